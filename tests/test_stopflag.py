"""Stop signals and data failures agreed by all ranks: no signal is lost to the all-reduce that
agrees on it, and the agreement runs on CPU tensors (never waiting for a GPU). Loader workers
leave stop signals to the training process."""
import multiprocessing
import signal
import subprocess
import time

import torch
import torch.distributed as dist

from cliplite_dist.distributed import host_group
from cliplite_dist.stopping import StopFlag


def test_a_signal_arriving_during_the_all_reduce_is_kept_for_the_next(single_rank_group, monkeypatch):
    flag = StopFlag()
    reduce = dist.all_reduce
    seen = []

    def reduce_then_signal(tensor, *args, **kwargs):
        seen.append(tensor.device)
        reduce(tensor, *args, **kwargs)
        flag._handle(signal.SIGTERM, None)  # as if delivered while the collective blocked

    monkeypatch.setattr(dist, "all_reduce", reduce_then_signal)
    assert flag.agreed() == (False, 0)  # this round reduced a copy taken before the signal
    monkeypatch.undo()
    assert flag.agreed() == (True, 0) and flag.signum == signal.SIGTERM
    assert flag.agreed() == (True, 0)  # sticky: it stays set until the run acts on it (and ends)
    assert seen == [torch.device("cpu")]


def test_a_failed_fetch_names_the_rank(single_rank_group):
    flag = StopFlag()
    assert flag.agreed(failed=True) == (False, 1)
    assert flag.agreed() == (False, 0)


def test_on_gloo_the_default_group_is_the_host_group(single_rank_group):
    assert host_group() is None


def _loader_worker_like(ready) -> None:
    from cliplite_dist import stopping

    stopping.leave_to_parent()
    ready.set()
    time.sleep(120)


def test_a_loader_worker_outlives_stop_signals_from_others_but_not_its_parents_sigterm():
    ctx = multiprocessing.get_context("fork")  # how the DataLoader starts workers here
    ready = ctx.Event()
    worker = ctx.Process(target=_loader_worker_like, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    for name in ("TERM", "USR1", "USR2"):  # as SLURM sends them: from another process
        subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    worker.join(2)
    assert worker.is_alive()
    worker.terminate()  # the DataLoader's own shutdown: SIGTERM from the parent
    worker.join(10)
    assert worker.exitcode == 0
