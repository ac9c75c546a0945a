"""Real SLURM: jobs submitted through cliplite-submit to the single-node cluster that
`slurm/local-cluster.sh start` runs (.ci/run starts it), interrupted the way SLURM does."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from runkit import RECIPE, clean_env, metric_steps, run, tiny_overrides


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def submit(corpus, out, extra: dict, *flags, timeout=600) -> subprocess.CompletedProcess:
    cmd = [script("cliplite-submit"), RECIPE] + tiny_overrides(corpus, out, **extra) + \
        ["--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "15", *flags]
    return run(cmd, timeout=timeout)


def job_id_of(stdout: str) -> str:
    return re.search(r"submitted job (\S+)", stdout).group(1)


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out or "GONE"


def test_two_task_job_trains_with_both_ranks_and_checkpoints(slurm_cluster, tiny_corpus, tmp_path):
    proc = submit(tiny_corpus, tmp_path, {"train.steps": 4, "train.checkpoint_every": 2}, "--wait")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    job_id = job_id_of(proc.stdout)
    run_dir = tmp_path / "t"
    assert json.loads((run_dir / "job.json").read_text())["job_id"] == job_id
    rank0 = (run_dir / "logs" / "train-rank0.log").read_text()
    assert "2 rank(s) (slurm)" in rank0 and "done at step 4" in rank0
    assert (run_dir / "logs" / "train-rank1.log").exists()
    for task in (0, 1):  # SLURM's own per-task logs
        assert (tmp_path / "slurm" / f"{job_id}_{task}_log.out").exists()
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").exists()
    assert {p.name for p in ckpt.glob("trainer_state_rank*.pt")} == {"trainer_state_rank0.pt", "trainer_state_rank1.pt"}

    status = run([script("cliplite-status"), job_id], timeout=60)
    assert status.returncode == 0, status.stderr
    assert str(run_dir) in status.stdout and "COMPLETED" in status.stdout
    assert re.search(r"last step\s+4", status.stdout) and "step_00000004" in status.stdout


def _interrupt_and_finish(corpus, out, interrupt: list[str], signal_name: str) -> tuple[str, int, str]:
    """A 2-task job with a loader worker per task, interrupted by `interrupt` (+ job id) at step 3
    or later; waits until the job completes. Returns (job id, step of the stop checkpoint, rank 0's log)."""
    proc = submit(corpus, out, {"train.steps": 60, "train.log_every": 1, "train.checkpoint_every": 0,
                                "data.eval": "''", "data.workers": 1})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    job_id = job_id_of(proc.stdout)
    run_dir = out / "t"
    deadline = time.monotonic() + 300
    while not any(m["step"] >= 3 for m in metric_steps(run_dir)):
        assert time.monotonic() < deadline, f"job {job_id} never reached step 3: {job_state(job_id)}"
        time.sleep(0.5)
    subprocess.run(interrupt + [job_id], check=True)
    deadline = time.monotonic() + 600
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {job_state(job_id)}"
        time.sleep(1)
    log = (run_dir / "logs" / "train-rank0.log").read_text()
    assert job_state(job_id) == "COMPLETED", log[-3000:]
    assert "killed by signal" not in log, log[-3000:]  # the loader workers outlived the signal
    saved = int(re.search(rf"stopped by signal \d+ \({signal_name}\) at step (\d+); checkpoint saved", log).group(1))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:08d}'} at step {saved}" in log
    steps = [m["step"] for m in metric_steps(run_dir) if "train/loss" in m]
    assert steps[-1] == 60 and steps[steps.index(saved) + 1:] == list(range(saved + 1, 61))  # zero steps lost
    assert (run_dir / "checkpoints" / "step_00000060" / "COMPLETE").exists()
    return job_id, saved, log


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, tiny_corpus, tmp_path):
    # what SLURM does --signal seconds before the time limit: USR2 to every task of the job's steps
    job_id, _, log = _interrupt_and_finish(tiny_corpus, tmp_path, ["scancel", "--signal=USR2"], "SIGUSR2")
    assert f"requeued job {job_id}" in log


def test_preemption_checkpoints_where_it_stopped_and_the_requeued_job_resumes_there(slurm_cluster, tiny_corpus,
                                                                                   tmp_path):
    # what preemption does: SIGTERM to every process of the job step (loader workers included),
    # SIGKILL KillWait seconds later, and the job back in the queue
    job_id, _, log = _interrupt_and_finish(tiny_corpus, tmp_path, ["scontrol", "requeue"], "SIGTERM")
    assert f"job {job_id} is already back in the queue (requeued by SLURM)" in log
    assert "ERROR" not in log, log[-3000:]  # no failed second requeue, no failed job


def test_sweep_is_one_job_array_with_a_run_directory_per_point(slurm_cluster, tiny_corpus, tmp_path):
    proc = submit(tiny_corpus, tmp_path, {"train.steps": 2, "train.checkpoint_every": 0, "data.eval": "''",
                                          "data.workers": 0},
                  "--sweep", "objective.name=cliplite,infonce", "--tasks-per-node", "1", "--wait")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\d+_\d+\s", line)]
    assert [row[1] for row in rows] == ["cliplite", "infonce"]
    array_ids = {row[0].split("_")[0] for row in rows}
    assert len(array_ids) == 1  # one array
    for objective in ("cliplite", "infonce"):
        run_dir = tmp_path / f"t-name={objective}"
        log = (run_dir / "logs" / "train-rank0.log").read_text()
        assert f": {objective}, 1 rank(s) (slurm)" in log and "done at step 2" in log


def test_plain_sbatch_template_runs_the_same_entry_point(slurm_cluster, tiny_corpus, tmp_path):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 0})
    env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["sbatch", "--wait", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
                           f"--output={tmp_path}/sbatch-%j.out", str(Path(__file__).parents[1] / "slurm" / "train.sbatch"),
                           RECIPE, *overrides], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("sbatch-*.out"))
    assert proc.returncode == 0, proc.stderr + logs[-4000:]
    assert "2 tasks" in logs and "held-out retrieval R@1" in logs
    assert "2 rank(s) (slurm)" in (tmp_path / "t" / "logs" / "train-rank0.log").read_text()
    assert (tmp_path / "t" / "logs" / "train-rank1.log").exists()
