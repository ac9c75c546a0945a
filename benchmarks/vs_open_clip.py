"""Our trainer against open_clip's (`open_clip_train`, from the open-clip-torch package) on the
same work: the same shards, open_clip model config, batch size, precision (on a GPU, the same TF32
and cuDNN settings), optimizer settings, worker count and number of steps, run in alternation so
that drift of the machine hits both.

Throughput is each trainer's own steady-state measure, defined alike: samples per second over a
logging window (data wait included), median over the windows after the first (which holds
start-up and warmup). Ours comes from `metrics.jsonl` (`train/samples_per_s`); theirs from the
window average `Batch (t)` of their log. A pair is (ours with InfoNCE, theirs); the reported ratio
is the median over pairs, with CLIP-Lite beside it.

open_clip_train 3.x needs webdataset <= 0.2.86 (it breaks on newer ones) and pandas; both go
into `benchmarks/.open_clip_deps/py3.X` (`pip install --target`, from the registry, or offline every
wheel in `--wheels DIR`: webdataset's at least, pandas' where this Python lacks it) and onto
open_clip's PYTHONPATH only, so our own process keeps its webdataset. On CPU it runs as one
process (its DDP wrapper passes a CPU device id), so the comparison is one process; on a GPU,
one GPU. The shards are split evenly between the loader workers, whole batches each, so
neither trainer's epoch ends early on a worker that ran out.

    python benchmarks/vs_open_clip.py --machine-name cpu-2core-dev          # fp32, 5 pairs (~25 min here)
    python benchmarks/vs_open_clip.py --precision bf16 --model ViT-B-32 --batch 256 --steps 40 \
        --workers 8 --machine-name h200                                     # GPU: amp_bf16 for theirs
    python benchmarks/vs_open_clip.py --model benchmarks/model_configs/ViT-B-32-hollow.json --batch 16 \
        --precision bf16 --steps 300 --log-every 30 --pairs 3   # ViT-B-32's ops without its arithmetic
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, REPO, markdown_table, results_folder, write_results

# One folder per interpreter: pandas' compiled parts built for one Python fail to import in another.
OPEN_CLIP_DEPS = BENCH_DIR / ".open_clip_deps" / f"py{sys.version_info.major}.{sys.version_info.minor}"
OPEN_CLIP_PINS = ["webdataset==0.2.86", "pandas", "pytz", "tzdata"]
# Registers model configs (ours: tiny-vit ..., or one JSON file) with open_clip, then runs its trainer's main().
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                  "from open_clip_train.main import main; main(sys.argv[2:])")
THEIR_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
_WINDOW = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")


def open_clip_deps_installed() -> bool:
    return (OPEN_CLIP_DEPS / "webdataset-0.2.86.dist-info").exists()


def ensure_open_clip_deps(wheels: str | None) -> None:
    if open_clip_deps_installed():
        return
    packages = ["--no-index", *map(str, sorted(Path(wheels).glob("*.whl")))] if wheels else OPEN_CLIP_PINS
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(OPEN_CLIP_DEPS),
                    *packages], check=True)


def steady(rates: list[float]) -> float:
    """Median over the logging windows after the first."""
    if len(rates) < 2:
        raise RuntimeError(f"need at least 2 logging windows, got {len(rates)}: run more steps")
    return statistics.median(rates[1:])


def run_quietly(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    """Run a trainer with its output kept back, but for the end of it when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print((proc.stdout + proc.stderr)[-4000:], file=sys.stderr, flush=True)
        raise subprocess.CalledProcessError(proc.returncode, cmd[:4])


def their_model(model: str) -> tuple[str, str]:
    """(what open_clip_train's process registers with open_clip, the name it trains): our packaged
    configs and an open_clip name, or a model-config JSON file and the name our trainer gives it."""
    from cliplite_dist.models import PACKAGED_CONFIGS, resolve_model_name

    return (model if model.endswith(".json") else str(PACKAGED_CONFIGS)), resolve_model_name(model)


