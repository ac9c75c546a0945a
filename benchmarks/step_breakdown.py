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
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

from cliplite_dist.config import Config, ObjectiveConfig
from cliplite_dist.distributed import DistEnv, init_distributed, pick_device
from cliplite_dist.engine import build_engine
from cliplite_dist.models import build_model
from cliplite_dist.objectives import build_objective

RESULTS = Path(__file__).parent / "results" / "step_breakdown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on; written beside them."""
    import deepspeed

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "threads": torch.get_num_threads()}


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loss_time(name: str, batch: int, dim: int, device, repeats: int) -> float:
    objective = build_objective(ObjectiveConfig(name=name), dim).to(device)
    img = torch.randn(batch, dim, device=device, requires_grad=True)
    txt = torch.randn(batch, dim, device=device, requires_grad=True)

    def step():
        objective(img, txt).loss.backward()

    return timed(step, repeats)


def step_rate(name: str, model_name: str, batch: int, device, repeats: int) -> tuple[float, int]:
    """(samples/s of whole DeepSpeed steps, the towers' embedding width)."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size = model_name, name, batch
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, device)
    size = towers.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=device, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a large red circle left of a small blue square"] * batch).to(device)

    def step():
        out = info.engine(images, tokens)
        info.engine.backward(out.loss)
        info.engine.step()

    return batch / timed(step, repeats), towers.embed_dim


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
        rate, dim = step_rate(name, args.model, args.batch, device, args.repeats)
        rows.append({
            "objective": name, "model": args.model, "batch": args.batch, "step_samples_per_s": rate,
            "loss_fwd_bwd_ms": 1000 * loss_time(name, args.batch, dim, device, args.repeats * 5),
        })
        print(json.dumps(rows[-1]))
    out = RESULTS / (args.machine_name or machine()["host"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    lines = ["| objective | model | batch | loss fwd+bwd (ms) | full step (samples/s) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['objective']} | {r['model']} | {r['batch']} | {r['loss_fwd_bwd_ms']:.3f} | "
              f"{r['step_samples_per_s']:.1f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
