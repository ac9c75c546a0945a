"""What every task of a submitted job runs: the trainer, plus requeue on time limit or preemption.

submitit calls `checkpoint()` on global rank 0 only, inside its signal handler, where no
collective may run. So the trainer installs its own handlers (every rank sets a flag, all ranks
agree at the next step boundary and checkpoint together) and, once that checkpoint is complete,
rank 0 requeues the job with `scontrol requeue` while the other ranks wait at a barrier. The new
allocation runs the same pickled job, which resumes from the newest checkpoint by itself; its
rendezvous port is derived from the restart count, so it never meets the old store.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import submitit

from cliplite_dist.config import Config
from cliplite_dist.distributed import DistEnv
from cliplite_dist.trainer import EXIT_INTERRUPTED, train

log = logging.getLogger("cliplite_dist")


class RequeueLimitReached(RuntimeError):
    """Stopped by a signal after the allowed number of requeues: resubmit to continue."""


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for array elements, else the job id."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _requeued_by_slurm(job_id: str, restarts: int) -> bool:
    """Whether SLURM itself requeued the job (preemption, `scontrol requeue`) while this allocation
    winds down: its restart count is then already ahead of the one this allocation started with."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                               timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"\bRestarts=(\d+)", shown)
    return found is not None and int(found.group(1)) > restarts


class TrainJob(submitit.helpers.Checkpointable):
    """A training run as a submitit job.

    Checkpointable so that a signal arriving before the trainer's own handlers are installed
    (during start-up) still requeues the same job through submitit.
    """

    def __init__(self, cfg: Config, max_requeues: int):
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.requeued = False

    def __call__(self) -> str:
        code = train(self.cfg, on_stop=self._requeue)
        if code not in (0, EXIT_INTERRUPTED):  # bad data, a config this machine cannot run: a failed job
            sys.exit(code)
        if code == EXIT_INTERRUPTED:
            # Only rank 0 decided (and submitit reads only task 0's result); a requeued job
            # writes no result, since SLURM runs it again.
            if DistEnv.from_environ().rank != 0 or self.requeued or "SLURM_JOB_ID" not in os.environ:
                sys.exit(EXIT_INTERRUPTED)
            raise RequeueLimitReached(
                f"stopped by a signal after {self._restarts()} requeue(s) (--max-requeues "
                f"{self.max_requeues}); the checkpoint is in {self.cfg.run_url or self.cfg.run_dir}/checkpoints: "
                f"submit the same command again to continue")
        return self.cfg.run_url or str(self.cfg.run_dir)

    def _restarts(self) -> int:
        return int(os.environ.get("SLURM_RESTART_COUNT", 0))

    def _requeue(self) -> None:
        """Rank 0, after the stop checkpoint: requeue unless the cap is reached. Never raises:
        the other ranks are waiting at a barrier."""
        job_id = slurm_job_id()
        if job_id is None:
            return
        if _requeued_by_slurm(job_id, self._restarts()):
            self.requeued = True
            log.warning("job %s is already back in the queue (requeued by SLURM); it resumes from the checkpoint",
                        job_id)
            return
        if self._restarts() >= self.max_requeues:
            log.warning("not requeuing job %s: %d requeue(s) already (cap %d)", job_id, self._restarts(),
                        self.max_requeues)
            return
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("scontrol requeue %s failed: %s", job_id, getattr(exc, "stderr", "") or exc)
            return
        self.requeued = True
        log.warning("requeued job %s (requeue %d of at most %d); it resumes from the checkpoint",
                    job_id, self._restarts() + 1, self.max_requeues)
