import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch

from cliplite_dist import checkpoint
from cliplite_dist import engine as engine_module
from cliplite_dist.config import Config, EngineConfig, ModelConfig, ObjectiveConfig, OptimConfig
from cliplite_dist.engine import (build_engine, deepspeed_config, lr_factor, param_groups, resolve_precision,
                                  set_cuda_math, set_lr)
from cliplite_dist.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import DispatchCount  # noqa: E402  (benchmarks/common.py: the step benchmark counts the same)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(name="tiny-vit"), ObjectiveConfig(name="cliplite", prior_weight=0.1))[0]


def test_groups_split_parts_and_exclude_norms_biases_temperatures_from_decay(model):
    groups = param_groups(model, OptimConfig(lr=1e-3, image_lr=0.2, text_lr=0.0, critic_lr=5e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"image", "image_no_decay", "text", "text_no_decay", "critic", "critic_no_decay"}
    assert by_name["image"]["base_lr"] == 0.2 and by_name["text"]["base_lr"] == 1e-3
    assert by_name["critic"]["base_lr"] == 5e-3
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith("no_decay"))
    assert all(g["weight_decay"] == 0.1 for n, g in by_name.items() if not n.endswith("no_decay"))
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert id(model.objective.log_temp) in no_decay
    assert not any(n.endswith(".bias") or ".ln_" in n or "norm" in n for n in decayed_names), decayed_names
    # every trainable parameter in exactly one group
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_parts_that_share_a_rate_share_groups(model):
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.1))}
    assert set(groups) == {"image+text+critic", "image+text+critic_no_decay"}
    paper = {g["name"]: g["base_lr"] for g in param_groups(model, OptimConfig(lr=1e-3, image_lr=0.2, weight_decay=1e-4))}
    assert paper == {"image": 0.2, "image_no_decay": 0.2, "text+critic": 1e-3, "text+critic_no_decay": 1e-3}


def test_open_clip_scalar_logit_scale_is_gone_and_no_parameter_is_0_dim(model):
    assert getattr(model.towers, "logit_scale", None) is None
    assert all(p.ndim >= 1 for p in model.parameters())  # DeepSpeed 0.19 cannot broadcast 0-dim ones


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0, "base_lr": 0.2}])
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_deepspeed_config_follows_ours():
    cfg = Config()
    cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip, cfg.engine.zero_stage = 32, 4, 2.0, 3
    ds = deepspeed_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 2.0 and ds["zero_optimization"]["stage"] == 3  # its wrappers clip
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "torch_autocast" not in ds
    assert "scheduler" not in ds  # our own schedule sets per-group rates
    # bf16: gradients summed over ranks and over micro-batches in fp32; no per-step overflow read-back
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["bf16"]["check_grad_overflow"] is False
    cfg.optim.grad_accum = 1
    assert "data_types" not in deepspeed_config(cfg, "bf16")
    assert "communication_data_type" not in deepspeed_config(cfg, "fp32")
    # ZeRO 0: autocast over fp32 weights, every gradient reduced as it is (fp32)
    cfg.engine.zero_stage = 0
    ds = deepspeed_config(cfg, "bf16")
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    assert "communication_data_type" not in ds and "data_types" not in ds


def test_precision_auto_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    """V100 and T4 (compute capability 7.x) report bf16 support but only emulate it."""
    gpu = torch.device("cuda", 0)
    for capability, expected in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision(EngineConfig(precision="auto"), gpu) == expected, capability
    assert resolve_precision(EngineConfig(precision="bf16"), gpu) == "bf16"


