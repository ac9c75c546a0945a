"""benchmarks/objectives.py: sweeps extended until the winner is inside its grid, winners chosen on
validation only, fresh seeds on both budgets, intervals and verdicts, resumable grids, and one
real reported cell."""
import argparse
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import objectives  # noqa: E402

BUDGET = objectives.Budget(steps=100, reference_batch=16)


def _scored(cells, score):
    return [dict(c, val_score=score(c)) for c in cells]


def test_sweep_extends_past_an_edge_until_the_winner_is_inside():
    first = objectives.sweep_cells(["infonce"], [16], BUDGET)
    assert [c["lr"] for c in first] == [3e-4, 1e-3, 3e-3] and {c["seed"] for c in first} == {0}
    assert {(c["axis"], c["steps"]) for c in first} == {("both", 100)}  # the reference batch: one budget
    # the score keeps rising with the rate up to 1e-2: two extensions upwards, then the winner is inside
    rows = _scored(first, lambda c: -abs(c["lr"] - 1e-2))
    extra = objectives.extension_cells(rows, BUDGET)
    assert [c["lr"] for c in extra] == [1e-2]
    rows += _scored(extra, lambda c: -abs(c["lr"] - 1e-2))
    extra = objectives.extension_cells(rows, BUDGET)
    assert [c["lr"] for c in extra] == [3e-2]
    rows += _scored(extra, lambda c: -abs(c["lr"] - 1e-2))
    assert objectives.extension_cells(rows, BUDGET) == []
    assert objectives.at_edge(objectives.sweep_groups(rows)[("infonce", 16, "both", "adamw")]) == ""
    # a winner at the ladder's end stays flagged
    low = _scored(objectives.sweep_cells(["infonce"], [16], BUDGET), lambda c: -c["lr"])
    for _ in range(5):
        low += _scored(objectives.extension_cells(low, BUDGET), lambda c: -c["lr"])
    group = objectives.sweep_groups(low)[("infonce", 16, "both", "adamw")]
    assert [r["lr"] for r in group] == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3] and objectives.at_edge(group) == "low"
    assert "at the low edge" in objectives.sweep_table(low)


def test_paper_row_sweeps_both_optimisers_on_the_shorter_budget_and_variants_inherit_the_winner():
    stage1 = objectives.sweep_cells(["cliplite-paper"], [16, 64], BUDGET)
    assert {(c["batch"], c["axis"], c["steps"], c["optimizer"]) for c in stage1} == {
        (b, axis, steps, o) for b, axis, steps in ((16, "both", 100), (64, "samples", 25))
        for o in ("adamw", "sgd-lookahead")}
    assert [c["lr"] for c in stage1 if c["optimizer"] == "sgd-lookahead" and c["batch"] == 16] == [0.01, 0.03, 0.1]
    rows = _scored(stage1, lambda c: (c["optimizer"] == "sgd-lookahead") == (c["batch"] == 16)
                   and c["lr"] in (0.03, 3e-4))
    chosen = objectives.winners(rows)
    assert (chosen[("cliplite-paper", 16, "both")]["optimizer"], chosen[("cliplite-paper", 64, "samples")]["optimizer"]) \
        == ("sgd-lookahead", "adamw")
    stage2 = objectives.sweep_cells(["cliplite-layer", "cliplite-cross_rank"], [16, 64], BUDGET, chosen)
    assert {(c["row"], c["batch"], c["optimizer"]) for c in stage2} == {
        (r, b, o) for r in ("cliplite-layer", "cliplite-cross_rank") for b, o in ((16, "sgd-lookahead"), (64, "adamw"))}
    assert {c["world_size"] for c in stage2 if c["row"] == "cliplite-cross_rank"} == {2}
    # a variant asked for alone (e.g. cross_rank where 2 GPUs are) brings its parent's sweep along
    assert objectives.sweep_stages(["cliplite-cross_rank"]) == (["cliplite-paper"], ["cliplite-cross_rank"])
    assert objectives.sweep_stages(["infonce", "siglip"]) == (["infonce", "siglip"], [])


