"""Reading the job's memory limit from cgroup files laid out as cgroup v1 and v2 kernels write
them (the real-cgroup case, with a trainer inside, is in test_train)."""
from pathlib import Path

from cliplite_dist.memlimit import MemoryLimit, tightest

GIB = 2**30


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_takes_the_ancestor_that_leaves_least_room(tmp_path):
    """SLURM's cgroup v2 layout: the job's limit on the job folder, none on the task's own."""
    root = tmp_path / "cgroup"
    write(root, cgroup_controllers="cpu memory")
    job = root / "system.slice" / "slurmstepd.scope" / "job_7"
    write(job.parent, memory_max="max", memory_current=str(40 * GIB))
    write(job, memory_max=str(64 * GIB), memory_current=str(10 * GIB))
    write(job / "step_0", memory_max=str(80 * GIB), memory_current=str(9 * GIB))
    write(job / "step_0" / "user" / "task_0", memory_max="max", memory_current=str(8 * GIB))
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
    assert tightest(proc, root) == MemoryLimit(job, 64 * GIB, 10 * GIB)
    assert tightest(proc, root).headroom == 54 * GIB


def test_v1_inside_a_container_reads_the_mount_root(tmp_path):
    """A container sees its own memory cgroup at the mount's root while /proc/self/cgroup still
    names the host's path; unlimited (2**63 rounded to a page) does not count."""
    root = tmp_path / "cgroup"
    write(root / "memory", memory_limit_in_bytes=str(16 * GIB), memory_usage_in_bytes=str(17 * GIB))
    proc = tmp_path / "self-cgroup"
    proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    found = tightest(proc, root)
    assert found == MemoryLimit(root / "memory", 16 * GIB, 17 * GIB) and found.headroom == 0
    write(root / "memory", memory_limit_in_bytes="9223372036854771712")
    assert tightest(proc, root) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert tightest(tmp_path / "missing", tmp_path) is None
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/user.slice\n")  # v2 line, but nothing mounted under the root given
    assert tightest(proc, tmp_path) is None
