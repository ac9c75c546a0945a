"""Objectives: exact multi-rank equivalences on real gloo groups (InfoNCE, SigLIP, CLIP-Lite's
cross_rank negatives and global-batch BatchNorm), hand-computed CLIP-Lite and SigLIP values, the
reference code's critic head and prior, the no-communication guarantee of CLIP-Lite's default
negatives, derangements, dtypes.

The multi-rank scenarios run once per world size (one `mp.spawn` each) and hand their results
back through files; the checks compare them with single-process computations here.
"""
from __future__ import annotations

import copy
import math
import typing
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

from cliplite_dist.config import Negatives, ObjectiveConfig, choices
from cliplite_dist.objectives import CLIPLite, InfoNCE, ObjectiveOutput, SigLIP, build_objective
from cliplite_dist.objectives.cliplite import EncodeAndDotHead, GlobalBatchNorm1d, random_derangement

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


def _siglip_model() -> Model:
    return Model(SigLIP(temperature_init=3.0, bias_init=-2.0))


def _cross_rank_model() -> Model:
    torch.manual_seed(1)
    return Model(CLIPLite(D, head="mlp", head_norm="layer", negatives="cross_rank", temperature_init=5.0))


def _global_bn() -> nn.Module:
    torch.manual_seed(2)
    bn = GlobalBatchNorm1d(DIN).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


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


def _scenario_siglip(rank: int, world: int) -> dict:
    x_img, x_txt = _batch(world)
    return _loss_and_grads(_siglip_model(), _local_rows(x_img, rank), _local_rows(x_txt, rank))


def _scenario_cross_rank(rank: int, world: int) -> dict:
    x_img, x_txt = _batch(world)
    return _loss_and_grads(_cross_rank_model(), _local_rows(x_img, rank), _local_rows(x_txt, rank))


def _scenario_global_bn(rank: int, world: int) -> dict:
    """Each rank normalises its rows with the global batch's statistics; loss = sum of the rank's
    outputs times fixed weights, so every output's gradient matters."""
    x = _local_rows(_batch(world)[0], rank).clone().requires_grad_()
    bn = _global_bn()
    out = bn(x)
    (out * _bn_loss_weights(world)[rank * B:(rank + 1) * B]).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