@pytest.fixture
def cuda_math():
    """PyTorch's defaults for the process-wide flags `set_cuda_math` sets, restored afterwards
    (monkeypatch cannot: torch's flag holders answer getattr but not its lookup)."""
    flags = ((torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", True),
             (torch.backends.cudnn, "benchmark", False))
    saved = [getattr(holder, name) for holder, name, _ in flags]
    for holder, name, default in flags:
        setattr(holder, name, default)
    yield lambda: tuple(getattr(holder, name) for holder, name, _ in flags)
    for (holder, name, _), value in zip(flags, saved):
        setattr(holder, name, value)


def test_gpus_compute_fp32_in_tf32_and_autotune_convolutions_as_open_clip_train(cuda_math):
    """Setting the flags needs no GPU: what a CUDA device would get, and that a CPU run changes
    nothing (a CPU has no TF32; on a machine with a GPU, its other runs keep PyTorch's defaults)."""
    set_cuda_math(EngineConfig(), torch.device("cpu"))
    assert cuda_math() == (False, True, False)
    set_cuda_math(EngineConfig(), torch.device("cuda", 0))
    assert cuda_math() == (True, True, True)
    set_cuda_math(EngineConfig(tf32=False), torch.device("cuda", 0))
    assert cuda_math() == (False, False, True)  # full fp32, convolutions too


@pytest.mark.parametrize("zero,accum", [(0, 2), (1, 2), (2, 2), (3, 1)])
def test_bf16_resnet_trains_with_fp32_master_weights_and_batchnorm_statistics(single_rank_group, zero, accum):
    """A BatchNorm tower (and the critic's BatchNorm head) in bf16 under DeepSpeed: the towers
    compute in bf16; the weights the optimizer steps are fp32 (ZeRO 0: the parameters themselves,
    under autocast; ZeRO 1-3: master copies of bf16 parameters); running statistics kept fp32 and
    updated; micro-batches accumulated in fp32."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size, cfg.optim.warmup_steps = "tiny-resnet", "cliplite", 4, 0
    cfg.engine.precision, cfg.engine.zero_stage, cfg.optim.grad_accum = "bf16", zero, accum
    torch.manual_seed(0)
    model, towers = build_model(cfg.model, cfg.objective)
    engine = build_engine(model, cfg, torch.device("cpu")).engine
    images = torch.randn(4, 3, 64, 64, dtype=torch.bfloat16)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    losses = []
    for _ in range(2 * accum):
        out = engine(images, tokens)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and len(set(losses[::accum])) == 2  # the weights moved
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32 if zero == 0 else torch.bfloat16}
    assert {p.dtype for p in engine.basic_optimizer.state} == {torch.float32}  # the tensors it steps
    norms = [m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 4 and all(m.running_mean.dtype == torch.float32 for m in norms)
    assert all(int(m.num_batches_tracked) == 2 * accum and m.running_mean.abs().sum() > 0 for m in norms)
    engine.eval()
    with torch.no_grad():
        assert all(emb.dtype == torch.bfloat16 for emb in engine(images, tokens, towers_only=True))


@pytest.mark.parametrize("precision,accum", [("bf16", 1), ("bf16", 2), ("fp32", 1)])
def test_a_training_step_without_zero_reads_nothing_back_to_the_host(single_rank_group, precision, accum):
    """Forward, backward and the optimizer step (clipping included) queue work without waiting
    for it: no value is read back and the device is never synchronized, so a GPU's next step is
    queued ahead. DeepSpeed's own bf16 optimizer at ZeRO 0 read one per parameter tensor each
    step (121 for tiny-vit); its throughput timer, on by default, synchronized twice a step from
    the third step on."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size, cfg.optim.grad_clip = "tiny-vit", "cliplite", 4, 1.0
    cfg.engine.precision, cfg.optim.grad_accum = precision, accum
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, torch.device("cpu"))
    images = torch.randn(4, 3, 64, 64, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    for measured in (False, False, True):  # the first builds the optimizer state; a timer syncs from the third
        counted = DispatchCount()
        with counted if measured else contextlib.nullcontext():
            for _ in range(accum):
                out = info.engine(images, tokens)
                info.engine.backward(out.loss)
                info.step()
    assert counted.host_reads == 0 and counted.syncs == 0
    assert info.engine.global_steps == 3


@pytest.mark.parametrize("precision,lookahead_k", [("fp32", 0), ("bf16", 0), ("fp32", 2)])
def test_without_zero_all_gradients_are_clipped_at_once_before_the_step(single_rank_group, precision, lookahead_k):
    """Where DeepSpeed steps our optimizer plainly, we clip: plain SGD at lr 1 moves the weights
    by exactly the clipped gradient, whose norm is optim.grad_clip; the logged norm is the one
    before clipping; and the step's work does not grow with the number of parameter tensors
    (DeepSpeed's clipping ran a norm and a multiply for each)."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size, cfg.engine.precision = "tiny-vit", "cliplite", 4, precision
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = "sgd", 1.0, 0.0, 0.0
    cfg.optim.grad_clip, cfg.optim.lookahead_k = 0.05, lookahead_k  # Lookahead: no sync at its first step
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, torch.device("cpu"))
    assert deepspeed_config(cfg, precision)["gradient_clipping"] == 0.0  # DeepSpeed clips nothing more
    params = [p for p in info.engine.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    images = torch.randn(4, 3, 64, 64, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    info.engine.backward(info.engine(images, tokens).loss)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    counted = DispatchCount()
    with counted:
        info.engine.step()
    moved = torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in zip(params, before)]))
    assert float(norm) > 10 * cfg.optim.grad_clip  # the clip bites
    assert info.grad_norm() == pytest.approx(float(norm), rel=1e-5)
    assert float(moved) == pytest.approx(cfg.optim.grad_clip, rel=1e-3)
    if not lookahead_k:  # (Lookahead's first step copies every weight)
        # torch's SGD on CPU steps tensor by tensor, one op each; DeepSpeed's clipping added five more each
        assert counted.ops < 2 * len(params), counted.ops


def test_without_zero_and_without_clipping_the_logs_still_get_the_norm(single_rank_group):
    cfg = Config()
    cfg.model.name, cfg.data.batch_size, cfg.optim.grad_clip = "tiny-vit", 4, 0.0
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = "sgd", 1.0, 0.0, 0.0
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, torch.device("cpu"))
    params = [p for p in info.engine.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    info.engine.backward(info.engine(torch.randn(4, 3, 64, 64), towers.tokenizer(["a", "b", "c", "d"])).loss)
    grads = [p.grad.clone() for p in params]
    info.engine.step()
    assert info.grad_norm() == pytest.approx(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
    for p, b, g in zip(params, before, grads):  # unclipped
        torch.testing.assert_close(p.detach(), b - g)


@pytest.mark.parametrize("objective", ["cliplite", "infonce"])
def test_under_autocast_the_towers_compute_in_bf16_and_the_objective_in_fp32(single_rank_group, objective):
    """bf16 without ZeRO: the towers' embeddings come out of autocast in bf16, and the objective
    (critic heads, similarities, loss) gives what it gives on those embeddings in fp32."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size, cfg.engine.precision = "tiny-vit", objective, 4, "bf16"
    model, towers = build_model(cfg.model, cfg.objective)
    engine = build_engine(model, cfg, torch.device("cpu")).engine
    engine.eval()
    images = torch.randn(4, 3, 64, 64, dtype=torch.bfloat16)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    with torch.no_grad():
        image_emb, text_emb = engine(images, tokens, towers_only=True)
        assert image_emb.dtype == text_emb.dtype == torch.bfloat16
        loss = engine(images, tokens).loss
        want = model.objective(image_emb.float(), text_emb.float()).loss
        embedded = engine(images, None, embed_only=True)[0]
    assert loss.dtype == embedded.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embedded, model.objective.embed_image(image_emb.float()), rtol=1e-6, atol=1e-6)


