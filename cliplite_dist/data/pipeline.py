"""The training stream: shards -> samples -> decode -> caption pick -> tokenize -> batches.

Each data-loader worker of each rank is one "slot". A slot reads its share of the shards in an
order seeded by (seed, epoch, slot) and cycles through them for as long as it is asked, so a
rank never runs short: the trainer takes exactly `steps_per_epoch` batches from every rank, which
is what keeps DeepSpeed's collectives in step whatever the shard counts. Bad samples go to a
`BadSampleCounter` that neither sleeps nor stays silent; its counts ride along with every batch.
"""
from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from cliplite_dist.config import DataConfig
from cliplite_dist.data.shards import SlotShare, open_shard, share_for_slot

log = logging.getLogger(__name__)

BAD_KINDS = ("read", "image", "caption")


class EmptyStreamError(RuntimeError):
    """A full pass over a reader's shards produced no usable sample: fail fast instead of hanging."""


class BadSampleCounter:
    """Counts skipped samples per kind and logs the first few of each, without sleeping."""

    def __init__(self, max_logged: int = 5):
        self.counts: Counter = Counter()
        self.max_logged = max_logged

    def record(self, kind: str, where: str, exc: BaseException | str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.max_logged:
            log.warning("skipping bad sample (%s) at %s: %s", kind, where, exc)

    def read_handler(self, exc: Exception) -> bool:
        """webdataset handler for tar/stream errors: count, continue with the next item."""
        self.record("read", str(exc.args[-1]) if exc.args else "?", exc)
        return True


def stable_seed(*parts) -> int:
    """A seed from parts that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(repr(parts).encode())


@dataclass
class SampleDecoder:
    """Turns a raw webdataset sample into (image tensor, caption text)."""

    transform: Callable
    caption_key: str
    image_keys: tuple[str, ...]
    pick_first_caption: bool = False  # evaluation: deterministic caption

    def image(self, sample: dict) -> torch.Tensor:
        for key in self.image_keys:
            if key in sample:
                with Image.open(io.BytesIO(sample[key])) as img:
                    return self.transform(img.convert("RGB"))
        raise KeyError(f"no image under any of {self.image_keys}")

    def caption(self, sample: dict, rng: random.Random) -> str:
        if self.caption_key == "txt":
            captions = sample["txt"].decode("utf-8")
        else:
            field = self.caption_key.split(":", 1)[1]
            captions = json.loads(sample["json"].decode("utf-8"))[field]
        if isinstance(captions, list):
            captions = [c for c in captions if isinstance(c, str) and c.strip()]
            if not captions:
                raise ValueError("empty caption list")
            captions = captions[0] if self.pick_first_caption else rng.choice(captions)
        if not isinstance(captions, str) or not captions.strip():
            raise ValueError("empty caption")
        return captions.strip()


def open_shards(urls, counter: BadSampleCounter) -> Iterator[dict]:
    """Open each shard (fsspec: local, http, s3, gs ...; or a pipe: command) and always close it."""
    for url in urls:
        try:
            stream = open_shard(url)
        except Exception as exc:  # missing shard, unreachable server
            counter.record("read", url, exc)
            continue
        try:
            yield {"url": url, "stream": stream}
        finally:
            try:
                stream.close()
            except OSError as exc:  # a pipe: command that failed
                counter.record("read", url, exc)


def iterate_samples(urls, counter: BadSampleCounter) -> Iterator[dict]:
    """Raw samples (dicts of key -> bytes) of `urls` in order; unreadable parts counted."""
    files = tar_file_expander(open_shards(urls, counter), handler=counter.read_handler)
    yield from group_by_keys(files, handler=counter.read_handler)


def decode_samples(samples, decoder: SampleDecoder, counter: BadSampleCounter,
                   rng: random.Random) -> Iterator[tuple[torch.Tensor, str, str]]:
    """(image, caption, key) per good sample; bad images and captions are counted and skipped."""
    for sample in samples:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        try:
            caption = decoder.caption(sample, rng)
        except Exception as exc:  # missing, empty, non-UTF-8, malformed json
            counter.record("caption", where, exc)
            continue
        try:
            image = decoder.image(sample)
        except Exception as exc:
            counter.record("image", where, exc)
            continue
        yield image, caption, sample.get("__key__", "")


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer: emits a random held item once the buffer is full."""
    held: list = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        index = rng.randrange(len(held))
        held[index], item = item, held[index]
        yield item
    rng.shuffle(held)
    yield from held


class ShardStream(IterableDataset):
    """Endless batches of (images, tokens, bad-sample counts) for one rank.

    `set_epoch` before each `iter()` reseeds shard order and shuffles from (seed, epoch), so
    every epoch differs but a rerun of the same epoch is identical.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, decoder: SampleDecoder, tokenizer,
                 rank: int, world_size: int, seed: int):
        self.urls, self.cfg, self.decoder, self.tokenizer = list(urls), cfg, decoder, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.restart_at = 0, 0

    def set_epoch(self, epoch: int, restart_at: int = 0) -> None:
        """Seeds for `epoch`; `restart_at` > 0 (resuming mid-epoch) gives that epoch a fresh order."""
        self.epoch, self.restart_at = epoch, restart_at

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, worker

    def _shard_order(self, slot: int, num_slots: int, rng: random.Random):
        """(url, share) for this slot, pass after pass; resampled mode draws with replacement."""
        if self.cfg.resampled:
            share = SlotShare(tuple(self.urls))
            while True:
                yield rng.choice(self.urls), share
        pass_index = 0
        while True:
            order = list(self.urls)
            random.Random(stable_seed(self.seed, self.epoch, self.restart_at, pass_index)).shuffle(order)
            share = share_for_slot(order, slot, num_slots)
            for url in share.urls:
                yield url, share
            pass_index += 1

    def _samples(self, slot: int, num_slots: int, counter: BadSampleCounter,
                 rng: random.Random) -> Iterator[dict]:
        dry = 0  # shards in a row that gave this slot nothing
        for url, share in self._shard_order(slot, num_slots, rng):
            got = False
            for index, sample in enumerate(iterate_samples([url], counter)):
                if index % share.sample_stride == share.sample_offset:
                    got = True
                    yield sample
            dry = 0 if got else dry + 1
            if dry >= len(share.urls):
                raise EmptyStreamError(
                    f"rank {self.rank}: {dry} shard(s) in a row (last: {url!r}) gave no sample; "
                    f"bad so far: {dict(counter.counts)}")

    def __iter__(self):
        slot, num_slots, worker = self._slot()
        rng = random.Random(stable_seed(self.seed, self.epoch, self.restart_at, slot))
        counter = BadSampleCounter()
        samples = shuffled(self._samples(slot, num_slots, counter, rng), self.cfg.shuffle_buffer, rng)
        decoded = decode_samples(samples, self.decoder, counter, rng)
        batch_size = self.cfg.batch_size
        while True:
            images, captions = [], []
            for image, caption, _ in decoded:
                images.append(image)
                captions.append(caption)
                if len(images) == batch_size:
                    break
            if len(images) < batch_size:
                return
            yield torch.stack(images), self.tokenizer(captions), ((self.epoch, worker), dict(counter.counts))


def _worker_init(_: int) -> None:
    """One intra-op thread per worker: the trainer process needs the cores for the model."""
    torch.set_num_threads(1)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init, prefetch_factor=4 if workers else None,
                      persistent_workers=False)


class BadSampleTally:
    """Sums the per-worker cumulative counts that arrive with batches, in the training process."""

    def __init__(self):
        self.by_worker: dict[tuple[int, int], dict[str, int]] = {}

    def update(self, worker_counts: tuple[tuple[int, int], dict]) -> None:
        """Counts are cumulative per (epoch, worker) iterator, so the newest one replaces the last."""
        worker, counts = worker_counts
        self.by_worker[tuple(worker)] = counts  # the loader turns the tuple into a list

    def totals(self) -> dict[str, int]:
        out = {kind: 0 for kind in BAD_KINDS}
        for counts in self.by_worker.values():
            for kind, n in counts.items():
                out[kind] = out.get(kind, 0) + n
        return out
