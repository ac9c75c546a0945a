"""Does one negative per positive (CLIP-Lite) learn as well as CLIP's B-1 negatives (InfoNCE), or
SigLIP's pairwise sigmoid, at the same batch size, once every run has trained to a plateau?

Rows (`ROWS`): InfoNCE; SigLIP; CLIP-Lite as the paper's code trains it (BatchNorm critic head,
the reference's image+text prior at 0.1, shift negatives, and its optimiser, SGD in Lookahead,
among the swept choices); and CLIP-Lite with one thing changed: the LayerNorm head, random
negatives, the neighbouring rank's caption (2 ranks). Every cell trains micro-vit (32 px) on the
synthetic caption corpus (`recipes/bench-objectives.yaml`), every row with the same augmentation
(`--augment`: open_clip's crop by default; `paper` is the paper's, which on this corpus crops
away what the captions name).

Two budgets, both reported: the same number of optimizer steps N at every batch size (the
paper's batch-size ablation), and the same number of samples S = N x the reference batch (the
smallest, by default) at every batch size. At the reference batch the two coincide and share
their runs. The corpus (20,000 pairs) is repeated for many epochs, as the paper's COCO runs
were (~2,000 epochs). `GRIDS` holds the defaults: the full grid's budget is where InfoNCE's
batch-64 curve began to level off on 2,000 pairs (tens of core-hours on a CPU: a job for GPUs
or SLURM); `--quick` is the same grid, two rows, far shorter, for a first look in about an hour.

Fairness: every row gets its own learning-rate sweep at each batch size, on the shorter of that
batch size's two budgets (the other reuses the winner), scored on a validation split (mean R@1
both ways; a separately generated retrieval set, never a reported one). A sweep starts with 3
rates and extends its grid until the winner is not at an edge (`MAX_EXTENSIONS` at most; a
winner left at an edge is flagged). CLIP-Lite-paper sweeps both optimisers; its variants
inherit the winning optimiser and sweep the rate. Then every winner trains with fresh seeds
(not the sweep's) and is evaluated on the reported sets: held-out retrieval R@1/R@5 both ways,
zero-shot top-1, a linear probe on the frozen image features (top-1) and a multi-label probe
(every colour and shape in a scene, mAP). Each reported run evaluates `CURVE_POINTS` times on
the validation split: its learning curve (R@1 and probe against samples seen), and whether it
plateaued (`PLATEAU_GAIN`: under 5% relative gain of validation R@1 over its last quarter, on a
line fitted to its second half: `plateau_gain`).

Cells already measured are kept in `cells.jsonl` beside the results, so an interrupted grid
continues where it stopped. Writes results.json/.csv/.md and curves-batchB.png under
`benchmarks/results/objectives/<machine>/`.

    python benchmarks/objectives.py --quick --jobs 2    # InfoNCE and CLIP-Lite-paper, batch 64 and 256
    python benchmarks/objectives.py --jobs 2            # every row
    python benchmarks/objectives.py --slurm --partition gpu --gpus-per-node 1    # as job arrays

A cell of W ranks takes W GPUs: on a one-GPU machine leave out cliplite-cross_rank (`--rows`),
or run it through SLURM.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import (REPO, CellCache, add_common_args, difference_interval, entry_point, markdown_table,
                    mean_interval, pyplot, results_folder, run_cells, save_figure, write_results)

RECIPE = REPO / "recipes" / "bench-objectives.yaml"


@dataclass(frozen=True)
class Row:
    overrides: tuple[str, ...]
    world_size: int = 1
    optimizers: tuple[str, ...] = ("adamw",)  # swept; empty: the optimiser `inherits` chose
    inherits: str = ""  # take the optimiser this row's sweep chose at each batch size


PAPER = ("objective.name=cliplite", "objective.head=mlp", "objective.head_norm=batch", "objective.negatives=shift",
         "objective.prior=reference", "objective.prior_weight=0.1")
ROWS = {
    "infonce": Row(("objective.name=infonce",)),
    "siglip": Row(("objective.name=siglip",)),
    "cliplite-paper": Row(PAPER, optimizers=("adamw", "sgd-lookahead")),
    "cliplite-layer": Row(PAPER + ("objective.head_norm=layer",), optimizers=(), inherits="cliplite-paper"),
    "cliplite-random": Row(PAPER + ("objective.negatives=random",), optimizers=(), inherits="cliplite-paper"),
    "cliplite-cross_rank": Row(PAPER + ("objective.negatives=cross_rank",), world_size=2, optimizers=(),
                               inherits="cliplite-paper"),
}


@dataclass(frozen=True)
class Grid:
    """A grid's defaults (each overridable on the command line)."""

    rows: tuple[str, ...]
    batches: tuple[int, ...]
    steps: int  # N: optimizer steps of the same-steps budget


