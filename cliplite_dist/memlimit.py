"""How much memory this process's control group still allows: SLURM's --mem (ConstrainRAMSpace),
a container's memory limit. Pages written to /dev/shm count against it, so the loader's
shared-memory check at start-up reads it beside /dev/shm's free space: a job that outgrows it
is killed by the kernel mid-run, with no checkpoint and no requeue.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_UNLIMITED_V1 = 2**62  # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class MemoryLimit:
    """A memory cgroup's limit and what its processes (and their shared memory) use now."""

    cgroup: Path
    limit: int
    usage: int

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.usage)


def tightest(proc_cgroup: Path = Path("/proc/self/cgroup"),
             root: Path = Path("/sys/fs/cgroup")) -> MemoryLimit | None:
    """The limit, among this process's memory cgroup and its ancestors, that leaves the least
    room (a job's limit sits on an ancestor of its tasks' cgroups); None where none is set or
    the cgroup files cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = [limit for line in lines for limit in _limits(line, root)]
    return min(found, key=lambda limit: limit.headroom, default=None)


def _limits(line: str, root: Path) -> list[MemoryLimit]:
    """The set limits of the cgroup named on one /proc/self/cgroup line and of its ancestors.
    The path may be longer than what is mounted (a container sees its own cgroup at the mount's
    root), so every ancestor present under the mount counts."""
    _, controllers, path = line.split(":", 2)
    if "memory" in controllers.split(","):  # v1: its own hierarchy
        base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
    elif controllers == "" and (root / "cgroup.controllers").exists():  # v2 mounted at root
        base, limit_file, usage_file = root, "memory.max", "memory.current"
    else:
        return []
    parts = [part for part in path.split("/") if part]
    out = []
    for depth in range(len(parts), -1, -1):
        folder = base.joinpath(*parts[:depth])
        try:
            text = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if text != "max" and int(text) < _UNLIMITED_V1:
            out.append(MemoryLimit(folder, int(text), usage))
    return out
