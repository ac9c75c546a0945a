"""Lookahead (Zhang et al., 2019) around any optimizer, as the CLIP-Lite paper trained with it.

The inner optimizer takes k fast steps; then the slow weights move alpha of the way towards the
fast ones and the fast weights restart from there:  slow += alpha (fast - slow); fast = slow.

Why our own and not `timm.optim.Lookahead`: timm creates the slow weights at the first sync
(step k) from the fast weights of that moment, so its first sync does nothing, while the
reference's Lookahead starts them from the weights before the first step; and timm keeps a
`state` of its own, separate from the inner optimizer's, which DeepSpeed's ZeRO wrappers read
and write. Here the slow weights live in the inner optimizer's per-parameter state and the step
counter in its param groups, and `param_groups`/`state` are the inner optimizer's own objects.
So every checkpoint that saves the inner optimizer (DeepSpeed's, at ZeRO 0-3) saves both, and
resuming is exact. DeepSpeed's ZeRO stages swap the groups' parameters for flat fp32 partitions
after the optimizer is built; the slow weights follow whatever the groups hold at the first step.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

SLOW = "lookahead_slow"
STEP = "lookahead_step"


class Lookahead(torch.optim.Optimizer):
    def __init__(self, inner: torch.optim.Optimizer, k: int, alpha: float):
        # No super().__init__: it would copy the groups; these must stay the inner optimizer's.
        if k < 1:
            raise ValueError(f"optim.lookahead_k={k!r} must be >= 1")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"optim.lookahead_alpha={alpha!r} must be within (0, 1]")
        self.inner, self.k, self.alpha = inner, k, alpha
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        for group in inner.param_groups:
            group.setdefault(STEP, 0)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, state) -> None:
        self.inner.state = state

    @torch.no_grad()
    def step(self, closure=None):
        # The slow weights start as the weights before the first step; they are put into the
        # state only after the inner step, because torch's optimizers set up a parameter's
        # state (moments, step count) only while it is empty.
        first = [(p, p.detach().clone()) for group in self.param_groups for p in group["params"]
                 if SLOW not in self.inner.state[p]]
        loss = self.inner.step(closure)
        for p, weights in first:
            self.inner.state[p][SLOW] = weights
        for group in self.param_groups:
            group[STEP] = group.get(STEP, 0) + 1
            if group[STEP] % self.k == 0:
                for p in group["params"]:
                    slow = self.inner.state[p][SLOW]
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        for group in self.inner.param_groups:
            group.setdefault(STEP, 0)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.inner!r})"