# Batch 64 and up, the paper's ablation range: at batch 16 InfoNCE learns less per sample seen than
# at 64 here and is still climbing at 25,000 steps (benchmarks/README.md, 2026-11-30).
GRIDS = {
    "full": Grid(tuple(ROWS), (64, 256), 20000),  # where InfoNCE at 64 began to level off on 2,000 pairs
    "quick": Grid(("infonce", "cliplite-paper"), (64, 256), 1000),  # about an hour on 2 cores, far from a plateau
}


@dataclass(frozen=True)
class Optimizer:
    overrides: tuple[str, ...]
    ladder: tuple[float, ...]  # the learning rates a sweep may use, in order
    start: int  # index in `ladder` of the first of the 3 rates a sweep starts with


OPTIMIZERS = {
    # starting at 3e-4..3e-3: InfoNCE's best measured rates, 1e-3 at batch 64 and 3e-3 or more at 256
    "adamw": Optimizer(("optim.name=adamw", "optim.weight_decay=0.05", "optim.grad_clip=1.0"),
                       (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), 3),
    # the paper's: SGD with momentum 0.9, weight decay 1e-4, gradient clip 10, inside Lookahead
    "sgd-lookahead": Optimizer(("optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=1e-4",
                                "optim.grad_clip=10.0", "optim.lookahead_k=5", "optim.lookahead_alpha=0.5"),
                               (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0), 2),
}
MAX_EXTENSIONS = 3
CURVE_POINTS = 8  # evaluations per reported run; the 6th is at 75%
PLATEAU_GAIN = 0.05
METRICS = {  # reported metric -> label
    "R@1": "R@1 (mean both ways)", "R@5": "R@5 (mean both ways)", "zeroshot_top1": "zero-shot top-1",
    "probe_top1": "probe top-1", "probe_mAP": "multi-label probe mAP",
    # colours, 8 of the 14 labels, are easy for any feature: the shapes alone may separate the rows
    "probe_mAP_shapes": "multi-label probe mAP, shapes",
}


# ---- one cell --------------------------------------------------------------------------------------
def eval_sets(data_dir: Path) -> dict[str, Path]:
    """Where the evaluation sets of a corpus live: `val` (sweeps and curves; same distribution as
    `heldout`, another seed), `heldout` (reported retrieval), `classes` (zero-shot and probe) and
    `multilabel` (multi-label probe)."""
    return {name: data_dir / name for name in ("val", "heldout", "classes", "multilabel")}


def write_eval_sets(cfg) -> None:
    """The benchmark's own sets beside the corpus, written once (the trainer writes the rest)."""
    from cliplite_dist.data.synthetic import ensure_split, write_multilabel_set

    syn = cfg.data.synthetic
    sets = eval_sets(Path(syn.dir))
    ensure_split(sets["val"], syn.eval_samples, split="heldout", shard_size=syn.shard_size, image_size=syn.image_size,
                 seed=syn.seed + 1)
    for split, count in (("train", syn.classes_train_samples), ("test", syn.classes_test_samples)):
        if not (sets["multilabel"] / split / "nshards.txt").exists():
            write_multilabel_set(sets["multilabel"], count, split=split, seed=syn.seed, image_size=syn.image_size,
                                 shard_size=syn.shard_size)


def cell_name(cell: dict) -> str:
    return "-".join(str(cell[k]) for k in ("phase", "row", "batch", "axis", "steps", "augment", "optimizer", "lr",
                                           "seed"))


