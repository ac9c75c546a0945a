"""Export a run to an open_clip model folder, and load such a folder back with our critic.

    OUT/open_clip_config.json        model_cfg + preprocess_cfg: open_clip's own format
    OUT/open_clip_model.safetensors  the towers, open_clip's parameter names (+ logit_scale)
    OUT/cliplite_objective.safetensors  what open_clip cannot express: CLIP-Lite's critic heads,
                                     the learned temperature
    OUT/cliplite_meta.json           objective config, step, source run

`open_clip.create_model_and_transforms('local-dir:OUT')` (and so CLIP_benchmark's
`--model local-dir:OUT`) loads the towers; tools built on open_clip then compare the towers'
cosine similarity. `load(OUT)` also applies the objective, so its `encode_image`/`encode_text`
give the similarity the model was trained with (CLIP-Lite: the critic). Weights are written and
read as safetensors only: loading an export never unpickles anything.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cliplite_dist import checkpoint
from cliplite_dist.config import Config, ObjectiveConfig, is_remote, load_config
from cliplite_dist.models import preprocess_config
from cliplite_dist.objectives import Objective, build_objective
from cliplite_dist.rundir import fetch

TOWERS_PREFIX, OBJECTIVE_PREFIX = "towers.", "objective."
META = "cliplite_meta.json"
OBJECTIVE_WEIGHTS = "cliplite_objective.safetensors"


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    towers = {k[len(TOWERS_PREFIX):]: v for k, v in state.items() if k.startswith(TOWERS_PREFIX)}
    objective = {k[len(OBJECTIVE_PREFIX):]: v for k, v in state.items() if k.startswith(OBJECTIVE_PREFIX)}
    unknown = set(state) - {TOWERS_PREFIX + k for k in towers} - {OBJECTIVE_PREFIX + k for k in objective}
    if unknown:
        raise ValueError(f"unexpected parameters in the checkpoint: {sorted(unknown)[:5]}")
    return towers, objective


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml")
    return load_config(path)


def export_run(run_dir: str | Path, out: Path, tag: str | None = None) -> Path:
    """Write `out` from the newest complete checkpoint of `run_dir` (or `tag`); a remote run
    directory (s3://...) is read from a temporary local copy of its files and that checkpoint."""
    if is_remote(str(run_dir)):
        with tempfile.TemporaryDirectory(prefix="cliplite-export-") as local:
            return _export(Path(local), Path(out), fetch(str(run_dir), Path(local), tag), str(run_dir))
    return _export(Path(run_dir), Path(out), tag, str(Path(run_dir).resolve()))


def _export(run_dir: Path, out: Path, tag: str | None, source: str) -> Path:
    cfg = run_config(run_dir)
    root = run_dir / "checkpoints"
    tag = tag or checkpoint.find_latest(root)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    towers, objective = _split(checkpoint.consolidated_state_dict(root, tag))
    model_cfg = json.loads((run_dir / "model_cfg.json").read_text())
    objective_module = build_objective(cfg.objective, int(model_cfg["embed_dim"]))
    objective_module.load_state_dict(objective)
    # open_clip's towers own a logit scale (and SigLIP's a bias); ours live in the objective: write them back
    towers["logit_scale"] = objective_module.log_temp.detach().reshape(())
    if isinstance(getattr(objective_module, "bias", None), nn.Parameter):
        model_cfg = {**model_cfg, "init_logit_bias": float(objective_module.bias.detach())}
        towers["logit_bias"] = objective_module.bias.detach().reshape(())
    out.mkdir(parents=True, exist_ok=True)
    save_file(towers, str(out / "open_clip_model.safetensors"))
    save_file(objective, str(out / OBJECTIVE_WEIGHTS))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(model_cfg)}, indent=1) + "\n")
    (out / META).write_text(json.dumps(
        {"objective": asdict(cfg.objective), "embed_dim": int(model_cfg["embed_dim"]),
         "step": int(tag.split("_")[1]), "source_run": source, "checkpoint": tag,
         "similarity": "critic heads, L2-normalised dot" if cfg.objective.name == "cliplite" else "cosine"},
        indent=1) + "\n")
    return out


class ExportedModel(nn.Module):
    """open_clip towers plus our objective: encode_* give the embeddings whose dot product is the
    similarity the model was trained with (unit vectors)."""

    def __init__(self, towers: nn.Module, objective: Objective):
        super().__init__()
        self.towers, self.objective = towers, objective

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.objective.embed_image(self.towers.encode_image(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.objective.embed_text(self.towers.encode_text(tokens))


def load(path: str | Path):
    """(model, preprocess, tokenizer) of an exported folder; model.encode_image/encode_text."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a cliplite_dist export: no {META}")
    meta = json.loads(meta_file.read_text())
    towers, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    objective = build_objective(ObjectiveConfig(**meta["objective"]), meta["embed_dim"])
    objective.load_state_dict(load_file(str(path / OBJECTIVE_WEIGHTS)))
    model = ExportedModel(towers, objective).eval()
    return model, preprocess, tokenizer
