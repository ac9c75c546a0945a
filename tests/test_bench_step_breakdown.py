"""The step benchmark's A/B machinery: steps alternate (the order swapping every round) and the
ratio's interval brackets its median, wide for noisy ratios and narrow for steady ones."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_breakdown as bench  # noqa: E402  (benchmarks/step_breakdown.py)


def test_steps_alternate_and_swap_order_every_round():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved_step_seconds(steps, rounds=4)
    assert [len(t) for t in times.values()] == [4, 4]
    measured = calls[2 * bench.WARMUP_ROUNDS:]
    assert measured == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_bootstrap_interval_brackets_the_median():
    steady = [1.0, 1.01, 0.99, 1.0, 1.0, 1.01, 0.99, 1.0] * 5
    median, low, high = bench.median_ratio_interval(steady)
    assert low <= median <= high and high - low <= 0.011
    noisy = [0.8, 1.2, 0.9, 1.1, 1.0, 0.7, 1.3, 1.05] * 5
    median, low, high = bench.median_ratio_interval(noisy)
    assert low <= median <= high and high - low > 0.04
    assert bench.median_ratio_interval(noisy) == (median, low, high)  # seeded: reproducible
