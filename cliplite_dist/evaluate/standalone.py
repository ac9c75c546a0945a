"""`cliplite-eval`: retrieval, zero-shot classification and linear probes of a trained model.

The target is an export folder, a run directory (its newest checkpoint) or one checkpoint
folder. Runs and checkpoints are exported to a temporary folder and loaded from there, so the
model evaluated is exactly the one `cliplite-export` ships. Similarities use the objective's
own embeddings (CLIP-Lite: its critic heads; InfoNCE: cosine); linear probes use the frozen
image tower's features, as the paper's probes use the backbone.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from cliplite_dist.evaluate import tasks
from cliplite_dist.evaluate.datasets import load_labelled
from cliplite_dist.evaluate.embed import LocalEmbedder
from cliplite_dist.export import META, export_run, load


def load_target(target: str | Path, workdir: Path):
    """(model, preprocess, tokenizer) for an export folder, a run directory or a checkpoint folder."""
    path = Path(target)
    if (path / META).is_file():
        return load(path)
    if (path / "config.yaml").is_file():
        return load(export_run(path, workdir / "export"))
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return load(export_run(path.parent.parent, workdir / "export", tag=path.name))
    raise FileNotFoundError(f"{path} is neither an export (no {META}), a run directory (no config.yaml) "
                            f"nor a checkpoint folder inside one")


def linear_probe_eval(model, preprocess, train_split: str, test_split: str, batch_size: int,
                      max_images: int = 0) -> dict:
    """Probe on the frozen image tower's features (before any critic head)."""
    data = tasks.ProbeInputs(load_labelled(train_split, preprocess, max_images),
                             load_labelled(test_split, preprocess, max_images))
    return asdict(tasks.probe(LocalEmbedder(model.towers, batch_size), data))


def evaluate(target: str, retrieval: str | None = None, zeroshot: str | None = None,
             probe: tuple[str, str] | None = None, batch_size: int = 256, max_images: int = 0,
             device: str = "cpu") -> dict:
    """`device`: where the model embeds (cpu, cuda, cuda:N); in fp32, as exported."""
    with tempfile.TemporaryDirectory(prefix="cliplite-eval-") as workdir:
        model, preprocess, tokenizer = load_target(target, Path(workdir))
        model.to(device)
        embedder = LocalEmbedder(model, batch_size)
        results: dict = {"target": str(target), "device": str(device)}
        if retrieval:
            results["retrieval"] = tasks.retrieval(
                embedder, tasks.prepare_retrieval(retrieval, preprocess, tokenizer, max_images))
        if zeroshot:
            results["zeroshot"] = tasks.zeroshot(
                embedder, tasks.prepare_zeroshot(zeroshot, preprocess, tokenizer, max_images))
        if probe:
            results["linear_probe"] = linear_probe_eval(model, preprocess, *probe, batch_size, max_images)
    return results


def render(results: dict) -> str:
    """A plain table: one line per metric."""
    lines = [f"evaluation of {results['target']} on {results['device']}"]
    for section in ("retrieval", "zeroshot", "linear_probe"):
        for key, value in results.get(section, {}).items():
            if key == "sweep":
                value = ", ".join(f"{wd:g}:{metric:.3f}" for wd, metric in value)
            elif key == "per_class":
                if not value:
                    continue
                value = ", ".join("-" if ap is None else f"{ap:.3f}" for ap in value)
            elif isinstance(value, float):
                value = f"{value:.4f}"
            lines.append(f"{section:<13} {key:<24} {value}")
    return "\n".join(lines)