def test_finals_use_fresh_seeds_on_both_budgets_with_the_sweeps_winner():
    rows = _scored(objectives.sweep_cells(["infonce"], [16, 64, 256], BUDGET),
                   lambda c: -abs(c["lr"] - (3e-4 if c["batch"] == 16 else 1e-3)))
    assert {(c["batch"], c["axis"], c["steps"]) for c in rows} == {(16, "both", 100), (64, "samples", 25),
                                                                   (256, "samples", 6)}
    finals = objectives.final_cells(objectives.winners(rows), [1, 2, 3], BUDGET)
    by_axis = {(c["batch"], c["axis"]): (c["steps"], c["lr"]) for c in finals}
    assert by_axis == {(16, "both"): (100, 3e-4), (64, "steps"): (100, 1e-3), (64, "samples"): (25, 1e-3),
                       (256, "steps"): (100, 1e-3), (256, "samples"): (6, 1e-3)}
    assert {c["seed"] for c in finals} == {1, 2, 3} and {c["phase"] for c in finals} == {"final"}
    assert len(finals) == 5 * 3 and "val_score" not in finals[0]
    assert {c["augment"] for c in rows + finals} == {BUDGET.augment} == {"open_clip"}  # in each cell's identity
    # with the largest batch as the reference, the smaller batch sweeps on the same-steps budget
    assert objectives.Budget(steps=100, reference_batch=64).sweep_axis(16) == "steps"


def test_a_cell_names_its_corpus_and_refuses_another():
    budget = objectives.Budget(steps=100, reference_batch=64, pairs=20000)
    cell = objectives.sweep_cell("infonce", 64, "both", "adamw", 1e-3, budget)
    assert cell["pairs"] == 20000 == objectives.cell_config(cell).data.synthetic.train_samples  # the recipe's
    with pytest.raises(ValueError, match="2000 pairs.*makes 20000"):
        objectives.cell_config(dict(cell, pairs=2000))
    # a cached row of 2,000 pairs is another cell
    assert common.cell_key(cell) != common.cell_key(dict(cell, pairs=2000))


def test_rows_that_need_more_gpus_than_the_machine_has_are_named():
    rows = list(objectives.ROWS)
    assert objectives.rows_wider_than_gpus(rows, 1) == ["cliplite-cross_rank"]  # 2 ranks, one GPU each
    assert objectives.rows_wider_than_gpus(rows, 2) == []
    assert objectives.rows_wider_than_gpus(rows, 0) == []  # on CPU the ranks share the cores


def test_plateau_gain_reads_a_line_through_the_second_half():
    flat = [{"step": s, "val_R@1": v} for s, v in ((25, 0.1), (50, 0.40), (75, 0.41), (100, 0.40))]
    assert objectives.plateau_gain(flat) == 0.0  # the rise of the first half does not count
    rising = [{"step": s, "val_R@1": 0.002 * s} for s in (25, 50, 75, 100)]
    assert objectives.plateau_gain(rising) == pytest.approx(0.05 / 0.15)
    noisy = [{"step": s, "val_R@1": v} for s, v in ((50, 0.40), (62, 0.44), (75, 0.38), (88, 0.43), (100, 0.40))]
    assert abs(objectives.plateau_gain(noisy)) < 0.05  # one high point does not make a rise


def test_intervals_and_verdicts():
    mean, half = common.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert common.mean_interval([5.0]) == (5.0, 0.0)
    diff, half = common.difference_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert diff == 0 and half > 0
    assert common.t_critical(2.7) == 4.303 and common.t_critical(100) == 1.96
    base = [{"R@1": v} for v in (0.30, 0.31, 0.32)]
    assert objectives.verdict([{"R@1": v} for v in (0.40, 0.41, 0.42)], base, "R@1") == "ahead"
    assert objectives.verdict([{"R@1": v} for v in (0.20, 0.21, 0.22)], base, "R@1") == "behind"
    assert objectives.verdict([{"R@1": v} for v in (0.25, 0.31, 0.37)], base, "R@1") == "tie"


