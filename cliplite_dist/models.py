"""open_clip towers plus the training objective, as one module owned by one DeepSpeed engine.

Towers come from open_clip by name (RN50, ViT-B-32, ... any registered config), from a model-config
JSON in open_clip's format given by path, or from our tiny configs shipped in `model_configs/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch
import torch.distributed as dist
from torch import nn

from cliplite_dist.config import ModelConfig, ObjectiveConfig
from cliplite_dist.norms import keep_batchnorm_statistics_fp32
from cliplite_dist.objectives import Objective, ObjectiveOutput, build_objective

PACKAGED_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False


def resolve_model_name(name: str) -> str:
    """The open_clip name for `name`; a JSON path is registered with open_clip under its stem."""
    global _registered
    if not _registered:
        open_clip.add_model_config(PACKAGED_CONFIGS)
        _registered = True
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model.name={name!r}: no such model-config JSON file")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"model.name={name!r} is not an open_clip model config; known: "
                         f"{', '.join(open_clip.list_models())}")
    return name


def preprocess_config(model_cfg: dict) -> dict:
    """The image preprocessing every run uses, in open_clip's `preprocess_cfg` terms, so training,
    evaluation and an exported model (open_clip_config.json) all see images the same way."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return {"size": size, "mode": "RGB", "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}


@dataclass
class Towers:
    model: nn.Module
    model_cfg: dict
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])


def image_size(cfg: ModelConfig) -> int:
    """The size of training images for model.name, known before the model is built."""
    return preprocess_config(open_clip.get_model_config(resolve_model_name(cfg.name)))["size"]


def build_towers(cfg: ModelConfig) -> Towers:
    name = resolve_model_name(cfg.name)
    model = open_clip.create_model(name, pretrained=None)
    # open_clip's own logit scale/bias are unused (each objective owns its temperature), and as
    # 0-dim parameters they break DeepSpeed 0.19's initial broadcast (`view(uint8)` of a scalar):
    # drop them; an export to open_clip's format writes the objective's temperature back.
    for attr in ("logit_scale", "logit_bias"):
        if isinstance(getattr(model, attr, None), nn.Parameter):
            setattr(model, attr, None)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model_cfg = open_clip.get_model_config(name)
    preprocess = PreprocessCfg(**preprocess_config(model_cfg))
    return Towers(
        model=model,
        model_cfg=model_cfg,
        train_transform=image_transform_v2(preprocess, is_train=True),
        eval_transform=image_transform_v2(preprocess, is_train=False),
        tokenizer=open_clip.get_tokenizer(name),
    )


class ContrastiveModel(nn.Module):
    """Towers and objective in one module, so one engine owns (and partitions) all parameters.

    Everything goes through `forward`, evaluation embeddings too: under ZeRO-3 parameters are
    gathered by forward hooks, and calling `encode_text` directly would skip them.
    """

    def __init__(self, towers: nn.Module, objective: Objective):
        super().__init__()
        self.towers = towers
        self.objective = objective

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
                embed_only: bool = False, towers_only: bool = False) -> ObjectiveOutput | tuple:
        """The objective's output; with `embed_only` the objective's retrieval embeddings, with
        `towers_only` the towers' raw embeddings (what a linear probe reads), of either input."""
        image_emb = self.towers.encode_image(images) if images is not None else None
        text_emb = self.towers.encode_text(tokens) if tokens is not None else None
        if towers_only:
            return image_emb, text_emb
        # The objective runs outside autocast (bf16 without ZeRO): its similarities and losses stay
        # fp32 (objectives.base.compute_dtype), as under DeepSpeed's bf16 weights.
        with torch.autocast((image_emb if image_emb is not None else text_emb).device.type, enabled=False):
            if embed_only:
                return (None if image_emb is None else self.objective.embed_image(image_emb),
                        None if text_emb is None else self.objective.embed_text(text_emb))
            return self.objective(image_emb, text_emb)


def build_model(model_cfg: ModelConfig, objective_cfg: ObjectiveConfig) -> tuple[ContrastiveModel, Towers]:
    towers = build_towers(model_cfg)
    objective = build_objective(objective_cfg, towers.embed_dim)
    model = ContrastiveModel(towers.model, objective)
    keep_batchnorm_statistics_fp32(model)
    if model_cfg.compile:
        compile_encoders(towers.model)
    return model, towers


def compile_encoders(towers: nn.Module) -> None:
    """torch.compile, in place, the towers' encoders: the image tower and the text transformer
    (`text` in open_clip's CustomTextCLIP). `Module.compile` keeps parameter names, so checkpoints
    and exports are those of the eager model. The objective stays eager: a few ops, and InfoNCE's
    all-gather would split its graph."""
    for name in ("visual", "transformer", "text"):
        encoder = getattr(towers, name, None)
        if isinstance(encoder, nn.Module):
            encoder.compile()


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Average every BatchNorm's running statistics over the ranks (nothing to do on one rank).

    BatchNorm normalises with each rank's own batch in training (the reference's DDP did too), so
    each rank's running statistics drift apart; evaluation and checkpoints use them. Averaged,
    every rank evaluates its slice of a set with the same network, and a checkpoint (written from
    rank 0) holds what every rank holds, so a resumed run continues exactly.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [buf for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats for buf in (m.running_mean, m.running_var)]
    if not buffers:
        return
    flat = torch.cat([buf.float().flatten() for buf in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for buf, values in zip(buffers, flat.split([buf.numel() for buf in buffers])):
        buf.copy_(values.view_as(buf))
