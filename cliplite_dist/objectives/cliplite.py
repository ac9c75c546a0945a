"""CLIP-Lite (Shrivastava et al., AISTATS 2023): a Jensen-Shannon lower bound on image-text MI.

A critic T(x, y) = t * <head_i(x), head_t(y)> (unit vectors, learned multiplier t) is trained to
score each matched pair high and exactly one mismatched pair per image low:

    loss = mean softplus(-T(pos)) + mean softplus(T(neg))   [+ prior_weight * image prior]

and 2 log 2 - loss is the JSD MI estimate in nats. One negative per positive is what makes it
cheap: the default negatives come from the local batch, so the loss needs no communication.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliplite_dist.objectives.base import Objective, ObjectiveOutput, check_choice, check_pairs, normalize
from cliplite_dist.objectives.gather import from_previous_rank, world

HEADS = ("mlp", "linear")
NEGATIVES = ("shift", "random", "hard", "cross_rank")


class EncodeAndDotHead(nn.Module):
    """The paper's critic block: a non-linear branch plus a near-identity linear shortcut, then a norm.

    The shortcut starts as (truncated) identity so that at initialisation the critic compares the
    towers' embeddings themselves; the branch learns what to add. The paper used BatchNorm; we use
    LayerNorm, which normalises each row alone: identical on every rank and at any batch size
    (eval included) without SyncBatchNorm or running statistics.
    """

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(dim_in, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, dim_out))
        self.shortcut = nn.Linear(dim_in, dim_out)
        self.norm = nn.LayerNorm(dim_out)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            self.shortcut.weight.diagonal().fill_(1.0)
            self.shortcut.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.branch(x) + self.shortcut(x))


def build_head(kind: str, dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    check_choice("objective.head", kind, HEADS)
    if kind == "linear":
        return nn.Linear(dim_in, dim_out)
    return EncodeAndDotHead(dim_in, hidden, dim_out)


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward: one loss trains two adversaries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class ImagePrior(nn.Module):
    """Deep InfoMax's prior matching on the image tower's embedding.

    A small discriminator tells sigmoid(embedding) (label 0) from uniform[0, 1) noise (label 1)
    and minimises the BCE; the gradient-reversal on the embedding's path makes the image tower
    maximise it, i.e. push its squashed embeddings towards the uniform prior. The discriminator
    runs once, on the concatenation, because ZeRO-2 breaks when a module runs twice in a step.
    """

    def __init__(self, dim: int):
        super().__init__()
        half = max(1, dim // 2)
        self.discriminator = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, half), nn.ReLU(), nn.Linear(half, 1))

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        fake = torch.sigmoid(_GradReverse.apply(image_emb.to(_param_dtype(self))))
        noise = torch.rand_like(fake)
        logits = self.discriminator(torch.cat([fake, noise])).squeeze(1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = torch.cat([torch.zeros_like(logits[: len(fake)]), torch.ones_like(logits[len(fake):])])
        return F.binary_cross_entropy_with_logits(logits, labels)


def random_derangement(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random permutation pi of range(b) with pi(i) != i for every i, drawn on `device`.

    A random relabelling p of a rotation by k in [1, b): pi(p[j]) = p[(j + k) % b] has no fixed
    point by construction. Rejection sampling of uniform derangements would need a host sync to
    test for fixed points; this needs none.
    """
    if b < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got batch size {b}")
    perm = torch.randperm(b, device=device)
    k = torch.randint(1, b, (), device=device)
    pi = torch.empty_like(perm)
    pi[perm] = perm[(torch.arange(b, device=device) + k) % b]
    return pi


@torch.no_grad()
def hardest_other(zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """For each image row, the index of the highest-scoring caption other than its own."""
    scores = zi @ zt.T
    scores.fill_diagonal_(float("-inf"))
    return scores.argmax(dim=1)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class CLIPLite(Objective):
    """CLIP-Lite's JSD objective with one negative per positive.

    negatives: `shift` pairs image i with caption (i+1) mod b (the paper); `random` with a fresh
    random derangement; `hard` with the best-scoring other caption (chosen without gradient);
    `cross_rank` with row i of the previous rank's captions (one point-to-point exchange per step,
    gradients returned to that rank; falls back to `shift` on one process). Only `cross_rank`
    communicates.
    """

    def __init__(self, embed_dim: int, head: str = "mlp", head_hidden: int = 0, head_dim: int = 0,
                 negatives: str = "shift", temperature_init: float = 1 / 0.07,
                 temperature_max: float = 100.0, prior_weight: float = 0.0):
        super().__init__(temperature_init, temperature_max)
        check_choice("objective.negatives", negatives, NEGATIVES)
        if prior_weight < 0:
            raise ValueError(f"objective.prior_weight={prior_weight!r} must be >= 0 (0 disables the prior)")
        hidden, dim_out = head_hidden or embed_dim, head_dim or embed_dim
        self.image_head = build_head(head, embed_dim, hidden, dim_out)
        self.text_head = build_head(head, embed_dim, hidden, dim_out)
        self.negatives = negatives
        self.prior_weight = float(prior_weight)
        self.prior = ImagePrior(embed_dim) if prior_weight > 0 else None

    def embed_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        return normalize(self.image_head(image_emb.to(_param_dtype(self.image_head))))

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return normalize(self.text_head(text_emb.to(_param_dtype(self.text_head))))

    def negative_captions(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """The caption features paired with each image as its one negative (rows of zi)."""
        if self.negatives == "cross_rank" and world()[1] > 1:
            return from_previous_rank(zt)
        b = zi.shape[0]
        if b < 2:
            raise ValueError(f"objective.negatives={self.negatives!r} takes the negative caption from the "
                             f"local batch, which needs batch size >= 2 (got {b})")
        if self.negatives == "random":
            return zt[random_derangement(b, zt.device)]
        if self.negatives == "hard":
            return zt[hardest_other(zi, zt)]
        return zt.roll(-1, dims=0)  # shift (and cross_rank on one process): caption (i + 1) mod b

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> ObjectiveOutput:
        check_pairs(image_emb, text_emb)
        zi, zt = self.embed_image(image_emb), self.embed_text(text_emb)  # each head runs once
        temp = self.temperature()
        pos = temp * (zi * zt).sum(dim=1)
        neg = temp * (zi * self.negative_captions(zi, zt)).sum(dim=1)
        loss_pos, loss_neg = F.softplus(-pos).mean(), F.softplus(neg).mean()
        loss = loss_pos + loss_neg
        metrics = {
            "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach(),
            "mi_jsd": 2 * math.log(2) - loss.detach(),
            "temperature": temp.detach(),
            "pos_score": pos.detach().mean(),
            "neg_score": neg.detach().mean(),
        }
        if self.prior is not None:
            loss_prior = self.prior(image_emb)
            loss = loss + self.prior_weight * loss_prior
            metrics["loss_prior"] = loss_prior.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
