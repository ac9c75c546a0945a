"""benchmarks/objectives.py: sweep winners chosen on validation only, and one real cell."""
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import objectives  # noqa: E402


def _sweep_row(row, batch, lr, head="mlp", t0=14.2857, score=0.0, **extra):
    return dict(phase="sweep", row=row, batch=batch, lr=lr, head=head, temperature_init=t0, seed=0,
                val_score=score, **extra)


def test_winners_come_from_the_validation_score_and_finals_use_fresh_seeds():
    sweep = [_sweep_row("cliplite-shift", 16, 1e-3, "mlp", 5.0, score=0.10, **{"t2i_R@1": 0.9}),
             _sweep_row("cliplite-shift", 16, 3e-3, "linear", 14.2857, score=0.20, **{"t2i_R@1": 0.0})]
    stage2 = objectives.strategy_cells(sweep, [16], [1e-3, 3e-3], samples=64)
    # the other CLIP-Lite rows inherit shift's winning head and temperature, and sweep lr only
    assert {(c["row"], c["lr"]) for c in stage2} == {(r, lr) for r in ("cliplite-random", "cliplite-hard",
                                                                        "cliplite-cross_rank") for lr in (1e-3, 3e-3)}
    assert all(c["head"] == "linear" and c["temperature_init"] == 14.2857 for c in stage2)
    assert [c["world_size"] for c in stage2 if c["row"] == "cliplite-cross_rank"] == [2, 2]

    scored = sweep + [_sweep_row(c["row"], 16, c["lr"], c["head"], c["temperature_init"], score=c["lr"])
                      for c in stage2] + [_sweep_row("infonce", 16, lr, score=1 / lr) for lr in (1e-3, 3e-3)]
    finals = objectives.final_cells(scored, [16], [1, 2, 3], samples=64)
    assert len(finals) == len(objectives.ROWS) * 3 and {c["seed"] for c in finals} == {1, 2, 3}
    chosen = {c["row"]: c["lr"] for c in finals}
    assert chosen["cliplite-shift"] == 3e-3 and chosen["infonce"] == 1e-3 and chosen["cliplite-hard"] == 3e-3


def test_sweep_table_marks_one_winner_per_row_and_batch():
    rows = [_sweep_row("infonce", b, lr, score=s) for b in (16, 64) for lr, s in ((1e-3, 0.1), (3e-3, 0.3))]
    table = objectives.sweep_table(rows)
    assert table.count("| yes |") == 2 and "0.300" in table


@pytest.mark.timeout(300)
def test_one_final_cell_trains_and_reports_every_metric(tiny_corpus, tmp_path, single_rank_group):
    cell = dict(phase="final", row="cliplite-hard", batch=16, lr=1e-3, head="linear", temperature_init=5.0, seed=1,
                samples=64, world_size=1,
                overrides=[f"run.output_dir={tmp_path}", f"data.synthetic.dir={tiny_corpus}",
                           "data.synthetic.train_samples=0", f"data.train={tiny_corpus / 'train'}",
                           "data.eval_max_samples=64", "data.shuffle_buffer=50"])
    row = objectives.measure(cell)
    assert row["steps"] == 4
    for key in objectives.QUALITY + ("final_loss", "step_ms", "loss_ms", "peak_mem_mb"):
        assert row[key] >= 0, key
    assert 0 < row["probe_top1"] <= 1 and row["step_ms"] > row["loss_ms"] > 0
    assert (tiny_corpus / "val" / "sizes.json").exists()  # the sweep's validation split, not the held-out one
    assert not list(tmp_path.iterdir())  # benchmark cells keep no run directories


def test_report_writes_mean_std_table_and_plots(tmp_path):
    rows = []
    for batch in (16, 64):
        for row in objectives.ROWS:
            sweep = _sweep_row(row, batch, 1e-3, score=0.1)
            rows.append(sweep)
            for seed, value in ((1, 0.1), (2, 0.3)):
                rows.append(dict(sweep, phase="final", seed=seed, final_loss=1.0,
                                 step_ms=10.0 * batch, loss_ms=1.0, peak_mem_mb=5.0,
                                 **{k: value for k in objectives.QUALITY}))
    machine = {"gpu": None, "cpu": "test cpu", "cores": 2, "torch": "x", "deepspeed": "y"}
    objectives.report(rows, tmp_path, samples=64, seeds=[1, 2], machine=machine)
    text = (tmp_path / "results.md").read_text()
    assert "0.200 ± 0.141" in text and text.count("| cliplite-cross_rank |") >= 2
    summary = text.split("## Sweep")[0]
    assert len({line.count("|") for line in summary.splitlines() if line.startswith("|")}) == 1  # columns line up
    for name in ("quality_vs_batch.png", "step_time_vs_batch.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 400