def cell_config(cell: dict):
    """The recipe plus this cell's row, optimiser, rate, batch, steps and seed (and the cell's own
    `overrides`, if any, last); refused if the cell names another corpus than that makes."""
    from cliplite_dist.config import load_config

    row = ROWS[cell["row"]]
    steps = cell["steps"]
    overrides = [
        f"run.name={cell_name(cell)}", *row.overrides, f"data.augment={cell['augment']}",
        *OPTIMIZERS[cell["optimizer"]].overrides,
        f"optim.lr={cell['lr']}", f"data.batch_size={cell['batch'] // row.world_size}", f"train.steps={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}", f"train.log_every={max(1, steps // 10)}",
        f"train.seed={cell['seed']}", *cell.get("overrides", []),
    ]
    syn = load_config(RECIPE, overrides).data.synthetic
    if cell.get("pairs", syn.train_samples) != syn.train_samples:
        raise ValueError(f"cell {cell_name(cell)} is for a corpus of {cell['pairs']} pairs, but {RECIPE.name} with its "
                         f"overrides makes {syn.train_samples} (data.synthetic.train_samples)")
    sets = eval_sets(Path(syn.dir))
    overrides.append(f"data.eval={sets['val']}")
    if cell["phase"] == "final":
        overrides += [f"data.eval_zeroshot={sets['classes']}", f"data.eval_probe={sets['classes']}",
                      f"train.eval_every={max(1, steps // CURVE_POINTS)}"]
    return load_config(RECIPE, overrides)


def mean_r1(results: dict, prefix: str = "") -> float:
    return (results[f"{prefix}i2t_R@1"] + results[f"{prefix}t2i_R@1"]) / 2


def plateau_gain(curve: list[dict]) -> float:
    """Relative gain of validation R@1 over the last quarter of training, read off a least-squares
    line through the evaluations of the second half (several points: one evaluation's noise, 5%
    of R@1 on 4,000 images, would otherwise decide it): (fit(T) - fit(3T/4)) / fit(3T/4)."""
    total = curve[-1]["step"]
    points = [(p["step"], p["val_R@1"]) for p in curve if p["step"] >= total / 2]
    if len(points) < 2:
        return float("inf")
    mean_x, mean_y = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    at_three_quarters = mean_y + slope * (0.75 * total - mean_x)
    return slope * total / 4 / max(at_three_quarters, 1e-9)


