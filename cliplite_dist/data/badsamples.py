"""Bad data, counted by kind and by shard: what was skipped, where, and whether a run should stop.

A week-long run must survive a truncated tar or a dead mirror, but it must not train for days on
a corpus that is mostly broken either. Readers count what they skip (never silently, never with a
sleep); the training process sums the counts of all its readers, logs them, and stops the run
once the bad fraction passes `data.max_bad_fraction`, naming the shards that did the most harm.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

# What each kind of bad data means: a whole shard lost, or one sample lost.
SHARD_KINDS = {
    "missing_shard": "the shard does not exist",
    "unreachable": "its server did not answer, or its pipe: command failed",
    "empty_shard": "zero bytes, or no sample in it",
    "corrupt_shard": "cut short or not a tar (the samples before the damage are kept)",
}
SAMPLE_KINDS = {
    "image": "an image does not decode, or is absent",
    "no_caption": "a caption is missing or empty",
    "bad_caption": "a caption is not UTF-8, or not valid JSON",
}
BAD_KINDS = (*SHARD_KINDS, *SAMPLE_KINDS)
_LOST_BEFORE_OPEN = ("missing_shard", "unreachable")  # shards that never got opened
WORST_KEPT = 10  # shards per reader reported with each batch
MIN_SAMPLES_TO_JUDGE = 100  # no fraction is judged on fewer samples ...
MIN_SHARDS_TO_JUDGE = 4  # ... or on fewer shards than this


class BadDataCounter:
    """One reader's counts: good samples, shards opened, bad ones per kind and per shard URL."""

    def __init__(self, max_logged: int = 5):
        self.counts: Counter = Counter()
        self.by_shard: Counter = Counter()
        self.kinds_by_shard: dict[str, Counter] = {}  # this reader's own, for its error messages
        self.good = 0
        self.shards_opened = 0
        self.max_logged = max_logged

    def record(self, kind: str, url: str, where: str, exc: BaseException | str) -> None:
        """Count one bad shard or sample; the first few of each kind are logged with the cause."""
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-data kind {kind!r}")
        self.counts[kind] += 1
        self.by_shard[url] += 1
        self.kinds_by_shard.setdefault(url, Counter())[kind] += 1
        if self.counts[kind] <= self.max_logged:
            log.warning("skipping bad data (%s) at %s: %s", kind, where, exc)

    def explain(self, url: str) -> str:
        """What went wrong with one shard, kind by kind, in words."""
        kinds = self.kinds_by_shard.get(url)
        if not kinds:
            return "no usable sample (nothing counted as bad)"
        meaning = {**SHARD_KINDS, **SAMPLE_KINDS}
        return "; ".join(f"{kind} x{n}: {meaning[kind]}" for kind, n in kinds.most_common())

    def snapshot(self) -> dict:
        """Plain data that rides along with a batch and is saved with checkpoints."""
        return {"counts": dict(self.counts), "good": self.good, "shards_opened": self.shards_opened,
                "by_shard": dict(self.by_shard.most_common(WORST_KEPT))}

    @classmethod
    def from_snapshot(cls, snapshot: dict | None) -> "BadDataCounter":
        counter = cls()
        if snapshot:
            counter.counts.update(snapshot["counts"])
            counter.by_shard.update(snapshot["by_shard"])
            counter.good, counter.shards_opened = snapshot["good"], snapshot["shards_opened"]
        return counter


class BadDataTally:
    """The training process's sum over its readers. Each reader's snapshot is cumulative, so the
    newest one per reader replaces the last; readers of earlier epochs keep their final counts."""

    def __init__(self, by_reader: dict | None = None):
        self.by_reader: dict[tuple[int, int], dict] = dict(by_reader or {})

    def update(self, reader: tuple[int, int], snapshot: dict) -> None:
        self.by_reader[tuple(reader)] = snapshot

    def totals(self) -> dict[str, int]:
        """Bad counts per kind plus `good` and `shards_opened`, over every reader of this rank."""
        out = {kind: 0 for kind in BAD_KINDS}
        out.update(good=0, shards_opened=0)
        for snapshot in self.by_reader.values():
            for kind, n in snapshot["counts"].items():
                out[kind] += n
            out["good"] += snapshot["good"]
            out["shards_opened"] += snapshot["shards_opened"]
        return out

    def worst_shards(self) -> Counter:
        worst: Counter = Counter()
        for snapshot in self.by_reader.values():
            worst.update(snapshot["by_shard"])
        return worst


def fractions(totals: dict[str, float]) -> tuple[float, float]:
    """(bad samples / samples read, lost shards / shards tried); 0 until enough was read to judge."""
    bad_samples = sum(totals[k] for k in SAMPLE_KINDS)
    samples = totals["good"] + bad_samples
    lost_shards = sum(totals[k] for k in SHARD_KINDS)
    tried = totals["shards_opened"] + sum(totals[k] for k in _LOST_BEFORE_OPEN)
    sample_fraction = bad_samples / samples if samples >= MIN_SAMPLES_TO_JUDGE else 0.0
    shard_fraction = lost_shards / tried if tried >= MIN_SHARDS_TO_JUDGE else 0.0
    return sample_fraction, shard_fraction


class TooMuchBadData(RuntimeError):
    """The bad fraction passed data.max_bad_fraction; the message names the worst shards."""


def exceeds(totals: dict[str, float], limit: float) -> bool:
    return max(fractions(totals)) > limit


def too_much_bad_data(totals: dict[str, float], worst: Counter, limit: float) -> TooMuchBadData:
    """The error to stop with: what was lost, of how much, and the worst shards."""
    sample_fraction, shard_fraction = fractions(totals)
    kinds = ", ".join(f"{k} {int(totals[k])}" for k in BAD_KINDS if totals[k])
    shards = "\n  ".join(f"{url}: {n} bad" for url, n in worst.most_common(WORST_KEPT))
    samples = int(totals["good"] + sum(totals[k] for k in SAMPLE_KINDS))
    return TooMuchBadData(
        f"bad data above data.max_bad_fraction={limit}: {sample_fraction:.1%} of {samples} samples and "
        f"{shard_fraction:.1%} of the shards tried were lost ({kinds}). Worst shards:\n  {shards}\n"
        f"Fix or drop these shards (cliplite-prep stats rescans a directory), or raise data.max_bad_fraction.")
