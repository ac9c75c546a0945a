"""Lookahead: the reference's update on small tensors, and exact resume inside real DeepSpeed
engines at ZeRO 0-3 (the slow weights and the step counter travel with DeepSpeed's checkpoints)."""
from __future__ import annotations

import deepspeed
import pytest
import torch

from cliplite_dist import checkpoint
from cliplite_dist.config import Config, OptimConfig
from cliplite_dist.engine import build_optimizer, deepspeed_config, param_groups
from cliplite_dist.lookahead import SLOW, Lookahead

CPU = torch.device("cpu")


def _reference_lookahead(params, grads_per_step, lr, k, alpha):
    """The CLIP-Lite reference's Lookahead around plain SGD, spelled out: slow weights are the
    initial weights; after every k inner steps fast = alpha * fast + (1 - alpha) * slow, slow = fast."""
    fast = [p.clone() for p in params]
    slow = [p.clone() for p in params]
    for step, grads in enumerate(grads_per_step, 1):
        fast = [f - lr * g for f, g in zip(fast, grads)]
        if step % k == 0:
            fast = [alpha * f + (1 - alpha) * s for f, s in zip(fast, slow)]
            slow = [f.clone() for f in fast]
    return fast


def test_matches_the_reference_update_on_small_tensors():
    torch.manual_seed(0)
    init = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(11)]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=3, alpha=0.5)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(params, _reference_lookahead(init, grads, 0.1, 3, 0.5)):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    # without the wrapper the weights end elsewhere: the test sees Lookahead's effect
    plain = [p - 0.1 * sum(g[i] for g in grads) for i, p in enumerate(init)]
    assert not torch.allclose(params[0].detach(), plain[0])


def test_inner_optimizer_state_is_set_up_normally_and_holds_the_slow_weights():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lookahead(torch.optim.AdamW([p], lr=0.1), k=2, alpha=0.5)
    p.grad = torch.ones(3)
    opt.step()
    state = opt.state[p]
    assert {"exp_avg", "exp_avg_sq", "step", SLOW} <= set(state)
    assert torch.equal(state[SLOW], torch.ones(3))  # the weights before the first step
    assert opt.param_groups is opt.inner.param_groups and opt.param_groups[0]["lookahead_step"] == 1
    with pytest.raises(ValueError, match="lookahead_k"):
        Lookahead(torch.optim.SGD([p], lr=0.1), k=0, alpha=0.5)


def _engine(zero_stage: int, precision: str = "fp32", lookahead: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    cfg = Config()
    cfg.data.batch_size, cfg.engine.zero_stage, cfg.optim.grad_clip = 4, zero_stage, 1.0
    optim = OptimConfig(name="adamw", lr=0.05, lookahead_k=lookahead, lookahead_alpha=0.5)
    optimizer = build_optimizer(param_groups(model, optim), optim, CPU)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, precision))
    return engine


def _train(engine, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)  # the same batch for a step whichever engine runs it
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        out = engine(x.to(next(engine.module.parameters()).dtype))
        loss = (out.float() - y).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_resume_is_exact_inside_deepspeed(single_rank_group, tmp_path, zero_stage, precision):
    """3 steps, save, a fresh engine loads and takes steps 4-8 (syncs at 5): the weights equal
    those of 8 uninterrupted steps, and differ from an engine without Lookahead."""
    straight = _engine(zero_stage, precision)
    _train(straight, range(1, 9))

    first = _engine(zero_stage, precision)
    _train(first, range(1, 4))
    checkpoint.save(first, tmp_path, 3, {"step": 3}, keep=1)
    resumed = _engine(zero_stage, precision)
    checkpoint.load(resumed, tmp_path, checkpoint.find_latest(tmp_path))
    _train(resumed, range(4, 9))
    for name, want in _weights(straight).items():
        assert torch.equal(_weights(resumed)[name], want), name

    without = _engine(zero_stage, precision, lookahead=0)
    _train(without, range(1, 9))
    assert any(not torch.equal(w, _weights(straight)[n]) for n, w in _weights(without).items())
