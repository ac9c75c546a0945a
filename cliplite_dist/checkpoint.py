"""Checkpoints: DeepSpeed engine state plus our trainer state, safe against a crash mid-save.

Layout under `RUN_DIR/checkpoints/`:
    step_00000500/          DeepSpeed's files (ZeRO partitions ...), one trainer_state_rankR.pt
                            per rank, and COMPLETE, written last, once every rank has saved; it
                            holds the step and `nodes N` (a remote copy is whole once each of
                            the N nodes has marked its files up: cliplite_dist/rundir.py)
    latest                  the newest complete tag, replaced atomically (os.replace)
A crash mid-save leaves a folder without COMPLETE, which resume ignores, and a `latest` that still
names the previous complete checkpoint.

Resuming on another number of ranks (`resume_mode`): ZeRO 0 keeps whole copies and loads as it is.
ZeRO 1-3 partition the optimizer state by rank: with AdamW, DeepSpeed's universal checkpoint
(`universal_copy`, converted at resume into a scratch folder) reshards weights and moments
exactly; its converter knows Adam's moments only, so with SGD or Lookahead the run restarts from
the checkpoint's consolidated fp32 weights with a fresh optimizer state (a warm start).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cliplite_dist.distributed import DistEnv

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"  # the tag of a checkpoint's universal form in its scratch folder (universal_copy)
_TAG = re.compile(r"^step_(\d{8,})$")
# What DeepSpeed's universal converter asks every checkpoint to carry (Megatron writes more).
_UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.rsplit("_", 1)[1])


def _complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).exists()]
    return sorted(tags, key=step_of)


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


def _loss_scaler(engine) -> torch.amp.GradScaler | None:
    """fp16 without ZeRO: DeepSpeed's GradScaler, whose scale its checkpoints leave out (a resume
    would start over at 2**16 and skip steps until it settled again)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


def save(engine, root: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    rank = dist.get_rank()
    client_state = dict(_UNIVERSAL_INFO)
    if (scaler := _loss_scaler(engine)) is not None:
        client_state["loss_scaler"] = scaler.state_dict()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state=client_state)
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


def saved_world_size(root: Path, tag: str) -> int:
    """How many ranks wrote a checkpoint (one trainer state file each)."""
    return len(list((root / tag).glob("trainer_state_rank*.pt")))


def resume_mode(root: Path, tag: str, world_size: int, zero_stage: int, optimizer: str,
                group_sizes: list[int]) -> tuple[str, str]:
    """(how a checkpoint is resumed on `world_size` ranks, why): "exact" (in its own layout),
    "universal" (DeepSpeed's universal checkpoint reshards weights and AdamW moments) or
    "warm_start" (its consolidated fp32 weights, a fresh optimizer state). `optimizer` names the
    run's optimizer ("adamw", "sgd in Lookahead", ...), `group_sizes` its parameter groups' sizes."""
    if zero_stage == 0 or saved_world_size(root, tag) == world_size:
        return "exact", "its own layout"
    if optimizer != "adamw":
        return "warm_start", (f"a warm start: the consolidated fp32 weights and a fresh {optimizer} state "
                              f"(DeepSpeed's universal checkpoint reshards AdamW's moments only)")
    # At ZeRO 1-2 every rank must hold part of every group; a group of 2 W^2 elements or more
    # always gives each of W ranks some, whatever DeepSpeed's alignment padding.
    if zero_stage < 3 and min(group_sizes) < 2 * world_size ** 2:
        return "warm_start", (f"a warm start: the consolidated fp32 weights and a fresh AdamW state (a parameter "
                              f"group of {min(group_sizes)} elements is too small to give every one of {world_size} "
                              f"ranks a part, which DeepSpeed's universal checkpoint needs at ZeRO {zero_stage})")
    return "universal", "DeepSpeed's universal checkpoint: weights and AdamW moments resharded exactly"


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint, whatever its ZeRO stage and world size.

    ZeRO 1-3 (and bf16) keep fp32 master weights partitioned in the optimizer files; DeepSpeed's
    zero_to_fp32 merges them. A ZeRO-0 fp32 checkpoint holds the module's weights directly. These
    files are the run's own checkpoint, written by this framework.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = root / tag
    if any(folder.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def universal_copy(root: Path, tag: str, out: Path) -> Path:
    """Write DeepSpeed's universal form of checkpoint TAG into `out` (a scratch folder outside
    the run directory, which a remote run's sync would otherwise upload) and return `out`.
    One process per filesystem writes it; every rank then loads from it."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(root / tag), "--output_folder", str(out / UNIVERSAL)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed could not convert {root / tag} to a universal checkpoint:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return out


def load(engine, root: Path, tag: str, mode: str = "exact", universal: Path | None = None) -> dict:
    """Restore engine and this rank's trainer state (RNG included); returns the trainer state.
    `mode` (`resume_mode`) "universal": the engine, built to load universal checkpoints, from
    `universal` (`universal_copy`); "warm_start": the weights went into the model before its
    engine was built, so only the trainer state is read here."""
    if mode != "warm_start":
        load_root, load_tag = (universal, UNIVERSAL) if mode == "universal" else (root, tag)
        # DeepSpeed's ZeRO-3 universal load gives every group the first group's settings (weight
        # decay, our base_lr; the groups were just built from this run's config: keep theirs) and
        # one shared `step` tensor, which AdamW would then advance once per group each step
        settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
        load_path, client_state = engine.load_checkpoint(str(load_root), tag=load_tag, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_root / load_tag}")
        if (scaler := _loss_scaler(engine)) is not None and "loss_scaler" in (client_state or {}):
            scaler.load_state_dict(client_state["loss_scaler"])
        if mode == "universal":
            for group, own in zip(engine.optimizer.param_groups, settings):
                group.update(own)
            for state in engine.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
    rank_file = root / tag / f"trainer_state_rank{dist.get_rank()}.pt"
    if not rank_file.exists():  # resumed on more ranks than saved: rank 0's counters, own RNG
        rank_file = root / tag / "trainer_state_rank0.pt"
        state = torch.load(rank_file, weights_only=True)
        state.pop("rng", None)
        return state
    state = torch.load(rank_file, weights_only=True)
    set_rng_state(state.pop("rng"))
    return state
