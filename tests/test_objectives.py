"""Objectives: exact multi-rank equivalences on real gloo groups, hand-computed CLIP-Lite values,
the no-communication guarantee of CLIP-Lite's default negatives, derangements, prior, dtypes.

The multi-rank scenarios run once per world size (one `mp.spawn` each) and hand their results
back through files; the checks compare them with single-process computations here.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (instrumented below)
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cliplite_dist.config import CHOICES, ObjectiveConfig
from cliplite_dist.objectives import (HEADS, NEGATIVES, OBJECTIVES, CLIPLite, InfoNCE, ObjectiveOutput,
                                      build_objective)
from cliplite_dist.objectives.cliplite import hardest_other, random_derangement

B, DIN, D = 4, 6, 5  # rows per rank, tower input width, embedding width

COMM_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
              "reduce_scatter_tensor", "broadcast", "send", "recv", "isend", "irecv", "batch_isend_irecv",
              "all_to_all", "all_to_all_single", "barrier", "gather", "scatter", "reduce")
COMM_MODULES = (dist, dist.distributed_c10d, dist.nn.functional)


# ----------------------------------------------------------------------------- shared setup

def _batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch of tower inputs (images, texts), float64 for exact comparisons."""
    gen = torch.Generator().manual_seed(1234)
    return (torch.randn(world * B, DIN, generator=gen, dtype=torch.float64),
            torch.randn(world * B, DIN, generator=gen, dtype=torch.float64))


