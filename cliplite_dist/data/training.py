"""The trainer's one door to its data: `TrainingData` turns `cfg.data`, the towers' preprocessing
and the rank's place in the job into device-ready batches, and keeps what a checkpoint needs to
continue them (every reader's position and bad-data counts).

Behind it, two layers: where samples come from (`shards`, `slots`, `reader`, `badsamples`: which
shards, in which order, from which position, what was bad) and how a batch is made fast
(`pipeline`, `transforms`, `handoff`: decode, crop, tokenize, hand over through shared memory).
Nothing else of `data/` is the trainer's business.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from cliplite_dist import stopping
from cliplite_dist.config import DataConfig
from cliplite_dist.data.augment import PRESETS
from cliplite_dist.data.badsamples import (BAD_KINDS, SAMPLE_KINDS, TooMuchBadData, exceeds, fractions,
                                           too_much_bad_data)
from cliplite_dist.data.pipeline import (BatchInfo, DataProgress, SampleDecoder, SharedMemoryShortfall, BatchStream,
                                         as_raised, check_shared_memory, make_loader)
from cliplite_dist.data.shards import Corpus, all_urls, count_samples, resolve_corpora
from cliplite_dist.data.slots import EmptyStreamError, SlotPosition, stable_seed
from cliplite_dist.data.synthetic import ensure_corpus
from cliplite_dist.data.tokens import BatchTokenizer
from cliplite_dist.data.transforms import DeviceTransform, decode_uint8, uint8_train_transform
from cliplite_dist.distributed import DistEnv
from cliplite_dist.shardspec import ShardError

__all__ = ["TrainingData", "Fetched", "DATA_ERRORS", "EmptyStreamError", "SharedMemoryShortfall",
           "check_shared_memory", "find_corpora", "write_synthetic_corpus"]

# Errors that mean the data cannot be read (or too much of it is bad): a requeue would fail the same way.
DATA_ERRORS = (EmptyStreamError, TooMuchBadData, ShardError)

log = logging.getLogger("cliplite_dist")


def find_corpora(cfg: DataConfig) -> tuple[list[Corpus], list[str]]:
    """The training corpora with their shard lists, and warnings (unreachable shards) to log.
    Raises ShardError naming the pattern, bucket or host that does not resolve."""
    return resolve_corpora(cfg.train, cfg.train_weights, cfg.connect_timeout_s)


def write_synthetic_corpus(cfg: DataConfig) -> None:
    """Write the recipe's synthetic corpus, if it has one and it is not complete (one rank only)."""
    ensure_corpus(cfg.synthetic)


@dataclass
class Fetched:
    """One micro-batch as the loader made it, not yet taken: a stop agreed on after fetching it
    leaves the saved data positions before it. Its epoch and reader ride in `info`."""

    images: torch.Tensor | object  # uint8 images, or imagebatch.RaggedImages for the device to crop
    tokens: torch.Tensor
    info: BatchInfo


