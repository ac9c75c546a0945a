"""Held-out image<->text retrieval, computed on every rank.

Every rank embeds an equal slice of the evaluation set (the same number of forward calls on each
rank, which ZeRO-3 requires since parameters are gathered collectively), the slices are gathered,
and similarities are computed in chunks so memory stays bounded by chunk x N.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cliplite_dist.data.pipeline import BadSampleCounter, SampleDecoder, decode_samples, iterate_samples


@dataclass
class EvalSet:
    images: torch.Tensor  # [N, 3, H, W]
    tokens: torch.Tensor  # [N, context]
    keys: list[str]


def load_eval_set(urls: list[str], decoder: SampleDecoder, tokenizer, max_samples: int) -> EvalSet:
    """The first `max_samples` good samples of `urls`, first caption of each, in shard order."""
    counter = BadSampleCounter()
    images, captions, keys = [], [], []
    for image, caption, key in decode_samples(iterate_samples(urls, counter), decoder, counter,
                                              random.Random(0)):
        images.append(image)
        captions.append(caption)
        keys.append(key)
        if len(images) == max_samples:
            break
    if not images:
        raise ValueError(f"evaluation shards {urls[:3]} gave no usable sample (bad: {dict(counter.counts)})")
    return EvalSet(torch.stack(images), tokenizer(captions), keys)


def recall_at_k(similarity_rows, targets: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of rows whose target column is among the top-k; `similarity_rows` yields chunks."""
    hits = {k: 0 for k in ks}
    total, start = 0, 0
    for chunk in similarity_rows:
        rows = chunk.shape[0]
        target = targets[start:start + rows].unsqueeze(1)
        # rank of the target = other columns scoring at least as high: ties count against us, so
        # a collapsed model (all scores equal) gets recall 0, not 1
        target_score = chunk.gather(1, target)
        rank = (chunk >= target_score).sum(dim=1) - 1
        for k in ks:
            hits[k] += int((rank < k).sum())
        total += rows
        start += rows
    return {k: hits[k] / total for k in ks}


def _chunks(a: torch.Tensor, b: torch.Tensor, chunk: int):
    for start in range(0, a.shape[0], chunk):
        yield a[start:start + chunk].float() @ b.float().T


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """R@1/5/10 both ways for N paired embeddings (row i of each is a pair); chance R@1 is 1/N."""
    n = image_emb.shape[0]
    targets = torch.arange(n, device=image_emb.device)
    metrics = {}
    for direction, (a, b) in {"i2t": (image_emb, text_emb), "t2i": (text_emb, image_emb)}.items():
        for k, value in recall_at_k(_chunks(a, b, chunk), targets).items():
            metrics[f"{direction}_R@{k}"] = value
    metrics["chance_R@1"] = 1.0 / n
    metrics["num_samples"] = n
    return metrics


@torch.no_grad()
def embed_distributed(engine, data: EvalSet, batch_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the whole set, each rank embedding every world-th sample, then gathered."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = data.images.shape[0]
    per_rank = -(-n // world)
    index = torch.arange(rank, per_rank * world, world) % n  # padded by wrapping around
    image_parts, text_parts = [], []
    for start in range(0, per_rank, batch_size):
        idx = index[start:start + batch_size]
        img, txt = engine(data.images[idx].to(device, dtype), data.tokens[idx].to(device), embed_only=True)
        image_parts.append(img.float())
        text_parts.append(txt.float())
    local = torch.cat([torch.cat(image_parts), torch.cat(text_parts)], dim=1)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    # interleave back: rank r's j-th row is sample j * world + r
    full = torch.stack(gathered, dim=1).reshape(per_rank * world, -1)[:n]
    dim = image_parts[0].shape[1]
    return full[:, :dim], full[:, dim:]


def evaluate_retrieval(engine, data: EvalSet, batch_size: int, device, dtype) -> dict[str, float]:
    was_training = engine.training
    engine.eval()
    try:
        image_emb, text_emb = embed_distributed(engine, data, batch_size, device, dtype)
    finally:
        engine.train(was_training)
    return retrieval_metrics(image_emb, text_emb)
