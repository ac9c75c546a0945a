"""CLIP-Lite vs InfoNCE at matched batch sizes: what each learns from the same samples, and what
each step costs.

Grid: rows (InfoNCE; CLIP-Lite with each negative-selection strategy: shift, as the paper;
random derangement; the hardest caption in the local batch; the neighbouring rank's caption)
x global batch sizes x seeds, with the same model (micro-vit), data (the synthetic caption
corpus), samples seen and schedule in every cell (`recipes/bench-objectives.yaml`).

Fairness: before the reported runs, each row gets its own sweep at each batch size, scored on
a validation split (a separately generated retrieval set, never the reported sets):
  - InfoNCE: learning rate;
  - CLIP-Lite shift: learning rate x critic head (mlp, linear) x temperature init;
  - the other CLIP-Lite rows: learning rate, with shift's winning head and temperature.
Then every row's winner trains with fresh seeds (not the sweep's) and is evaluated on the
reported sets: held-out retrieval R@1/R@5, zero-shot top-1 and a linear probe on frozen image
features, plus final loss, step time, loss time and peak memory.

Writes results.csv (every run, sweep included), results.md (mean ± std over seeds, and the
sweep), quality_vs_batch.png and step_time_vs_batch.png under
`benchmarks/results/objectives/<machine>/`.

    python benchmarks/objectives.py --quick      # 3 batch sizes, 2 lrs, 93 runs: 40 min on 2 CPU cores
    python benchmarks/objectives.py              # 6 batch sizes, 3 lrs: the full grid
    python benchmarks/objectives.py --slurm --partition gpu --gpus-per-node 1    # as job arrays
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import shutil
import statistics
from pathlib import Path

from common import (PeakMemory, REPO, add_common_args, entry_point, loss_seconds, markdown_table, mean_std,
                    pyplot, results_folder, run_cells, save_figure, write_results)

RECIPE = REPO / "recipes" / "bench-objectives.yaml"
ROWS = {  # row name -> (objective, negatives, world size): cross_rank needs a neighbouring rank
    "infonce": ("infonce", "shift", 1),
    "cliplite-shift": ("cliplite", "shift", 1),
    "cliplite-random": ("cliplite", "random", 1),
    "cliplite-hard": ("cliplite", "hard", 1),
    "cliplite-cross_rank": ("cliplite", "cross_rank", 2),
}
CLIP_T0 = 14.2857  # 1 / 0.07: CLIP's initial logit scale, and the paper's initial temperature
QUALITY = ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5", "zeroshot_top1", "probe_top1")


# ---- one cell --------------------------------------------------------------------------------------
def val_set(cfg) -> Path:
    """The validation retrieval set the sweeps are scored on: same distribution as the reported
    held-out set, another seed, written once beside the corpus."""
    from cliplite_dist.data.synthetic import write_corpus

    out = Path(cfg.data.synthetic.dir) / "val"
    if not (out / "sizes.json").exists():
        write_corpus(out, 1000, split="heldout", shard_size=1000, image_size=cfg.data.synthetic.image_size,
                     seed=cfg.data.synthetic.seed + 1)
    return out


def cell_config(cell: dict):
    """The recipe plus this cell's settings (and the cell's own `overrides`, if any, last)."""
    from cliplite_dist.config import load_config

    objective, negatives, world = ROWS[cell["row"]]
    steps = max(1, cell["samples"] // cell["batch"])
    name = "-".join(f"{k}{cell[k]}" for k in ("row", "batch", "lr", "head", "temperature_init", "seed"))
    overrides = [
        f"run.name={cell['phase']}-{name}", f"objective.name={objective}", f"objective.negatives={negatives}",
        f"objective.head={cell['head']}", f"objective.temperature_init={cell['temperature_init']}",
        f"optim.lr={cell['lr']}", f"data.batch_size={cell['batch'] // world}", f"train.steps={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}", f"train.log_every={max(1, steps // 10)}",
        f"train.seed={cell['seed']}", *cell.get("overrides", []),
    ]
    data_dir = Path(load_config(RECIPE, overrides).data.synthetic.dir)
    if cell["phase"] == "sweep":
        overrides.append(f"data.eval={data_dir / 'val'}")
    else:
        overrides += [f"data.eval={data_dir / 'heldout'}", f"data.eval_zeroshot={data_dir / 'classes'}"]
    return load_config(RECIPE, overrides)


def probe(trainer, data_dir: Path) -> float:
    """Linear probe on the frozen image tower, this process only (ZeRO 0: full weights here)."""
    from cliplite_dist.evaluate.standalone import linear_probe_eval

    result = linear_probe_eval(trainer.engine.module, trainer.towers.eval_transform,
                               str(data_dir / "classes" / "train"), str(data_dir / "classes" / "test"), 500)
    return result["value"]


def measure(cell: dict) -> dict | None:
    from cliplite_dist.trainer import Trainer

    cfg = cell_config(cell)
    data_dir = Path(cfg.data.synthetic.dir)
    trainer = Trainer(cfg)
    if trainer.env.is_main:
        val_set(cfg)  # before the barrier in the trainer's set-up
    with PeakMemory() as memory:
        code = trainer.run()
    if code != 0:
        raise RuntimeError(f"cell {cell} ended with exit code {code}")
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()] \
        if trainer.env.is_main else []
    loss_time = 1000 * loss_seconds(cfg.objective, cfg.data.batch_size, trainer.towers.embed_dim,
                                    trainer.device, repeats=30)
    row = None
    if trainer.env.is_main:
        train = [m for m in lines if "train/samples_per_s" in m]
        final_eval = [m for m in lines if "eval/i2t_R@1" in m][-1]
        rate = statistics.median(m["train/samples_per_s"] for m in (train[1:] or train))
        row = {**cell, "steps": cfg.train.steps, "final_loss": train[-1]["train/loss"],
               "step_ms": 1000 * cell["batch"] / rate, "samples_per_s": rate, "loss_ms": loss_time,
               "peak_mem_mb": memory.peak_mb}
        row.update({k: final_eval[f"eval/{k}"] for k in ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5")})
        if cell["phase"] == "final":
            row["zeroshot_top1"] = final_eval["eval/zeroshot_top1"]
            row["probe_top1"] = probe(trainer, data_dir)
        else:  # the retrieval numbers above are on the validation split: the sweep's score
            row["val_score"] = statistics.mean(row[k] for k in ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5"))
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # checkpoints of benchmark cells are not kept
    del trainer
    gc.collect()
    return row


# ---- the grid ----------------------------------------------------------------------------------------
def sweep_cells(batches, lrs, heads, temps, samples) -> list[dict]:
    """Stage 1: InfoNCE (lr) and CLIP-Lite shift (lr x head x temperature), seed 0."""
    cells = []
    for batch in batches:
        cells += [dict(phase="sweep", row="infonce", batch=batch, lr=lr, head="mlp", temperature_init=CLIP_T0,
                       seed=0, samples=samples, world_size=1) for lr in lrs]
        cells += [dict(phase="sweep", row="cliplite-shift", batch=batch, lr=lr, head=head, temperature_init=t,
                       seed=0, samples=samples, world_size=1) for lr, head, t in itertools.product(lrs, heads, temps)]
    return cells


def best(rows: list[dict], row: str, batch: int) -> dict:
    candidates = [r for r in rows if r["phase"] == "sweep" and r["row"] == row and r["batch"] == batch]
    return max(candidates, key=lambda r: r["val_score"])


def strategy_cells(sweep: list[dict], batches, lrs, samples) -> list[dict]:
    """Stage 2: the other CLIP-Lite rows sweep lr with shift's winning head and temperature."""
    cells = []
    for batch in batches:
        winner = best(sweep, "cliplite-shift", batch)
        for row in ("cliplite-random", "cliplite-hard", "cliplite-cross_rank"):
            cells += [dict(phase="sweep", row=row, batch=batch, lr=lr, head=winner["head"],
                           temperature_init=winner["temperature_init"], seed=0, samples=samples,
                           world_size=ROWS[row][2]) for lr in lrs]
    return cells