def test_balanced_groups_and_cached_cells_are_not_measured_again(tmp_path, monkeypatch):
    groups = common.balanced_groups([0, 1, 2, 3], cost=lambda i: [8, 1, 1, 6][i], groups=2)
    assert sorted(map(sorted, groups)) == [[0], [1, 2, 3]]
    cache = common.CellCache(tmp_path / "cells.jsonl")
    cells = [{"a": 1}, {"a": 2}]
    cache.add(cells[0], {"a": 1, "value": 10})
    measured = []
    monkeypatch.setattr(common, "run_cells_local", lambda script, todo, *rest: measured.extend(todo) or
                        [{"a": c["a"], "value": 20} for c in todo])
    args = argparse.Namespace(slurm=False, jobs=2)
    rows = common.run_cells("x.py", cells, args, "b", cache)
    assert measured == [{"a": 2}] and [r["value"] for r in rows] == [10, 20]


@pytest.mark.timeout(600)
def test_one_final_cell_trains_and_reports_every_metric(tiny_corpus, tmp_path, single_rank_group):
    cell = dict(phase="final", row="cliplite-paper", batch=16, axis="steps", steps=4, augment="paper",
                optimizer="sgd-lookahead", lr=0.03, seed=1, world_size=1,
                overrides=[f"run.output_dir={tmp_path}", f"data.synthetic.dir={tiny_corpus}",
                           "data.synthetic.train_samples=0", f"data.train={tiny_corpus / 'train'}",
                           "data.synthetic.eval_samples=64", "data.synthetic.classes_test_samples=96",
                           "data.synthetic.classes_train_samples=192", "data.shuffle_buffer=50",
                           "data.synthetic.shard_size=200"])
    cfg = objectives.cell_config(cell)
    assert (cfg.objective.head_norm, cfg.objective.prior, cfg.data.augment, cfg.optim.lookahead_k) == \
        ("batch", "reference", "paper", 5)
    row = objectives.measure(cell)
    for key in objectives.METRICS:
        assert 0 <= row[key] <= 1, key
    assert [p["step"] for p in row["curve"]] == [1, 2, 3, 4]
    assert row["curve"][-1]["samples"] == 64 and all(0 <= p["probe_top1"] <= 1 for p in row["curve"])
    assert "plateau_gain" in row and row["final_loss"] > 0
    assert (tiny_corpus / "val" / "sizes.json").exists()  # validation split, not the held-out one
    assert (tiny_corpus / "multilabel" / "test" / "nshards.txt").exists()
    assert not list(tmp_path.iterdir())  # benchmark cells keep no run directories


def test_report_writes_intervals_verdicts_and_curves(tmp_path):
    rows = []
    for batch in (16, 64, 256):
        for name in objectives.ROWS:
            for axis in BUDGET.axes(batch):
                sweep = dict(objectives.sweep_cell(name, batch, axis, "adamw", 1e-3, BUDGET), val_score=0.1)
                rows.append(sweep)
                for seed, value in ((1, 0.1), (2, 0.3), (3, 0.2)):
                    shift = 0.5 if name == "siglip" else 0.0
                    curve = [{"step": s, "samples": s * batch, "val_R@1": value * s / 100, "probe_top1": 0.5}
                             for s in range(25, 101, 25)]
                    rows.append(dict(sweep, phase="final", seed=seed, final_loss=1.0, curve=curve,
                                     plateau_gain=objectives.plateau_gain(curve),
                                     **{k: value + shift for k in objectives.METRICS}))
    machine = {"gpu": None, "cpu": "test cpu", "cores": 2, "torch": "x", "deepspeed": "y"}
    text = objectives.report(rows, tmp_path, BUDGET, [1, 2, 3], machine)
    assert text == (tmp_path / "results.md").read_text()
    assert f"0.200 ± {common.mean_interval([0.1, 0.3, 0.2])[1]:.3f}" in text
    steps_table = text.split("## Same number of steps")[1].split("## Same number of samples")[0]
    assert "| siglip | 16 |" in steps_table and "| ahead |" in steps_table and "| tie |" in steps_table
    assert "0/3 (gain +33.3% max)" in steps_table  # these curves still rise: nothing plateaued
    assert len({line.count("|") for line in steps_table.splitlines() if line.startswith("|")}) == 1
    assert "R@1 ahead" in text.split("## Against InfoNCE")[1]
    for batch in (16, 64, 256):
        with Image.open(tmp_path / f"curves-batch{batch}.png") as image:
            assert image.size[0] > 600
    assert statistics.mean([0.1, 0.3, 0.2]) == pytest.approx(0.2)
