"""One place that turns a torchrun, SLURM (`srun`) or single-process environment into ranks.

Everything else asks `DistEnv` for rank and world size. `export()` writes the torch.distributed
variables back into os.environ *before* data-loader workers start, so webdataset-style node
splitting in the workers sees the real rank instead of "rank 0 of 1".
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from cliplite_dist.config import EngineConfig

_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed host list, e.g. `gpu[001-002,005],cpu7` -> gpu001 gpu002 gpu005 cpu7.

    Our own parser so that no `scontrol` is needed inside the job (and unit tests run anywhere).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> list[str]:
    match = _BRACKET.search(item)
    if not match:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        else:
            values = [part]
        for value in values:
            out.extend(_expand_item(prefix + value + suffix))
    return out


def _tasks_on_first_node(tasks_per_node: str) -> int:
    """`SLURM_TASKS_PER_NODE` looks like `4(x2),3`; local world size is the count of our node."""
    first = tasks_per_node.split(",")[0]
    return int(first.split("(")[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_port(job_id: str, restart_count: int = 0, step_id: int = 0) -> int:
    """A port every task of a job step derives alike; a requeued job (new restart count) gets a new
    one, so its rendezvous never meets a stale store from the previous allocation, and so does
    each step of one allocation (two trainings started side by side with srun)."""
    return 15000 + (int(job_id) * 7 + restart_count * 101 + step_id * 13) % 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | submitit-local | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node(self) -> int:
        """This process's node: torchrun and SLURM's default (block) distribution number ranks
        node by node."""
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.local_world_size)

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", 0)),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                source="torchrun",
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            # srun's step may span fewer nodes than the job (srun -N 2 in a 4-node allocation):
            # rank 0 runs on the step's first node, which need not be the job's
            nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                        or "127.0.0.1")
            step = env.get("SLURM_STEP_ID", "0")
            return cls(
                rank=int(env["SLURM_PROCID"]),
                world_size=int(env["SLURM_NTASKS"]),
                local_rank=int(env.get("SLURM_LOCALID", 0)),
                local_world_size=_tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                                      or env.get("SLURM_TASKS_PER_NODE", "1")),
                master_addr=expand_nodelist(nodelist)[0],
                master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"),
                                                                     int(env.get("SLURM_RESTART_COUNT", 0)),
                                                                     int(step) if step.isdigit() else 0)),
                source="slurm",
            )
        if "SUBMITIT_LOCAL_GLOBALID" in env:  # submitit's local executor (`cliplite-submit --local`)
            return cls(
                rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
                world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
                local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
                local_world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
                master_port=slurm_port(env["SUBMITIT_LOCAL_JOB_ID"]),
                source="submitit-local",
            )
        return cls(master_port=int(env.get("MASTER_PORT") or _free_port()))

    def export(self, environ: dict | None = None) -> None:
        env = os.environ if environ is None else environ
        env.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK where a GPU is present (or asked for), else cpu. Every rank must see all of
    its node's GPUs (torchrun; SLURM's --gpus-per-node), since DeepSpeed, too, takes a rank's GPU
    by LOCAL_RANK. Where SLURM gives each task its own (--gpus-per-task, --gpu-bind), every rank
    of the node fails here at once, instead of ranks 1.. alone, with rank 0 left waiting for them
    until the rendezvous times out."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"engine.device=cuda but torch sees no GPU on {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch {torch.__version__} built for CUDA "
                f"{torch.version.cuda or 'none'}): give the job GPUs (SLURM: --gpus-per-node), or set "
                "engine.device=auto to train on the CPU")
        visible = torch.cuda.device_count()
        if visible < env.local_world_size:
            raise RuntimeError(
                f"rank {env.rank} sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) but its node runs {env.local_world_size} ranks: "
                "each rank must see all of the node's GPUs and takes the one at its local rank. On SLURM, request "
                "--gpus-per-node without --gpus-per-task, --ntasks-per-gpu or --gpu-bind")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device,
                     timeout_s: float = EngineConfig.collective_timeout_s) -> None:
    """Start the process group: nccl for CUDA devices, gloo on CPU. Always a group, even of one,
    so the trainer and DeepSpeed take a single code path. A collective that waits `timeout_s`
    for another rank stops the run."""
    import deepspeed

    env.export()
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), rank=env.rank,
                               world_size=env.world_size)


def host_group(timeout_s: float = EngineConfig.collective_timeout_s) -> torch.distributed.ProcessGroup | None:
    """A group of all ranks whose collectives take CPU tensors (gloo), for flags the hosts agree
    on without waiting for their GPUs; None (the default group) where that is gloo already.
    Every rank must call it, in the same order as other group creations."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


_UNSET = -(2**62)  # no value in a MAX all-reduce


def run_and_agree(action: Callable[[], int | None] | None, device: torch.device, what: str) -> tuple[int, int]:
    """Collective: `action` runs where given (e.g. on local rank 0 of each node) while the other
    ranks wait. A failure anywhere raises on every rank, instead of leaving the others waiting in
    the next collective. Returns the lowest and highest value `action` returned on any rank."""
    value, error = None, None
    if action is not None:
        try:
            value = action()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = exc
    flags = torch.tensor([int(error is not None), _UNSET if value is None else value,
                          _UNSET if value is None else -value], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if error is not None:
        raise RuntimeError(f"{what} failed: {type(error).__name__}: {error}") from error
    if flags[0]:
        raise RuntimeError(f"{what} failed on another node; see its log")
    return -int(flags[2]), int(flags[1])
