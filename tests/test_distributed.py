import subprocess
import sys

import pytest
import torch

from cliplite_dist.distributed import DistEnv, expand_nodelist, pick_device, slurm_port
from runkit import REPO, clean_env, free_port, train_command


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


def test_a_step_on_part_of_the_allocation_meets_on_its_own_first_node():
    """srun -N 1 --ntasks-per-node 2 inside a 2-node x 4-task job on gpu[001-002], landing on gpu002
    (the job's first node busy with another step): rank 0 is on gpu002, two ranks per node, and
    the step's port is not the first step's."""
    step = {**slurm_env(0), "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "gpu002", "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_STEP_ID": "1"}
    env = DistEnv.from_environ(step)
    assert (env.master_addr, env.world_size, env.local_world_size) == ("gpu002", 2, 2)
    assert env.master_port != DistEnv.from_environ({**step, "SLURM_STEP_ID": "0"}).master_port


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


@pytest.mark.parametrize("procid", [0, 6])
def test_a_rank_takes_the_gpu_at_its_local_rank_and_refuses_a_node_that_shows_each_rank_one(monkeypatch, procid):
    """--gpus-per-node: every rank of a 4-rank node sees its 4 GPUs and takes the one at its local
    rank. --gpus-per-task: each sees one, where DeepSpeed would still ask for cuda:LOCAL_RANK; then
    every rank refuses, local rank 0 too (else it would wait for the others until the rendezvous
    timed out), and says what to request."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    env = DistEnv.from_environ(slurm_env(procid))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("auto", env) == torch.device("cuda", procid % 4) and chosen == [procid % 4]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with pytest.raises(RuntimeError, match=r"sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=2\) but its node runs 4 ranks.*"
                                           r"--gpus-per-node without --gpus-per-task"):
        pick_device("cuda", env)
    assert chosen == [procid % 4]  # nothing set


def test_a_rank_that_never_arrives_stops_the_run_after_the_collective_timeout():
    """engine.collective_timeout_s reaches the process group: rank 0 of two, alone, gives up
    after 2 s instead of torch's default 30 minutes."""
    script = ("import torch\n"
              "from cliplite_dist.distributed import DistEnv, init_distributed\n"
              f"init_distributed(DistEnv(rank=0, world_size=2, master_port={free_port()}), torch.device('cpu'), 2)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "1/2 clients joined" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_gpu_recipe_on_a_machine_without_one_stops_instead_of_training_on_the_cpu(tmp_path):
    proc = subprocess.run(train_command() + [str(REPO / "recipes" / "cc3m-vitb32.yaml"), f"run.output_dir={tmp_path}"],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "engine.device=cuda but torch sees no GPU" in proc.stderr and "engine.device=auto" in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "cc3m-vitb32").exists()