class Model(nn.Module):
    """Two small linear 'towers' and an objective, seeded alike on every rank."""

    def __init__(self, objective: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.image_tower, self.text_tower = nn.Linear(DIN, D), nn.Linear(DIN, D)
        self.objective = objective
        self.double()

    def forward(self, x_img, x_txt) -> ObjectiveOutput:
        return self.objective(self.image_tower(x_img), self.text_tower(x_txt))


def _infonce_model() -> Model:
    return Model(InfoNCE(temperature_init=10.0, temperature_max=100.0))


def _cross_rank_model() -> Model:
    torch.manual_seed(1)
    return Model(CLIPLite(D, head="mlp", negatives="cross_rank", temperature_init=5.0))


def _loss_and_grads(model: Model, x_img, x_txt) -> dict:
    out = model(x_img, x_txt)
    out.loss.backward()
    return {"loss": out.loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _local_rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * B:(rank + 1) * B]


# ----------------------------------------------------------------------------- rank scenarios

def _scenario_infonce(rank: int, world: int) -> dict:
    x_img, x_txt = _batch(world)
    return _loss_and_grads(_infonce_model(), _local_rows(x_img, rank), _local_rows(x_txt, rank))


def _scenario_cross_rank(rank: int, world: int) -> dict:
    x_img, x_txt = _batch(world)
    return _loss_and_grads(_cross_rank_model(), _local_rows(x_img, rank), _local_rows(x_txt, rank))


def _count_calls(fn) -> int:
    """Calls to any torch.distributed communication function while `fn` runs.

    One wrapper per original function, shared by every namespace that exports it, so identity
    checks inside torch (e.g. P2POp's `op in [isend, irecv]`) still hold.
    """
    counts: Counter = Counter()
    wrappers, patched = {}, []

    def counting(orig):
        def wrapper(*args, **kwargs):
            counts[orig.__name__] += 1
            return orig(*args, **kwargs)
        return wrapper

    for module in COMM_MODULES:
        for name in COMM_NAMES:
            orig = getattr(module, name, None)
            if orig is not None:
                wrapper = wrappers.setdefault(id(orig), counting(orig))
                patched.append((module, name, orig))
                setattr(module, name, wrapper)
    try:
        fn()
    finally:
        for module, name, orig in patched:
            setattr(module, name, orig)
    return sum(counts.values())


def _scenario_comm_counts(rank: int, world: int) -> dict:
    """Communication calls in forward + backward of each objective, inside a real group."""
    x_img, x_txt = (_local_rows(x, rank) for x in _batch(world))
    models = {negatives: Model(CLIPLite(D, negatives=negatives, prior_weight=0.1)) for negatives in NEGATIVES}
    models["infonce"] = _infonce_model()
    return {name: _count_calls(lambda m=model: m(x_img, x_txt).loss.backward()) for name, model in models.items()}


SCENARIOS = {"infonce": _scenario_infonce, "cross_rank": _scenario_cross_rank,
             "comm_counts": _scenario_comm_counts}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {name: scenario(rank, world) for name, scenario in SCENARIOS.items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """world size -> per-rank scenario results, spawned once per world size."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world)
            cache[world] = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]
        return cache[world]

    return get


def _mean(tensors):
    return torch.stack(list(tensors)).mean(dim=0)


def _assert_matches_full_batch(ranks: list[dict], loss: torch.Tensor, model: Model) -> None:
    """Mean of rank losses == full-batch loss; rank-averaged grads (DDP/DeepSpeed) == its grads."""
    loss.backward()
    torch.testing.assert_close(_mean(r["loss"] for r in ranks), loss.detach(), atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(_mean(r["grads"][name] for r in ranks), param.grad, atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- 1. InfoNCE across ranks

@pytest.mark.parametrize("world", [2, 3])
def test_infonce_ranks_equal_full_batch(rank_results, world):
    ranks = [r["infonce"] for r in rank_results(world)]
    model = _infonce_model()
    out = model(*_batch(world))  # no process group of >1 rank here: plain loss on the whole batch
    _assert_matches_full_batch(ranks, out.loss, model)
    assert model.objective.log_temp.grad.abs() > 0  # the scale's gradient is part of the check


# ----------------------------------------------------------------------------- 2. CLIP-Lite by hand

def test_cliplite_matches_hand_computation():
    obj = CLIPLite(2, head="linear", negatives="shift", temperature_init=2.0)
    with torch.no_grad():
        obj.image_head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps coordinates
        obj.text_head.weight.copy_(torch.eye(2))
        obj.image_head.bias.zero_()
        obj.text_head.bias.zero_()
    images = torch.tensor([[0.0, 3.0], [2.0, 0.0], [1.0, 1.0]])  # heads -> units (1,0), (0,1), (1,1)/sqrt2
    texts = torch.tensor([[3.0, 0.0], [3.0, 4.0], [0.0, 5.0]])  # units (1,0), (0.6,0.8), (0,1)
    out = obj(images, texts)
    out.loss.backward()

    def sp(x):
        return math.log1p(math.exp(x))

    r = 1 / math.sqrt(2)
    cos_pos = [1.0, 0.8, r]  # <i0,t0>, <i1,t1>, <i2,t2>
    cos_neg = [0.6, 1.0, r]  # shift: <i0,t1>, <i1,t2>, <i2,t0>
    loss_pos = sum(sp(-2 * c) for c in cos_pos) / 3
    loss_neg = sum(sp(2 * c) for c in cos_neg) / 3
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d loss / d log t = t * d loss / d t, at t = 2
    dlog_temp = 2 * (sum(-sigmoid(-2 * c) * c for c in cos_pos) + sum(sigmoid(2 * c) * c for c in cos_neg)) / 3

    m = out.metrics
    assert out.loss.item() == pytest.approx(loss_pos + loss_neg, abs=1e-6)
    assert m["loss_pos"].item() == pytest.approx(loss_pos, abs=1e-6)
    assert m["loss_neg"].item() == pytest.approx(loss_neg, abs=1e-6)
    assert m["mi_jsd"].item() == pytest.approx(2 * math.log(2) - loss_pos - loss_neg, abs=1e-6)
    assert m["pos_score"].item() == pytest.approx(2 * sum(cos_pos) / 3, abs=1e-6)
    assert m["neg_score"].item() == pytest.approx(2 * sum(cos_neg) / 3, abs=1e-6)
    assert m["temperature"].item() == pytest.approx(2.0, abs=1e-6)
    assert obj.log_temp.grad.item() == pytest.approx(dlog_temp, abs=1e-6)
    assert "loss_prior" not in m
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())


def test_temperature_clamped_inside_forward_only():
    obj = CLIPLite(3, head="linear", temperature_init=50.0, temperature_max=20.0)
    out = obj(torch.randn(4, 3), torch.randn(4, 3))
    out.loss.backward()
    assert out.metrics["temperature"].item() == pytest.approx(20.0)
    assert obj.log_temp.item() == pytest.approx(math.log(50.0))  # parameter untouched
    assert obj.log_temp.grad.item() == 0.0  # clamped: no gradient pushes it further


# ----------------------------------------------------------------------------- 3. no communication

def test_cliplite_default_negatives_never_communicate(rank_results):
    for rank, result in enumerate(rank_results(2)):
        counts = result["comm_counts"]
        assert {k: counts[k] for k in ("shift", "random", "hard")} == {"shift": 0, "random": 0, "hard": 0}, rank
        # The instrumentation does see traffic where there is some.
        assert counts["cross_rank"] > 0 and counts["infonce"] > 0, (rank, counts)


# ----------------------------------------------------------------------------- 4. cross_rank

@pytest.mark.parametrize("world", [2, 3])  # 3: with 2 ranks, previous and next rank are the same one
def test_cross_rank_equals_full_batch_pairing(rank_results, world):
    """Convention: the per-rank losses use rank r-1's captions as negatives; the rank-averaged
    gradients (DDP/DeepSpeed) equal the single-process gradient of the mean over the global batch
    with the pairing image i <-> caption (i - B) mod (world * B)."""
    ranks = [r["cross_rank"] for r in rank_results(world)]
    model = _cross_rank_model()
    x_img, x_txt = _batch(world)
    obj = model.objective
    zi, zt = obj.embed_image(model.image_tower(x_img)), obj.embed_text(model.text_tower(x_txt))
    temp = obj.temperature()
    per_row = F.softplus(-temp * (zi * zt).sum(1)) + F.softplus(temp * (zi * zt.roll(B, dims=0)).sum(1))
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], _local_rows(per_row, rank).mean().detach(), atol=1e-5, rtol=0)
    _assert_matches_full_batch(ranks, per_row.mean(), model)


def test_cross_rank_without_group_is_shift():
    torch.manual_seed(3)
    emb_i, emb_t = torch.randn(5, 4), torch.randn(5, 4)
    torch.manual_seed(4)
    cross = CLIPLite(4, negatives="cross_rank")
    torch.manual_seed(4)
    shift = CLIPLite(4, negatives="shift")
    torch.testing.assert_close(cross(emb_i, emb_t).loss, shift(emb_i, emb_t).loss)


# ----------------------------------------------------------------------------- 5. derangements

@pytest.mark.parametrize("b", [2, 3, 5, 16])
def test_random_derangement_has_no_fixed_point(b):
    seen = set()
    for _ in range(300):
        pi = random_derangement(b)
        assert sorted(pi.tolist()) == list(range(b))
        assert (pi != torch.arange(b)).all(), pi
        seen.add(tuple(pi.tolist()))
    assert len(seen) >= {2: 1, 3: 2}.get(b, 10)  # fresh each call (b=2, 3 have only 1, 2 derangements)


def test_random_negatives_with_two_rows_pair_the_other_caption():
    obj = CLIPLite(3, head="linear", negatives="random")
    emb_i, emb_t = torch.randn(2, 3), torch.randn(2, 3)
    out = obj(emb_i, emb_t)
    zi, zt = obj.embed_image(emb_i), obj.embed_text(emb_t)
    expected = obj.temperature() * ((zi[0] @ zt[1]) + (zi[1] @ zt[0])) / 2
    torch.testing.assert_close(out.metrics["neg_score"], expected.detach())


def test_hard_negatives_pick_best_other_caption():
    torch.manual_seed(5)
    zi, zt = torch.randn(7, 4), torch.randn(7, 4)
    brute = [max((j for j in range(7) if j != i), key=lambda j: float(zi[i] @ zt[j])) for i in range(7)]
    assert hardest_other(zi, zt).tolist() == brute

    obj = CLIPLite(4, head="mlp", negatives="hard")
    emb_i, emb_t = torch.randn(7, 4), torch.randn(7, 4)
    out = obj(emb_i, emb_t)
    ni, nt = obj.embed_image(emb_i).detach(), obj.embed_text(emb_t).detach()
    hardest = [max(float(ni[i] @ nt[j]) for j in range(7) if j != i) for i in range(7)]
    expected = obj.temperature().item() * sum(hardest) / 7
    assert out.metrics["neg_score"].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("negatives", ["shift", "random", "hard", "cross_rank"])
def test_batch_of_one_is_a_clear_error(negatives):
    with pytest.raises(ValueError, match="batch size >= 2"):
        CLIPLite(3, negatives=negatives)(torch.randn(1, 3), torch.randn(1, 3))


# ----------------------------------------------------------------------------- 6. image prior

def test_prior_adds_weighted_term():
    torch.manual_seed(6)
    obj = CLIPLite(4, head="linear", prior_weight=0.5)
    out = obj(torch.randn(6, 4), torch.randn(6, 4))
    m = out.metrics
    assert m["loss_prior"] > 0
    torch.testing.assert_close(out.loss.detach(), m["loss_pos"] + m["loss_neg"] + 0.5 * m["loss_prior"])


def test_prior_gradient_reversal():
    """The discriminator gets the gradient of plain BCE minimisation; the image embedding gets
    exactly its negation (the encoder maximises what the discriminator minimises)."""
    torch.manual_seed(7)
    obj = CLIPLite(4, head="linear", prior_weight=0.5)
    emb, txt = torch.randn(6, 4), torch.randn(6, 4)
    disc = obj.prior.discriminator

    def grads(compute_loss):
        disc.zero_grad()  # grads -> None: each call gets fresh tensors
        x = emb.clone().requires_grad_()
        torch.manual_seed(8)  # the noise is the prior's only random draw
        compute_loss(x).backward()
        return x.grad, [p.grad for p in disc.parameters()]

    def plain_bce(x):
        fake = torch.sigmoid(x)
        noise = torch.rand_like(fake)
        logits = disc(torch.cat([fake, noise])).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, torch.cat([torch.zeros(6), torch.ones(6)]))

    g_rev, d_rev = grads(obj.prior)
    g_plain, d_plain = grads(plain_bce)
    assert g_plain.abs().sum() > 0
    torch.testing.assert_close(g_rev, -g_plain)
    for got, want in zip(d_rev, d_plain):
        torch.testing.assert_close(got, want)

    # Through the whole objective: the prior adds prior_weight * the reversed gradient.
    no_prior = CLIPLite(4, head="linear", prior_weight=0.0)
    no_prior.load_state_dict(obj.state_dict(), strict=False)
    g_with, _ = grads(lambda x: obj(x, txt).loss)
    g_without, _ = grads(lambda x: no_prior(x, txt).loss)
    torch.testing.assert_close(g_with - g_without, 0.5 * g_rev)


def test_prior_weight_zero_creates_no_discriminator():
    obj = CLIPLite(4, prior_weight=0.0)
    assert obj.prior is None
    assert not any("prior" in name for name, _ in obj.named_parameters())
    assert "loss_prior" not in obj(torch.randn(3, 4), torch.randn(3, 4)).metrics
    with pytest.raises(ValueError, match="prior_weight"):
        CLIPLite(4, prior_weight=-0.1)


# ----------------------------------------------------------------------------- 7. dtypes and config

def _objectives():
    return [CLIPLite(8, head="mlp", head_hidden=16, head_dim=6, prior_weight=0.1), InfoNCE(1 / 0.07, 100.0),
            CLIPLite(8, head="linear", negatives="hard")]


def test_parameters_float32_and_bf16_inputs_give_float32_loss():
    for obj in _objectives():
        assert all(p.dtype == torch.float32 for p in obj.parameters())
        emb_i, emb_t = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
        for module in (obj, copy.deepcopy(obj).to(torch.bfloat16)):  # fp32, then DeepSpeed-style bf16 params
            out = module(emb_i, emb_t)
            assert out.loss.dtype == torch.float32 and out.loss.ndim == 0 and torch.isfinite(out.loss)
            out.loss.backward()
            assert all(v.dtype == torch.float32 for v in out.metrics.values())
            for embed, x in ((module.embed_image, emb_i), (module.embed_text, emb_t)):
                z = embed(x)
                assert z.dtype == torch.float32
                torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_build_objective_and_errors():
    assert isinstance(build_objective(ObjectiveConfig(name="infonce"), 8), InfoNCE)
    obj = build_objective(ObjectiveConfig(name="cliplite", head="mlp", head_dim=4, negatives="random"), 8)
    assert isinstance(obj, CLIPLite) and obj.embed_image(torch.randn(2, 8)).shape == (2, 4)
    assert (OBJECTIVES, HEADS, NEGATIVES) == (CHOICES["objective.name"], CHOICES["objective.head"],
                                              CHOICES["objective.negatives"])
    bad = {"name": ("clip", "cliplite, infonce"), "head": ("bn", "mlp, linear"),
           "negatives": ("global", "shift, random, hard, cross_rank")}
    for key, (value, choices) in bad.items():
        with pytest.raises(ValueError) as err:
            build_objective(ObjectiveConfig(**{key: value}), 8)
        assert f"objective.{key}={value!r}" in str(err.value) and choices in str(err.value)
