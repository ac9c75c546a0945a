import os
import subprocess
import tempfile

import pytest
import torch
import torch.distributed as dist


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run wherever torch sees a CUDA GPU and skip, saying so, everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, and torch sees none here (on a GPU machine: "
                                   "python benchmarks/gpu_check.py runs them)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_rank_group():
    """One gloo group of one rank for the whole session: DeepSpeed caches groups, so tests that
    build engines in-process share it instead of re-initialising."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    store = tempfile.mkdtemp(prefix="cliplite-pg-")
    dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small synthetic corpus shared by the training tests: 3 train shards, 1 held-out shard,
    and a zero-shot / linear-probe class set (CLIP_benchmark layout)."""
    from cliplite_dist.config import SyntheticConfig
    from cliplite_dist.data.synthetic import ensure_corpus

    root = tmp_path_factory.mktemp("corpus")
    ensure_corpus(SyntheticConfig(dir=str(root), train_samples=600, eval_samples=64, shard_size=200,
                                  classes_test_samples=96, classes_train_samples=192))
    return root


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(state.startswith(("idle", "mix", "alloc")) for state in out.split())


@pytest.fixture(scope="module")
def slurm_cluster():
    if not _cluster_up():
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster: .ci/run must start slurm/local-cluster.sh")
        pytest.skip("no SLURM cluster here (start one with: sudo slurm/local-cluster.sh start)")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port for the whole session; stopped by pid."""
    from storekit import serving, start_s3_server

    yield from serving(start_s3_server)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test process pointed at the loopback S3 server."""
    from storekit import pointed_at

    yield from pointed_at(s3_server, monkeypatch)


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator on a free loopback port for the whole session; stopped by pid."""
    from storekit import serving, start_gcs_server

    yield from serving(start_gcs_server)


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    """This test process pointed at the loopback GCS emulator."""
    from storekit import pointed_at

    yield from pointed_at(gcs_server, monkeypatch)


@pytest.fixture
def memory_cgroup():
    from cgroupkit import MemoryCgroup

    try:
        group = MemoryCgroup(f"cliplite-test-{os.getpid()}")
    except OSError as exc:
        pytest.skip(f"needs a memory cgroup this process may create (root, cgroup v1 or v2): {exc}")
    yield group
    group.remove()
