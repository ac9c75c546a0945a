"""The GPU path, run for real, in one command: the `gpu` tests, our bf16 trainer against
open_clip_train's amp_bf16 (ViT-B-32, batch 256), the step breakdown and the data benchmark's
device rows on CUDA, each GPU recipe for 20 steps at its real model and per-GPU batch, and, where
time is left, what dispatching ViT-B-32's step costs (ViT-B-32-hollow) and the step with compiled
towers (model.compile) beside the eager one. Every
part writes its results under results/<benchmark>/<gpu>/ (`<gpu>` from the GPU's name: h200)
as soon as it finishes.

Made for a machine with python3, torch (CUDA) and a GPU but no package registry: our other
dependencies travel as wheels with the working tree. Here, with a registry:

    python benchmarks/gpu_check.py --fetch-wheels        # into .whl/gpu/ (git-ignored, ~8 MB)

There, in the repository's root:

    python3 benchmarks/gpu_check.py --wheels .whl/gpu --out DIR

installs the wheels into a folder of its own (`pip install --no-index --no-deps --target`), puts
it and the repository on every part's PYTHONPATH, and runs the parts in order, each in its own
process under a time limit, skipping a part once less of --budget-s is left than it needs. With
--out, the results and every part's log go to a scratch folder that is packed into
DIR/gpu_check.tgz after each part (a run cut short still hands back what finished), beside a
summary, DIR/gpu_check.md; without it, results go to benchmarks/results/ directly.

    python benchmarks/gpu_check.py --recipes --machine-name h200   # the recipe part alone

Before a lent GPU's minutes go into it, rehearse the whole check on a CPU: the same parts,
orchestration and packing, each part at toy sizes (micro-vit, batch 8, a few steps; the `gpu`
tests collected and skipped), results under the rehearsal's own machine name:

    python benchmarks/gpu_check.py --rehearse --wheels '' --out /tmp/rehearsal   # this environment's packages
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WHEELS = REPO / ".whl" / "gpu"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What a CUDA image with torch (this workplace's, NGC's) lacks of our dependencies and theirs, at
# the versions installed here; deepspeed is built here as a wheel (pure Python: DS_BUILD_OPS=0).
CARRIED = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
           "typing_extensions", "open_clip_torch", "ftfy", "wcwidth", "simplejpeg", "braceexpand")
OPEN_CLIP_WHEELS = ("webdataset==0.2.86",)  # open_clip_train's pin, on its PYTHONPATH only (vs_open_clip.py)
RECIPES = ("cc3m-vitb32", "coco-paper", "laion400m-vitb16")
# ViT-B-32's layers with next to no arithmetic: its step's time is what dispatching ViT-B-32's step costs
HOLLOW = BENCH_DIR / "model_configs" / "ViT-B-32-hollow.json"


# ---- here: the wheels ---------------------------------------------------------------------------
def fetch_wheels(folder: Path, python_version: str) -> None:
    """CARRIED at this environment's versions into `folder`, open_clip_train's pins into
    `folder/open_clip` (a second webdataset: one folder, one version of each)."""
    shutil.rmtree(folder, ignore_errors=True)
    pip = [sys.executable, "-m", "pip"]
    target = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:", "--no-deps",
              *[arg for platform in PLATFORMS for arg in ("--platform", platform)]]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED if name != "deepspeed"]
    subprocess.run([*pip, "download", "-q", *target, "-d", str(folder), *pins], check=True)
    subprocess.run([*pip, "download", "-q", *target, "-d", str(folder / "open_clip"), *OPEN_CLIP_WHEELS], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), f"deepspeed=={importlib.metadata.version('deepspeed')}"],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}, "
          f"{sum(p.stat().st_size for p in folder.rglob('*.whl')) / 2**20:.1f} MiB")


def install_wheels(folder: Path, site: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, sorted(folder.glob("*.whl")))], check=True)


def machine_name(scale: Scale) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100-sxm4-80gb'; a rehearsal's own."""
    if scale is REHEARSAL:
        return "cpu-rehearsal"
    import torch

    name = torch.cuda.get_device_name(0).lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ---- there: the parts ---------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    command: list[str]
    limit_s: int  # stopped after this long
    needs_s: int  # started only with this much of the budget left
    report: Path | None = None  # where the end of its log is kept as its results (the tests' summary)


