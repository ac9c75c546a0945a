"""benchmarks/scaling.py's cost model against hand-computed values."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402


def test_infonce_loss_fit_is_linear_in_ranks():
    t0, slope = scaling.infonce_loss_fit(loss_ms_b=3.0, loss_ms_16b=258.0)  # 2 + 1 x W at W = 1 and W = 256
    assert (t0, slope) == pytest.approx((2.0, 1.0))


def test_projection_by_part():
    # b=4, d=8, 100 parameters, 1 GB/s, 1 us per message, towers 10 ms
    args = dict(towers_ms=10.0, batch=4, dim=8, params=100, bandwidth_gbs=1.0, latency_us=1.0)
    infonce = scaling.projected_ms("infonce", 2, loss_ms_1=3.0, loss_ms_16b=258.0, **args)
    assert infonce["grad_allreduce_ms"] == pytest.approx(1000 * (400 / 1e9 + 2e-6))  # 2 (W-1)/W 4P / BW + 2 (W-1) a
    assert infonce["features_ms"] == pytest.approx(1000 * (6 * 4 * 8 * 4 / 1e9 + 4e-6))
    assert infonce["loss_ms"] == pytest.approx(4.0)  # t0 + slope x W
    assert infonce["step_ms"] == pytest.approx(10.0 + 4.0 + infonce["grad_allreduce_ms"] + infonce["features_ms"])
    shift = scaling.projected_ms("cliplite-shift", 1024, loss_ms_1=3.0, **args)
    assert shift["loss_ms"] == 3.0 and shift["features_ms"] == 0.0  # nothing leaves the rank, whatever W
    cross = scaling.projected_ms("cliplite-cross_rank", 1024, loss_ms_1=3.0, **args)
    assert cross["features_ms"] == pytest.approx(1000 * (2 * 4 * 8 * 4 / 1e9 + 2e-6))  # independent of W
    alone = scaling.projected_ms("infonce", 1, loss_ms_1=3.0, loss_ms_16b=258.0, **args)
    assert alone["grad_allreduce_ms"] == 0.0 and alone["features_ms"] == 0.0 and alone["loss_ms"] == pytest.approx(3.0)
