"""Training objectives: `build_objective(cfg, embed_dim)` turns the objective config into a module.

Both objectives take the towers' raw embeddings and return an `ObjectiveOutput` (float32 loss,
detached tensor metrics); see `base.Objective` for the interface.
"""
from __future__ import annotations

from cliplite_dist.config import ObjectiveConfig
from cliplite_dist.objectives.base import Objective, ObjectiveOutput, check_choice
from cliplite_dist.objectives.cliplite import HEADS, NEGATIVES, CLIPLite
from cliplite_dist.objectives.infonce import InfoNCE

OBJECTIVES = ("cliplite", "infonce")

__all__ = ["Objective", "ObjectiveOutput", "CLIPLite", "InfoNCE", "build_objective",
           "OBJECTIVES", "HEADS", "NEGATIVES"]


def build_objective(cfg: ObjectiveConfig, embed_dim: int) -> Objective:
    """The objective named by `cfg.name` for towers of width `embed_dim`.

    head, negatives and prior_weight only affect cliplite (infonce ignores them); head and
    negatives are validated for both, so a typo never passes silently.
    """
    check_choice("objective.name", cfg.name, OBJECTIVES)
    check_choice("objective.head", cfg.head, HEADS)
    check_choice("objective.negatives", cfg.negatives, NEGATIVES)
    if cfg.name == "infonce":
        return InfoNCE(cfg.temperature_init, cfg.temperature_max)
    return CLIPLite(embed_dim, head=cfg.head, head_hidden=cfg.head_hidden, head_dim=cfg.head_dim,
                    negatives=cfg.negatives, temperature_init=cfg.temperature_init,
                    temperature_max=cfg.temperature_max, prior_weight=cfg.prior_weight)