@dataclass(frozen=True)
class Scale:
    """The sizes the parts run at: the check's on a GPU, or a rehearsal's on a CPU."""
    device: str
    model: str  # vs_open_clip and step_breakdown
    batch: int
    steps: int  # vs_open_clip, per run
    log_every: int
    workers: int
    pairs: int
    rounds: int  # step_breakdown
    recipe_steps: int
    recipe_overrides: tuple[str, ...] = ()  # on top of each recipe as it stands
    data_args: tuple[str, ...] = ()  # data.py --device-rows


GPU = Scale("cuda", "ViT-B-32", 256, steps=40, log_every=10, workers=8, pairs=2, rounds=20, recipe_steps=20)
# Toy sizes on the CPU; the recipes keep their objective, ZeRO stage, precision and augmentation.
REHEARSAL = Scale("cpu", "micro-vit", 8, steps=4, log_every=2, workers=1, pairs=1, rounds=2, recipe_steps=4,
                  recipe_overrides=("engine.device=cpu", "model.name=micro-vit", "data.batch_size=8", "data.workers=1"),
                  data_args=("--device", "cpu", "--quick"))


def parts(machine: str, results: Path, wheels: Path | None, work: Path, scratch: Path, scale: Scale) -> list[Part]:
    """Each part's logs go under `work` (packed with --out); its shards and runs under `scratch`."""
    py, name = sys.executable, ["--machine-name", machine, "--results-dir", str(results)]
    tests = results / "gpu_tests" / machine
    open_clip_wheels = ["--wheels", str(wheels / "open_clip")] if wheels else []
    rehearse = ["--rehearse"] if scale is REHEARSAL else []
    return [
        Part("environment", [py, "-c", "import shutil, sys, torch, deepspeed, open_clip, simplejpeg; "
                             "gpu = sys.argv[1] == 'cuda'; "  # on a GPU, this part fails where CUDA does
                             "print(torch.__version__, torch.version.cuda, "
                             "torch.cuda.get_device_name() if gpu else 'CPU rehearsal', "
                             "torch.cuda.get_device_capability() if gpu else '', 'deepspeed', deepspeed.__version__, "
                             "'open_clip', open_clip.__version__, "
                             # the loader workers' batches live there; a container's may be 64 MiB
                             "'/dev/shm free GiB', round(shutil.disk_usage('/dev/shm').free / 2**30, 2))",
                             scale.device], 90, 30),
        Part("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
                           "tests/test_gpu.py", f"--junitxml={tests / 'junit.xml'}"], 240, 90, tests / "results.md"),
        Part("vs_open_clip", [py, "benchmarks/vs_open_clip.py", "--model", scale.model, "--batch", str(scale.batch),
                              "--precision", "bf16", "--steps", str(scale.steps), "--log-every", str(scale.log_every),
                              "--workers", str(scale.workers), "--pairs", str(scale.pairs),
                              "--out", str(scratch / "vs_open_clip"), *open_clip_wheels, *name], 240, 120),
        Part("step_breakdown", [py, "benchmarks/step_breakdown.py", "--model", scale.model, "--batch", str(scale.batch),
                                "--precision", "bf16", "--rounds", str(scale.rounds), *name], 90, 40),
        Part("data device rows", [py, "benchmarks/data.py", "--device-rows", "--cache-dir", str(scratch / "data"),
                                  *scale.data_args, *name], 90, 30),
        Part("recipes", [py, "benchmarks/gpu_check.py", "--recipes", *rehearse, "--steps", str(scale.recipe_steps),
                         "--work", str(work), "--scratch", str(scratch / "recipes"), *name], 200, 90),
        # after what the check must show: how much of a step is dispatch, and what model.compile does to it
        Part("dispatch", [py, "benchmarks/step_breakdown.py", "--model", str(HOLLOW), "--batch", "2",
                          "--precision", "bf16", "--rounds", str(scale.rounds), "--machine-name", f"{machine}-hollow",
                          "--results-dir", str(results)], 90, 30),
        Part("compiled step", [py, "benchmarks/step_breakdown.py", "--compile", "--model", scale.model,
                               "--batch", str(scale.batch), "--precision", "bf16", "--rounds", str(scale.rounds),
                               *name], 240, 120),
    ]


