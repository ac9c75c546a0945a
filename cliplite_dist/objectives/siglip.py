"""SigLIP (Zhai et al., ICCV 2023): a sigmoid loss on every image-caption pair of the global batch.

Each pair (i, j) is its own binary problem, z_ij = t <x_i, y_j> + b, positive on the diagonal:

    loss = -1/B sum_i sum_j log sigmoid(sign_ij z_ij),   sign_ij = +1 if i == j else -1

with a learned multiplier t (initialised at 10, t' = log 10 in the paper) and a learned bias b
(initialised at -10, so that the B^2 - B negatives do not swamp the B positives at the start).
Across ranks we use open_clip's `SigLipLoss`: each rank scores its images against its own
captions and then every other rank's, passed around a ring with gradients returned to their
owners, so the mean of the rank losses is the loss of the global batch and the rank-averaged
gradients are its gradient, as for InfoNCE, without ever holding all ranks' captions at once.
"""
from __future__ import annotations

import torch
from open_clip.loss import SigLipLoss
from torch import nn

from cliplite_dist.objectives.base import Objective, ObjectiveOutput, check_pairs, normalize
from cliplite_dist.objectives.gather import world

PAPER_TEMPERATURE = 10.0
PAPER_BIAS = -10.0


class SigLIP(Objective):
    """No heads: the towers' embeddings, L2-normalised, are the retrieval embeddings."""

    def __init__(self, temperature_init: float = PAPER_TEMPERATURE, temperature_max: float = 100.0,
                 bias_init: float = PAPER_BIAS):
        super().__init__(temperature_init, temperature_max)
        # shape [1], not 0-dim, like the temperature: DeepSpeed 0.19 cannot broadcast 0-dim parameters
        self.bias = nn.Parameter(torch.full((1,), float(bias_init), dtype=torch.float32))

    def embed_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        return normalize(image_emb)

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return normalize(text_emb)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> ObjectiveOutput:
        check_pairs(image_emb, text_emb)
        img, txt = self.embed_image(image_emb), self.embed_text(text_emb)
        scale, bias = self.temperature(), self.bias[0].to(img.dtype)
        rank, size = world()
        loss = SigLipLoss(rank=rank, world_size=size)(img, txt, scale, bias)
        return ObjectiveOutput(loss=loss, metrics={"temperature": scale.detach(), "bias": bias.detach()})