def test_a_zero_engine_after_an_autocast_one_still_reduces_in_fp32(single_rank_group):
    """DeepSpeed marks autocast on for the whole process once an engine enables it: a ZeRO 1
    engine built after it must still reduce its bf16 gradients in fp32."""
    cfg = Config()
    cfg.model.name, cfg.data.batch_size, cfg.engine.precision = "tiny-vit", 4, "bf16"
    assert build_engine(build_model(cfg.model, cfg.objective)[0], cfg, torch.device("cpu")).engine.torch_autocast_enabled()
    cfg.engine.zero_stage = 1
    zero = build_engine(build_model(cfg.model, cfg.objective)[0], cfg, torch.device("cpu")).engine
    assert set(zero.optimizer.ipg_buckets) == {torch.float32}


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 is refused on CPU (`resolve_precision`), but its paths (without ZeRO torch autocast and
    GradScaler, under ZeRO DeepSpeed's fp16 weights) have CPU kernels: the engine is built as a GPU
    would build it."""
    monkeypatch.setattr(engine_module, "resolve_precision", lambda cfg, device: "fp16")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # AdamW: fused, it takes GradScaler's scale itself
def test_fp16_without_zero_scales_the_loss_and_clips_the_true_gradients(single_rank_group, fp16_on_cpu, optimizer,
                                                                       tmp_path):
    """fp16 at ZeRO 0: autocast over fp32 weights, the loss scaled for backward; `Engine.step`
    divides the scale out, so the clip and the logged norm see the true gradients; the scale is
    checkpointed. DeepSpeed's own fp16 optimizer there divided gradients that were never scaled
    by 2**16: the weights barely moved."""
    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size, cfg.optim.grad_clip = "tiny-vit", "cliplite", 4, 0.05
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = optimizer, 1.0, 0.0, 0.0
    torch.manual_seed(0)
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, torch.device("cpu"))
    scaler = info.engine.torch_autocast_z0_gradscaler
    assert info.precision == "fp16" and info.engine.optimizer is info.engine.basic_optimizer and scaler is not None
    # where the scale has settled: 2**16, where it starts, overflows this model's fp16 backward
    scaler.load_state_dict({**scaler.state_dict(), "scale": 256.0})
    params = [p for p in info.engine.module.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}
    before = [p.detach().clone() for p in params]
    images = torch.randn(4, 3, 64, 64, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    info.engine.backward(info.engine(images, tokens).loss)
    scale = scaler.get_scale()
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) / scale
    assert scale == 256.0 and math.isfinite(norm) and norm > 10 * cfg.optim.grad_clip  # the clip bites
    info.step()
    assert info.grad_norm() == pytest.approx(norm, rel=1e-5)
    moved = torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in zip(params, before)]))
    if optimizer == "adamw":
        assert 0 < float(moved) < math.inf
        info.engine.backward(info.engine(images, tokens).loss)
        with pytest.raises(RuntimeError, match="loss scale"):  # past Engine.step: it would clip scaled gradients
            info.engine.step()
        return
    assert float(moved) == pytest.approx(cfg.optim.grad_clip, rel=1e-3)  # lr 1: by the clipped gradient
    scaler.update(1024.0)  # as after overflows; a resume must not start over at 2**16
    checkpoint.save(info.engine, tmp_path, 1, {"step": 1}, keep=1)
    resumed = build_engine(build_model(cfg.model, cfg.objective)[0], cfg, torch.device("cpu")).engine
    checkpoint.load(resumed, tmp_path, checkpoint.find_latest(tmp_path))
    assert resumed.torch_autocast_z0_gradscaler.get_scale() == 1024.0


@pytest.mark.parametrize("zero", [1, 3])
def test_fp16_under_zero_reduces_in_fp32_and_trains_once_its_loss_scale_settles(single_rank_group, fp16_on_cpu, zero):
    """fp16 at ZeRO 1-3 is DeepSpeed's: fp16 weights, fp32 master copies, a dynamic loss scale.
    Its gradients go over the wire in fp32 (they went in fp16, summed over ranks in fp16); the
    first steps overflow at 2**16 and are skipped, then the weights move."""
    cfg = Config()
    cfg.model.name, cfg.data.batch_size, cfg.engine.zero_stage = "tiny-vit", 4, zero
    torch.manual_seed(0)
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, torch.device("cpu"))
    assert info.precision == "fp16" and set(info.engine.optimizer.ipg_buckets) == {torch.float32}
    images = torch.randn(4, 3, 64, 64, dtype=info.input_dtype)
    tokens = towers.tokenizer(["a red circle", "a blue square", "two stars", "a green cross"])
    losses = []
    for _ in range(6):
        out = info.engine(images, tokens)
        info.engine.backward(out.loss)
        info.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and 0 < info.engine.skipped_steps < 6
    assert losses[-1] != losses[0]  # a step was taken


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_precision(EngineConfig(precision="auto"), cpu) == "fp32"
    assert resolve_precision(EngineConfig(precision="bf16"), cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision(EngineConfig(precision="fp16"), cpu)