def final_evaluations(trainer, sets: dict[str, Path]) -> dict:
    """Held-out retrieval and the multi-label probe (all labels, and the shapes alone), on every
    rank (the embedding is collective)."""
    from cliplite_dist.data.synthetic import LABEL_NAMES, SHAPES
    from cliplite_dist.evaluate import tasks
    from cliplite_dist.evaluate.embed import DistributedEmbedder
    from cliplite_dist.evaluate.metrics import mean_ap

    cfg, info = trainer.cfg, trainer.engine_info
    embedder = DistributedEmbedder(trainer.engine, cfg.data.eval_batch_size, trainer.device, info.input_dtype)
    towers = DistributedEmbedder(trainer.engine, cfg.data.eval_batch_size, trainer.device, info.input_dtype,
                                 towers_only=True)
    transform, tokenizer = trainer.towers.eval_transform, trainer.towers.tokenizer
    trainer.engine.eval()
    heldout = tasks.retrieval(embedder, tasks.prepare_retrieval(str(sets["heldout"]), transform, tokenizer))
    multilabel = tasks.probe(towers, tasks.prepare_probe(str(sets["multilabel"]), transform))
    return {**{k: heldout[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")},
            "R@1": mean_r1(heldout), "R@5": (heldout["i2t_R@5"] + heldout["t2i_R@5"]) / 2,
            "probe_mAP": multilabel.value,
            "probe_mAP_shapes": mean_ap([ap for name, ap in zip(LABEL_NAMES, multilabel.per_class) if name in SHAPES])}


def measure(cell: dict) -> dict | None:
    from cliplite_dist.trainer import Trainer

    cfg = cell_config(cell)
    trainer = Trainer(cfg)
    if trainer.env.is_main:
        write_eval_sets(cfg)  # before the barrier in the trainer's set-up
    code = trainer.run()
    if code != 0:
        raise RuntimeError(f"cell {cell} ended with exit code {code}")
    final = final_evaluations(trainer, eval_sets(Path(cfg.data.synthetic.dir))) if cell["phase"] == "final" else {}
    row = None
    if trainer.env.is_main:
        lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in lines if "train/samples_per_s" in m]
        evals = [m for m in lines if "eval/i2t_R@1" in m]
        row = {**cell, "final_loss": train[-1]["train/loss"],
               "samples_per_s": statistics.median(m["train/samples_per_s"] for m in (train[1:] or train)),
               "val_score": mean_r1(evals[-1], "eval/")}
        if cell["phase"] == "final":
            probe_key = next(k for k in evals[-1] if k.startswith("eval/probe_"))
            curve = [{"step": m["step"], "samples": m["step"] * cell["batch"], "val_R@1": mean_r1(m, "eval/"),
                      "probe_top1": m[probe_key]} for m in evals]
            row.update(final, zeroshot_top1=evals[-1]["eval/zeroshot_top1"], probe_top1=evals[-1][probe_key],
                       curve=curve, plateau_gain=plateau_gain(curve))
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # checkpoints of benchmark cells are not kept
    del trainer
    gc.collect()
    return row


# ---- the grid ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What every cell of a grid shares: its training budgets, its augmentation and its corpus."""

    steps: int  # N: optimizer steps of every same-steps cell
    reference_batch: int  # same-samples cells see steps x reference_batch samples
    # data.augment of every row (the data pipeline is not what is compared). The paper's crops, down
    # to 20% of the image, cut away objects the synthetic captions name (benchmarks/README.md).
    augment: str = "open_clip"
    # pairs in the recipe's training corpus, part of every cell's identity: cached cells trained on
    # another corpus are not handed back
    pairs: int = 0

    def steps_for(self, axis: str, batch: int) -> int:
        """Steps of a cell at `batch` on `axis` ("steps", "samples", or "both": where they agree)."""
        return max(1, self.steps * self.reference_batch // batch) if axis == "samples" else self.steps

    def axes(self, batch: int) -> tuple[str, ...]:
        """The budgets a batch size is trained on: one run ("both") where they coincide."""
        return ("both",) if self.steps_for("samples", batch) == self.steps else ("steps", "samples")

    def sweep_axis(self, batch: int) -> str:
        """The budget a batch size's sweep runs on: the one with fewer steps."""
        return min(self.axes(batch), key=lambda axis: self.steps_for(axis, batch))


def rows_wider_than_gpus(rows: list[str], gpus: int) -> list[str]:
    """Rows whose cells need more ranks than a machine with `gpus` GPUs has (none on a CPU
    machine, gpus=0, where ranks share the cores): a rank takes a GPU of its own."""
    return [name for name in rows if gpus and ROWS[name].world_size > gpus]


def cell_cost(cell: dict) -> float:
    """About what a cell costs, for splitting cells between parallel workers: steps x (a fixed
    cost per step + one per sample)."""
    return cell["steps"] * (16 + cell["batch"]) * cell["world_size"]


def sweep_cells(rows, batches, budget: Budget, chosen: dict | None = None) -> list[dict]:
    """The first 3 rates of every (row, batch, optimiser), on the batch's sweep budget; rows that
    inherit their optimiser take it from `chosen` ((row, batch, axis) -> winning sweep row)."""
    cells = []
    for name in rows:
        row = ROWS[name]
        for batch in batches:
            axis = budget.sweep_axis(batch)
            for optimizer in row.optimizers or (chosen[(row.inherits, batch, axis)]["optimizer"],):
                opt = OPTIMIZERS[optimizer]
                cells += [sweep_cell(name, batch, axis, optimizer, lr, budget)
                          for lr in opt.ladder[opt.start:opt.start + 3]]
    return cells


def sweep_cell(row: str, batch: int, axis: str, optimizer: str, lr: float, budget: Budget) -> dict:
    return dict(phase="sweep", row=row, batch=batch, axis=axis, steps=budget.steps_for(axis, batch),
                augment=budget.augment, pairs=budget.pairs, optimizer=optimizer, lr=lr, seed=0,
                world_size=ROWS[row].world_size)


def sweep_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Sweep rows by (row, batch, axis, optimiser), each list sorted by rate."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["phase"] == "sweep":
            groups.setdefault((r["row"], r["batch"], r["axis"], r["optimizer"]), []).append(r)
    return {key: sorted(group, key=lambda r: r["lr"]) for key, group in groups.items()}


def best(group: list[dict]) -> dict:
    """The winner: highest validation score; a tie goes to the smaller rate."""
    return max(group, key=lambda r: (r["val_score"], -r["lr"]))


def at_edge(group: list[dict]) -> str:
    """"low"/"high" if the winner is the smallest/largest rate tried, else ""."""
    winner = best(group)
    return "low" if winner is group[0] else "high" if winner is group[-1] else ""


def extension_cells(rows: list[dict], budget: Budget) -> list[dict]:
    """One more rate beyond the edge for every sweep whose winner sits at an edge of its grid
    (none once the ladder or MAX_EXTENSIONS runs out)."""
    cells = []
    for (row, batch, axis, optimizer), group in sweep_groups(rows).items():
        ladder = OPTIMIZERS[optimizer].ladder
        edge, lrs = at_edge(group), [r["lr"] for r in group]
        index = ladder.index(lrs[0]) - 1 if edge == "low" else ladder.index(lrs[-1]) + 1
        if edge and len(lrs) < 3 + MAX_EXTENSIONS and 0 <= index < len(ladder):
            cells.append(sweep_cell(row, batch, axis, optimizer, ladder[index], budget))
    return cells


def winners(rows: list[dict]) -> dict[tuple, dict]:
    """(row, batch, axis) -> the winning sweep row over every optimiser swept."""
    out: dict[tuple, dict] = {}
    for (row, batch, axis, _), group in sweep_groups(rows).items():
        candidate = best(group)
        if (row, batch, axis) not in out or candidate["val_score"] > out[(row, batch, axis)]["val_score"]:
            out[(row, batch, axis)] = candidate
    return out


def final_cells(chosen: dict[tuple, dict], seeds, budget: Budget) -> list[dict]:
    """Every winner again with fresh seeds, on both budgets, on the reported sets."""
    return [dict(phase="final", row=w["row"], batch=w["batch"], axis=axis, steps=budget.steps_for(axis, w["batch"]),
                 augment=budget.augment, pairs=budget.pairs, optimizer=w["optimizer"], lr=w["lr"], seed=seed,
                 world_size=w["world_size"])
            for _, w in sorted(chosen.items()) for axis in budget.axes(w["batch"]) for seed in seeds]


def sweep_stages(rows: list[str]) -> tuple[list[str], list[str]]:
    """Stage 1: rows that sweep their optimiser, and the rows the others inherit it from even when
    not asked for (their sweep alone: from the cache, when an earlier run had them); stage 2: rows
    that inherit it."""
    parents = {ROWS[r].inherits for r in rows}
    return [r for r in ROWS if (r in rows and not ROWS[r].inherits) or r in parents], \
        [r for r in rows if ROWS[r].inherits]


def run_sweeps(rows: list[str], batches, budget: Budget, args, cache: CellCache) -> list[dict]:
    """The sweeps of `sweep_stages`, each stage's grids extended until no winner sits at an edge."""
    measured: list[dict] = []
    for stage in sweep_stages(rows):
        if not stage:
            continue
        cells = sweep_cells(stage, batches, budget, winners(measured))
        while cells:
            measured += run_cells(__file__, cells, args, "objectives", cache, cell_cost)
            cells = [c for c in extension_cells(measured, budget) if c["row"] in stage]
    return measured


# ---- report ----------------------------------------------------------------------------------------------
def _cell(rows: list[dict], row: str, batch: int, axis: str) -> list[dict]:
    """The reported runs of (row, batch) on `axis`; at the reference batch one set serves both."""
    return [r for r in rows if r["phase"] == "final" and r["row"] == row and r["batch"] == batch
            and r["axis"] in (axis, "both")]


def verdict(runs: list[dict], baseline: list[dict], key: str) -> str:
    """ahead / tie / behind the baseline: whether Welch's 95% interval of the difference of
    means excludes 0."""
    diff, half = difference_interval([r[key] for r in runs], [r[key] for r in baseline])
    return "ahead" if diff - half > 0 else "behind" if diff + half < 0 else "tie"


def fmt_interval(values: list[float]) -> str:
    mean, half = mean_interval(values)
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def results_table(rows: list[dict], axis: str, budget: Budget) -> str:
    header = ["row", "batch", "steps", "optimizer / lr", *METRICS.values(), "vs InfoNCE (R@1)", "plateaued",
              "seeds"]
    table = []
    for batch in sorted({r["batch"] for r in rows if r["phase"] == "final"}):
        baseline = _cell(rows, "infonce", batch, axis)
        for name in ROWS:
            runs = _cell(rows, name, batch, axis)
            if not runs:
                continue
            gains = [r["plateau_gain"] for r in runs]
            plateaued = sum(g < PLATEAU_GAIN for g in gains)
            table.append([name, batch, runs[0]["steps"], f"{runs[0]['optimizer']} / {runs[0]['lr']:g}",
                          *(fmt_interval([r[k] for r in runs]) for k in METRICS),
                          "-" if name == "infonce" or not baseline else verdict(runs, baseline, "R@1"),
                          f"{plateaued}/{len(runs)} (gain {100 * max(gains):+.1f}% max)", len(runs)])
    return markdown_table(header, table)


def verdict_table(rows: list[dict], batches) -> str:
    """Every row against InfoNCE, on every metric and both budgets."""
    header = ["row", "budget", *(f"batch {b}" for b in batches)]
    table = []
    measured = {r["row"] for r in rows if r["phase"] == "final"}
    for name in ROWS:
        if name == "infonce" or name not in measured:
            continue
        for axis in ("steps", "samples"):
            cells = []
            for batch in batches:
                runs, baseline = _cell(rows, name, batch, axis), _cell(rows, "infonce", batch, axis)
                cells.append(", ".join(f"{label.split(' (')[0]} {verdict(runs, baseline, k)}"
                                       for k, label in METRICS.items()) if runs and baseline else "-")
            table.append([name, f"same {axis}", *cells])
    return markdown_table(header, table)


def sweep_table(rows: list[dict]) -> str:
    chosen = winners(rows)
    table = []
    for (row, batch, axis, optimizer), group in sorted(sweep_groups(rows).items()):
        edge = at_edge(group)
        winner = chosen[(row, batch, axis)]
        table.append([row, batch, axis, group[0]["steps"], optimizer,
                      ", ".join(f"{r['lr']:g}: {r['val_score']:.3f}" for r in group),
                      f"{best(group)['lr']:g}" + (f" (at the {edge} edge)" if edge else ""),
                      "yes" if winner["optimizer"] == optimizer else ""])
    return markdown_table(["row", "batch", "budget", "steps", "optimizer", "lr: validation R@1", "best lr", "chosen"],
                          table)


def plot_curves(rows: list[dict], folder: Path) -> list[str]:
    """One PNG per batch size: validation R@1 and probe top-1 against samples seen, mean over
    seeds, same-steps runs solid, same-samples runs dashed (at the reference batch they are one)."""
    plt = pyplot()
    names = []
    for batch in sorted({r["batch"] for r in rows if r["phase"] == "final"}):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for i, name in enumerate(ROWS):
            for axis, style in (("steps", "-"), ("both", "-"), ("samples", "--")):
                runs = [r for r in rows if r["phase"] == "final" and (r["row"], r["batch"], r["axis"]) == (name, batch, axis)]
                if not runs:
                    continue
                for ax, key in zip(axes, ("val_R@1", "probe_top1")):
                    points = list(zip(*(r["curve"] for r in runs)))
                    ax.plot([p[0]["samples"] for p in points], [statistics.mean(q[key] for q in p) for p in points],
                            style, color=f"C{i}", marker="o", markersize=3,
                            label=name if axis == "both" else f"{name}, same {axis}")
        for ax, title in zip(axes, ("validation R@1 (mean both ways)", "linear probe top-1")):
            ax.set_xscale("log")
            ax.set_xlabel("samples seen")
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"learning curves at batch {batch} (mean over seeds)")
        name = f"curves-batch{batch}.png"
        save_figure(fig, folder / name)
        names.append(name)
    return names


def report(rows: list[dict], folder: Path, budget: Budget, seeds: list[int], machine: dict) -> str:
    """results.md and the learning-curve plots, from the rows (also from a saved results.json)."""
    on = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    batches = sorted({r["batch"] for r in rows if r["phase"] == "final"})
    plots = plot_curves(rows, folder)
    text = (f"# Objectives at matched batch sizes, trained to a plateau\n\nmicro-vit (32 px) on the synthetic caption "
            f"corpus ({budget.pairs:,} pairs), {len(seeds)} fresh seeds per cell (the sweeps used seed 0), on {on}, "
            f"torch {machine['torch']}, DeepSpeed {machine['deepspeed']}. Same steps: {budget.steps} optimizer steps "
            f"at every batch size; same samples: {budget.steps * budget.reference_batch:,} samples at every batch size "
            f"({budget.steps} steps at batch {budget.reference_batch}); data.augment={budget.augment} for every "
            f"row. Values: mean ± half-width of the 95% t "
            f"interval over seeds, on the reported sets. 'vs InfoNCE': Welch's 95% interval of the difference "
            f"excludes 0 (ahead / behind) or not (tie). 'plateaued': runs whose validation R@1 gained under "
            f"{PLATEAU_GAIN:.0%} over the last quarter of training.\n\n"
            f"## Same number of steps\n\n{results_table(rows, 'steps', budget)}\n\n"
            f"## Same number of samples\n\n{results_table(rows, 'samples', budget)}\n\n"
            f"## Against InfoNCE, every metric\n\n{verdict_table(rows, batches)}\n\n"
            f"## Learning curves\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n\n"
            f"## Sweeps (validation split, seed 0)\n\n{sweep_table(rows)}\n")
    (folder / "results.md").write_text(text)
    return text


def main() -> None:
    import torch

    from cliplite_dist.config import Augment, choices, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)

    def default(field: str) -> str:
        values = {name: getattr(grid, field) for name, grid in GRIDS.items()}
        return "default: " + "; ".join(f"{name} {v if isinstance(v, int) else ','.join(map(str, v))}"
                                       for name, v in values.items())

    parser.add_argument("--batches", default="", help=f"comma-separated global batch sizes ({default('batches')})")
    parser.add_argument("--rows", default="", help=f"comma-separated rows ({default('rows')})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0,
                        help=f"N: optimizer steps of the same-steps budget ({default('steps')})")
    parser.add_argument("--reference-batch", type=int, default=0,
                        help="same-samples budget: N x this many samples (default: the smallest batch)")
    parser.add_argument("--augment", choices=choices(Augment), default="open_clip",
                        help="data.augment of every row (default: open_clip's crop; see benchmarks/README.md)")
    parser.add_argument("--rerender", action="store_true", help="rewrite results.md and the plots from results.json")
    args = parser.parse_args()
    folder = results_folder("objectives", args.machine_name, args.results_dir)
    if args.rerender:
        saved = json.loads((folder / "results.json").read_text())
        print(report(saved["rows"], folder, Budget(**saved["budget"]), saved["seeds"], saved["machine"]))
        return
    grid = GRIDS["quick" if args.quick else "full"]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(grid.batches)
    rows = args.rows.split(",") if args.rows else list(grid.rows)
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    gpus = torch.cuda.device_count()
    too_wide = [] if args.slurm else rows_wider_than_gpus(rows, gpus)
    if too_wide:
        parser.error(f"rows {', '.join(too_wide)} train on more ranks (one GPU each) than the {gpus} GPU(s) here: "
                     f"leave them out with --rows, or run the grid with --slurm --gpus-per-node N (a cell then "
                     f"spans nodes)")
    budget = Budget(args.steps or grid.steps, args.reference_batch or min(batches), args.augment,
                    load_config(RECIPE).data.synthetic.train_samples)
    seeds = list(range(1, args.seeds + 1))
    cache = CellCache(folder / "cells.jsonl")

    sweep = run_sweeps(rows, batches, budget, args, cache)
    chosen = {key: winner for key, winner in winners(sweep).items() if key[0] in rows}
    final = run_cells(__file__, final_cells(chosen, seeds, budget), args, "objectives", cache, cell_cost)
    results = sweep + final
    write_results(folder, results, "", world_size=2, budget=vars(budget), batches=batches, seeds=seeds)
    print(report(results, folder, budget, seeds, json.loads((folder / "results.json").read_text())["machine"]))


if __name__ == "__main__":
    entry_point(main, measure)
