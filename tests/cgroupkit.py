"""A real memory cgroup for a test's child processes: what SLURM's --mem (ConstrainRAMSpace) or a
container's memory limit puts around a job. Needs root and a writable cgroup v1 memory hierarchy
or a cgroup v2 root that delegates the memory controller."""
from __future__ import annotations

import os
import signal
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    def __init__(self, name: str):
        if (ROOT / "memory").is_dir():  # v1
            self.path, self._limit_file = ROOT / "memory" / name, "memory.limit_in_bytes"
        elif "memory" in (ROOT / "cgroup.subtree_control").read_text().split():  # v2
            self.path, self._limit_file = ROOT / name, "memory.max"
        else:
            raise OSError("no cgroup hierarchy here has the memory controller")
        self.path.mkdir()

    @property
    def procs(self) -> Path:
        """Write a pid here to move that process (and its later children) into the cgroup."""
        return self.path / "cgroup.procs"

    def limit(self, nbytes: int) -> None:
        (self.path / self._limit_file).write_text(str(nbytes))

    def remove(self) -> None:
        for pid in self.procs.read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        self.path.rmdir()
