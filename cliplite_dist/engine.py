"""DeepSpeed from our config: precision, ZeRO stage, clipping, accumulation, optimizer groups.

The engine owns precision, ZeRO, clipping and the optimizer step; the trainer only calls
`backward` and `step`. The learning rate is our own per-step warmup + cosine, written into each
parameter group (a DeepSpeed `scheduler` block would overwrite per-group rates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cliplite_dist.config import Config, EngineConfig, OptimConfig, check_precision
from cliplite_dist.lookahead import Lookahead

PARTS = ("image", "text", "critic")


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # DeepSpeed's config takes these names too
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores compute in bf16


def has_native_bf16(device: torch.device) -> bool:
    """A GPU that computes in bf16 itself. `torch.cuda.is_bf16_supported()` also says yes on
    older GPUs (V100, T4) that only emulate it, many times slower than their fp16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def resolve_precision(cfg: EngineConfig, device: torch.device) -> str:
    """bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU, unless the recipe says
    otherwise."""
    if cfg.precision != "auto":
        check_precision(cfg.precision, device.type)
        return cfg.precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if has_native_bf16(device) else "fp16"


def set_cuda_math(cfg: EngineConfig, device: torch.device) -> None:
    """Process-wide CUDA math, as open_clip_train sets it: fp32 matrix products and convolutions
    in TF32 where engine.tf32 (PyTorch has run matrix products in full fp32 by default since 1.12,
    far below the tensor cores' TF32 rate), and cuDNN times its convolution algorithms once per
    input shape and keeps the fastest (a run's shapes are fixed). Nothing changes on CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = True


def _part_of(name: str) -> str:
    if name.startswith("objective."):
        return "critic"
    if name.startswith("towers.visual."):
        return "image"
    return "text"


def _decays(name: str, param: nn.Parameter) -> bool:
    """No weight decay on norms, biases, temperatures and other 1-d parameters."""
    return param.ndim >= 2 and "log_temp" not in name and "logit_scale" not in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per (lr, weight decay): the parts (image, text, critic) that share a rate share
    groups, named after them. Each carries `base_lr`, which the schedule scales every step.

    Fewer, larger groups matter to a resume on more ranks: DeepSpeed's universal checkpoint
    cannot load a group so small that some rank holds none of it (a lone temperature, say)."""
    part_lr = {"image": cfg.image_lr or cfg.lr, "text": cfg.text_lr or cfg.lr,
               "critic": cfg.critic_lr or cfg.lr}
    groups: dict[tuple[float, bool], dict[str, list]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = _part_of(name)
            groups.setdefault((part_lr[part], _decays(name, param)), {}).setdefault(part, []).append(param)
    return [
        {"params": [param for part in PARTS if part in parts for param in parts[part]],
         "name": "+".join(part for part in PARTS if part in parts) + ("" if decay else "_no_decay"),
         "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr, "base_lr": lr}
        for (lr, decay), parts in sorted(groups.items(), key=lambda item: (min(map(PARTS.index, item[1])), item[0]))
    ]


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over `groups`, inside Lookahead when optim.lookahead_k > 0."""
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        # Fused AdamW (one kernel over all tensors) on CUDA and, since torch 2.4, on CPU: the default
        # per-tensor loop is a visible share of a small model's step (docs/design.md).
        fused = device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    return Lookahead(optimizer, cfg.lookahead_k, cfg.lookahead_alpha) if cfg.lookahead_k else optimizer


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def steps_plainly(precision: str, zero_stage: int) -> bool:
    """DeepSpeed steps our optimizer as it is, with no 16-bit or ZeRO wrapper (fp32, or bf16 /
    fp16 autocast, at ZeRO 0). Its wrappers clip their flat buffers; plainly, DeepSpeed would clip
    tensor by tensor, so there `GradientClip` clips instead."""
    return zero_stage == 0


class GradientClip:
    """optim.grad_clip where DeepSpeed steps our optimizer plainly: a step pre-hook on the torch
    optimizer that takes the norm of all gradients in one multi-tensor pass and scales them in
    another (torch's `clip_grad_norm_`, as open_clip_train clips), where DeepSpeed's clipping
    runs a norm and a multiply per parameter tensor (docs/design.md). The gradients are already
    averaged over ranks then, so every rank computes the same norm. The norm stays a tensor until
    the logs read it."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.max_norm = max_norm if max_norm > 0 else math.inf  # 0: no clipping, but the logs get the norm
        self.norm: torch.Tensor | None = None
        # Lookahead's fast steps are its inner optimizer's: clip what they step
        (optimizer.inner if isinstance(optimizer, Lookahead) else optimizer).register_step_pre_hook(self._clip)

    def _clip(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if getattr(optimizer, "grad_scale", None) is not None:  # GradScaler's hand-over to a fused step
            raise RuntimeError("the gradients still carry fp16's loss scale: step through Engine.step, which "
                               "takes it out first")
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def runs_autocast(precision: str, zero_stage: int) -> bool:
    """bf16 and fp16 without ZeRO run as torch autocast over fp32 weights, as open_clip's AMP does:
    our optimizer steps the fp32 weights itself, gradients are fp32 between micro-batches and on
    the wire; fp16's loss scale is DeepSpeed's torch GradScaler. DeepSpeed's own 16-bit optimizer
    at ZeRO 0 reads a value back to the host once per parameter tensor at every step
    (docs/design.md), and in fp16 (DeepSpeed 0.19) never scales the loss while it divides the
    gradients by the scale, so the weights barely move. Under ZeRO 1-3 its 16-bit optimizers step
    flat, partitioned fp32 master weights, and 16-bit weights halve what ZeRO-3 gathers."""
    return precision in LOW_PRECISION and zero_stage == 0


def deepspeed_config(cfg: Config, precision: str, load_universal: bool = False) -> dict:
    """DeepSpeed's config for our run. bf16 keeps fp32 weights (autocast, ZeRO 0) or fp32 master
    weights (ZeRO 1-3) and fp32 optimizer state; what DeepSpeed's bf16 keeps in bf16 by default
    is gradients on the wire and between micro-batches, where open_clip's AMP keeps fp32, so here
    both are fp32. `load_universal`: the engine will load a universal checkpoint (a resume on
    another number of ranks)."""
    zero = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage == 3:
        # gather full parameters for saving so checkpoints hold consolidated 16-bit weights too
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    autocast = runs_autocast(precision, cfg.engine.zero_stage)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # where DeepSpeed steps our optimizer plainly, GradientClip clips
        "gradient_clipping": 0.0 if steps_plainly(precision, cfg.engine.zero_stage) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        # bf16 needs no loss scale, so no overflow check (it read a flag back to the host every step)
        "bf16": {"enabled": precision == "bf16" and not autocast, "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16" and not autocast, "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # our trainer logs
        "wall_clock_breakdown": False,
        # its throughput timer synchronizes the device at every forward and step (a no-op on CPU)
        "timers": {"throughput": {"enabled": False}},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if autocast:
        # no module's gradients marked for 16-bit reduction: all of them go over the wire in fp32
        ds["torch_autocast"] = {"enabled": True, "dtype": precision, "lower_precision_safe_modules": []}
    elif precision in LOW_PRECISION:
        # a sum over 64 ranks rounded to 16 bits at every hop (bf16 keeps 8 significant bits, fp16
        # 11) loses what open_clip's AMP, fp32 gradients on the wire, keeps
        ds["communication_data_type"] = "fp32"
        if precision == "bf16" and cfg.optim.grad_accum > 1:  # fp16 ZeRO accumulates in its weights' dtype
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


@dataclass
class Engine:
    engine: object  # deepspeed.DeepSpeedEngine
    precision: str
    device: torch.device
    clip: GradientClip | None  # where DeepSpeed steps our optimizer plainly

    @property
    def input_dtype(self) -> torch.dtype:
        """Images go to the device in the compute dtype (autocast's first convolution takes bf16 too)."""
        return LOW_PRECISION.get(self.precision, torch.float32)

    def step(self) -> None:
        """DeepSpeed's step (it updates the weights at the last micro-batch only). fp16 without
        ZeRO: there, first, the loss scale comes out of the gradients (on the device, no host
        read), so that GradientClip clips, and the logs get, their true norm; GradScaler's step
        then skips an update whose gradients overflowed."""
        scaler = self.engine.torch_autocast_z0_gradscaler
        if scaler is not None and self.engine.is_gradient_accumulation_boundary():
            scaler.unscale_(self.engine.optimizer)
        self.engine.step()

    def grad_norm(self) -> float:
        """The gradients' norm before clipping, at the last optimizer step (a read back to the host)."""
        return float(self.clip.norm if self.clip is not None else self.engine.get_global_grad_norm())


def build_engine(model: nn.Module, cfg: Config, device: torch.device, load_universal: bool = False) -> Engine:
    import deepspeed
    from deepspeed.runtime import torch_autocast

    precision = resolve_precision(cfg.engine, device)
    set_cuda_math(cfg.engine, device)
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim, device)
    # DeepSpeed marks autocast on for the whole process at the first engine that enables it and
    # never clears it; a later ZeRO engine would then reduce bf16 gradients in bf16
    torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, precision, load_universal))
    plainly = steps_plainly(precision, cfg.engine.zero_stage)
    if (engine.optimizer is engine.basic_optimizer) != plainly:  # else nothing or both would clip
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} {'wrapped' if plainly else 'did not wrap'} the "
                           f"optimizer at ZeRO {cfg.engine.zero_stage}, {precision}; the gradient clipping here "
                           "assumes otherwise")
    if engine.world_size == 1 and plainly:
        # One rank has nothing to average, but DeepSpeed would still flatten every gradient into
        # buckets, all-reduce them over a group of one and copy them back.
        engine.enable_backward_allreduce = False
    return Engine(engine=engine, precision=precision, device=device,
                  clip=GradientClip(optimizer, cfg.optim.grad_clip) if plainly else None)
