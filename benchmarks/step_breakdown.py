"""Where a training step's time goes, per objective, and CLIP-Lite's step against InfoNCE's.

For each objective on one process: forward+backward time of the objective alone on tower-sized
embeddings, and whole DeepSpeed steps (towers + objective + optimizer) on in-memory inputs (no
data loading). Both engines live in one process and their steps alternate (which goes first
swaps every round), so the two objectives see the same machine state: separate runs of one
configuration differ by up to 8% here, far more than the objectives do. The ratio of the two
step times is taken per round; its median and a bootstrap 95% interval say whether CLIP-Lite is
as fast as InfoNCE. `open_clip_train`'s own step (fp32 or `amp_bf16`, at ZeRO 0 as it has no
other) alternates with them, and InfoNCE ÷ it is taken the same way: the step alone, without
either trainer's data path (`vs_open_clip.py` runs both trainers whole). One more step of each is
counted op by op: the ATen ops it runs and how many read a value back to the host (each a wait
for the GPU's queue to drain; counted on CPU too), and one more for its matrix arithmetic
(torch's FLOP counter), so a step's time is also a rate: TFLOP/s, on a GPU against its peak.
With --compile, InfoNCE with compiled towers (`model.compile`) alternates beside the eager steps.
Writes `benchmarks/results/step_breakdown/<machine>/` (`step_breakdown_compiled/` with --compile).

    python benchmarks/step_breakdown.py                       # tiny-vit, batch 64, CPU
    python benchmarks/step_breakdown.py --model ViT-B-32 --batch 256   # on a GPU: bf16 (engine.precision=auto)
    python benchmarks/step_breakdown.py --precision bf16               # CPU in bf16: the step's ops and host reads
    python benchmarks/step_breakdown.py --compile                      # + InfoNCE with compiled towers
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
import typing
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cliplite_dist.config import Config, Precision
from cliplite_dist.distributed import DistEnv, init_distributed, pick_device
from cliplite_dist.engine import resolve_precision
from common import RESULTS, DispatchCount, engine_step, loss_seconds, markdown_table, results_folder, sync, \
    write_results

OBJECTIVES = ("cliplite", "infonce")
COMPILED = "infonce_compiled"  # InfoNCE with model.compile (--compile), beside the eager one
OPEN_CLIP_TRAIN = "open_clip_train"  # its own step beside ours, at the precisions it has without a grad scaler
THEIR_PRECISIONS = ("fp32", "bf16")
WARMUP_ROUNDS = 3


def interleaved_step_seconds(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each objective's step, one step of each per round, alternating the order."""
    for _ in range(WARMUP_ROUNDS):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        for name in (list(steps) if i % 2 == 0 else list(reversed(steps))):
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def open_clip_train_step(cfg: Config, precision: str, device: torch.device) -> Callable[[], None]:
    """`open_clip_train`'s own step at one rank (its `train_one_epoch`, which wraps nothing in DDP
    there) on a batch like `engine_step`'s: its model under autocast for bf16 (`amp_bf16`) over
    fp32 weights, `ClipLoss`, AdamW over its two decay groups with our optimizer settings, torch's
    `clip_grad_norm_` at optim.grad_clip, the logit-scale clamp. The step our InfoNCE is held
    against, without either trainer's data path."""
    import open_clip
    from open_clip.loss import ClipLoss

    from cliplite_dist.models import image_size, resolve_model_name

    name = resolve_model_name(cfg.model.name)
    model = open_clip.create_model(name, output_dict=True).to(device)
    plain = [p for n, p in model.named_parameters()  # its rule: no decay on gains, biases, the scale
             if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    plain_ids = {id(p) for p in plain}
    decayed = [p for p in model.parameters() if id(p) not in plain_ids]
    optimizer = torch.optim.AdamW([{"params": plain, "weight_decay": 0.0},
                                   {"params": decayed, "weight_decay": cfg.optim.weight_decay}],
                                  lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    loss_fn = ClipLoss()
    size = image_size(cfg.model)
    images = torch.randn(cfg.data.batch_size, 3, size, size, device=device)  # fp32: autocast casts
    tokens = open_clip.get_tokenizer(name)(["a large red circle left of a small blue square"] * cfg.data.batch_size)
    tokens = tokens.to(device)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(**model(images, tokens))
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def median_ratio_interval(ratios: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, 2.5th and 97.5th percentile of the median over bootstrap resamples)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=60, help="steps of each objective, alternating")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--precision", choices=typing.get_args(Precision), default="auto", help="engine.precision")
    parser.add_argument("--compile", action="store_true",
                        help="also InfoNCE with model.compile; results in step_breakdown_compiled/")
    parser.add_argument("--machine-name", default=None, help="results folder name (default: host)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where results/step_breakdown/<machine>/ goes")
    args = parser.parse_args()

    env = DistEnv.from_environ()
    device = pick_device("auto", env)
    init_distributed(env, device)
    cfgs, steps, dims = {}, {}, {}
    for name in (*OBJECTIVES, *([COMPILED] if args.compile else [])):
        cfg = Config()
        cfg.model.name, cfg.model.compile, cfg.data.batch_size = args.model, name == COMPILED, args.batch
        cfg.objective.name = "infonce" if name == COMPILED else name
        cfg.engine.zero_stage, cfg.engine.precision = args.zero_stage, args.precision
        cfgs[name] = cfg
        steps[name], dims[name], _ = engine_step(cfg, device)  # a compiled one compiles in the warm-up rounds
    precision = resolve_precision(cfgs["infonce"].engine, device)
    if precision in THEIR_PRECISIONS:
        steps[OPEN_CLIP_TRAIN] = open_clip_train_step(cfgs["infonce"], precision, device)
    times = interleaved_step_seconds(steps, args.rounds)
    # Not the compiled step's: under a dispatch mode torch.compile runs the code eagerly
    counts = {name: DispatchCount() for name in steps if name != COMPILED}
    flops = {}  # the step's matrix arithmetic, against which its time is a rate (on a GPU: of its peak)
    for name in counts:
        with counts[name]:
            steps[name]()
        with FlopCounterMode(display=False) as flop_count:
            steps[name]()
        flops[name] = flop_count.get_total_flops()
    if COMPILED in steps:
        flops[COMPILED] = flops["infonce"]  # the same arithmetic
    rows = [{"objective": name, "model": args.model, "batch": args.batch, "rounds": args.rounds,
             "device": device.type, "precision": precision,
             "zero_stage": 0 if name == OPEN_CLIP_TRAIN else args.zero_stage,
             "step_ms": 1000 * statistics.median(times[name]),
             "step_samples_per_s": args.batch / statistics.median(times[name]),
             "ops_per_step": counts[name].ops if name in counts else None,
             "host_reads_per_step": counts[name].host_reads if name in counts else None,
             "syncs_per_step": counts[name].syncs if name in counts else None,
             "tflop_per_step": flops[name] / 1e12,
             "tflop_per_s": flops[name] / 1e12 / statistics.median(times[name]),
             "loss_fwd_bwd_ms": None if name in (OPEN_CLIP_TRAIN, COMPILED) else
             1000 * loss_seconds(cfgs[name].objective, args.batch, dims[name], device, args.rounds * 5)}
            for name in steps]
    # one samples/s over another's, per round: the other's step time over the one's
    ratios = {f"{a}_over_{b}": median_ratio_interval([tb / ta for ta, tb in zip(times[a], times[b])])
              for a, b in (("cliplite", "infonce"), ("infonce", OPEN_CLIP_TRAIN), (COMPILED, "infonce"))
              if a in times and b in times}
    for row in rows:
        print(json.dumps(row))
    table = markdown_table(["objective", "model", "batch", "device", "precision", "ZeRO", "loss fwd+bwd (ms)",
                            "step (ms, median)", "full step (samples/s)", "TFLOP / step", "TFLOP/s", "ops / step",
                            "host reads / step", "device syncs / step"],
                           [[r["objective"], r["model"], r["batch"], r["device"], r["precision"], r["zero_stage"],
                             "-" if r["loss_fwd_bwd_ms"] is None else f"{r['loss_fwd_bwd_ms']:.3f}",
                             f"{r['step_ms']:.1f}", f"{r['step_samples_per_s']:.1f}",
                             f"{r['tflop_per_step']:.3g}", f"{r['tflop_per_s']:.3g}",
                             *("-" if r[key] is None else r[key]
                               for key in ("ops_per_step", "host_reads_per_step", "syncs_per_step"))]
                            for r in rows])
    summary = "\n".join(
        f"{key.replace('_over_', ' ÷ ')} samples/s, per round of one step each ({args.rounds} rounds, alternating "
        f"order): median {ratio:.3f}, bootstrap 95% interval [{low:.3f}, {high:.3f}]"
        for key, (ratio, low, high) in ratios.items())
    folder = results_folder("step_breakdown_compiled" if args.compile else "step_breakdown", args.machine_name,
                            args.results_dir)
    write_results(folder, rows, f"{table}\n\n{summary}\n",
                  **{key: {"median": round(ratio, 4), "interval_95": [round(low, 4), round(high, 4)]}
                     for key, (ratio, low, high) in ratios.items()})
    print(table)
    print(summary)


if __name__ == "__main__":
    main()
