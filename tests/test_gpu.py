"""The CUDA path, run for real: nccl, bf16 and fp16 under ZeRO 0-3 (BatchNorm towers too), the
batched device resize against the worker's, the objectives, checkpoint + resume, export and
evaluation on the GPU.

Every test is marked `gpu`: where torch sees no GPU they skip with that reason (conftest.py);
`python benchmarks/gpu_check.py` runs them on one. The engine cases need a process group on
nccl, and the test session may already hold a gloo one (in-process DeepSpeed tests), so they
run in a process of their own: this file run as a script, every case in one process (one
start-up), results handed back as JSON.
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cliplite_dist.config import Config, ModelConfig, ObjectiveConfig
from cliplite_dist.data.augment import PRESETS, Augmented, unwrap_augmented
from cliplite_dist.data.transforms import DeviceTransform
from cliplite_dist.engine import LOW_PRECISION
from cliplite_dist.models import build_towers
from cliplite_dist.objectives import build_objective
from cropkit import assert_near_the_workers_resize, worker_and_device_crops
from runkit import RECIPE, clean_env, console_command, free_port, run, tiny_overrides, train_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import DispatchCount  # noqa: E402  (benchmarks/common.py)

pytestmark = pytest.mark.gpu

# (model, precision, ZeRO stage, gradient accumulation); tiny-resnet: BatchNorm towers
ENGINE_CASES = [(model, precision, zero, 1) for model in ("tiny-vit",) for precision in ("bf16", "fp16")
                for zero in (0, 1, 2, 3)]
ENGINE_CASES += [("tiny-vit", "bf16", zero, 2) for zero in (0, 1, 2)]  # accumulated in fp32
ENGINE_CASES += [("tiny-vit", "fp16", 0, 2)]  # the loss scale divided out once, at the last micro-batch
ENGINE_CASES += [("tiny-resnet", "bf16", 0, 1), ("tiny-resnet", "bf16", 2, 1), ("tiny-resnet", "fp16", 1, 1)]
STEPS = {"bf16": 3, "fp16": 10}  # fp16's loss scale starts at 2**16 and halves at each step that overflows


def case_id(case: tuple) -> str:
    model, precision, zero, accum = case
    return f"{model}-{precision}-zero{zero}-accum{accum}"


def engine_case(model_name: str, precision: str, zero: int, accum: int, device: torch.device) -> dict:
    """STEPS optimizer steps of the cliplite model on one fixed batch; what the engine keeps."""
    from cliplite_dist.engine import build_engine
    from cliplite_dist.models import build_model

    cfg = Config()
    cfg.model.name, cfg.objective.name, cfg.data.batch_size = model_name, "cliplite", 8
    cfg.engine.precision, cfg.engine.zero_stage, cfg.optim.grad_accum = precision, zero, accum
    cfg.optim.warmup_steps = 0
    torch.manual_seed(0)
    model, towers = build_model(cfg.model, cfg.objective)
    info = build_engine(model, cfg, device)
    images = torch.randn(8, 3, 64, 64, device=device, dtype=info.input_dtype)
    tokens = towers.tokenizer([f"a {c} circle left of a small square" for c in "abcdefgh"]).to(device)
    losses = []
    for _ in range(STEPS[precision] * accum):
        out = info.engine(images, tokens)
        info.engine.backward(out.loss)
        info.step()
        losses.append(out.loss.item())
    syncs = host_syncs_per_step(info, images, tokens, accum)  # one step more
    batchnorms = [m for m in info.engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {"losses": losses, "precision": info.precision, "autocast": info.engine.torch_autocast_enabled(),
            "host_syncs_per_step": syncs,
            "param_dtypes": sorted({str(p.dtype) for p in info.engine.module.parameters()}),
            "master_dtypes": sorted({str(p.dtype) for p in info.engine.basic_optimizer.state}),  # what it steps
            # ZeRO 1-3: the dtypes its reduction buckets send gradients over the wire in
            "reduce_dtypes": sorted(str(d) for d in getattr(info.engine.optimizer, "ipg_buckets", {})),
            "batchnorm_stat_dtypes": sorted({str(m.running_mean.dtype) for m in batchnorms}),
            "batchnorm_steps": sorted({int(m.num_batches_tracked) for m in batchnorms})}


def host_syncs_per_step(info, images, tokens, accum: int) -> int:
    """How often one more optimizer step (its micro-batches' forward and backward included) made
    the host wait for the GPU: CUDA's sync debug mode's warnings, plus the device-wide
    synchronizes it does not see (`DispatchCount`: DeepSpeed's throughput timer made two a step)."""
    import warnings

    torch.cuda.synchronize()
    counted = DispatchCount()
    with warnings.catch_warnings(record=True) as caught, counted:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(accum):
                info.engine.backward(info.engine(images, tokens).loss)
                info.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) + counted.syncs


def engine_cases_main(out: str) -> None:
    """Script mode: an nccl group of one rank, then every engine case; errors recorded per case."""
    import os
    import traceback

    import torch.distributed as dist

    from cliplite_dist.distributed import DistEnv, init_distributed, pick_device

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = DistEnv.from_environ()
    device = pick_device("cuda", env)
    init_distributed(env, device)
    results = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "cases": {}}
    for case in ENGINE_CASES:
        try:
            results["cases"][case_id(case)] = engine_case(*case, device)
        except Exception:  # the others still run; the test of this case shows the traceback
            results["cases"][case_id(case)] = {"error": traceback.format_exc()}
        results["cuda_math"] = {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                                "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                                "cudnn_benchmark": torch.backends.cudnn.benchmark}
        Path(out).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engines") / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert out.exists(), (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def test_nccl_group_of_one_rank(engine_results):
    assert engine_results["backend"] == "nccl" and engine_results["world_size"] == 1


def test_engines_on_cuda_compute_fp32_in_tf32_with_autotuned_convolutions(engine_results):
    """open_clip_train's CUDA math (engine.tf32 defaults on): what the engines' runs set."""
    assert engine_results["cuda_math"] == {"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": True}


@pytest.mark.parametrize("case", ENGINE_CASES, ids=case_id)
def test_low_precision_steps_under_every_zero_stage(engine_results, case):
    """Parameters in the training dtype (at ZeRO 0: fp32 under autocast, and no host sync in a
    step), fp32 weights in the optimizer, finite losses that change from step to step on a
    repeated batch (bf16; fp16's first steps may be skipped while its loss scale settles, but
    then its weights move too), BatchNorm statistics kept fp32 and updated."""
    model, precision, zero, accum = case
    result = engine_results["cases"][case_id(case)]
    assert "error" not in result, result.get("error")
    assert result["precision"] == precision
    # without ZeRO: autocast over fp32 weights, which our optimizer steps with no host sync
    autocast = zero == 0
    assert result["autocast"] == autocast
    assert result["param_dtypes"] == [str(torch.float32 if autocast else LOW_PRECISION[precision])]
    if autocast:
        assert result["host_syncs_per_step"] == 0
    assert result["master_dtypes"] == ["torch.float32"]  # the tensors the optimizer stepped
    assert result["reduce_dtypes"] == ([] if autocast else ["torch.float32"])
    steps = STEPS[precision]
    assert len(result["losses"]) == steps * accum and all(math.isfinite(v) for v in result["losses"])
    # the same batch each step: a new loss means the weights moved (fp16: once its scale settled)
    distinct = len(set(result["losses"][::accum]))
    assert distinct == steps if precision == "bf16" else distinct > 1, result["losses"]
    if model == "tiny-resnet":
        assert result["batchnorm_stat_dtypes"] == ["torch.float32"]
        assert result["batchnorm_steps"] == [(steps + 1) * accum]


@pytest.fixture(scope="module")
def tiny_train_transform():
    return build_towers(ModelConfig(name="tiny-vit")).train_transform


def test_device_resize_on_cuda_matches_the_workers_and_the_per_image_path(tiny_train_transform):
    """The same boxes resized in the worker (uint8) and on the GPU (one batched resampling per
    image size): as near as the worker's rounding and clamping allow (`cropkit`, whose bounds
    test_transforms.py proves on the CPU); the batched GPU resize equals the per-image one to
    float rounding; and the whole transform, flips and jitter too, never makes the host wait."""
    resized, crops = worker_and_device_crops(tiny_train_transform)
    crops = crops.to(torch.device("cuda"))
    device = DeviceTransform(tiny_train_transform, torch.device("cuda"), torch.float32)
    on_device = device.resize(crops)
    assert_near_the_workers_resize(on_device, resized)
    torch.testing.assert_close(on_device, device.resize_each(crops), atol=1e-2, rtol=0)
    rng = random.Random(0)
    _, augment = unwrap_augmented([Augmented(None, PRESETS["paper"].draw(rng)) for _ in range(len(crops))])
    torch.cuda.set_sync_debug_mode("error")  # crop boxes, image groups and augmented rows go over pinned
    try:
        model_input = device(crops, augment)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model_input.dtype == torch.float32 and model_input.is_cuda


@pytest.mark.parametrize("name", ["cliplite", "infonce"])
def test_objectives_on_cuda_match_float64_on_cpu(name):
    """Loss and gradients of the objective (CLIP-Lite: its BatchNorm critic heads in training
    mode) on CUDA in fp32, against the same module in float64 on the CPU."""
    torch.manual_seed(0)
    reference = build_objective(ObjectiveConfig(name=name), 32).double()
    on_gpu = build_objective(ObjectiveConfig(name=name), 32)
    on_gpu.load_state_dict(reference.state_dict())
    on_gpu.cuda()
    image, text = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for x in (image, text)]
    gpu_inputs = [x.float().cuda().requires_grad_() for x in (image, text)]
    want, got = reference(*inputs).loss, on_gpu(*gpu_inputs).loss
    want.backward()
    got.backward()
    assert got.is_cuda and torch.isfinite(got)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(gpu_inputs, inputs):
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, rtol=1e-3, atol=1e-5)


