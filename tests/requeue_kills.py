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


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def kill_the_job() -> None:
    children, doomed = _children(), []
    todo = [int(pid) for pid in Path(os.environ["CLIPLITE_TEST_JOB_PIDS"]).read_text().split()]
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, []))
    for pid in sorted(doomed, key=lambda p: p == os.getpid()):  # this process last
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(train(load_config(sys.argv[1], sys.argv[2:]), on_stop=kill_the_job))