def final_cells(sweep: list[dict], batches, seeds, samples) -> list[dict]:
    """Stage 3: every row's winner at every batch size, fresh seeds, reported sets."""
    cells = []
    for batch, row, seed in itertools.product(batches, ROWS, seeds):
        winner = best(sweep, row, batch)
        cells.append(dict(phase="final", row=row, batch=batch, lr=winner["lr"], head=winner["head"],
                          temperature_init=winner["temperature_init"], seed=seed, samples=samples,
                          world_size=ROWS[row][2]))
    return cells


# ---- report ----------------------------------------------------------------------------------------------
def summary_table(rows: list[dict], cuda: bool) -> str:
    final = [r for r in rows if r["phase"] == "final"]
    header = ["row", "batch", "lr / head / T0", "R@1 t2i", "R@1 i2t", "R@5 t2i", "R@5 i2t", "zero-shot top-1",
              "probe top-1", "final loss", "step (ms)", "loss fwd+bwd (ms)", "peak mem (MB)", "seeds"]
    table = []
    for batch in sorted({r["batch"] for r in final}):
        for row in ROWS:
            cell = [r for r in final if r["row"] == row and r["batch"] == batch]
            if not cell:
                continue
            first = cell[0]
            table.append([row, batch, f"{first['lr']:g} / {first['head']} / {first['temperature_init']:.3g}"]
                         + [mean_std([r[k] for r in cell]) for k in QUALITY]
                         + [mean_std([r["final_loss"] for r in cell]), mean_std([r["step_ms"] for r in cell], 1),
                            mean_std([r["loss_ms"] for r in cell], 2),
                            mean_std([r["peak_mem_mb"] for r in cell], 0) if cuda else "-",
                            len(cell)])
    return markdown_table(header, table)