def test_checkpoint_resume_export_and_evaluate_on_cuda(tiny_corpus, tmp_path):
    """The trainer on the GPU with its defaults there (bf16, crops resized on the device): a
    checkpointed run, the same command resuming it, the export evaluated with --device cuda."""
    def overrides(steps: int) -> list[str]:
        return tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": steps, "train.checkpoint_every": 2})

    first = run(train_command() + [RECIPE] + overrides(4))
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "device cuda:0, bf16, fp32 as TF32" in first.stdout
    second = run(train_command() + [RECIPE] + overrides(6))
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resumed from {tmp_path / 't' / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert "step 6/6" in out and "peak_mem_gib" in out
    export = run(console_command("cliplite-export") + [str(tmp_path / "t"), str(tmp_path / "out")])
    assert export.returncode == 0, export.stderr[-3000:]
    evaluated = run(console_command("cliplite-eval") + [
        str(tmp_path / "out"), "--device", "cuda", "--retrieval", str(tiny_corpus / "heldout"),
        "--zeroshot", str(tiny_corpus / "classes"), "--max-images", "64", "--json", str(tmp_path / "eval.json")])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["device"] == "cuda" and "on cuda" in evaluated.stdout
    assert 0.0 <= results["retrieval"]["i2t_R@1"] <= 1.0 and 0.0 <= results["zeroshot"]["top1"] <= 1.0


if __name__ == "__main__":
    engine_cases_main(sys.argv[1])
