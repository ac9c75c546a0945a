"""One reader's share of an epoch, in an order that can be continued exactly after a restart.

A "slot" is one data-loader worker of one rank. Its samples come from shards in an order seeded
by (seed, epoch, pass) and pass through shuffle blocks seeded by (seed, epoch, slot, block).
Because every choice is a function of those numbers, a `SlotPosition` (which pass, which shard,
how far into it, which block, how many of the block were handed on) is all a checkpoint needs:
re-reading from the block's start and reshuffling it gives back the very same remaining samples.

A streaming shuffle buffer would need its contents saved; a block shuffle needs four integers.
Both mix samples over the same distance (about one buffer), and shard order is shuffled anyway.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.reader import read_shard
from cliplite_dist.data.shards import Corpus, SlotShare, all_urls, share_for_slot


class EmptyStreamError(RuntimeError):
    """A full pass over a reader's shards produced no usable sample: fail fast instead of hanging."""


def stable_seed(*parts) -> int:
    """A seed from parts that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(repr(parts).encode())


@dataclass(frozen=True)
class SlotPosition:
    """Where a slot is within its epoch; plain integers, saved with every checkpoint."""

    pass_index: int = 0  # pass over the slot's share (epoch mode) or shard draw (resampled mode)
    shard_index: int = 0  # shard within that pass's share
    sample_index: int = 0  # raw samples of that shard before the current block starts
    block: int = 0  # shuffle blocks begun in this epoch
    taken: int = 0  # samples of the current block already handed on

    def to_dict(self) -> dict:
        return asdict(self)


class SlotReader:
    """Raw samples of one slot for one epoch, each with the position just after it.

    Epoch mode: pass after pass over the slot's share of all shards (each pass in a new order),
    for as long as the trainer asks; the trainer takes the same number of batches from every rank.
    Resampled mode: one corpus drawn by weight, then one of its shards uniformly, per pass.
    """

    def __init__(self, corpora: list[Corpus], resampled: bool, block_size: int, seed: int, epoch: int,
                 slot: int, num_slots: int, counter: BadDataCounter, opener: Callable):
        self.corpora, self.resampled, self.block_size = corpora, resampled, max(1, block_size)
        self.seed, self.epoch, self.slot, self.num_slots = seed, epoch, slot, num_slots
        self.counter, self.opener = counter, opener
        self.urls = all_urls(corpora)

    def share(self, pass_index: int) -> SlotShare:
        if self.resampled:
            rng = random.Random(stable_seed(self.seed, self.epoch, self.slot, pass_index))
            corpus = rng.choices(self.corpora, weights=[c.weight for c in self.corpora])[0]
            return SlotShare((rng.choice(corpus.urls),))
        order = list(self.urls)
        random.Random(stable_seed(self.seed, self.epoch, pass_index)).shuffle(order)
        return share_for_slot(order, self.slot, self.num_slots)

    def dry_limit(self, share: SlotShare) -> int:
        """Shards in a row that may give nothing before the reader gives up: a whole pass over its
        share, and at least the corpus (up to 64 shards), so that a few empty shards drawn in a
        row by a reader with a small share do not end a run whose corpus is mostly fine."""
        return max(len(share.urls), min(len(self.urls), 64))

    def _raw(self, start: SlotPosition) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        """Samples from `start` on, each with the (pass, shard, sample) cursor just past it."""
        pass_index, shard_index, sample_index = start.pass_index, start.shard_index, start.sample_index
        dry: list[str] = []  # shards in a row that gave this slot nothing
        while True:
            share = self.share(pass_index)
            while shard_index < len(share.urls):
                url = share.urls[shard_index]
                got = False
                for index, sample in enumerate(read_shard(url, self.counter, self.opener)):
                    if index >= sample_index and index % share.sample_stride == share.sample_offset:
                        got = True
                        yield sample, (pass_index, shard_index, index + 1)
                dry = [] if got or sample_index else dry + [url]
                if len(dry) >= self.dry_limit(share):
                    raise EmptyStreamError(self._nothing_readable(dry))
                shard_index, sample_index = shard_index + 1, 0
            pass_index, shard_index = pass_index + 1, 0

    def _nothing_readable(self, dry: list[str]) -> str:
        """The error for a reader that gave up: every shard it tried and what was wrong with it."""
        shards = "\n  ".join(f"{url}: {self.counter.explain(url)}" for url in dict.fromkeys(dry))
        return (f"data reader {self.slot} of {self.num_slots} got no sample from {len(dry)} shard(s) in a row "
                f"(bad so far: {dict(self.counter.counts)}):\n  {shards}\nCheck data.train and these shards "
                f"(cliplite-prep stats rescans a directory).")

    def samples(self, start: SlotPosition = SlotPosition()) -> Iterator[tuple[dict, SlotPosition]]:
        """Shuffled samples from `start` on, each with the position that continues after it."""
        raw = self._raw(start)
        cursor = (start.pass_index, start.shard_index, start.sample_index)
        block_index, skip = start.block, start.taken
        while True:
            block, next_cursor = [], cursor
            for sample, next_cursor in raw:
                block.append(sample)
                if len(block) == self.block_size:
                    break
            random.Random(stable_seed(self.seed, self.epoch, self.slot, block_index)).shuffle(block)
            for taken in range(skip, len(block)):
                yield block[taken], SlotPosition(*cursor, block=block_index, taken=taken + 1)
            block_index, skip, cursor = block_index + 1, 0, next_cursor
