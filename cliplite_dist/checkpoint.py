"""Checkpoints: DeepSpeed engine state plus our trainer state, safe against a crash mid-save.

Layout under `RUN_DIR/checkpoints/`:
    step_00000500/          DeepSpeed's files (ZeRO partitions ...), one trainer_state_rankR.pt
                            per rank, and COMPLETE, written last, once every rank has saved; it
                            holds the step and `nodes N` (a remote copy is whole once each of
                            the N nodes has marked its files up: cliplite_dist/rundir.py)
    latest                  the newest complete tag, replaced atomically (os.replace)
A crash mid-save leaves a folder without COMPLETE, which resume ignores, and a `latest` that still
names the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from cliplite_dist.distributed import DistEnv

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).exists()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def find_latest(root: Path) -> str | None:
    """The newest complete checkpoint tag: `latest` if it names a complete one, else a scan."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = _complete_tags(root)
    return tags[-1] if tags else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    folder = root / tag
    torch.save({**trainer_state, "rng": rng_state()}, folder / f"trainer_state_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (folder / COMPLETE).write_text(f"{step}\nnodes {DistEnv.from_environ().num_nodes}\n")
        _write_atomic(root / LATEST, tag + "\n")
        _prune(root, keep)
    dist.barrier()
    return folder


def _prune(root: Path, keep: int) -> None:
    tags = _complete_tags(root)
    for tag in tags[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)


def load(engine, root: Path, tag: str) -> dict:
    """Restore engine and this rank's trainer state (RNG included); returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rank_file = root / tag / f"trainer_state_rank{dist.get_rank()}.pt"
    if not rank_file.exists():  # resumed on more ranks than saved: rank 0's counters, own RNG
        rank_file = root / tag / "trainer_state_rank0.pt"
        state = torch.load(rank_file, weights_only=True)
        state.pop("rng", None)
        return state
    state = torch.load(rank_file, weights_only=True)
    set_rng_state(state.pop("rng"))
    return state
