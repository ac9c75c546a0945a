"""CLIP-Lite (Shrivastava et al., AISTATS 2023): a Jensen-Shannon lower bound on image-text MI.

A critic T(x, y) = t * <head_i(x), head_t(y)> (unit vectors, learned multiplier t) is trained to
score each matched pair high and exactly one mismatched pair per image low:

    JSD loss = mean softplus(-T(pos)) + mean softplus(T(neg))

and 2 log 2 - JSD loss is the JSD MI estimate in nats. One negative per positive is what makes it
cheap: the default negatives come from the local batch, so the loss needs no communication.
With a prior (prior_weight w > 0) the loss is (1 - w) JSD + w prior, as in the paper's code, or
JSD + w prior for our adversarial variant (`config.Prior`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliplite_dist.config import CriticHead, HeadNorm, Negatives, Prior, check_choice
from cliplite_dist.norms import BatchNorm1dFp32Statistics
from cliplite_dist.objectives.base import Objective, ObjectiveOutput, check_pairs, normalize
from cliplite_dist.objectives.gather import all_reduce_sum, from_previous_rank, world

PAPER_TEMPERATURE = 1 / 0.07  # the reference code's initial critic multiplier (CLIP's too)


class GlobalBatchNorm1d(BatchNorm1dFp32Statistics):
    """BatchNorm1d whose training statistics are those of the global batch (every rank's rows).

    torch's SyncBatchNorm does this on GPUs only; this one works over any process group (gloo
    too) with one differentiable all-reduce of the rows' sums, sums of squares and count, so W
    ranks compute exactly what one process computes on the concatenated batch. Evaluation uses
    the running statistics, which are then the same on every rank. Statistics stay fp32 under
    bf16 parameters, as in every BatchNorm of ours (`norms`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        stats = all_reduce_sum(torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_full((1,), x.shape[0])]))
        sums, squares, count = stats[:x.shape[1]], stats[x.shape[1]:-1], stats[-1]
        mean = sums / count
        var = (squares / count - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.to(out.dtype) + self.bias.to(out.dtype)
        return out.to(x.dtype)


def _branch_norm(kind: HeadNorm, width: int) -> nn.Module:
    check_choice("objective.head_norm", kind, HeadNorm)
    return {"batch": BatchNorm1dFp32Statistics, "sync_batch": GlobalBatchNorm1d, "layer": nn.LayerNorm}[kind](width)


class EncodeAndDotHead(nn.Module):
    """The paper's critic block: Linear (no bias) -> norm -> ReLU -> Linear, plus a near-identity
    linear shortcut, then LayerNorm (the reference's MILinearBlock).

    The shortcut starts as (truncated) identity plus small noise, so that at initialisation the
    critic compares the towers' embeddings themselves; the branch learns what to add. The
    branch's norm is the reference's BatchNorm1d (`batch`: statistics of this rank's batch,
    as under the reference's DDP; `sync_batch`: of all ranks' batches) or a LayerNorm (`layer`),
    which normalises each row alone and so needs no batch at all.
    """

    def __init__(self, dim_in: int, hidden: int, dim_out: int, norm: HeadNorm = "batch"):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(dim_in, hidden, bias=False), _branch_norm(norm, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))
        self.shortcut = nn.Linear(dim_in, dim_out)
        self.norm = nn.LayerNorm(dim_out)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            self.shortcut.weight.diagonal().fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.branch(x) + self.shortcut(x))


