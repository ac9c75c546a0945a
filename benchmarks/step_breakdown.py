"""Where a training step's time goes, per objective: the loss alone vs the whole step.

For each objective on one process: forward+backward time of the objective alone on tower-sized
embeddings, and samples/s of a full DeepSpeed step (towers + objective + optimizer) on synthetic
input tensors (no data loading). Writes `benchmarks/results/step_breakdown/<machine>/` with the
machine description beside the numbers.

    python benchmarks/step_breakdown.py                       # tiny-vit, batch 64, CPU
    python benchmarks/step_breakdown.py --model ViT-B-32 --batch 256
"""
from __future__ import annotations

import argparse
import json

from cliplite_dist.config import Config
from cliplite_dist.distributed import DistEnv, init_distributed, pick_device
from common import engine_step_rate, loss_seconds, markdown_table, results_folder, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--machine-name", default=None, help="results folder name (default: host)")
    args = parser.parse_args()

    env = DistEnv.from_environ()
    device = pick_device("auto", env.local_rank)
    init_distributed(env, device)
    rows = []
    for name in ("cliplite", "infonce"):
        cfg = Config()
        cfg.model.name, cfg.objective.name, cfg.data.batch_size = args.model, name, args.batch
        rate, dim, _ = engine_step_rate(cfg, device, args.repeats)
        rows.append({
            "objective": name, "model": args.model, "batch": args.batch, "step_samples_per_s": rate,
            "loss_fwd_bwd_ms": 1000 * loss_seconds(cfg.objective, args.batch, dim, device, args.repeats * 5),
        })
        print(json.dumps(rows[-1]))
    table = markdown_table(["objective", "model", "batch", "loss fwd+bwd (ms)", "full step (samples/s)"],
                           [[r["objective"], r["model"], r["batch"], f"{r['loss_fwd_bwd_ms']:.3f}",
                             f"{r['step_samples_per_s']:.1f}"] for r in rows])
    write_results(results_folder("step_breakdown", args.machine_name), rows, table)
    print(table)


if __name__ == "__main__":
    main()