def _bn_loss_weights(world: int) -> torch.Tensor:
    return torch.randn(world * B, DIN, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


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
    models = {negatives: Model(CLIPLite(D, negatives=negatives, prior_weight=0.1)) for negatives in choices(Negatives)}
    models["infonce"], models["siglip"] = _infonce_model(), _siglip_model()
    return {name: _count_calls(lambda m=model: m(x_img, x_txt).loss.backward()) for name, model in models.items()}


SCENARIOS = {"infonce": _scenario_infonce, "siglip": _scenario_siglip, "cross_rank": _scenario_cross_rank,
             "global_bn": _scenario_global_bn, "comm_counts": _scenario_comm_counts}


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
        assert {k: counts[k] for k in ("shift", "random")} == {"shift": 0, "random": 0}, rank
        # The instrumentation does see traffic where there is some.
        assert counts["cross_rank"] > 0 and counts["infonce"] > 0 and counts["siglip"] > 0, (rank, counts)


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


@pytest.mark.parametrize("negatives", choices(Negatives))
def test_batch_of_one_is_a_clear_error(negatives):
    with pytest.raises(ValueError, match="batch size >= 2"):
        CLIPLite(3, negatives=negatives)(torch.randn(1, 3), torch.randn(1, 3))


# ----------------------------------------------------------------------------- 6. priors

def _reference_prior_term(discriminator: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The reference code's formula as written there: D ends in a sigmoid, noise ~ U[0, 1)."""
    prior = torch.rand_like(features)
    term_a = torch.log(torch.sigmoid(discriminator(prior))).mean()
    term_b = torch.log(1.0 - torch.sigmoid(discriminator(features))).mean()
    return -(term_a + term_b)


def test_reference_prior_formula_and_weighting():
    """(1 - w) JSD + w (image prior + text prior), every parameter minimising it (no reversal)."""
    torch.manual_seed(6)
    obj = CLIPLite(4, head="linear", prior="reference", prior_weight=0.1)
    emb_i, emb_t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    assert [m.out_features for m in obj.prior.image if isinstance(m, nn.Linear)] == [1000, 200, 1]
    torch.manual_seed(7)
    out = obj(emb_i, emb_t)
    torch.manual_seed(7)  # the same noise: the image term draws first, then the text term
    want_prior = _reference_prior_term(obj.prior.image, emb_i) + _reference_prior_term(obj.prior.text, emb_t)
    m = out.metrics
    torch.testing.assert_close(m["loss_prior"], want_prior.detach())
    torch.testing.assert_close(out.loss.detach(), 0.9 * (m["loss_pos"] + m["loss_neg"]) + 0.1 * want_prior.detach())
    # the image features' gradient is that of plain minimisation (cooperative, as in the reference)
    (grad_obj,) = torch.autograd.grad(out.loss, emb_i)
    no_prior = CLIPLite(4, head="linear")
    no_prior.load_state_dict(obj.state_dict(), strict=False)
    jsd = no_prior(emb_i, emb_t).loss
    (grad_want,) = torch.autograd.grad(0.9 * jsd + 0.1 * want_prior, emb_i)
    torch.testing.assert_close(grad_obj, grad_want)


def test_adversarial_prior_adds_weighted_term():
    torch.manual_seed(6)
    obj = CLIPLite(4, head="linear", prior="adversarial", prior_weight=0.5)
    out = obj(torch.randn(6, 4), torch.randn(6, 4))
    m = out.metrics
    assert m["loss_prior"] > 0
    torch.testing.assert_close(out.loss.detach(), m["loss_pos"] + m["loss_neg"] + 0.5 * m["loss_prior"])


def test_prior_gradient_reversal():
    """The discriminator gets the gradient of plain BCE minimisation; the image embedding gets
    exactly its negation (the encoder maximises what the discriminator minimises)."""
    torch.manual_seed(7)
    obj = CLIPLite(4, head="linear", prior="adversarial", prior_weight=0.5)
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

    g_rev, d_rev = grads(lambda x: obj.prior(x, txt))
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
    for weight in (-0.1, 1.0):
        with pytest.raises(ValueError, match="prior_weight"):
            CLIPLite(4, prior_weight=weight)


# ----------------------------------------------------------------------------- 7. dtypes and config

def _objectives():
    return [CLIPLite(8, head="mlp", head_hidden=16, head_dim=6, prior_weight=0.1), InfoNCE(1 / 0.07, 100.0),
            CLIPLite(8, head="linear", negatives="random", prior="adversarial", prior_weight=0.1),
            CLIPLite(8, head="mlp", head_norm="sync_batch"), SigLIP()]


def _bf16_parameters(module: nn.Module) -> nn.Module:
    """A copy cast as DeepSpeed casts for bf16: parameters only, buffers (BatchNorm statistics) stay fp32."""
    module = copy.deepcopy(module)
    for param in module.parameters():
        param.data = param.data.to(torch.bfloat16)
    return module


def test_parameters_float32_and_bf16_inputs_give_float32_loss():
    for obj in _objectives():
        assert all(p.dtype == torch.float32 for p in obj.parameters())
        emb_i, emb_t = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
        bf16 = _bf16_parameters(obj)
        evaluating = _bf16_parameters(obj).eval()  # running statistics in fp32 beside bf16 weights
        for module in (obj, bf16, evaluating):
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
    # temperature_init 0: each objective's paper value
    assert build_objective(ObjectiveConfig(name="infonce"), 8).temperature().item() == pytest.approx(1 / 0.07)
    assert build_objective(ObjectiveConfig(name="cliplite"), 8).temperature().item() == pytest.approx(1 / 0.07)
    siglip = build_objective(ObjectiveConfig(name="siglip"), 8)
    assert siglip.temperature().item() == pytest.approx(10.0) and siglip.bias.item() == -10.0
    assert build_objective(ObjectiveConfig(name="siglip", temperature_init=3.0), 8).temperature().item() == \
        pytest.approx(3.0)
    for key in ("name", "head", "head_norm", "negatives", "prior"):
        with pytest.raises(ValueError) as err:
            build_objective(ObjectiveConfig(**{key: "nonsense"}), 8)
        assert f"objective.{key}='nonsense'" in str(err.value)
        assert ", ".join(choices(typing.get_type_hints(ObjectiveConfig)[key])) in str(err.value)


# ----------------------------------------------------------------------------- 8. critic head norms

def _reference_block(x: torch.Tensor, head: EncodeAndDotHead, training: bool) -> torch.Tensor:
    """The reference's MILinearBlock on `head`'s weights, spelled out: Linear (no bias) ->
    BatchNorm1d -> ReLU -> Linear, plus the shortcut, then LayerNorm."""
    lin1, bn, _, lin2 = head.branch
    h = x @ lin1.weight.T
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    f = torch.relu(h) @ lin2.weight.T + lin2.bias + x @ head.shortcut.weight.T + head.shortcut.bias
    return F.layer_norm(f, f.shape[1:], head.norm.weight, head.norm.bias, head.norm.eps)


def test_batchnorm_head_in_train_and_eval_mode():
    torch.manual_seed(8)
    head = EncodeAndDotHead(6, 10, 6, norm="batch")
    assert isinstance(head.branch[1], nn.BatchNorm1d) and head.branch[0].bias is None
    torch.testing.assert_close(head.shortcut.weight.diagonal(), torch.ones(6))  # near-identity shortcut
    assert head.shortcut.weight.abs().max() == 1.0
    x = torch.randn(16, 6)
    torch.testing.assert_close(head(x), _reference_block(x, head, training=True))  # batch statistics
    assert head.branch[1].num_batches_tracked == 1 and head.branch[1].running_mean.abs().sum() > 0
    for _ in range(5):
        head(torch.randn(16, 6) * 2 + 1)  # running statistics move on
    head.eval()
    y = torch.randn(3, 6)
    torch.testing.assert_close(head(y), _reference_block(y, head, training=False))  # running statistics
    torch.testing.assert_close(head(y[:1]), head(y)[:1])  # evaluation: a row does not depend on its batch


def test_layer_norm_head_normalises_each_row_alone():
    torch.manual_seed(9)
    head = EncodeAndDotHead(6, 10, 6, norm="layer")
    assert isinstance(head.branch[1], nn.LayerNorm)
    x = torch.randn(5, 6)
    torch.testing.assert_close(head(x)[:2], head(x[:2]))


@pytest.mark.parametrize("world", [2, 3])
def test_global_batchnorm_ranks_equal_full_batch(rank_results, world):
    """W ranks' outputs, input gradients, affine gradients (summed over ranks) and running
    statistics equal one plain BatchNorm1d on the global batch."""
    ranks = [r["global_bn"] for r in rank_results(world)]
    x = _batch(world)[0].clone().requires_grad_()
    bn = nn.BatchNorm1d(DIN).double()
    bn.load_state_dict(_global_bn().state_dict())
    out = bn(x)
    (out * _bn_loss_weights(world)).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad)
    torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), bn.weight.grad)
    torch.testing.assert_close(sum(r["bias_grad"] for r in ranks), bn.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


# ----------------------------------------------------------------------------- 9. SigLIP

def test_siglip_matches_hand_computation():
    obj = SigLIP(temperature_init=2.0, bias_init=-1.0)
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # units (0.6, 0.8), (0, 1)
    out = obj(images, texts)
    cos = [[0.6, 0.0], [0.8, 1.0]]
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    want = -sum(log_sigmoid((1 if i == j else -1) * (2 * cos[i][j] - 1)) for i in range(2) for j in range(2)) / 2
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert out.metrics["temperature"].item() == pytest.approx(2.0) and out.metrics["bias"].item() == -1.0


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_ranks_equal_full_batch(rank_results, world):
    ranks = [r["siglip"] for r in rank_results(world)]
    model = _siglip_model()
    out = model(*_batch(world))
    _assert_matches_full_batch(ranks, out.loss, model)
    assert model.objective.bias.grad.abs() > 0 and model.objective.log_temp.grad.abs() > 0
