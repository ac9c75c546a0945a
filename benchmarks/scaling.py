"""Samples/s vs number of ranks, weak-scaling efficiency, and a cost model that projects the step
time of each objective to 8 ... 1024 GPUs.

Measured (per objective, per world size W, the per-rank batch fixed: weak scaling): samples/s of
whole DeepSpeed steps (towers + objective + optimizer, data-parallel gradient all-reduce) on
in-memory inputs, the loss's forward+backward alone, and on W > 1 the achieved all-reduce bus
bandwidth and a feature all-gather's time. Efficiency(W) = rate(W) / (W x rate(1)). On a CPU
machine every cell runs with the same threads per rank (cores / the largest W), so that ranks
behave like separate devices instead of splitting one's cores.

Cost model (documented in benchmarks/README.md), per rank and step, for per-rank batch b,
embedding width d, element size e, P parameters, bus bandwidth BW, per-message latency a:
    T(W) = T_towers(b) + T_loss(b, W) + T_grad_allreduce(W) + T_features(W)
    T_grad_allreduce = 2 (W-1)/W * P * 4 bytes / BW + 2 (W-1) a   (ring, fp32 gradients; the
                       same for both objectives; counted without overlap as an upper bound)
    InfoNCE:  T_loss = t0 + c * b * (W b)   (its logits are b x W b; t0 and c are fitted to the
              single-process loss measured at batch b and 16 b, whose logits are b^2 and 256 b^2)
              T_features = 6 (W-1) b d e / BW + 4 (W-1) a   (forward: ring all-gather of the
              [b, 2d] image+text features, (W-1)/W x W b 2d e; backward: ring all-reduce of the
              [W b, 2d] gradient, 2 (W-1)/W x W b 2d e; see gather.py)
    CLIP-Lite shift / random: T_loss(b, W) = T_loss(b, 1), T_features = 0
    CLIP-Lite cross_rank: T_features = 2 b d e / BW + 2 a   (one exchange forward, one backward)
T_towers is measured here (or given with --towers-ms for other hardware), BW and a are
parameters (--bandwidth-gbs, --latency-us); the measured W=2 run checks the model on this
machine with the bandwidth measured here.

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py --model ViT-B-32 --batch 256 --slurm --partition gpu \
        --gpus-per-node 8 --ranks 1,8,16,32
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from common import (add_common_args, engine_step_rate, entry_point, loss_seconds, markdown_table, pyplot,
                    results_folder, run_cells, save_figure, timed, write_results)

OBJECTIVES = {  # row -> (objective, negatives)
    "infonce": ("infonce", "shift"),
    "cliplite-shift": ("cliplite", "shift"),
    "cliplite-cross_rank": ("cliplite", "cross_rank"),
}
PROJECT_RANKS = (1, 8, 16, 32, 64, 128, 256, 512, 1024)


# ---- measuring ---------------------------------------------------------------------------------------
def bus_bandwidth(device, megabytes: int = 32) -> float:
    """Achieved all-reduce bus bandwidth in GB/s (the nccl-tests convention: 2 (W-1)/W x bytes / t)."""
    world = dist.get_world_size()
    tensor = torch.ones(megabytes * 2**20 // 4, device=device)
    seconds = timed(lambda: dist.all_reduce(tensor), repeats=5, warmup=1)
    return 2 * (world - 1) / world * tensor.numel() * 4 / seconds / 1e9


def measure(cell: dict) -> dict | None:
    from cliplite_dist.config import Config
    from cliplite_dist.distributed import DistEnv, init_distributed, pick_device

    env = DistEnv.from_environ()
    device = pick_device("auto", env)
    if device.type == "cpu":  # ranks on one CPU machine share its cores: every cell, whatever its
        torch.set_num_threads(cell["threads"])  # rank count, gets the same cores per rank
    init_distributed(env, device)
    cfg = Config()
    cfg.model.name, cfg.data.batch_size = cell["model"], cell["batch"]
    cfg.objective.name, cfg.objective.negatives = OBJECTIVES[cell["row"]]
    rate, dim, params = engine_step_rate(cfg, device, cell["repeats"])
    loss_ms = 1000 * loss_seconds(cfg.objective, cell["batch"], dim, device, cell["repeats"] * 3)
    loss_ms_16x = None  # InfoNCE's quadratic term, for the cost model (one process: no exchange)
    if env.world_size == 1 and cfg.objective.name == "infonce":
        loss_ms_16x = 1000 * loss_seconds(cfg.objective, 16 * cell["batch"], dim, device, cell["repeats"])
    bandwidth = bus_bandwidth(device) if env.world_size > 1 else None
    gather_ms = None
    if env.world_size > 1:
        features = torch.randn(cell["batch"], dim, device=device)
        parts = [torch.empty_like(features) for _ in range(env.world_size)]
        gather_ms = 1000 * timed(lambda: dist.all_gather(parts, features), repeats=20)
    if not env.is_main:
        return None
    return {**cell, "ranks": env.world_size, "threads_per_rank": torch.get_num_threads(), "embed_dim": dim,
            "params": params, "samples_per_s": rate * env.world_size, "step_ms": 1000 * cell["batch"] / rate,
            "loss_ms": loss_ms, "loss_ms_16x_batch": loss_ms_16x, "bus_bandwidth_gbs": bandwidth,
            "feature_gather_ms": gather_ms, "device": str(device)}


# ---- the cost model -------------------------------------------------------------------------------
def infonce_loss_fit(loss_ms_b: float, loss_ms_16b: float) -> tuple[float, float]:
    """(t0, slope) with T(W) = t0 + slope * W for InfoNCE's loss at a fixed per-rank batch b: one
    process at batch b has b^2 logits (W = 1), at 16 b it has 256 b^2 (the logits of W = 256)."""
    slope = max(0.0, (loss_ms_16b - loss_ms_b) / 255)
    return loss_ms_b - slope, slope


def projected_ms(row: str, ranks: int, towers_ms: float, loss_ms_1: float, batch: int, dim: int, params: int,
                 bandwidth_gbs: float, latency_us: float, loss_ms_16b: float | None = None,
                 elem_bytes: int = 4) -> dict[str, float]:
    """Step time of one rank at `ranks` ranks, by part (see the module docstring)."""
    bw, a = bandwidth_gbs * 1e9, latency_us * 1e-6
    w = ranks
    grad = (2 * (w - 1) / w * params * 4 / bw + 2 * (w - 1) * a) if w > 1 else 0.0
    if row == "infonce":
        t0, slope = infonce_loss_fit(loss_ms_1, loss_ms_16b if loss_ms_16b is not None else loss_ms_1)
        loss = (t0 + slope * w) / 1000
        features = 6 * (w - 1) * batch * dim * elem_bytes / bw + 4 * (w - 1) * a
    else:
        loss = loss_ms_1 / 1000
        features = (2 * batch * dim * elem_bytes / bw + 2 * a) if row == "cliplite-cross_rank" and w > 1 else 0.0
    parts = {"towers_ms": towers_ms, "loss_ms": 1000 * loss, "grad_allreduce_ms": 1000 * grad,
             "features_ms": 1000 * features}
    parts["step_ms"] = sum(parts.values())
    return parts


def projections(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """From the one-rank measurements: each objective's projected step time at PROJECT_RANKS."""
    out = []
    for row in (r for r in rows if r["ranks"] == 1):
        towers_ms = args.towers_ms or (row["step_ms"] - row["loss_ms"])
        parts_at = {ranks: projected_ms(row["row"], ranks, towers_ms, row["loss_ms"], row["batch"], row["embed_dim"],
                                        row["params"], args.bandwidth_gbs, args.latency_us, row["loss_ms_16x_batch"])
                    for ranks in PROJECT_RANKS}
        base = parts_at[1]["step_ms"]
        out += [{"row": row["row"], "ranks": ranks, **parts, "base_step_ms": base,
                 "efficiency": base / parts["step_ms"]} for ranks, parts in parts_at.items()]
    return out


