"""A stop signal at any moment of a run: during start-up, data start, a step, an evaluation or a
checkpoint save, on 1 rank and on one of 2 ranks, sent (like SLURM's preemption) to the rank's
process and to its loader workers. Every run ends with exit 75 and a complete checkpoint at the
step where it stopped (nothing to save before the first step), or finishes if the signal came
too late to matter; the same command then resumes there and reaches the last step.

The moments are drawn at random over a run's whole life (seeded: a failure names its seed and
moment, to rerun it). CLIPLITE_SIGNAL_RUNS sets the number of signalled runs per world size (CI
runs more than the default)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from runkit import RECIPE, clean_env, descendants, metric_steps, tiny_overrides, torchrun_command, train_command
from test_multiprocess import rank_pid

EXIT_INTERRUPTED = 75
STEPS = 12
RUNS = int(os.environ.get("CLIPLITE_SIGNAL_RUNS", "3"))  # CI: 12
SEED = int(os.environ.get("CLIPLITE_SIGNAL_SEED", "20261129"))
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# The interpreter's own start and the CLI's first imports come before any code of ours can catch
# a signal (cliplite-train catches from its first line): moments start after them.
FIRST_MOMENT_S = 0.5


def _command(world: int, corpus, out) -> list[str]:
    launcher = train_command() if world == 1 else torchrun_command(world)
    return launcher + [RECIPE] + tiny_overrides(corpus, out, **{
        "train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 5, "train.eval_every": 6,
        "data.workers": 1, "engine.zero_stage": 1 if world > 1 else 0})


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _target(proc: subprocess.Popen, world: int, rank: int) -> int | None:
    """The process to signal: the trainer itself on 1 rank, torchrun's worker of `rank` on 2 (a
    signal to torchrun's agent is torchrun's business); None until it exists."""
    if world == 1:
        return proc.pid
    try:
        return rank_pid(proc.pid, rank)
    except (AssertionError, OSError):
        return None


def _signal_at(proc: subprocess.Popen, world: int, rank: int, signum: int, moment: float) -> bool:
    """Send `signum` to the target and its loader workers `moment` s after it appeared; False if
    the run ended first."""
    # The pid found first is the one signalled: torchrun's worker can exit (its run done) while the
    # agent is still up, and a second lookup would then find nothing.
    target = appeared = None
    while proc.poll() is None:
        if target is None:
            target = _target(proc, world, rank)
            appeared = time.monotonic() if target is not None else None
        if target is not None and time.monotonic() - appeared >= moment:
            for pid in [target, *descendants(target)]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            return True
        time.sleep(0.01)
    return False


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _exit_code(proc: subprocess.Popen, out: str, world: int) -> int:
    if world == 1:
        return proc.returncode
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", out)}  # torchrun's failure report
    return max(codes, key=abs) if codes else proc.returncode


def _latest_step(out_dir) -> int | None:
    latest = out_dir / "t" / "checkpoints" / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    assert (out_dir / "t" / "checkpoints" / tag / "COMPLETE").exists(), tag
    return int(tag.split("_")[1])


@pytest.fixture(scope="module")
def life(tiny_corpus, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """(seconds to the first step, seconds to the end) of an undisturbed run on each world size.
    Moments are drawn half from start-up and half from the steps, evaluation and saves after it:
    start-up takes most of a tiny run's wall time, but not most of a real one's."""
    spans = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"undisturbed{world}")
        start = time.monotonic()
        proc = _start(_command(world, tiny_corpus, out))
        first_step = None
        while proc.poll() is None and first_step is None:
            if any("train/loss" in m for m in metric_steps(out / "t")):
                first_step = time.monotonic() - start
            time.sleep(0.05)
        text = _finish(proc)
        assert proc.returncode == 0 and first_step is not None, text[-3000:]
        spans[world] = (first_step, time.monotonic() - start)
        assert _latest_step(out) == STEPS
    return spans


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("world", [1, 2])
def test_a_signal_at_any_moment_stops_cleanly_and_resumes(tiny_corpus, tmp_path, life, world):
    rng = random.Random(SEED + world)
    first_step, end = life[world]
    stopped_at = []
    for i in range(RUNS):
        signum, rank = rng.choice(SIGNALS), rng.randrange(world)
        moment = rng.uniform(*((FIRST_MOMENT_S, first_step) if i % 2 == 0 else (first_step, end)))
        where = f"run {i} (seed {SEED + world}): {signal.Signals(signum).name} to rank {rank} at {moment:.2f} s"
        out_dir = tmp_path / f"run{i}"
        cmd = _command(world, tiny_corpus, out_dir)
        proc = _start(cmd)
        _signal_at(proc, world, rank, signum, moment)
        text = _finish(proc)
        assert "is killed by signal" not in text, (where, text[-3000:])  # loader workers survived
        code = _exit_code(proc, text, world)
        if code == 0:  # the run had finished its steps before the signal reached it
            assert _latest_step(out_dir) == STEPS, where
            stopped_at.append(STEPS)
            continue
        assert code == EXIT_INTERRUPTED, (where, code, text[-3000:])
        found = re.search(rf"stopped by signal {int(signum)} \({signal.Signals(signum).name}\) at step (\d+)", text)
        assert found, (where, text[-3000:])
        step = int(found.group(1))
        assert _latest_step(out_dir) == (step or None), where  # the stop checkpoint, or none before step 1
        stopped_at.append(step)

        proc = _start(cmd)  # the same command resumes there and finishes
        text = _finish(proc)
        assert proc.returncode == 0, (where, text[-3000:])
        if step:
            assert f"at step {step}" in text and "resumed from" in text, (where, text[-3000:])
        assert f"done at step {STEPS}" in text, where
        assert _latest_step(out_dir) == STEPS, where
    print(f"world {world}: stopped at steps {stopped_at}")
