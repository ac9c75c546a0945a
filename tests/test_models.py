import json

import pytest
import torch

from cliplite_dist.config import ModelConfig, ObjectiveConfig
from cliplite_dist.models import PACKAGED_CONFIGS, build_model, build_towers, resolve_model_name


def test_model_from_a_config_json_path_and_its_tokenizer_and_transforms(tmp_path):
    cfg = json.loads((PACKAGED_CONFIGS / "tiny-vit.json").read_text())
    cfg["vision_cfg"]["layers"] = 1
    cfg["text_cfg"]["context_length"] = 20
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    towers = build_towers(ModelConfig(name=str(path)))
    assert towers.embed_dim == 128
    assert len(towers.model.visual.transformer.resblocks) == 1
    assert towers.tokenizer(["a red circle"]).shape == (1, 20)
    from PIL import Image
    assert towers.eval_transform(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.name='no-such-model'.*ViT-B-32"):
        resolve_model_name("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_model_name(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
@pytest.mark.parametrize("objective", ["cliplite", "infonce"])
def test_forward_gives_a_loss_and_embed_only_gives_unit_vectors(name, objective):
    model, towers = build_model(ModelConfig(name=name), ObjectiveConfig(name=objective))
    images = torch.randn(4, 3, 64, 64)
    tokens = towers.tokenizer(["a red circle", "a blue square", "a star", "two shapes"])
    out = model(images, tokens)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    img, txt = model(images, tokens, embed_only=True)
    assert img.shape == txt.shape == (4, 128)
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)


def test_gradient_checkpointing_switch():
    towers = build_towers(ModelConfig(name="tiny-vit", grad_checkpointing=True))
    assert towers.model.visual.transformer.grad_checkpointing
    assert towers.model.transformer.grad_checkpointing


@pytest.mark.parametrize("zero", [0, 2])
def test_compiled_encoders_train_and_embed_as_the_eager_ones_under_their_parameter_names(single_rank_group, zero):
    """model.compile: the same losses, evaluation embeddings and parameter names (so checkpoints
    and exports) as eager towers, with DeepSpeed's own gradient hooks (ZeRO 2) or without, and
    gradient checkpointing on as the large recipes have it; both encoders really compiled, for
    training and for evaluation."""
    from torch._dynamo.utils import counters

    from cliplite_dist.config import Config
    from cliplite_dist.engine import build_engine

    torch._dynamo.reset()
    counters.clear()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    captions = [f"a {colour} {shape}" for colour in ("red", "blue") for shape in ("circle", "square", "star", "cross")]
    losses, embeddings, names = {}, {}, {}
    for compiled in (False, True):
        cfg = Config()
        cfg.model = ModelConfig(name="micro-vit", grad_checkpointing=True, compile=compiled)
        cfg.objective.name, cfg.data.batch_size, cfg.engine.precision = "infonce", 8, "fp32"
        cfg.engine.zero_stage = zero
        torch.manual_seed(0)
        model, towers = build_model(cfg.model, cfg.objective)
        engine = build_engine(model, cfg, torch.device("cpu")).engine
        tokens = towers.tokenizer(captions)
        losses[compiled] = []
        for _ in range(3):
            out = engine(images, tokens)
            engine.backward(out.loss)
            engine.step()
            losses[compiled].append(out.loss.item())
        engine.eval()
        with torch.no_grad():
            embeddings[compiled] = torch.cat(engine(images, tokens, embed_only=True))
        names[compiled] = list(engine.module.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert torch.allclose(embeddings[True], embeddings[False], atol=1e-5)
    assert names[True] == names[False]
    # every frame dynamo met was compiled; torch 2.4's attention still splits a graph once
    assert counters["frames"]["ok"] == counters["frames"]["total"] >= 4  # the two encoders, training and evaluation
    assert counters["stats"]["unique_graphs"] >= 3
