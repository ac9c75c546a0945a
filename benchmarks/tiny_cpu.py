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

from common import REPO, markdown_table, results_folder, write_results



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
    flat = {f"{section}/{k}": v for section in ("retrieval", "zeroshot", "linear_probe")
            for k, v in evaluation[section].items() if isinstance(v, (int, float, str))}
    return {"objective": name, "wall_s": wall,
            "samples_per_s_median": statistics.median(m["train/samples_per_s"] for m in train[1:]),
            "data_wait_frac_median": statistics.median(m["train/data_wait_frac"] for m in train[1:]),
            "final_loss": train[-1]["train/loss"], "steps": train[-1]["step"], **flat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/cliplite-bench-tiny-cpu")
    parser.add_argument("--machine-name", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = [run_objective(name, out) for name in ("cliplite", "infonce")]
    table = markdown_table(
        ["objective", "wall (s, incl. first-run synth for cliplite)", "samples/s (median)", "data wait", "final loss",
         "held-out R@1 i2t / t2i (chance t2i)", "R@5 i2t", "zero-shot top-1 / top-5 (chance)", "linear probe top-1"],
        [[r["objective"], f"{r['wall_s']:.0f}", f"{r['samples_per_s_median']:.0f}",
          f"{100 * r['data_wait_frac_median']:.1f}%", f"{r['final_loss']:.3f}",
          f"{r['retrieval/i2t_R@1']:.3f} / {r['retrieval/t2i_R@1']:.3f} ({r['retrieval/chance_t2i_R@1']:.4f})",
          f"{r['retrieval/i2t_R@5']:.3f}",
          f"{r['zeroshot/top1']:.3f} / {r['zeroshot/top5']:.3f} ({r['zeroshot/chance_top1']:.3f})",
          f"{r['linear_probe/value']:.3f}"] for r in rows])
    write_results(results_folder("tiny_cpu", args.machine_name), rows, table)
    print(table)


if __name__ == "__main__":
    main()
