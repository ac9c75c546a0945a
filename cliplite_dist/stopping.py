"""Stop signals (SIGTERM, SIGUSR1, SIGUSR2): caught from cliplite-train's first line, kept until
the run acts on them, agreed by every rank, ignored by data-loader workers and once a run is over.

This module imports nothing heavy at the top, so the CLI can catch signals before the seconds of
imports (torch, DeepSpeed) and set-up that follow: a preemption during start-up still ends in an
orderly stop instead of a killed process.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_early = 0  # a stop signal that arrived before a StopFlag took over (catch_early)


def _record_early(signum, _frame) -> None:
    global _early
    _early = signum


def catch_early() -> None:
    """Remember stop signals from here on, until StopFlag.install hands them to a run."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record_early)


def ignore() -> None:
    """In the training process once the run is over (finished, or stopped with its checkpoint):
    stop signals do nothing, so the exit code says how it ended (Python's own teardown would
    otherwise restore the default action, which kills)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def leave_to_parent() -> None:
    """In a loader worker: stop signals are the training process's business. PyTorch's workers
    die on a SIGTERM that did not come from their parent, and SLURM's preemption sends one to every
    process of the job step, mid-checkpoint. The parent's own SIGTERM (the DataLoader ending a
    worker that did not stop in time) still ends the worker: SIGTERM stays blocked and a thread
    takes each one, exiting only if the parent sent it."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def take_sigterms() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterms, name="sigterm-from-parent", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS) - {signal.SIGTERM})  # see `held`


@contextmanager
def held():
    """Stop signals wait (blocked, not lost) while this block forks loader workers: a worker
    starts with them blocked and unblocks them only once it has its own handling
    (`leave_to_parent`), so none can kill it in between; here they are delivered when the block
    ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopFlag:
    """A stop signal and a data failure, agreed by all ranks at every micro-step.

    The signal handler (no collectives there) only sets `requested`, and nothing else writes it:
    the all-reduce reduces a copy, so a signal that arrives while it runs is kept for the next
    one instead of being overwritten by its result (acting on a signal ends the run, so the flag
    is never cleared). `signum` is the agreed signal: the largest any rank received.

    Why every micro-step, on a CPU (gloo) group: a rank whose data fetch failed has no batch, so
    the others must hear of it before the forward's first collective, or they wait there
    forever; agreeing only every N steps would leave that rank stepping on without data. And an
    all-reduce of a CUDA tensor read back by the host makes the host wait for the GPU to finish
    every step already queued, every step: no kernels queued ahead. Over gloo the flag is a CPU
    tensor; the host waits only for the other ranks' hosts (which run ahead of their GPUs), a
    network round trip, never for a GPU.
    """

    def __init__(self):
        self.requested = 0  # written by the signal handler (and install) only
        self.signum = 0
        self.group = None  # a torch.distributed group; None: the default group (gloo on CPU)

    def install(self) -> None:
        """Catch stop signals from here on, keeping one that arrived since catch_early."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        self.requested = self.requested or _early

    def _handle(self, signum, _frame) -> None:
        self.requested = signum

    def agreed(self, failed: bool = False) -> tuple[bool, int]:
        """(any rank signalled, 1 + the highest rank that `failed`, or 0), the same on every rank."""
        import torch  # here, not at the top: see the module's docstring
        import torch.distributed as dist

        flag = torch.tensor([self.requested, dist.get_rank() + 1 if failed else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum, failed_rank = flag.tolist()
        return self.signum != 0, failed_rank
