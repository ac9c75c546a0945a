"""What every benchmark shares: the machine description, timing, result files, and running a
grid of cells here or as a SLURM job array.

A benchmark is a list of *cells* (plain dicts: one configuration to measure) and a function
that measures one cell and returns a row (a flat dict). `run_cells` runs them one after the
other in this process, in worker processes of the cells' world size (`torchrun` for W > 1),
or as a SLURM job array through our launcher's executor, and returns the rows in cell order.
`write_results` puts rows, a markdown table and the machine description in
`benchmarks/results/<benchmark>/<machine>/`.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"


def _cpuinfo(key: str) -> str | None:
    """The first `key` line of /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_bf16() -> list[str]:
    """The CPU's bf16 matrix instructions: two CPUs of one model name may differ here, and
    without them bf16 is emulated, many times slower than fp32."""
    flags = set((_cpuinfo("flags") or "").split())
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]


def machine(world_size: int = 1) -> dict:
    """What the numbers were measured on; written beside them."""
    import deepspeed

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cpu_bf16": cpu_bf16(), "cores": os.cpu_count(),
            "gpu": gpu, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "threads": torch.get_num_threads(), "world_size": world_size, "date": time.strftime("%Y-%m-%d"),
            "load_avg_1min": os.getloadavg()[0]}  # > cores means something else competed for the CPU


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class DispatchCount(TorchDispatchMode):
    """The ATen ops run inside `with` (views included; on a GPU, about the kernels launched), how
    many of them read a tensor's value back to the host, which on a GPU waits until every kernel
    queued before it has run, and how often the whole device was synchronized (torch.cuda's or
    DeepSpeed's accelerator's `synchronize`, which no op shows): `.ops`, `.host_reads`, `.syncs`
    after the block. Counted the same on CPU, where no timing shows them."""

    HOST_READS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                            torch.ops.aten.nonzero.default, torch.ops.aten.equal.default})

    def __init__(self):
        super().__init__()
        self.ops = self.host_reads = self.syncs = 0
        self._syncing = False  # DeepSpeed's CUDA accelerator synchronizes through torch.cuda: count once

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func in self.HOST_READS
        return func(*args, **(kwargs or {}))

    def _counted(self, synchronize):
        def counted(*args, **kwargs):
            self.syncs += not self._syncing
            outer, self._syncing = self._syncing, True
            try:
                return synchronize(*args, **kwargs)
            finally:
                self._syncing = outer
        return counted

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        self._patched = [(torch.cuda, "synchronize", torch.cuda.synchronize),
                         (get_accelerator(), "synchronize", get_accelerator().synchronize)]
        for owner, name, synchronize in self._patched:
            setattr(owner, name, self._counted(synchronize))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, synchronize in self._patched:
            setattr(owner, name, synchronize)
        return super().__exit__(*exc)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code inside `with`: CUDA's allocator peak on a GPU; on CPU the peak
    resident set size above the process's size at entry, sampled every 2 ms by a thread (torch's
    CPU allocator keeps no statistics). `.peak_mb` after the block."""

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = 0.0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._done.set()
        self._thread.join()
        self.peak_mb = (max(self._peak, _rss_bytes()) - self._base) / 2**20


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless, on clusters
    too); imported on demand so that workers and tests of the measuring code never load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a reduced grid that runs in a few minutes here")
    parser.add_argument("--machine-name", default=None, help="results folder name (default: the host name)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where results/<benchmark>/<machine>/ goes")
    parser.add_argument("--jobs", type=int, default=1, help="cells measured at once here (each gets cores/jobs "
                        "threads); keep 1 where timings are the point")
    slurm = parser.add_argument_group("SLURM (run the cells as a job array through our launcher)")
    slurm.add_argument("--slurm", action="store_true")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--account", default="")
    slurm.add_argument("--qos", default="")
    slurm.add_argument("--time", default="60", help="per array task")
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=int, default=0)
    slurm.add_argument("--constraint", default="")


def results_folder(benchmark: str, machine_name: str | None, results_dir: str | Path = RESULTS) -> Path:
    folder = Path(results_dir) / benchmark / (machine_name or socket.gethostname())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(folder: Path, rows: list[dict], markdown: str, world_size: int = 1, **extra) -> None:
    """results.json (machine + rows + extra), results.csv (the rows) and results.md."""
    (folder / "results.json").write_text(
        json.dumps({"machine": machine(world_size), **extra, "rows": rows}, indent=1) + "\n")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(folder / "results.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(markdown.rstrip() + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# Two-sided 95% critical values of Student's t by degrees of freedom (scipy is not a dependency);
# from 30 on, the normal's 1.96 is within 2%.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045)


def t_critical(df: float) -> float:
    """t quantile 0.975 for `df` degrees of freedom (rounded down: a slightly wider interval)."""
    df = int(df)
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval); half-width 0 for a single value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_critical(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def difference_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), half-width of Welch's 95% interval for it)."""
    if len(a) < 2 or len(b) < 2:
        return statistics.mean(a) - statistics.mean(b), float("inf")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return statistics.mean(a) - statistics.mean(b), 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return statistics.mean(a) - statistics.mean(b), t_critical(df) * (va + vb) ** 0.5