def build_head(kind: CriticHead, dim_in: int, hidden: int, dim_out: int, norm: HeadNorm = "batch") -> nn.Module:
    check_choice("objective.head", kind, CriticHead)
    if kind == "linear":
        return nn.Linear(dim_in, dim_out)
    return EncodeAndDotHead(dim_in, hidden, dim_out, norm)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class ReferencePrior(nn.Module):
    """The paper's code's Deep InfoMax prior term, on the image and the text features.

    Per modality a discriminator D (Linear 1000 -> ReLU -> Linear 200 -> ReLU -> Linear 1, then
    sigmoid) and the loss -(mean log D(u) + mean log(1 - D(f))) with u ~ U[0, 1) shaped like the
    features f; the two modalities' losses are summed. As in the reference (and the Deep InfoMax
    code it follows) every parameter minimises it, the towers too: they are not D's adversaries
    here but help it tell their features from the noise. Each D runs once, on [u; f]: a module
    run twice in one step breaks ZeRO-2.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.image = self._discriminator(dim)
        self.text = self._discriminator(dim)

    @staticmethod
    def _discriminator(dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 1))

    @staticmethod
    def term(discriminator: nn.Module, features: torch.Tensor) -> torch.Tensor:
        features = features.to(_param_dtype(discriminator))
        noise = torch.rand_like(features)
        logits = discriminator(torch.cat([noise, features])).squeeze(1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        n = len(noise)
        # log D = logsigmoid(logit), log(1 - D) = logsigmoid(-logit): the stable forms of the same values
        return -(F.logsigmoid(logits[:n]).mean() + F.logsigmoid(-logits[n:]).mean())

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.term(self.image, image_emb) + self.term(self.text, text_emb)


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient backward: one loss trains two adversaries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class AdversarialPrior(nn.Module):
    """Deep InfoMax's prior matching as the DIM paper describes it, on the image features only.

    A small discriminator tells sigmoid(embedding) (label 0) from uniform[0, 1) noise (label 1)
    and minimises the BCE; the gradient reversal on the embedding's path makes the image tower
    maximise it, i.e. push its squashed embeddings towards the uniform prior. Not the paper's
    code (see ReferencePrior); the discriminator runs once, on the concatenation.
    """

    def __init__(self, dim: int):
        super().__init__()
        half = max(1, dim // 2)
        self.discriminator = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, half), nn.ReLU(), nn.Linear(half, 1))

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
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


class CLIPLite(Objective):
    """CLIP-Lite's JSD objective with one negative per positive.

    negatives: `shift` pairs image i with caption (i+1) mod b (the paper); `random` with a fresh
    random derangement; `cross_rank` with row i of the previous rank's captions (one
    point-to-point exchange per step, gradients returned to that rank; falls back to `shift` on
    one process). Only `cross_rank` and the `sync_batch` head norm communicate.
    """

    def __init__(self, embed_dim: int, head: CriticHead = "mlp", head_hidden: int = 0, head_dim: int = 0,
                 negatives: Negatives = "shift", temperature_init: float = PAPER_TEMPERATURE,
                 temperature_max: float = 100.0, prior_weight: float = 0.0, prior: Prior = "reference",
                 head_norm: HeadNorm = "batch"):
        super().__init__(temperature_init, temperature_max)
        check_choice("objective.negatives", negatives, Negatives)
        check_choice("objective.prior", prior, Prior)
        if not 0 <= prior_weight < 1:
            raise ValueError(f"objective.prior_weight={prior_weight!r} must be in [0, 1) (0 disables the prior)")
        hidden, dim_out = head_hidden or embed_dim, head_dim or embed_dim
        self.image_head = build_head(head, embed_dim, hidden, dim_out, head_norm)
        self.text_head = build_head(head, embed_dim, hidden, dim_out, head_norm)
        self.negatives = negatives
        self.prior_weight = float(prior_weight)
        self.prior = None
        self.jsd_weight = 1.0
        if prior_weight > 0:
            self.prior = (ReferencePrior if prior == "reference" else AdversarialPrior)(embed_dim)
            self.jsd_weight = 1.0 - self.prior_weight if prior == "reference" else 1.0

    def embed_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        return normalize(self.image_head(image_emb.to(_param_dtype(self.image_head))))

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return normalize(self.text_head(text_emb.to(_param_dtype(self.text_head))))

    def negative_captions(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """The caption features paired with each image as its one negative (rows of zi)."""
        if self.negatives == "cross_rank" and world()[1] > 1:
            return from_previous_rank(zt)
        if self.negatives == "random":
            return zt[random_derangement(zi.shape[0], zt.device)]
        return zt.roll(-1, dims=0)  # shift (and cross_rank on one process): caption (i + 1) mod b

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> ObjectiveOutput:
        b = check_pairs(image_emb, text_emb)
        if b < 2 and not (self.negatives == "cross_rank" and world()[1] > 1):
            raise ValueError(f"objective.negatives={self.negatives!r} takes the negative caption from the "
                             f"local batch, which needs batch size >= 2 (got {b})")
        zi, zt = self.embed_image(image_emb), self.embed_text(text_emb)  # each head runs once
        temp = self.temperature()
        pos = temp * (zi * zt).sum(dim=1)
        neg = temp * (zi * self.negative_captions(zi, zt)).sum(dim=1)
        loss_pos, loss_neg = F.softplus(-pos).mean(), F.softplus(neg).mean()
        jsd = loss_pos + loss_neg
        metrics = {
            "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach(),
            "mi_jsd": 2 * math.log(2) - jsd.detach(),
            "temperature": temp.detach(),
            "pos_score": pos.detach().mean(),
            "neg_score": neg.detach().mean(),
        }
        loss = jsd
        if self.prior is not None:
            loss_prior = self.prior(image_emb, text_emb)
            loss = self.jsd_weight * jsd + self.prior_weight * loss_prior
            metrics["loss_prior"] = loss_prior.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
