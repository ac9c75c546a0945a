"""Embedders: all images or captions of an evaluation set -> unit embeddings, batched.
Images come as datasets.EncodedImages (decoded batch by batch), captions as a token tensor.

`LocalEmbedder` runs a loaded model in this process (cliplite-eval). `DistributedEmbedder`
runs inside training on every rank: each rank embeds every world-th item through the engine
(the same number of forward calls on each rank, which ZeRO-3 needs since parameters are
gathered collectively), then the slices are gathered. Both give the same embeddings.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cliplite_dist.evaluate.datasets import EncodedImages


class LocalEmbedder:
    """Batches go to the model's device; embeddings come back to the CPU (as the distributed
    embedder's do), where the metrics are computed."""

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _run(self, fn, data) -> torch.Tensor:
        return torch.cat([fn(data[i:i + self.batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(data), self.batch_size)])

    def images(self, images: EncodedImages) -> torch.Tensor:
        return self._run(self.model.encode_image, images)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.encode_text, tokens)


class DistributedEmbedder:
    """`towers_only`: the towers' raw embeddings (a linear probe's features) instead of the
    objective's retrieval embeddings."""

    def __init__(self, engine, batch_size: int, device, dtype, towers_only: bool = False):
        self.engine, self.batch_size, self.device, self.dtype = engine, batch_size, device, dtype
        self.mode = {"towers_only": True} if towers_only else {"embed_only": True}

    @torch.no_grad()
    def _run(self, data, as_images: bool) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        n = len(data)
        per_rank = -(-n // world)
        index = torch.arange(rank, per_rank * world, world) % n  # padded by wrapping around
        parts = []
        for start in range(0, per_rank, self.batch_size):
            batch = data[index[start:start + self.batch_size]]
            if as_images:
                emb, _ = self.engine(batch.to(self.device, self.dtype), None, **self.mode)
            else:
                _, emb = self.engine(None, batch.to(self.device), **self.mode)
            parts.append(emb.float())
        local = torch.cat(parts)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        # rank r's j-th row is item j * world + r: interleave back, drop the padding
        return torch.stack(gathered, dim=1).reshape(per_rank * world, -1)[:n].cpu()

    def images(self, images: EncodedImages) -> torch.Tensor:
        return self._run(images, as_images=True)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens, as_images=False)
