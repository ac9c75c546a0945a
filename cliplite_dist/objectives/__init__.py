"""Training objectives: `build_objective(cfg, embed_dim)` turns the objective config into a module.

Every objective takes the towers' raw embeddings and returns an `ObjectiveOutput` (float32 loss,
detached tensor metrics); see `base.Objective` for the interface.
"""
from __future__ import annotations

from cliplite_dist.config import ObjectiveConfig, check_choices
from cliplite_dist.objectives import cliplite, infonce, siglip
from cliplite_dist.objectives.base import Objective, ObjectiveOutput
from cliplite_dist.objectives.cliplite import CLIPLite
from cliplite_dist.objectives.infonce import InfoNCE
from cliplite_dist.objectives.siglip import SigLIP

__all__ = ["Objective", "ObjectiveOutput", "CLIPLite", "InfoNCE", "SigLIP", "build_objective"]


def build_objective(cfg: ObjectiveConfig, embed_dim: int) -> Objective:
    """The objective named by `cfg.name` for towers of width `embed_dim`.

    A temperature_init of 0 takes the objective's paper value (1/0.07 for CLIP-Lite and InfoNCE,
    10 for SigLIP). Every choice is validated whichever objective uses it, so a typo never passes
    silently.
    """
    check_choices(cfg, "objective")
    if cfg.name == "infonce":
        return InfoNCE(cfg.temperature_init or infonce.PAPER_TEMPERATURE, cfg.temperature_max)
    if cfg.name == "siglip":
        return SigLIP(cfg.temperature_init or siglip.PAPER_TEMPERATURE, cfg.temperature_max, cfg.bias_init)
    return CLIPLite(embed_dim, head=cfg.head, head_hidden=cfg.head_hidden, head_dim=cfg.head_dim,
                    negatives=cfg.negatives, temperature_init=cfg.temperature_init or cliplite.PAPER_TEMPERATURE,
                    temperature_max=cfg.temperature_max, prior_weight=cfg.prior_weight, prior=cfg.prior,
                    head_norm=cfg.head_norm)