def sweep_table(rows: list[dict]) -> str:
    sweep = sorted((r for r in rows if r["phase"] == "sweep"), key=lambda r: (r["row"], r["batch"], -r["val_score"]))
    winners = {(r["row"], r["batch"]): best(rows, r["row"], r["batch"]) for r in sweep}
    return markdown_table(
        ["row", "batch", "lr", "head", "T0", "val score (mean R@1,R@5 both ways)", "chosen"],
        [[r["row"], r["batch"], f"{r['lr']:g}", r["head"], f"{r['temperature_init']:.3g}", f"{r['val_score']:.3f}",
          "yes" if winners[(r["row"], r["batch"])] is r else ""] for r in sweep])


def plot(rows: list[dict], folder: Path) -> None:
    plt = pyplot()

    final = [r for r in rows if r["phase"] == "final"]
    batches = sorted({r["batch"] for r in final})

    def series(row: str, key: str) -> tuple[list[float], list[float]]:
        values = [[r[key] for r in final if r["row"] == row and r["batch"] == b] for b in batches]
        return ([statistics.mean(v) for v in values],
                [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("t2i_R@1", "zeroshot_top1", "probe_top1"),
                              ("held-out text->image R@1", "zero-shot top-1", "linear probe top-1")):
        for row in ROWS:
            mean, std = series(row, key)
            ax.errorbar(batches, mean, yerr=std, marker="o", capsize=3, label=row)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("quality vs batch size at matched samples seen (mean ± std over seeds)")
    save_figure(fig, folder / "quality_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in ROWS:
        mean, std = series(row, "step_ms")
        ax.errorbar(batches, mean, yerr=std, marker="o", capsize=3, label=row)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("training step (ms)")
    ax.set_title("time per training step vs batch size")
    ax.legend(fontsize=8)
    save_figure(fig, folder / "step_time_vs_batch.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batches", default="", help="comma-separated global batch sizes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=0, help="samples seen per run")
    parser.add_argument("--rerender", action="store_true", help="rewrite results.md and the plots from results.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else \
        ([16, 64, 256] if args.quick else [8, 16, 32, 64, 128, 256])
    samples = args.samples or (8192 if args.quick else 16384)
    lrs = (1e-3, 3e-3) if args.quick else (3e-4, 1e-3, 3e-3)
    heads, temps = ("mlp", "linear"), (CLIP_T0, 5.0)
    seeds = list(range(1, args.seeds + 1))

    folder = results_folder("objectives", args.machine_name, args.results_dir)
    if args.rerender:
        saved = json.loads((folder / "results.json").read_text())
        report(saved["rows"], folder, saved["samples_per_run"], saved["seeds"], saved["machine"])
        return
    stage1 = run_cells(__file__, sweep_cells(batches, lrs, heads, temps, samples), args, "objectives")
    stage2 = run_cells(__file__, strategy_cells(stage1, batches, lrs, samples), args, "objectives")
    sweep = stage1 + stage2
    final = run_cells(__file__, final_cells(sweep, batches, seeds, samples), args, "objectives")
    rows = sweep + final
    write_results(folder, rows, "", world_size=2, samples_per_run=samples, batches=batches, seeds=seeds)
    report(rows, folder, samples, seeds, json.loads((folder / "results.json").read_text())["machine"])


def report(rows: list[dict], folder: Path, samples: int, seeds: list[int], machine: dict) -> None:
    """results.md and the plots, from the rows (also from a saved results.json: --rerender)."""
    on = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    text = (f"# Objectives at matched batch sizes\n\nmicro-vit on the synthetic caption corpus, {samples} samples "
            f"seen per run, {len(seeds)} seeds per cell (seeds {seeds[0]}-{seeds[-1]}; the sweep used seed 0), "
            f"winners chosen on a validation split, on {on}, torch {machine['torch']}, DeepSpeed "
            f"{machine['deepspeed']}. Values: mean ± std over seeds. Peak memory is measured on CUDA only (on CPU "
            f"the resident set hides what glibc reuses; loss_scaling measures the loss's memory).\n\n"
            f"{summary_table(rows, cuda=bool(machine['gpu']))}\n\n## Sweep (validation split, seed 0)\n\n"
            f"{sweep_table(rows)}\n")
    (folder / "results.md").write_text(text)
    plot(rows, folder)
    print(text)


if __name__ == "__main__":
    entry_point(main, measure)
