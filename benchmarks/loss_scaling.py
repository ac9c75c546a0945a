"""How each loss scales with the global batch: compute, memory and communication.

1. One process, the loss alone on random embeddings of width --dim (512: ViT-B/32's): median
   forward+backward time and peak memory at global batch 256 ... 65,536 (--quick: 256 ... 4,096).
   Points whose predicted memory exceeds --max-gb are recorded as skipped, never started.
   cross_rank is left out here: on one process it is shift, the same computation.
2. Bytes each rank sends + receives in one forward+backward: a closed formula in (W, b, d,
   element size) derived from the objectives' code, and the bytes of the tensors actually passed
   to torch.distributed during one step on 2 gloo ranks; the two must agree (`match`).

Writes results.{json,csv,md} and loss_scaling.png under
`benchmarks/results/loss_scaling/<machine>/`.

    python benchmarks/loss_scaling.py --quick --machine-name NAME     # 1 to 3 minutes on 2 cores
    python benchmarks/loss_scaling.py --machine-name NAME             # about 6 minutes on 2 idle cores
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import inspect
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from common import (PeakMemory, add_common_args, entry_point, markdown_table, pyplot, results_folder, run_cells,
                    save_figure, timed, write_results)

BENCHMARK = "loss_scaling"
ROWS = {  # row name -> (objective.name, objective.negatives)
    "infonce": ("infonce", "shift"),
    "siglip": ("siglip", "shift"),
    "cliplite-shift": ("cliplite", "shift"),
    "cliplite-random": ("cliplite", "random"),
    "cliplite-cross_rank": ("cliplite", "cross_rank"),
}
ONE_PROCESS_ROWS = tuple(row for row in ROWS if row != "cliplite-cross_rank")  # cross_rank is shift there
# fp32 elements alive at the peak of one forward+backward, as (x B^2, x B*d), to skip points before
# they run out of memory. B^2: InfoNCE's two logits matrices with their saved products, softmax
# outputs and gradients; SigLIP's logits, labels and their product, log-sigmoid and gradients.
# B*d: features, head activations and gradients. Measured here (d=512, B from 1k to 16k): InfoNCE
# 4.5 B^2 + 4 B d, CLIP-Lite 14 to 17 B d; rounded up for safety (SigLIP: as InfoNCE).
PEAK_ELEMENTS = {
    "infonce": (5.0, 8.0),
    "siglip": (5.0, 8.0),
    "cliplite-shift": (0.0, 20.0),
    "cliplite-random": (0.0, 20.0),
}
ANALYTIC_WORLDS = (2, 8, 64, 512)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STEADY_MMAP_BYTES = 32 * 2**20  # where glibc's own threshold ends up after a few large frees


# ---- analytic communication ------------------------------------------------------------------------
def analytic_bytes(row: str, world: int, batch: int, dim: int, elem_bytes: int = 4) -> int:
    """Bytes one rank sends + receives in one forward+backward of the loss (ring collectives).

    `batch` is the per-rank batch b, `dim` the width of the features that travel (the tower
    embedding for InfoNCE, the critic head's output for CLIP-Lite), `elem_bytes` their element
    size: the objectives normalise in at least float32, so 4 also under bf16 towers.

    InfoNCE: forward all_gather of the [b, 2d] image|text features, (W-1) b 2d e sent and as
    much received; backward all_reduce of the [W b, 2d] gathered gradient, 2 (W-1)/W W b 2d e
    each way. Total 12 (W-1) b d e. SigLIP (open_clip's ring): every other rank's [b, d] text
    features pass through, W-1 tensors sent and W-1 received forward, their gradients the same
    backward: 4 (W-1) b d e. cross_rank: one [b, d] tensor to the next rank and one from the
    previous, forward and backward: 4 b d e for any W >= 2. Other negatives: local, 0.
    """
    if world < 2 or row not in ("infonce", "siglip", "cliplite-cross_rank"):
        return 0
    if row == "infonce":
        return 12 * (world - 1) * batch * dim * elem_bytes
    if row == "siglip":
        return 4 * (world - 1) * batch * dim * elem_bytes
    return 4 * batch * dim * elem_bytes


def logits_shape(row: str, world: int, batch: int) -> str:
    """The score matrices one rank holds: InfoNCE's and SigLIP's grow with the global batch,
    CLIP-Lite's do not."""
    if row == "infonce":
        return f"2 x {batch} x {world * batch}"
    if row == "siglip":
        return f"{world} x {batch} x {batch}"
    return f"2 x {batch}"


# ---- measured communication ------------------------------------------------------------------------
def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _both(n: float) -> tuple[float, float]:
    return n, n


# (sent, received) by one rank for one call, given the call's bound arguments and the group's size,
# under the ring algorithms the analytic formulas assume.
TRAFFIC: dict[str, Callable[[dict, int], tuple[float, float]]] = {
    "all_gather_into_tensor": lambda a, w: _both((w - 1) * _nbytes(a["input_tensor"])),
    "all_gather": lambda a, w: _both((w - 1) * _nbytes(a["tensor"])),
    "all_reduce": lambda a, w: _both(2 * (w - 1) / w * _nbytes(a["tensor"])),
    "reduce_scatter_tensor": lambda a, w: _both((w - 1) * _nbytes(a["output"])),
    "reduce_scatter": lambda a, w: _both((w - 1) * _nbytes(a["output"])),
    "broadcast": lambda a, w: _both((w - 1) / w * _nbytes(a["tensor"])),
    "send": lambda a, w: (_nbytes(a["tensor"]), 0),
    "isend": lambda a, w: (_nbytes(a["tensor"]), 0),
    "recv": lambda a, w: (0, _nbytes(a["tensor"])),
    "irecv": lambda a, w: (0, _nbytes(a["tensor"])),
}


class CommCounter:
    """Counts what this rank passes to torch.distributed while active.

    Replaces the communication functions by counting wrappers, in `torch.distributed` (the
    objectives call `dist.<name>` at call time) and in `distributed_c10d` (where torch checks P2P
    ops by identity, `op is isend`, and where `batch_isend_irecv` finds the functions it calls),
    and restores the originals on exit. `batch_isend_irecv` itself moves nothing: its sends and
    receives are counted as the `isend`/`irecv` calls it makes.
    """

    def __enter__(self) -> "CommCounter":
        self.sent = self.received = 0.0
        self.calls: Counter[str] = Counter()
        self._patched: list[tuple[object, str, Callable]] = []
        self._wrapper_of: dict[Callable, Callable] = {}
        for name in (*TRAFFIC, "batch_isend_irecv"):
            original = getattr(dist, name)
            self._wrapper_of[original] = self._wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self._patched.append((module, name, original))
                    setattr(module, name, self._wrapper_of[original])
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in self._patched:
            setattr(module, name, original)

    @property
    def total(self) -> int:
        return round(self.sent + self.received)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            self.calls[name] += 1
            if name == "batch_isend_irecv":  # ops built before counting began hold the originals
                for op in arguments["p2p_op_list"]:
                    op.op = self._wrapper_of.get(op.op, op.op)
            else:
                sent, received = TRAFFIC[name](arguments, dist.get_world_size(arguments.get("group")))
                self.sent += sent
                self.received += received
            return fn(*args, **kwargs)

        return counted


def build(row: str, dim: int) -> torch.nn.Module:
    from cliplite_dist.config import ObjectiveConfig
    from cliplite_dist.objectives import build_objective

    name, negatives = ROWS[row]
    return build_objective(ObjectiveConfig(name=name, negatives=negatives), dim)


def step_fn(objective: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> Callable[[], None]:
    """One forward+backward as in training: fresh gradients for the objective and both towers'
    embeddings (what backward hands to the towers), none accumulated across calls."""

    def step() -> None:
        objective.zero_grad(set_to_none=True)
        image.grad = text.grad = None
        objective(image, text).loss.backward()

    return step


def embeddings(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, dim, generator=generator).requires_grad_() for _ in range(2))


def count_step(row: str, batch: int, dim: int) -> CommCounter:
    """Communication of one forward+backward of `row` on this rank's random batch (every rank of
    the default group must call it together)."""
    torch.manual_seed(0)  # the same critic heads on every rank, as DeepSpeed broadcasts them
    step = step_fn(build(row, dim), *embeddings(batch, dim, seed=1 + dist.get_rank()))
    with CommCounter() as counter:
        step()
    return counter


# ---- one cell ----------------------------------------------------------------------------------------
def predicted_gb(row: str, batch: int, dim: int) -> float:
    squares, rows = PEAK_ELEMENTS[row]
    return 4 * (squares * batch * batch + rows * batch * dim) / 2**30


def malloc_thresholds(mmap_bytes: int) -> None:
    """Blocks of at least `mmap_bytes` get a mapping of their own, unmapped when freed, and free
    heap above twice that is given back (glibc's own ratio). Setting them stops glibc adapting them."""
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_bytes)


def peak_mb(step: Callable[[], None], min_seconds: float = 0.2) -> float:
    """Peak memory of `step`, repeated for at least `min_seconds` so that the 2 ms sampler of
    PeakMemory sees the peak of sub-millisecond steps too (each step frees what it allocates).

    PeakMemory reads the resident set on CPU, which glibc blurs: freed blocks stay in its heap
    and are reused unseen, and a trim during the step can cancel a growth. So while it samples,
    the heap starts trimmed and every block above 128 KiB is mapped fresh. Afterwards the
    thresholds go back to STEADY_MMAP_BYTES: small ones made steps up to 20x slower here (page
    faults and unmaps on every step), so they must not stay for the next cell's timing.
    """
    malloc_thresholds(128 * 1024)
    ctypes.CDLL(None).malloc_trim(0)
    with PeakMemory() as memory:
        start = time.perf_counter()
        step()
        while time.perf_counter() - start < min_seconds:
            step()
    malloc_thresholds(STEADY_MMAP_BYTES)
    return memory.peak_mb


def repeats_for(batch: int) -> tuple[int, int]:
    """(warmup, repeats) of the timing: fewer for big batches, whose steps take seconds and whose
    first call's one-off costs (thread pools, lazy initialisation) are lost in them."""
    if batch <= 1024:
        return 2, 10
    if batch <= 4096:
        return 1, 5
    if batch <= 16384:
        return 0, 3
    return 0, 1


def measure_one_process(cell: dict) -> dict:
    row, batch, dim = cell["row"], cell["batch"], cell["dim"]
    out = {"part": "one process", "row": row, "batch": batch, "dim": dim,
           "predicted_gb": round(predicted_gb(row, batch, dim), 3)}
    if out["predicted_gb"] > cell["max_gb"]:
        return {**out, "status": f"oom/skipped: predicted {out['predicted_gb']:.1f} GB > --max-gb {cell['max_gb']:.1f}"}
    torch.manual_seed(0)
    step = step_fn(build(row, dim), *embeddings(batch, dim, seed=1))
    warmup, repeats = repeats_for(batch)
    seconds = timed(step, repeats, warmup)
    memory = peak_mb(step)  # after timing, so that one-off first-call allocations are not counted
    return {**out, "status": "ok", "fwd_bwd_ms": round(1000 * seconds, 3), "peak_mb": round(memory, 1),
            "repeats": repeats}


def measure_communication(cell: dict) -> dict | None:
    row, batch, dim, world = cell["row"], cell["batch"], cell["dim"], dist.get_world_size()
    counter = count_step(row, batch, dim)
    if dist.get_rank() != 0:
        return None
    analytic = analytic_bytes(row, world, batch, dim)
    return {"part": "communication", "row": row, "world_size": world, "batch": batch, "dim": dim,
            "logits_per_rank": logits_shape(row, world, batch), "analytic_bytes": analytic,
            "measured_bytes": counter.total, "measured_sent": round(counter.sent),
            "measured_received": round(counter.received),
            "calls": ", ".join(f"{name} x{n}" for name, n in sorted(counter.calls.items())) or "none",
            "match": counter.total == analytic}


def measure(cell: dict) -> dict | None:
    """The row of one cell on rank 0, None on the other ranks."""
    from cliplite_dist.config import EngineConfig
    from cliplite_dist.distributed import DistEnv, init_distributed, pick_device
    from cliplite_dist.engine import set_cuda_math

    env = DistEnv.from_environ()
    device = pick_device("auto", env)
    set_cuda_math(EngineConfig(), device)  # on a GPU, the objectives compute as in training
    init_distributed(env, device)
    malloc_thresholds(STEADY_MMAP_BYTES)  # every cell timed alike, the first too
    if cell["part"] == "communication":
        return measure_communication(cell)
    return measure_one_process(cell)


# ---- the grid and the report ----------------------------------------------------------------------
def default_max_gb() -> float:
    """Half of the memory available now: other jobs share this machine, and a predicted figure
    can be off by a few tens of percent."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 2 / 2**30
    raise RuntimeError("no MemAvailable in /proc/meminfo: pass --max-gb")


def cells(args: argparse.Namespace) -> list[dict]:
    top = 4096 if args.quick else 65536
    batches = [2**k for k in range(8, top.bit_length())]
    grid = [{"part": "one process", "row": row, "batch": batch, "dim": args.dim, "max_gb": args.max_gb,
             "world_size": 1} for row in ONE_PROCESS_ROWS for batch in batches]
    comm_batches = (256,) if args.quick else (256, 4096)
    grid += [{"part": "communication", "row": row, "batch": batch, "dim": args.dim, "world_size": 2}
             for row in ROWS for batch in comm_batches]
    return grid


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(rows: list[dict], dim: int, machine_name: str, max_gb: float) -> str:
    timing = [r for r in rows if r["part"] == "one process"]
    comm = [r for r in rows if r["part"] == "communication"]
    lines = [
        f"# Loss scaling on {machine_name}: forward+backward of each loss alone on random fp32 "
        f"embeddings (d={dim}), one process; bytes per rank per step, analytic and measured on 2 gloo ranks",
        "",
        f"## Time and peak memory vs global batch (one process; skipped above a predicted {max_gb:.1f} GB)",
        "",
        markdown_table(["objective", "global batch", "fwd+bwd (ms)", "peak memory (MB)", "status"],
                       [[r["row"], r["batch"], r.get("fwd_bwd_ms", "-"), r.get("peak_mb", "-"), r["status"]]
                        for r in timing]),
        "",
        "cliplite-cross_rank is not in this table: on one process it is shift.",
        "",
        "## Communication per rank per step, measured on 2 gloo ranks",
        "",
        markdown_table(["objective", "W", "b per rank", "logits per rank", "analytic (MiB)", "measured (MiB)",
                        "calls", "match"],
                       [[r["row"], r["world_size"], r["batch"], r["logits_per_rank"], _mb(r["analytic_bytes"]),
                         _mb(r["measured_bytes"]), r["calls"], r["match"]] for r in comm]),
        "",
        "## Analytic communication per rank per step at b = 256 per rank (MiB sent + received)",
        "",
        markdown_table(["objective", *(f"W={w}" for w in ANALYTIC_WORLDS), "logits per rank at W=512"],
                       [[row, *(_mb(analytic_bytes(row, w, 256, dim)) for w in ANALYTIC_WORLDS),
                         logits_shape(row, ANALYTIC_WORLDS[-1], 256)] for row in ROWS]),
        "",
        "Ring collectives: all_gather moves (W-1) shares each way, all_reduce 2 (W-1)/W of the tensor. "
        "Not included: the engine's all-reduce of the objective's parameter gradients (CLIP-Lite's critic "
        "heads; InfoNCE has only its temperature).",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in ONE_PROCESS_ROWS:
        points = [r for r in rows if r["part"] == "one process" and r["row"] == row and r["status"] == "ok"]
        batches = [r["batch"] for r in points]
        left.plot(batches, [r["fwd_bwd_ms"] for r in points], marker="o", label=row)
        right.plot(batches, [r["peak_mb"] for r in points], marker="o", label=row)
    for axis, label in ((left, "forward+backward (ms)"), (right, "peak memory (MB)")):
        axis.set(xscale="log", yscale="log", xlabel="global batch", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    left.legend()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512)")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="skip points predicted to need more (default: half of the available memory)")
    args = parser.parse_args()
    args.max_gb = args.max_gb or default_max_gb()
    rows = run_cells(__file__, cells(args), args, BENCHMARK)
    folder = results_folder(BENCHMARK, args.machine_name, args.results_dir)
    markdown = report(rows, args.dim, folder.name, args.max_gb)
    write_results(folder, rows, markdown, world_size=2, dim=args.dim, max_gb=args.max_gb, quick=args.quick)
    plot(rows, folder / "loss_scaling.png")
    print(markdown)
    mismatched = [r for r in rows if r["part"] == "communication" and not r["match"]]
    if mismatched:
        raise SystemExit(f"measured != analytic communication for {len(mismatched)} cell(s), see results.md")


if __name__ == "__main__":
    entry_point(main, measure)
