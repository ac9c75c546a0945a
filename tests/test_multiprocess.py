"""2-process torchrun runs over gloo: ZeRO 0-3 in fp32 and bf16, every objective, 3 shards read
by 2 ranks x 2 workers (fewer shards than readers), a signal to one rank stopping both, and
ranks that would resume from different checkpoints stopping instead."""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runkit import RECIPE, clean_env, free_port, metric_steps, run, tiny_overrides, torchrun_command, train_command
from test_train import EXIT_INTERRUPTED, wait_for_step

CASES = [
    (0, "fp32", "objective.name=cliplite"),
    (0, "bf16", "objective.name=infonce"),
    (2, "fp32", "objective.negatives=cross_rank"),
    (2, "bf16", "objective.prior_weight=0.1"),
    (3, "fp32", "objective.name=infonce"),
    (3, "bf16", "objective.name=siglip"),
    (1, "fp32", "objective.head_norm=sync_batch"),
]


@pytest.mark.parametrize("zero, precision, extra", CASES, ids=[f"zero{z}-{p}-{e.split('=')[1]}" for z, p, e in CASES])
def test_two_ranks_train_evaluate_and_checkpoint(tiny_corpus, tmp_path, zero, precision, extra):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{
        "engine.zero_stage": zero, "engine.precision": precision, "data.workers": 2,
        "train.steps": 4, "train.checkpoint_every": 2})
    proc = run(torchrun_command() + [RECIPE, extra] + overrides, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run_dir = tmp_path / "t"
    assert f"2 rank(s) (torchrun), device cpu, {precision}, ZeRO {zero}" in out
    assert "held-out retrieval R@1 =" in out
    for rank in (0, 1):
        log = (run_dir / "logs" / f"train-rank{rank}.log").read_text()
        assert "Traceback" not in log
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert (ckpt / "COMPLETE").exists()
    assert {p.name for p in ckpt.glob("trainer_state_rank*.pt")} == {"trainer_state_rank0.pt", "trainer_state_rank1.pt"}


def test_signal_to_one_rank_stops_both_at_the_same_step(tiny_corpus, tmp_path):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": 400, "train.log_every": 1, "train.checkpoint_every": 0, "engine.zero_stage": 2})
    proc = subprocess.Popen(torchrun_command() + [RECIPE] + overrides, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "t"
    wait_for_step(run_dir, 3, proc)
    subprocess.run(["kill", "-USR1", str(rank_pid(proc.pid, 1))], check=True)
    out, _ = proc.communicate(timeout=180)
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    folder = run_dir / "checkpoints" / saved
    assert (folder / "COMPLETE").exists(), out[-3000:]
    assert {p.name for p in folder.glob("trainer_state_rank*.pt")} == {"trainer_state_rank0.pt", "trainer_state_rank1.pt"}
    for rank in (0, 1):
        log = (run_dir / "logs" / f"train-rank{rank}.log").read_text()
        assert f"stopped by signal {int(signal.SIGUSR1)} (SIGUSR1) at step {int(saved.split('_')[1])}" in log, log[-2000:]
    assert proc.returncode != 0  # torchrun reports a worker's non-zero exit as its own failure
    assert f"exitcode  : {EXIT_INTERRUPTED}" in out, out[-3000:]


def test_the_log_names_the_rank_whose_data_is_slow(tiny_corpus, tmp_path):
    """Rank 1's loader worker frozen for 4 s, as a node with slow storage would be: the log lines
    of that window say that rank 1 waited most of it for batches, while rank 0 (which waited for
    rank 1 in the gradient reduction) did not."""
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": 40, "train.log_every": 1, "train.checkpoint_every": 0, "data.eval": "''"})
    proc = subprocess.Popen(torchrun_command() + [RECIPE] + overrides, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(tmp_path / "t", 5, proc)
    workers = subprocess.run(["pgrep", "-P", str(rank_pid(proc.pid, 1))], capture_output=True, text=True).stdout.split()
    assert workers
    subprocess.run(["kill", "-STOP", *workers], check=True)
    time.sleep(4)
    subprocess.run(["kill", "-CONT", *workers], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    rows = [m for m in metric_steps(tmp_path / "t") if "train/data_wait_frac_max" in m]
    assert len(rows) == 40
    slow = [m for m in rows if m["train/data_wait_frac_max"] > 0.5]
    assert slow and all(m["train/data_wait_slowest_rank"] == 1 and m["train/data_wait_frac"] < 0.5 for m in slow), slow
    assert "data_wait_slowest_rank 1" in out


def rank_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`: a child of the agent with RANK=rank in its environment
    (data-loader workers share the command line, so matching on it could pick one of them)."""
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in metric_steps(run_dir) if "train/loss" in m]


def test_zero_stages_compute_the_same_training(tiny_corpus, tmp_path):
    """Same seed, same data, fp32: ZeRO 0, 2 and 3 are the same optimisation, step for step."""
    curves = {}
    for zero in (0, 2, 3):
        out = tmp_path / f"zero{zero}"
        overrides = tiny_overrides(tiny_corpus, out, **{
            "engine.zero_stage": zero, "engine.precision": "fp32", "train.steps": 4, "train.log_every": 1,
            "train.checkpoint_every": 0, "data.eval": "''",
            # at the recipe's rate the loss jumped (1.5 -> 3.9 -> 1.9) and blew ZeRO 3's rounding (1e-7 at
            # the first step) past the tolerance by step 4; at this one a 1% larger rate still moves it 1%
            "optim.lr": 1e-4})
        proc = run(torchrun_command() + [RECIPE] + overrides, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        curves[zero] = losses(out / "t")
    assert len(curves[0]) == 4
    assert curves[0][0] != curves[0][-1]  # it did train
    for zero in (2, 3):
        assert curves[zero] == pytest.approx(curves[0], rel=1e-4, abs=1e-5), curves


def test_zero3_two_ranks_resume_from_checkpoint(tiny_corpus, tmp_path):
    def overrides(steps):
        return tiny_overrides(tiny_corpus, tmp_path, **{
            "engine.zero_stage": 3, "engine.precision": "bf16", "train.log_every": 1, "data.eval": "''",
            "train.steps": steps, "train.checkpoint_every": 0})

    first = run(torchrun_command() + [RECIPE] + overrides(4), timeout=400)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    second = run(torchrun_command() + [RECIPE] + overrides(6), timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resumed from {tmp_path / 't' / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert "step 5/6" in out and "step 1/6" not in out
    assert (tmp_path / "t" / "checkpoints" / "step_00000006" / "COMPLETE").exists()


@pytest.mark.parametrize("holder", [0, 1], ids=["rank0-has-it", "rank1-has-it"])
def test_nodes_that_see_different_checkpoints_stop_instead_of_resuming_apart(tiny_corpus, tmp_path, holder):
    """Two one-rank "nodes" whose run.output_dir is a relative path, so each sees its own working
    directory's run (a node-local run directory); one of them holds a checkpoint. Both stop at
    start-up naming the checkpoint, instead of one rank resuming at step 2 while the other starts at 0."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    overrides = tiny_overrides(tiny_corpus, "runs", **{"data.eval": "''", "data.eval_zeroshot": "''",
                                                        "train.steps": 2, "train.checkpoint_every": 0})
    for node in nodes:
        node.mkdir()
    first = subprocess.run(train_command() + [RECIPE] + overrides, cwd=nodes[holder], env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                "-m", "cliplite_dist", RECIPE] + overrides + ["train.steps=4"],
                               cwd=nodes[k], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for k in (0, 1)]
    outs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert all(agent.returncode != 0 for agent in agents), outs
    checkpoint = Path("runs") / "t" / "checkpoints"
    if holder == 0:
        expected = f"rank 1 on {socket.gethostname()} does not see {checkpoint / 'step_00000002'} complete, " \
                   "which rank 0 resumes from"
    else:
        expected = f"rank 1 on {socket.gethostname()} sees checkpoint {checkpoint / 'step_00000002'} where rank 0 " \
                   "sees none"
    assert expected in outs[1], outs[1][-4000:]
    assert "checking that every rank sees the checkpoint to resume failed on another node" in outs[0], outs[0][-4000:]
    assert "resumed from" not in outs[0] + outs[1]
