"""Real training runs: the console script, TensorBoard events read back, checkpoints, signals."""
import shutil
import signal
import subprocess
import time

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runkit import RECIPE, clean_env, metric_steps, run, tiny_overrides, train_command

EXIT_INTERRUPTED = 75


def test_single_process_run_logs_checkpoints_and_evaluates(tiny_corpus, tmp_path):
    # resize_on=device: the loader worker sends unresized crops (the CUDA default); the other
    # runs in the suite resize in the worker (the CPU default)
    proc = run(train_command() + [RECIPE] + tiny_overrides(tiny_corpus, tmp_path, **{"data.resize_on": "device"}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "t"
    assert "held-out retrieval R@1 =" in proc.stdout and "chance 0.0156" in proc.stdout
    assert (run_dir / "config.yaml").read_text().count("batch_size: 8") == 1
    assert "resize_on: device" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["latest", "step_00000003", "step_00000006"]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/loss_pos", "train/loss_neg", "train/mi_jsd", "train/lr",
                "train/temperature", "train/grad_norm", "train/samples_per_s", "train/data_wait_frac",
                "train/bad", "data/bad_image", "data/bad_missing_shard", "data/bad_sample_fraction",
                "data/samples_read", "eval/i2t_R@1"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert [e.step for e in events.Scalars("eval/i2t_R@1")] == [6]
    log = (run_dir / "logs" / "train-rank0.log").read_text()
    assert "step 6/6" in log and "samples_per_s" in log


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in metric_steps(run_dir) if "train/loss" in m):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} logged within {timeout} s")


def test_sigterm_checkpoints_and_the_same_command_resumes(tiny_corpus, tmp_path):
    cmd = train_command() + [RECIPE] + tiny_overrides(
        tiny_corpus, tmp_path, **{"train.steps": 400, "train.log_every": 1, "train.checkpoint_every": 0})
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "t"
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= saved < 400
    assert f"stopped by signal {int(signal.SIGTERM)} (SIGTERM) at step {saved}" in out

    # the same command again, asked to stop soon after it resumes
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, saved + 2, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in out
    steps = [m["step"] for m in metric_steps(run_dir) if "train/loss" in m]
    second_run = steps[steps.index(saved) + 1:]
    assert second_run[0] == saved + 1  # continued at the saved step, not from 0


def test_bad_config_fails_before_anything_starts(tmp_path):
    proc = run(train_command() + [RECIPE, "data.batchsize=3", f"run.output_dir={tmp_path}"], timeout=60)
    assert proc.returncode == 2
    assert "unknown key 'data.batchsize'" in proc.stderr and "data.batch_size" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_too_little_shared_memory_stops_at_once_naming_the_fix(tiny_corpus, tmp_path):
    free_gib = shutil.disk_usage("/dev/shm").free / 2**30
    batch = int(free_gib * 2**30 / (3 * 32 * 32 * 7)) + 1  # one worker's buffers alone overflow it
    proc = run(train_command() + [RECIPE] + tiny_overrides(tiny_corpus, tmp_path, **{
        "data.batch_size": batch, "data.workers": 1, "model.name": "micro-vit"}), timeout=120)
    assert proc.returncode == 78, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "shared memory in /dev/shm" in proc.stderr and f"data.batch_size={batch}" in proc.stderr
    assert "data.workers=1" in proc.stderr and "--shm-size" in proc.stderr
    assert not (tmp_path / "t" / "checkpoints").exists()  # stopped before anything ran


def test_shared_memory_beyond_the_jobs_memory_limit_stops_at_once_naming_mem(tiny_corpus, tmp_path, memory_cgroup):
    """A job whose loaders would write more to /dev/shm (free: plenty) than its memory cgroup
    allows (SLURM's --mem) stops at start-up instead of being killed by the kernel mid-run."""
    if shutil.disk_usage("/dev/shm").free < 5 * 2**30:
        pytest.skip("needs 5 GiB free in /dev/shm, so that only the memory limit falls short")
    memory_cgroup.limit(2 * 2**30)
    batch = 4 * 2**30 // (7 * 3 * 32 * 32 * 5 // 4) + 1  # about 4 GiB of buffers for one worker
    proc = run(["sh", "-c", f'echo $$ > {memory_cgroup.procs} && exec "$@"', "sh"] + train_command() + [RECIPE]
               + tiny_overrides(tiny_corpus, tmp_path, **{"data.batch_size": batch, "data.workers": 1,
                                                           "model.name": "micro-vit"}), timeout=120)
    assert proc.returncode == 78, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "counts against this job's memory limit" in proc.stderr and "2.00 GiB limit" in proc.stderr
    assert f"cgroup {memory_cgroup.path}" in proc.stderr and "--mem" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "t" / "checkpoints").exists()
