"""A training run whose requeue ends the whole job at once, as SLURM does after `scontrol
requeue`: `on_stop` SIGKILLs every process under the pids listed in $CLIPLITE_TEST_JOB_PIDS
(each "node" of a test job: a torchrun agent and the workers it started in their own sessions).
Run by torchrun like `-m cliplite_dist`: requeue_kills.py RECIPE key=value..."""
import os
import signal
import sys
from pathlib import Path

from cliplite_dist.config import load_config
from cliplite_dist.trainer import train
from runkit import descendants


def kill_the_job() -> None:
    listed = [int(pid) for pid in Path(os.environ["CLIPLITE_TEST_JOB_PIDS"]).read_text().split()]
    doomed = [found for pid in listed for found in (pid, *descendants(pid))]
    for pid in sorted(doomed, key=lambda p: p == os.getpid()):  # this process last
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(train(load_config(sys.argv[1], sys.argv[2:]), on_stop=kill_the_job))
