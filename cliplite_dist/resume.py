"""Which checkpoint a run continues from, and how it is loaded on this run's ranks.

`prepare` runs before the engine is built: a checkpoint saved on another number of ranks at
ZeRO 1-3 is either converted to DeepSpeed's universal form (the engine must be built to load
it) or warm-started, its consolidated weights going into the model first
(`checkpoint.resume_mode` decides which). `Resume.load` then restores the engine and returns
the trainer state saved with it.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cliplite_dist import checkpoint, rundir
from cliplite_dist.config import Config
from cliplite_dist.distributed import DistEnv, run_and_agree
from cliplite_dist.engine import param_groups

log = logging.getLogger("cliplite_dist")


@dataclass
class Resume:
    """A checkpoint (`root`/`tag`) and how to load it: `mode` "exact", "universal" (from the
    converted copy in `universal`) or "warm_start"; `how` says it in words for the log."""

    root: Path
    tag: str
    mode: str = "exact"
    how: str = "its own layout"
    universal: Path | None = None

    def load(self, engine, env: DistEnv, zero_stage: int) -> dict:
        """Collective: restore `engine` and return this rank's trainer state; the universal copy
        is deleted once every rank has read it."""
        state = checkpoint.load(engine, self.root, self.tag, self.mode, self.universal)
        log.info("resumed from %s at step %d", self.root / self.tag, state["step"])
        if self.mode != "exact":
            log.warning("resuming a checkpoint of %d rank(s) on %d at ZeRO %d through %s",
                        checkpoint.saved_world_size(self.root, self.tag), env.world_size, zero_stage, self.how)
        if self.universal is not None:
            dist.barrier()
            if env.local_rank == 0:
                shutil.rmtree(self.universal, ignore_errors=True)
        return state


def find(cfg: Config, env: DistEnv, sync: rundir.RunDirSync | None,
         device: torch.device) -> tuple[Path, str] | None:
    """Collective: (checkpoints folder, tag) of the newest checkpoint (run.resume=auto, after a
    remote run directory's newest complete one has come down) or of the one named; None to start."""
    mode, root = cfg.run.resume, cfg.run_dir / rundir.CHECKPOINTS
    if mode == "never":
        return None
    if mode == "auto" and cfg.run_url:
        rundir.pull_for_resume(sync, device)
    if mode == "auto":
        tag = _agreed_latest(root, env, device)
        return None if tag is None else (root, tag)
    root, tag = Path(mode).parent, Path(mode).name

    def check() -> None:
        if not (root / tag).is_dir():
            raise FileNotFoundError(f"{_rank_here(env)} sees no checkpoint {root / tag} (run.resume): every node "
                                    f"must see it")

    run_and_agree(check, device, "finding the checkpoint of run.resume")
    return root, tag


def _agreed_latest(root: Path, env: DistEnv, device: torch.device) -> str | None:
    """Rank 0's newest complete checkpoint under `root`, which every rank must see complete too.
    Ranks that resumed from different steps (a node-local run directory, a stale listing on a
    network filesystem) would train on mismatched weights or wait on each other for ever."""
    def newest() -> int:
        tag = checkpoint.find_latest(root)
        return -1 if tag is None else checkpoint.step_of(tag)

    step, _ = run_and_agree(newest if env.is_main else None, device, f"finding the newest checkpoint under {root}")
    chosen = None if step < 0 else checkpoint.tag_for(step)
    where = _rank_here(env)
    advice = "every node must see the same run.output_dir (a shared filesystem, or a URL that the run mirrors to)"

    def check() -> None:
        if chosen is None and (mine := checkpoint.find_latest(root)) is not None:
            raise FileNotFoundError(f"{where} sees checkpoint {root / mine} where rank 0 sees none: {advice}")
        if chosen is not None and not (root / chosen / checkpoint.COMPLETE).exists():
            raise FileNotFoundError(f"{where} does not see {root / chosen} complete, which rank 0 resumes from: "
                                    f"{advice}")

    run_and_agree(check, device, "checking that every rank sees the checkpoint to resume")
    return chosen


def _rank_here(env: DistEnv) -> str:
    return f"rank {env.rank} on {socket.gethostname()}"


def _universal_copy(root: Path, tag: str, env: DistEnv, device: torch.device) -> Path:
    """The checkpoint in DeepSpeed's universal form, converted by local rank 0 of every node into
    the node's scratch space (collective; a failure stops every rank)."""
    name = hashlib.sha1(str((root / tag).resolve()).encode()).hexdigest()[:10]
    out = Path(tempfile.gettempdir()) / f"cliplite-universal-{name}-node{env.node}"

    def convert() -> None:
        checkpoint.universal_copy(root, tag, out)

    run_and_agree(convert if env.local_rank == 0 else None, device, f"converting {root / tag} to a universal checkpoint")
    return out


def prepare(cfg: Config, env: DistEnv, device: torch.device, sync: rundir.RunDirSync | None,
            model: nn.Module) -> Resume | None:
    """Collective: the checkpoint to resume (None: start afresh), made ready for this run's ranks;
    a warm start's weights are in `model` on return. Build the engine with
    `load_universal=resume.universal is not None`."""
    found = find(cfg, env, sync, device)
    if found is None:
        return None
    optimizer = cfg.optim.name + (" in Lookahead" if cfg.optim.lookahead_k else "")
    sizes = [sum(p.numel() for p in group["params"]) for group in param_groups(model, cfg.optim)]
    resume = Resume(*found)
    resume.mode, resume.how = checkpoint.resume_mode(*found, env.world_size, cfg.engine.zero_stage, optimizer, sizes)
    if resume.mode == "warm_start":
        model.load_state_dict(checkpoint.consolidated_state_dict(*found))
    elif resume.mode == "universal":
        resume.universal = _universal_copy(*found, env, device)
    return resume