def run_open_clip(shards: str, args, out: Path) -> float:
    name = f"oc-{time.time_ns()}"
    configs, model = their_model(args.model)
    cmd = [sys.executable, "-c", OPEN_CLIP_MAIN, configs,
           "--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples", str(args.batch * args.steps),
           "--batch-size", str(args.batch), "--workers", str(args.workers), "--precision", THEIR_PRECISION[args.precision],
           "--model", model, "--epochs", "1", "--log-every-n-steps", str(args.log_every),
           "--save-frequency", "0", "--logs", str(out), "--name", name, "--report-to", "",
           "--lr", "1e-3", "--wd", "0.05", "--warmup", "10", "--grad-clip-norm", "1.0", "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OPEN_CLIP_DEPS), os.environ.get("PYTHONPATH", "")])}
    run_quietly(cmd, out, env)
    log = (out / name / "out.log").read_text()
    return steady([args.batch / float(batch_s) for _, batch_s in _WINDOW.findall(log)])


def run_ours(objective: str, shards: str, args, out: Path) -> float:
    name = f"ours-{objective}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "cliplite_dist", str(REPO / "recipes" / "tiny-cpu.yaml"),
           f"objective.name={objective}", f"model.name={args.model}", f"data.train={shards}",
           f"data.num_samples={args.batch * args.steps}", "data.eval=''", "data.eval_zeroshot=''",
           "data.synthetic.train_samples=0", "data.caption_key=txt", f"data.batch_size={args.batch}",
           f"data.workers={args.workers}", f"engine.precision={args.precision}",
           f"engine.zero_stage={args.zero_stage}", "optim.lr=1e-3",
           "optim.weight_decay=0.05", "optim.warmup_steps=10", "optim.grad_clip=1.0", f"train.steps={args.steps}",
           f"train.log_every={args.log_every}", "train.checkpoint_every=0", f"run.output_dir={out}",
           f"run.name={name}", "run.resume=never"]
    run_quietly(cmd, out)
    metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / name / "checkpoints", ignore_errors=True)  # the final checkpoint is not measured
    return steady([m["train/samples_per_s"] for m in metrics if "train/samples_per_s" in m])


def write_shards(out: Path, samples: int, workers: int) -> str:
    """Two shards per loader worker, so every worker of either trainer gets the same share (whole
    batches when `samples` is a multiple of workers x batch)."""
    from cliplite_dist.data.synthetic import write_corpus

    shard_size = -(-samples // (2 * max(1, workers)))
    paths = write_corpus(out / "data", samples, split="train", shard_size=shard_size, image_size=64, seed=0)
    return str(out / "data" / f"train-{{00000..{len(paths) - 1:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=sorted(THEIR_PRECISION), default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, help="ours: engine.zero_stage")
    parser.add_argument("--wheels", default=None, help="offline: install every wheel in this folder instead of "
                                                           "OPEN_CLIP_PINS (webdataset 0.2.86, and pandas if missing)")
    parser.add_argument("--out", default="/tmp/cliplite-bench-vs-open-clip")
    parser.add_argument("--machine-name", default=None)
    parser.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    args = parser.parse_args()
    if args.model.endswith(".json"):  # both trainers run in the output folder
        args.model = str(Path(args.model).resolve())
    ensure_open_clip_deps(args.wheels)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards = write_shards(out, args.batch * args.steps, args.workers)

    rows = []
    for pair in range(args.pairs):
        runs = [("open_clip_train", lambda: run_open_clip(shards, args, out)),
                ("ours-infonce", lambda: run_ours("infonce", shards, args, out)),
                ("ours-cliplite", lambda: run_ours("cliplite", shards, args, out))]
        if pair % 2:
            runs.reverse()  # neither side always runs first
        rates = {name: fn() for name, fn in runs}
        rows.append({"pair": pair, **{f"{name}_samples_per_s": rate for name, rate in rates.items()},
                     "infonce_ratio": rates["ours-infonce"] / rates["open_clip_train"],
                     "cliplite_over_infonce": rates["ours-cliplite"] / rates["ours-infonce"]})
        print(json.dumps(rows[-1]), flush=True)
        report(rows, args)  # after every pair: a run cut short keeps the pairs it finished


def report(rows: list[dict], args: argparse.Namespace) -> None:
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "pair"}
    table = markdown_table(
        ["pair", "open_clip_train samples/s", "ours InfoNCE samples/s", "ours CLIP-Lite samples/s",
         "ours InfoNCE / open_clip", "ours CLIP-Lite / ours InfoNCE"],
        [[row["pair"], f"{row['open_clip_train_samples_per_s']:.1f}", f"{row['ours-infonce_samples_per_s']:.1f}",
          f"{row['ours-cliplite_samples_per_s']:.1f}", f"{row['infonce_ratio']:.3f}",
          f"{row['cliplite_over_infonce']:.3f}"] for row in rows]
        + [["**median**", f"{median['open_clip_train_samples_per_s']:.1f}", f"{median['ours-infonce_samples_per_s']:.1f}",
            f"{median['ours-cliplite_samples_per_s']:.1f}", f"**{median['infonce_ratio']:.3f}**",
            f"**{median['cliplite_over_infonce']:.3f}**"]])
    setting = (f"{args.model}, batch {args.batch}, {args.precision} (ours: ZeRO {args.zero_stage}), {args.workers} "
               f"worker(s), {args.steps} steps (log every {args.log_every}), 1 process, same shards; "
               f"{len(rows)} of {args.pairs} pairs")
    folder = results_folder("vs_open_clip", args.machine_name, args.results_dir)
    write_results(folder, rows, f"{setting}\n\n{table}", setting=vars(args), median=median)
    print(table, flush=True)


if __name__ == "__main__":
    main()
