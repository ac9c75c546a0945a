"""`cliplite-status RUN_DIR|JOB_ID`: where a run stands, from its files and from SLURM.

A run directory says most of it (metrics.jsonl, checkpoints, logs, job.json); SLURM adds the
job's state. A job id is traced back to its run directory through the job's comment (the
output root, set at submission) and the job.json files below it.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cliplite_dist.checkpoint import find_latest
from cliplite_dist.config import is_remote


@dataclass
class RunStatus:
    run_dir: Path
    job_id: str | None
    state: str
    step: int | None
    loss: float | None
    samples_per_s: float | None
    checkpoint: str | None
    log_tail: list[str]

    def render(self) -> str:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        lines = [f"run         {self.run_dir}",
                 f"job         {self.job_id or '-'}",
                 f"state       {self.state}",
                 f"last step   {fmt(self.step, 'd')}",
                 f"last loss   {fmt(self.loss, '.4f')}",
                 f"samples/s   {fmt(self.samples_per_s, '.1f')}",
                 f"checkpoint  {self.checkpoint or '-'}",
                 "log tail:"]
        return "\n".join(lines + [f"  {line}" for line in self.log_tail])


def _slurm(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _scontrol_field(job_id: str, field: str) -> str:
    """A field of `scontrol show job` (known to SLURM until MinJobAge after the job ends)."""
    match = re.search(rf"\b{field}=(\S+)", _slurm(["scontrol", "show", "job", job_id]))
    return match.group(1) if match else ""


def job_state(job_id: str) -> str:
    """From scontrol while SLURM still holds the job, else from accounting (sacct), else unknown."""
    state = _scontrol_field(job_id, "JobState")
    if state:
        return state
    state = _slurm(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    return state.splitlines()[0] if state else "unknown (no longer listed by SLURM)"


def run_dir_of_job(job_id: str) -> Path:
    root = _scontrol_field(job_id, "Comment")
    if not root:
        raise FileNotFoundError(f"SLURM knows no job {job_id} (or it was not submitted by cliplite-submit)")
    for job_file in sorted(Path(root).glob("*/job.json")):
        if json.loads(job_file.read_text()).get("job_id") == job_id:
            return job_file.parent
    raise FileNotFoundError(f"no run directory under {root} records job {job_id}")


def run_status(target: str, tail: int = 10) -> RunStatus:
    if is_remote(target):
        raise FileNotFoundError(f"{target} is remote: give the run's staging directory (RUN.LOCAL_DIR/NAME) "
                                f"or its job id")
    run_dir = Path(target) if Path(target).is_dir() else run_dir_of_job(target)
    job_file = run_dir / "job.json"
    job_id = json.loads(job_file.read_text())["job_id"] if job_file.exists() else None
    metrics_file = run_dir / "metrics.jsonl"
    train = []
    if metrics_file.exists():
        train = [m for m in map(json.loads, metrics_file.read_text().splitlines()) if "train/loss" in m]
    last = train[-1] if train else {}
    log_file = run_dir / "logs" / "train-rank0.log"
    log_tail = log_file.read_text(errors="replace").splitlines()[-tail:] if log_file.exists() else []
    if job_id:
        state = job_state(job_id)
    else:
        state = "not a SLURM job" + (" (has a log)" if log_tail else "")
    return RunStatus(run_dir=run_dir, job_id=job_id, state=state, step=last.get("step"),
                     loss=last.get("train/loss"), samples_per_s=last.get("train/samples_per_s"),
                     checkpoint=find_latest(run_dir / "checkpoints"), log_tail=log_tail)
