"""CLIP's symmetric InfoNCE loss, with negatives from every rank's batch.

Each rank scores its local rows against the columns of the global batch (gathered with gradients),
so the mean of the rank losses is the loss of the concatenated batch and the rank-averaged
parameter gradients (what DeepSpeed/DDP computes) are its gradient; it costs one all_gather forward
and one all_reduce backward of the b x 2D normalised features per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplite_dist.objectives.base import Objective, ObjectiveOutput, check_pairs, normalize
from cliplite_dist.objectives.gather import gather_rows, world

PAPER_TEMPERATURE = 1 / 0.07  # CLIP's initial logit scale


class InfoNCE(Objective):
    """No heads: the towers' embeddings, L2-normalised, are the retrieval embeddings.

    The learned logit scale starts at `temperature_init` and is clamped at `temperature_max`
    (100 in CLIP) inside forward.
    """

    def embed_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        return normalize(image_emb)

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return normalize(text_emb)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> ObjectiveOutput:
        b = check_pairs(image_emb, text_emb)
        img, txt = self.embed_image(image_emb), self.embed_text(text_emb)
        # One gather for both towers: the columns are every rank's features, in rank order.
        img_all, txt_all = gather_rows(torch.cat([img, txt], dim=1)).split(img.shape[1], dim=1)
        scale = self.temperature()
        logits_i2t = scale * img @ txt_all.T
        logits_t2i = scale * txt @ img_all.T
        labels = world()[0] * b + torch.arange(b, device=img.device)
        loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
        metrics = {
            "temperature": scale.detach(),
            "i2t_acc": _top1(logits_i2t, labels),
            "t2i_acc": _top1(logits_t2i, labels),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == labels).to(logits.dtype).mean()