def loss_seconds(objective_cfg, batch: int, dim: int, device, repeats: int) -> float:
    """Median forward+backward of an objective alone on random tower-sized embeddings. With a
    process group of several ranks every rank must call it (cross_rank and InfoNCE communicate)."""
    from cliplite_dist.objectives import build_objective

    objective = build_objective(objective_cfg, dim).to(device)
    image = torch.randn(batch, dim, device=device, requires_grad=True)
    text = torch.randn(batch, dim, device=device, requires_grad=True)
    return timed(lambda: objective(image, text).loss.backward(), repeats)


def engine_step(cfg, device) -> tuple[Callable[[], None], int, int]:
    """(one whole DeepSpeed step: towers + objective + optimizer, on in-memory inputs so no data
    loading is timed; the towers' embedding width; the parameter count). `cfg` is a
    cliplite_dist Config; the process group must exist."""
    from cliplite_dist.engine import build_engine
    from cliplite_dist.models import build_model, image_size

    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, device)
    size = image_size(cfg.model)
    batch = cfg.data.batch_size
    images = torch.randn(batch, 3, size, size, device=device, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a large red circle left of a small blue square"] * batch).to(device)

    def step() -> None:
        out = info.engine(images, tokens)
        info.engine.backward(out.loss)
        info.step()

    return step, towers.embed_dim, sum(p.numel() for p in model.parameters())


def engine_step_rate(cfg, device, repeats: int) -> tuple[float, int, int]:
    """(samples/s per rank of whole DeepSpeed steps (`engine_step`), embedding width, parameters)."""
    step, dim, params = engine_step(cfg, device)
    return cfg.data.batch_size / timed(step, repeats), dim, params


# ---- running cells -------------------------------------------------------------------------------
def cell_key(cell: dict) -> str:
    """A cell's identity: its settings as canonical JSON."""
    return json.dumps(cell, sort_keys=True)


class CellCache:
    """Rows of finished cells, one JSON line each, appended the moment a cell is measured: a grid
    that is interrupted (a session's end, a preemption) and run again skips the cells it has."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        entries = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return {cell_key(entry["cell"]): entry["row"] for entry in entries}

    def add(self, cell: dict, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # parallel workers append to the same file
            out.write(json.dumps({"cell": cell, "row": row}) + "\n")


def _worker_command(script: Path, world_size: int, cells_file: Path, rows_file: Path,
                    cache: Path | None) -> list[str]:
    args = ["--worker", str(cells_file), str(rows_file), *([str(cache)] if cache else [])]
    if world_size == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            str(script), *args]


def balanced_groups(index: list[int], cost: Callable[[int], float], groups: int) -> list[list[int]]:
    """`index` split into `groups` lists of about equal total cost (longest first, each to the
    least loaded group), each kept in its original order."""
    loads, parts = [0.0] * groups, [[] for _ in range(groups)]
    for i in sorted(index, key=cost, reverse=True):
        g = loads.index(min(loads))
        loads[g] += cost(i)
        parts[g].append(i)
    return [sorted(part) for part in parts if part]


def run_cells_local(script: Path, cells: list[dict], jobs: int = 1, cache: CellCache | None = None,
                    cost: Callable[[dict], float] = lambda cell: 1.0) -> list[dict]:
    """Each group of cells with the same `world_size` in worker processes, so process start-up
    and the process group are paid once per worker, not per cell. `jobs` workers run at once
    (a cell of W ranks counts W), the cells split between them by `cost`, each worker given an
    equal share of the cores as torch threads. If a worker fails, its rows measured so far stay
    on disk (and in `cache`) and the error names them."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:
        print(f"warning: load average {load:.1f} on {cores} cores: other work will skew the timings", flush=True)
    rows: list[dict | None] = [None] * len(cells)
    tmp = Path(tempfile.mkdtemp(prefix="cliplite-bench-"))
    for size in sorted({cell.get("world_size", 1) for cell in cells}):
        index = [i for i, cell in enumerate(cells) if cell.get("world_size", 1) == size]
        parts = balanced_groups(index, lambda i: cost(cells[i]), max(1, jobs // size))
        threads = max(1, cores // (len(parts) * size))
        procs = []
        for n, part in enumerate(parts):
            cells_file, rows_file = tmp / f"cells-{size}-{n}.json", tmp / f"rows-{size}-{n}.json"
            cells_file.write_text(json.dumps([cells[i] for i in part]))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = _worker_command(script, size, cells_file, rows_file, cache.path if cache else None)
            procs.append((subprocess.Popen(command, cwd=REPO, env=env), part, cells_file, rows_file))
        failed = [(cells_file, rows_file) for proc, _, cells_file, rows_file in procs if proc.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} {size}-rank worker(s) of {script.name} failed; the cells they "
                               f"were given and the rows they measured: {failed}")
        for _, part, _, rows_file in procs:
            for i, row in zip(part, json.loads(rows_file.read_text())):
                rows[i] = row
    shutil.rmtree(tmp)
    return rows  # type: ignore[return-value]


def worker_main(measure: Callable[[dict], dict | None], cells_file: str, rows_file: str,
                cache: str | None = None) -> None:
    """Inside a worker: measure every cell; rank 0 (the only rank that returns rows) writes them
    after each cell, and adds each to the cache, so a crash keeps what was measured."""
    rows = []
    for n, cell in enumerate(json.loads(Path(cells_file).read_text()), 1):
        row = measure(cell)
        if row is not None:
            rows.append(row)
            Path(rows_file).write_text(json.dumps(rows))
            if cache:
                CellCache(Path(cache)).add(cell, row)
            print(f"[{n}] {json.dumps(row)}", flush=True)


def entry_point(main: Callable[[], None], measure: Callable[[dict], dict | None]) -> None:
    """A benchmark script's `__main__`: a worker started by `run_cells_local`
    (`--worker CELLS ROWS [CACHE]`) or the benchmark itself."""
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--worker":
        worker_main(measure, *sys.argv[2:])
    else:
        main()


class _ArrayTask:
    """One SLURM array task: measure one cell in a process of its own (module-level, picklable)."""

    def __init__(self, script: Path):
        self.script = script

    def __call__(self, cell: dict) -> dict | None:
        sys.path.insert(0, str(self.script.parent))
        module = __import__(self.script.stem)
        return module.measure(cell)


def run_cells_slurm(script: Path, cells: list[dict], args: argparse.Namespace, benchmark: str) -> list[dict]:
    """The cells as SLURM job arrays (one array per world size, one array task per cell, each with
    the cell's number of ranks) through our launcher's executor; waits for every task and
    returns rank 0's rows."""
    from cliplite_dist.config import Config
    from cliplite_dist.launch.submit import SlurmOptions, make_executor

    sizes = {cell.get("world_size", 1) for cell in cells}
    rows: list[dict | None] = [None] * len(cells)
    for size in sorted(sizes):
        index = [i for i, cell in enumerate(cells) if cell.get("world_size", 1) == size]
        cfg = Config()
        cfg.run.output_dir, cfg.run.name = str(Path(args.results_dir) / benchmark / "slurm-jobs"), f"bench-{benchmark}"
        gpus = args.gpus_per_node  # on GPUs a cell of W ranks spans W / gpus-per-node nodes
        nodes = -(-size // gpus) if gpus else 1
        opts = SlurmOptions(nodes=nodes, tasks_per_node=0 if gpus else size, gpus_per_node=min(gpus, size),
                            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                            cpus_per_task=args.cpus_per_task, constraint=args.constraint, max_requeues=0,
                            job_name=f"bench-{benchmark}")
        executor = make_executor(opts, cfg, local=False)
        executor.update_parameters(setup=[f"export PYTHONPATH={BENCH_DIR}:{REPO}:${{PYTHONPATH:-}}"])
        jobs = executor.map_array(_ArrayTask(BENCH_DIR / script.name), [cells[i] for i in index])
        print(f"submitted {len(jobs)} array tasks ({size} rank(s) each): job {jobs[0].job_id.split('_')[0]}; "
              f"logs in {executor.folder}", flush=True)
        for i, job in zip(index, jobs):
            rows[i] = job.results()[0]  # rank 0's row
    return rows  # type: ignore[return-value]


def run_cells(script: str, cells: list[dict], args: argparse.Namespace, benchmark: str,
              cache: CellCache | None = None, cost: Callable[[dict], float] = lambda cell: 1.0) -> list[dict]:
    """Rows of `cells` in their order: from `cache` for cells measured before, the rest measured
    here (`args.jobs` at once) or as SLURM job arrays."""
    path = Path(script).resolve()
    done = cache.rows() if cache else {}
    todo = [cell for cell in cells if cell_key(cell) not in done]
    if todo:
        print(f"{len(todo)} cell(s) to measure, {len(cells) - len(todo)} from {cache.path if cache else ''}", flush=True)
    if todo and args.slurm:
        measured = run_cells_slurm(path, todo, args, benchmark)
        for cell, row in zip(todo, measured):
            if cache and row is not None:
                cache.add(cell, row)
    elif todo:
        measured = run_cells_local(path, todo, getattr(args, "jobs", 1), cache, cost)
    new = {cell_key(cell): row for cell, row in zip(todo, measured)} if todo else {}
    return [done.get(cell_key(cell)) or new[cell_key(cell)] for cell in cells]