def model_check(rows: list[dict], latency_us: float) -> list[list]:
    """The cost model at the measured W > 1 points, with the bandwidth measured in that run."""
    checks = []
    ones = {r["row"]: r for r in rows if r["ranks"] == 1}
    for row in (r for r in rows if r["ranks"] > 1 and r["row"] in ones):
        one = ones[row["row"]]
        predicted = projected_ms(row["row"], row["ranks"], one["step_ms"] - one["loss_ms"], one["loss_ms"],
                                 row["batch"], row["embed_dim"], row["params"], row["bus_bandwidth_gbs"], latency_us,
                                 one["loss_ms_16x_batch"])
        checks.append([row["row"], row["ranks"], f"{row['step_ms']:.1f}", f"{predicted['step_ms']:.1f}",
                       f"{row['bus_bandwidth_gbs']:.2f}"])
    return checks


# ---- report ----------------------------------------------------------------------------------------
def plot(projected: list[dict], args: argparse.Namespace, folder) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in OBJECTIVES:
        points = [p for p in projected if p["row"] == row]
        if not points:
            continue
        ranks = [p["ranks"] for p in points]
        axes[0].plot(ranks, [p["step_ms"] for p in points], marker="o", label=row)
        axes[1].plot(ranks, [p["efficiency"] for p in points], marker="o", label=row)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (GPUs)")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("projected step time per rank (ms)")
    axes[1].set_ylabel("weak-scaling efficiency")
    fig.suptitle(f"cost model: {args.model}, per-rank batch {args.batch}, bus bandwidth {args.bandwidth_gbs} GB/s, "
                 f"latency {args.latency_us} us")
    save_figure(fig, folder / "projected_scaling.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--ranks", default="1,2", help="world sizes to measure")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--bandwidth-gbs", type=float, default=25.0,
                        help="cost model: all-reduce bus bandwidth per rank in GB/s (25: a 200 Gb/s NIC per GPU)")
    parser.add_argument("--latency-us", type=float, default=10.0, help="cost model: latency per message")
    parser.add_argument("--towers-ms", type=float, default=0.0,
                        help="cost model: towers' forward+backward+optimizer per step (default: measured here)")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    sizes = [int(w) for w in args.ranks.split(",")]
    threads = max(1, (os.cpu_count() or 1) // max(sizes))  # CPU only: one rank's share at the largest size
    cells = [dict(row=row, model=args.model, batch=args.batch, repeats=repeats, world_size=w, threads=threads)
             for w in sizes for row in OBJECTIVES if not (row == "cliplite-cross_rank" and w == 1)]
    rows = run_cells(__file__, cells, args, "scaling")
    ones = {r["row"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        base = ones.get(r["row"]) or ones["cliplite-shift"]  # cross_rank's one-rank point is shift
        r["efficiency"] = r["samples_per_s"] / (r["ranks"] * base["samples_per_s"])
    ones["cliplite-cross_rank"] = {**ones["cliplite-shift"], "row": "cliplite-cross_rank"}
    projected = projections(list(ones.values()), args)
    folder = results_folder("scaling", args.machine_name, args.results_dir)
    measured = markdown_table(
        ["objective", "ranks", "threads/rank", "samples/s (all ranks)", "step (ms)", "loss fwd+bwd (ms)",
         "weak-scaling efficiency", "all-reduce bus GB/s", "feature all-gather (ms)"],
        [[r["row"], r["ranks"], r["threads_per_rank"], f"{r['samples_per_s']:.1f}", f"{r['step_ms']:.1f}",
          f"{r['loss_ms']:.2f}", f"{r['efficiency']:.2f}",
          "" if r["bus_bandwidth_gbs"] is None else f"{r['bus_bandwidth_gbs']:.2f}",
          "" if r["feature_gather_ms"] is None else f"{r['feature_gather_ms']:.2f}"] for r in rows])
    check = markdown_table(["objective", "ranks", "measured step (ms)", "cost model (ms)", "bus GB/s used"],
                           model_check(rows, args.latency_us))
    proj = markdown_table(
        ["objective", "ranks", "towers (ms)", "loss (ms)", "gradient all-reduce (ms)", "feature exchange (ms)",
         "step (ms)", "efficiency"],
        [[p["row"], p["ranks"], f"{p['towers_ms']:.1f}", f"{p['loss_ms']:.2f}", f"{p['grad_allreduce_ms']:.2f}",
          f"{p['features_ms']:.3f}", f"{p['step_ms']:.1f}", f"{p['efficiency']:.3f}"] for p in projected])
    text = (f"# Scaling: {args.model}, per-rank batch {args.batch}\n\n## Measured (weak scaling)\n\n{measured}\n\n"
            f"## Cost model against the measured multi-rank runs\n\n{check}\n\n"
            f"## Projection ({args.bandwidth_gbs} GB/s bus bandwidth, {args.latency_us} us latency, towers "
            f"{'given' if args.towers_ms else 'as measured here'})\n\n{proj}\n")
    write_results(folder, rows, text, world_size=max(r["ranks"] for r in rows), projection=projected,
                  bandwidth_gbs=args.bandwidth_gbs, latency_us=args.latency_us)
    plot(projected, args, folder)
    print(text)


if __name__ == "__main__":
    entry_point(main, measure)
