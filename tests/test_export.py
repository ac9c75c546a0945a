"""Export to open_clip's format and back: real runs, consolidated ZeRO shards, safetensors only."""
import json

import open_clip
import pytest
import torch

import cliplite_dist
from cliplite_dist.config import load_config
from cliplite_dist.export import export_run
from cliplite_dist.models import build_model
from runkit import RECIPE, console_command, metric_steps, run, tiny_overrides, torchrun_command, train_command


@pytest.mark.parametrize("objective", [["objective.name=cliplite", "objective.head=mlp"],
                                       ["objective.name=cliplite", "objective.head=linear"],
                                       ["objective.name=infonce"], ["objective.name=siglip"]],
                         ids=["cliplite-mlp", "cliplite-linear", "infonce", "siglip"])
def test_exported_embeddings_equal_the_trained_model(tiny_corpus, tmp_path, objective, monkeypatch):
    proc = run(train_command() + [RECIPE] + objective + tiny_overrides(
        tiny_corpus, tmp_path, **{"train.steps": 3, "train.checkpoint_every": 0, "data.eval": "''",
                                  "data.eval_zeroshot": "''"}))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / "t"
    out = export_run(run_dir, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                               "cliplite_objective.safetensors", "cliplite_meta.json"}
    # the model as trained: our module with the checkpoint's weights (ZeRO-0 fp32 keeps them whole)
    cfg = load_config(run_dir / "config.yaml")
    trained, towers = build_model(cfg.model, cfg.objective)
    states = torch.load(run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    trained.load_state_dict(states)
    trained.eval()

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    model, preprocess, tokenizer = cliplite_dist.load(out)
    monkeypatch.undo()
    images = torch.randn(5, 3, 64, 64)
    tokens = tokenizer(["a red circle", "a small blue star above a green cross", "x", "two shapes", "a cyan diamond"])
    with torch.no_grad():
        want_img, want_txt = trained(images, tokens, embed_only=True)
        assert torch.allclose(model.encode_image(images), want_img, atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), want_txt, atol=1e-5)
        # plain open_clip loads the same folder: its towers are ours
        towers_oc, _, preprocess_oc = open_clip.create_model_and_transforms(f"local-dir:{out}")
        assert torch.allclose(towers_oc.encode_image(images), trained.towers.encode_image(images), atol=1e-5)
        assert torch.allclose(towers_oc.logit_scale.exp(), trained.objective.temperature().float(), rtol=1e-5)
        if cfg.objective.name == "siglip":  # open_clip's SigLIP towers carry the learned bias too
            assert torch.allclose(towers_oc.logit_bias, trained.objective.bias[0])
    meta = json.loads((out / "cliplite_meta.json").read_text())
    assert meta["objective"]["name"] == cfg.objective.name and meta["step"] == 3


def test_two_rank_zero3_run_exports_and_evaluates_like_it_trained(tiny_corpus, tmp_path):
    """ZeRO-3 partitions on 2 ranks, consolidated to fp32: the standalone evaluation of the export
    (1 process) equals the in-training evaluation (2 ranks) of the same weights."""
    proc = run(torchrun_command() + [RECIPE] + tiny_overrides(
        tiny_corpus, tmp_path, **{"engine.zero_stage": 3, "engine.precision": "fp32", "train.steps": 4,
                                  "train.checkpoint_every": 0}), timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / "t"
    trained = [m for m in metric_steps(run_dir) if "eval/i2t_R@1" in m][-1]
    export = run(console_command("cliplite-export") + [str(run_dir), str(tmp_path / "out")])
    assert export.returncode == 0, export.stderr
    evaluated = run(console_command("cliplite-eval") + [str(tmp_path / "out"),
                     "--retrieval", str(tiny_corpus / "heldout"), "--zeroshot", str(tiny_corpus / "classes"),
                     "--linear-probe", str(tiny_corpus / "classes" / "train"), str(tiny_corpus / "classes" / "test"),
                     "--max-images", "64", "--json", str(tmp_path / "eval.json")])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for section in ("retrieval", "zeroshot", "linear_probe"):
        assert section in evaluated.stdout
    results = json.loads((tmp_path / "eval.json").read_text())
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10"):
        assert results["retrieval"][key] == pytest.approx(trained[f"eval/{key}"], abs=1e-9), key
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert results["zeroshot"][key] == pytest.approx(trained[f"eval/zeroshot_{key}"], abs=1e-9), key
    assert results["linear_probe"]["metric"] == "top1" and 0.0 <= results["linear_probe"]["value"] <= 1.0


def test_export_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="cliplite_meta.json"):
        cliplite_dist.load(tmp_path)


def test_render_prints_a_multilabel_probes_class_aps_and_omits_an_empty_list():
    from cliplite_dist.evaluate.standalone import render

    probe = {"metric": "mAP_voc07", "value": 0.5, "weight_decay": 0.01, "sweep": [(0.01, 0.4)]}
    lines = render({"target": "t", "device": "cpu", "linear_probe": {**probe, "per_class": [0.25, None, 0.75]}})
    assert "linear_probe  per_class                0.250, -, 0.750" in lines.splitlines()
    assert "per_class" not in render({"target": "t", "device": "cpu", "linear_probe": {**probe, "per_class": []}})
