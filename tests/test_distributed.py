import pytest

from cliplite_dist.distributed import DistEnv, expand_nodelist, slurm_port


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-002]", ["gpu001", "gpu002"]),
    ("node7", ["node7"]),
    ("a[1-3,7],b05", ["a1", "a2", "a3", "a7", "b05"]),
    ("gpu[09-11]", ["gpu09", "gpu10", "gpu11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def slurm_env(procid: int) -> dict:
    """What srun exports for task `procid` of a 2-node x 4-task job on gpu[001-002]."""
    return {
        "SLURM_JOB_ID": "123456", "SLURM_PROCID": str(procid), "SLURM_NTASKS": "8",
        "SLURM_LOCALID": str(procid % 4), "SLURM_NODEID": str(procid // 4),
        "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_NNODES": "2",
    }


@pytest.mark.parametrize("procid", range(8))
def test_two_nodes_by_four_tasks(procid):
    env = DistEnv.from_environ(slurm_env(procid))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (procid, 8, procid % 4, 4)
    assert env.master_addr == "gpu001"
    assert env.source == "slurm"
    # every task derives the same port
    assert env.master_port == DistEnv.from_environ(slurm_env(0)).master_port


def test_requeue_gets_a_fresh_rendezvous_port():
    first = DistEnv.from_environ(slurm_env(0))
    requeued = DistEnv.from_environ({**slurm_env(0), "SLURM_RESTART_COUNT": "1"})
    assert first.master_port != requeued.master_port
    assert 1024 < slurm_port("999999", 3) < 65536


def test_torchrun_wins_over_slurm_and_export_round_trips():
    environ = {**slurm_env(5), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    env = DistEnv.from_environ(environ)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "torchrun")
    out: dict = {}
    env.export(out)
    assert DistEnv.from_environ(out) == env


def test_single_process_default():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