def run_part(part: Part, env: dict, log: Path) -> tuple[str, float]:
    """(status, seconds): ok, failed (exit code N), or stopped at its limit."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(part.command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=part.limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its process group: data-loader workers and trainers it started
            proc.wait()
            return f"stopped at its {part.limit_s} s limit", time.perf_counter() - start
    return ("ok" if code == 0 else f"failed (exit code {code})"), time.perf_counter() - start


def summarise(machine: str, rows: list[list], budget_s: float) -> str:
    from common import markdown_table

    return (f"GPU check on {machine}, budget {budget_s:.0f} s; logs in logs/, results in results/\n\n"
            + markdown_table(["part", "status", "seconds"], rows) + "\n")


def pack(work: Path, out: Path) -> None:
    with tarfile.open(out / "gpu_check.tgz.part", "w:gz") as tar:
        tar.add(work, arcname="gpu_check")
    os.replace(out / "gpu_check.tgz.part", out / "gpu_check.tgz")


def check(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    wheels = Path(args.wheels).resolve() if args.wheels else None  # '': this environment's packages
    site = Path(args.site)
    if wheels:
        install_wheels(wheels, site)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *([str(site)] if wheels else []),
                                          os.environ.get("PYTHONPATH", "")])}
    scale = REHEARSAL if args.rehearse else GPU
    machine = args.machine_name or machine_name(scale)
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    results, logs = (work / "results" if out else BENCH_DIR / "results"), work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (results / "gpu_tests" / machine).mkdir(parents=True, exist_ok=True)
    rows = []
    for part in parts(machine, results, wheels, work, Path(args.scratch), scale):
        left = args.budget_s - (time.perf_counter() - started)
        if left < part.needs_s:
            status, seconds = f"skipped: {left:.0f} s of the budget left, needs {part.needs_s}", 0.0
        else:
            part.limit_s = min(part.limit_s, int(left))
            log = logs / f"{part.name.replace(' ', '_')}.log"
            status, seconds = run_part(part, env, log)
            print(f"{part.name}: {status} in {seconds:.0f} s\n" + log.read_text()[-1500:], flush=True)
            if part.report:
                part.report.write_text(log.read_text()[-6000:])
        rows.append([part.name, status, f"{seconds:.0f}"])
        summary = summarise(machine, rows, args.budget_s)
        (logs / "summary.md").write_text(summary)
        if out:
            (out / "gpu_check.md").write_text(summary)
            pack(work, out)
    print(summary)
    if any(status != "ok" for _, status, _ in rows):
        sys.exit(1)


# ---- the recipe part -----------------------------------------------------------------------------
def recipe_overrides(shards: Path, run_dir: Path, name: str, steps: int, scale: Scale) -> list[str]:
    """The recipe as it stands but for its data (synthetic shards, resampled: no epoch ends,
    which would restart the loader workers) and its length; no evaluation sets."""
    return [*scale.recipe_overrides, f"data.train={shards}", "data.eval=''", "data.eval_zeroshot=''",
            "data.eval_probe=''", "data.resampled=true", "data.samples_per_epoch=100000000",
            "data.synthetic.train_samples=0", f"train.steps={steps}", f"train.log_every={max(1, steps // 4)}",
            "train.checkpoint_every=0", "train.eval_every=0", f"run.output_dir={run_dir}", f"run.name={name}",
            "run.resume=never"]


def measure_recipe(recipe: str, shards: Path, run_dir: Path, logs: Path, steps: int, scale: Scale) -> dict:
    from cliplite_dist.config import load_config

    overrides = recipe_overrides(shards, run_dir, recipe, steps, scale)
    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml", overrides)
    proc = subprocess.run([sys.executable, "-m", "cliplite_dist", str(REPO / "recipes" / f"{recipe}.yaml"),
                           *overrides], capture_output=True, text=True)
    (logs / f"recipe-{recipe}.log").write_text(proc.stdout + proc.stderr)
    metrics = [json.loads(line) for line in (run_dir / recipe / "metrics.jsonl").read_text().splitlines()
               if "train/samples_per_s" in line] if proc.returncode == 0 else []
    shutil.rmtree(run_dir / recipe / "checkpoints", ignore_errors=True)  # the final one is GBs, not measured
    row = {"recipe": recipe, "model": cfg.model.name, "objective": cfg.objective.name,
           "batch_per_gpu": cfg.data.batch_size, "zero_stage": cfg.engine.zero_stage,
           "grad_checkpointing": cfg.model.grad_checkpointing, "steps": steps, "exit_code": proc.returncode}
    if len(metrics) >= 2:  # the first window holds start-up
        rates = [m["train/samples_per_s"] for m in metrics[1:]]
        row.update(samples_per_s=round(statistics.median(rates), 1),
                   step_ms=round(1000 * cfg.data.batch_size / statistics.median(rates), 1),
                   peak_mem_gib=round(max(m.get("train/peak_mem_gib", 0.0) for m in metrics), 2),  # CUDA only
                   data_wait_frac=round(statistics.median(m["train/data_wait_frac"] for m in metrics[1:]), 3),
                   final_loss=round(metrics[-1]["train/loss"], 4))
    return row


def write_recipe_results(rows: list[dict], folder: Path, steps: int, scale: Scale) -> None:
    from common import cpu_model, markdown_table, write_results

    import torch

    device = torch.cuda.get_device_name() if scale.device == "cuda" else f"CPU ({cpu_model()}), a rehearsal"
    table = markdown_table(
        ["recipe", "model", "objective", "batch / GPU", "ZeRO", "grad ckpt", "samples/s", "step (ms)",
         "peak memory (GiB)", "data wait", "exit"],
        [[r["recipe"], r["model"], r["objective"], r["batch_per_gpu"], r["zero_stage"], r["grad_checkpointing"],
          r.get("samples_per_s", "-"), r.get("step_ms", "-"), r.get("peak_mem_gib", "-"),
          r.get("data_wait_frac", "-"), r["exit_code"]] for r in rows])
    intro = (f"Each GPU recipe as it stands (model, objective, per-GPU batch, precision auto -> bf16, ZeRO stage, "
             f"workers, augmentation) on one {device}, {steps} steps on "
             "synthetic shards of 64 px JPEGs (decoding costs less than on real 256 px shards; the model's "
             "cost is real), resampled. samples/s: median of the logging windows after the first; peak "
             "memory: the CUDA allocator's peak (train/peak_mem_gib).")
    if scale.recipe_overrides:
        intro += f" A rehearsal: {', '.join(scale.recipe_overrides)} on top of each recipe."
    write_results(folder, rows, f"{intro}\n\n{table}\n", steps=steps, overrides=list(scale.recipe_overrides))
    print(table, flush=True)


def run_recipes(args: argparse.Namespace) -> None:
    from common import results_folder

    from cliplite_dist.config import SyntheticConfig
    from cliplite_dist.data.synthetic import ensure_corpus

    scratch, logs = Path(args.scratch), Path(args.work) / "logs"
    shutil.rmtree(scratch, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    ensure_corpus(SyntheticConfig(dir=str(scratch / "shards"), train_samples=2048, shard_size=128, image_size=64))
    scale = REHEARSAL if args.rehearse else GPU
    folder = results_folder("recipes", args.machine_name or machine_name(scale), args.results_dir)
    steps, rows = args.steps or scale.recipe_steps, []
    for recipe in RECIPES:
        rows.append(measure_recipe(recipe, scratch / "shards" / "train", scratch / "runs", logs, steps, scale))
        write_recipe_results(rows, folder, steps, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fetch-wheels", action="store_true", help="here: download / build the wheels into --wheels")
    parser.add_argument("--recipes", action="store_true", help="only run the GPU recipes (the last part)")
    parser.add_argument("--rehearse", action="store_true", help="on a CPU: every part at toy sizes")
    parser.add_argument("--wheels", default=str(WHEELS), help="installed for every part ('': this environment's)")
    parser.add_argument("--python-version", default="3.12", help="--fetch-wheels: the GPU machine's python3")
    parser.add_argument("--site", default="/tmp/cliplite-gpu-site", help="where the wheels are installed")
    parser.add_argument("--out", default=None, help="pack results and logs into OUT/gpu_check.tgz after every part")
    parser.add_argument("--work", default="/tmp/cliplite-gpu-check", help="logs (and, with --out, results)")
    parser.add_argument("--scratch", default="/tmp/cliplite-gpu-scratch",
                        help="the parts' shards and runs (not packed)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time")
    parser.add_argument("--steps", type=int, default=None, help="--recipes: steps per recipe (default: the scale's)")
    parser.add_argument("--machine-name", default=None, help="results folder name (default: from the GPU's name)")
    parser.add_argument("--results-dir", default=str(BENCH_DIR / "results"))
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels(Path(args.wheels), args.python_version)
    elif args.recipes:
        run_recipes(args)
    else:
        check(args)


if __name__ == "__main__":
    main()
