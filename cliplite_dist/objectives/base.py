"""The interface every training objective implements, and the pieces both objectives share.

An objective turns the two towers' raw embeddings into a loss. It owns everything between the
towers and the loss (critic heads, temperature, discriminator), so one DeepSpeed engine owns and
partitions all of it together with the towers.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ObjectiveOutput(NamedTuple):
    """A float32 scalar loss and detached 0-dim metrics.

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors in a module's output to hook
    its backward pass, and it looks inside tuples and dicts only. Metrics stay tensors: calling
    `.item()` here would force a host sync every step; the trainer decides when to read them.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (losses in half precision lose too much), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in at least float32, so that similarity = a @ b.T is a cosine."""
    return F.normalize(x.to(compute_dtype(x)), dim=-1)


class Objective(nn.Module):
    """Base class: a learned temperature (a multiplier, stored as its log) plus the loss interface.

    The multiplier is clamped inside `temperature()`, never in place on the parameter: DeepSpeed
    keeps an fp32 master copy and would overwrite any in-place edit of the bf16 parameter.
    """

    def __init__(self, temperature_init: float, temperature_max: float):
        super().__init__()
        if temperature_init <= 0:
            raise ValueError(f"temperature_init={temperature_init!r} must be > 0 (it is learned as its log)")
        self.temperature_max = float(temperature_max)
        # shape [1], not 0-dim: DeepSpeed 0.19 cannot broadcast 0-dim parameters at initialize
        self.log_temp = nn.Parameter(torch.full((1,), math.log(temperature_init), dtype=torch.float32))

    def temperature(self) -> torch.Tensor:
        """Current clamped multiplier, 0-dim, in at least float32 (also under bf16 parameters)."""
        log_temp = self.log_temp[0].to(compute_dtype(self.log_temp))
        return log_temp.exp().clamp(max=self.temperature_max)

    def embed_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding for retrieval / zero-shot (similarity = a @ b.T)."""
        raise NotImplementedError

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embedding for retrieval / zero-shot (similarity = a @ b.T)."""
        raise NotImplementedError

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> ObjectiveOutput:
        """Loss of matched pairs by row; inputs are raw tower outputs [b, D], possibly bf16."""
        raise NotImplementedError


def check_pairs(image_emb: torch.Tensor, text_emb: torch.Tensor) -> int:
    """The local batch size b; rows are pairs, so both towers must give the same number of rows."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"expected image and text embeddings of shape [b, D] with the same b, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    return image_emb.shape[0]