class TrainingData:
    """Endless micro-batches for one rank, epoch after epoch; the trainer takes the same number
    (`batches_per_epoch`) of every rank's, which keeps the ranks' collectives in step."""

    def __init__(self, cfg: DataConfig, towers, env: DistEnv, device: torch.device, input_dtype: torch.dtype,
                 seed: int, run_dir: Path, found: tuple[list[Corpus], list[str]] | None = None):
        """`towers`: a models.Towers (its train transform and tokenizer); `found`: what
        `find_corpora` returned before the rendezvous, if it ran then."""
        corpora, warnings = found or find_corpora(cfg)
        for warning in warnings:
            log.warning(warning)
        self.cfg, self.env, self.device = cfg, env, device
        self.num_samples = cfg.samples_per_epoch or cfg.num_samples or count_samples(all_urls(corpora))
        self.batches_per_epoch = max(1, self.num_samples // (cfg.batch_size * env.world_size))
        resize_in_worker = cfg.resize_on == "worker" or (cfg.resize_on == "auto" and device.type != "cuda")
        transform = uint8_train_transform(towers.train_transform, resize=resize_in_worker, augment=PRESETS[cfg.augment])
        decoder = SampleDecoder(transform, cfg.caption_key, tuple(cfg.image_keys.split(";")), decode=decode_uint8)
        self.device_transform = DeviceTransform(towers.train_transform, device, input_dtype,
                                                resizes=not resize_in_worker)
        self.stream = BatchStream(corpora, cfg, decoder, BatchTokenizer(towers.tokenizer), env.rank, env.world_size,
                                  seed)
        self.loader = make_loader(self.stream, cfg.workers, pin_memory=device.type == "cuda")
        self.progress = DataProgress(max(1, cfg.workers), env.world_size)
        self.train_seed = seed
        self.epoch = 0  # of the newest batch taken
        self.fresh_order = False  # set on resume where positions cannot be continued
        self.wait_s = 0.0  # spent waiting for batches since the last log line (`health`)
        self._iterator: Iterator[Fetched] | None = None
        self.keys_file = None
        if cfg.record_keys:
            (run_dir / "data").mkdir(exist_ok=True)
            self.keys_file = open(run_dir / "data" / f"keys-rank{env.rank}.jsonl", "a", encoding="utf-8")

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"data": self.progress.state_dict(), "data_seed": self.stream.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue each reader where the checkpoint left it. Resampled streams, and checkpoints
        whose readers do not match this run's (other world size or worker count), continue with a
        fresh data seed instead, recorded in later checkpoints: a new order, never a replay."""
        why = self.progress.load_state_dict(state["data"]) if "data" in state else "no data position saved"
        seed = state.get("data_seed", self.stream.seed)
        if self.cfg.resampled or why:
            seed = stable_seed(self.train_seed, "restart", state["step"])
            self.fresh_order = True
            log.warning("data: %s; continuing with fresh data seed %d", why or "resampled stream", seed)
        self.stream.seed = seed

    # ---- batches ----------------------------------------------------------------------------
    def start(self, micro: int) -> None:
        """Read from global micro-batch index `micro` on (0, or where a checkpoint stopped)."""
        self.epoch = micro // self.batches_per_epoch
        self._iterator = self._batches(micro)

    def _batches(self, micro: int) -> Iterator[Fetched]:
        readers = self.progress.readers
        while True:
            epoch, within = divmod(micro, self.batches_per_epoch)
            starts = self.progress.starts(epoch)
            if self.fresh_order:  # keep the bad-data counts, not the positions
                starts = {r: (SlotPosition(), bad) for r, (_, bad) in starts.items()}
                self.fresh_order = False
            self.stream.set_epoch(epoch, first_reader=within % readers, starts=starts)
            with stopping.held():  # forks the epoch's loader workers
                iterator = iter(self.loader)
            for _ in range(within, self.batches_per_epoch):
                images, tokens, info = next(iterator)
                yield Fetched(images, tokens, info)
                micro += 1
            del iterator  # shuts the epoch's workers down

    def fetch(self) -> tuple[Fetched | None, Exception | None]:
        """The next micro-batch and None, or None and the error that kept this rank from getting
        one (every rank must hear of it, or the others wait in a collective)."""
        began = time.perf_counter()
        try:
            return next(self._iterator), None
        except Exception as exc:
            return None, as_raised(exc)
        finally:
            self.wait_s += time.perf_counter() - began

    def take(self, batch: Fetched, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, token ids) on the device, ready for the towers; from here the batch counts as
        read (checkpoints continue after it) and its loader worker may reuse its memory."""
        info = batch.info
        self.progress.update(info)
        self.epoch = info.epoch
        if self.keys_file is not None:
            self.keys_file.write(json.dumps({"step": step, "keys": info.keys}) + "\n")
        images = self.device_transform(batch.images.to(self.device, non_blocking=True), info.augment)
        tokens = batch.tokens.to(self.device, non_blocking=True, copy=True)
        info.release()  # both copied: the worker may write its next batch over them
        return images, tokens

    # ---- the data's health over all ranks -----------------------------------------------------
    def health(self, window_s: float) -> tuple[dict[str, float], list[float], TooMuchBadData | None]:
        """Collective, at each log line: the bad-data counts of all ranks (TensorBoard's data/
        scalars); each rank's fraction of the last `window_s` seconds spent waiting for batches
        (the ranks wait for the slowest one in every step, so a node with slow storage or too few
        cores shows here); and the error to stop with once the bad fraction passes
        data.max_bad_fraction (the same on every rank). One all-reduce carries both. Also flushes
        the key record (data.record_keys) to disk."""
        totals = self.progress.tally.totals()
        names = list(totals)
        waits = [0.0] * self.env.world_size
        waits[self.env.rank], self.wait_s = self.wait_s / window_s, 0.0
        summed = torch.tensor([totals[n] for n in names] + waits, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        values = summed.tolist()
        totals, waits = dict(zip(names, values)), values[len(names):]
        sample_fraction, shard_fraction = fractions(totals)
        metrics = {f"data/bad_{kind}": totals[kind] for kind in BAD_KINDS}
        metrics.update({"data/bad_sample_fraction": sample_fraction, "data/lost_shard_fraction": shard_fraction,
                        "data/samples_read": totals["good"] + sum(totals[k] for k in SAMPLE_KINDS)})
        if self.keys_file is not None:
            self.keys_file.flush()
        if not exceeds(totals, self.cfg.max_bad_fraction):
            return metrics, waits, None
        worst = [None] * self.env.world_size
        dist.all_gather_object(worst, self.progress.tally.worst_shards())
        return metrics, waits, too_much_bad_data(totals, sum(worst, Counter()), self.cfg.max_bad_fraction)

    @staticmethod
    def bad_count(metrics: dict[str, float]) -> int:
        """All bad samples and lost shards in `health()`'s metrics."""
        return int(sum(metrics[f"data/bad_{kind}"] for kind in BAD_KINDS))

    def close(self) -> None:
        """Flush the key record (also on the way out of an error)."""
        if self.keys_file is not None:
            self.keys_file.close()
            self.keys_file = None
