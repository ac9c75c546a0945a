"""The README's main job for each objective: wall time, samples/s and all three evaluations.

Runs `cliplite-train recipes/tiny-cpu.yaml` once per objective (fresh run directories under
--out), collects the training numbers from each run's own metrics.jsonl, then runs
`cliplite-eval` on the run (held-out retrieval, zero-shot, linear probe on the classes set).
Writes `benchmarks/results/tiny_cpu/<machine>/results.{json,md}`.

    python benchmarks/tiny_cpu.py --machine-name cpu-2core-dev
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_breakdown import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "tiny_cpu"


def run_objective(name: str, out: Path) -> dict:
    data = out / "data"
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "cliplite-train"), str(REPO / "recipes" / "tiny-cpu.yaml"),
           f"objective.name={name}", f"run.output_dir={out}", f"run.name={name}", "run.resume=never",
           f"data.synthetic.dir={data}", f"data.train={data / 'train'}", f"data.eval={data / 'heldout'}",
           f"data.eval_zeroshot={data / 'classes'}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out)
    wall = time.perf_counter() - start
    subprocess.run([str(bin_dir / "cliplite-eval"), str(out / name), "--retrieval", str(data / "heldout"),
                    "--zeroshot", str(data / "classes"), "--linear-probe", str(data / "classes" / "train"),
                    str(data / "classes" / "test")], check=True)
    evaluation = json.loads((out / name / "eval.json").read_text())
    metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/samples_per_s" in m]
    return {"objective": name, "wall_s": wall,
            "samples_per_s_median": statistics.median(m["train/samples_per_s"] for m in train[1:]),
            "data_wait_frac_median": statistics.median(m["train/data_wait_frac"] for m in train[1:]),
            "final_loss": train[-1]["train/loss"], "steps": train[-1]["step"], "eval": evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/cliplite-bench-tiny-cpu")
    parser.add_argument("--machine-name", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = [run_objective(name, out) for name in ("cliplite", "infonce")]
    folder = RESULTS / (args.machine_name or machine()["host"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    lines = ["| objective | wall (s, incl. first-run synth for cliplite) | samples/s (median) | data wait | "
             "final loss | held-out R@1 i2t / t2i (chance t2i) | R@5 i2t | zero-shot top-1 / top-5 (chance) | "
             "linear probe top-1 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ret, zs, probe = r["eval"]["retrieval"], r["eval"]["zeroshot"], r["eval"]["linear_probe"]
        lines.append(f"| {r['objective']} | {r['wall_s']:.0f} | {r['samples_per_s_median']:.0f} | "
                     f"{100 * r['data_wait_frac_median']:.1f}% | {r['final_loss']:.3f} | {ret['i2t_R@1']:.3f} / "
                     f"{ret['t2i_R@1']:.3f} ({ret['chance_t2i_R@1']:.4f}) | {ret['i2t_R@5']:.3f} | "
                     f"{zs['top1']:.3f} / {zs['top5']:.3f} ({zs['chance_top1']:.3f}) | {probe['value']:.3f} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
