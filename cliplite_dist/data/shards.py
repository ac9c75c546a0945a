"""Shard lists: URL patterns, corpus joining, sample counts and the split over ranks and workers.

A shard spec is one or more corpora joined with `::`; each is a brace pattern
(`s3://b/cc3m/{00000..00331}.tar`), a single URL, or a directory holding shards (img2dataset
output included: only shards with a `_stats.json` are complete, and failed shards leave gaps).
"""
from __future__ import annotations

import json
import posixpath
import threading
from dataclasses import dataclass

import braceexpand
import fsspec

from cliplite_dist.shardspec import PIPE_PREFIX, ShardError, parse_weights, split_corpora

def _is_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path)


def _unstrip(url: str, fs, path: str) -> str:
    """fsspec listings drop the protocol; put it back so workers open the same filesystem."""
    return fs.unstrip_protocol(path) if "://" in url else path


def _shards_in_dir(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    names = sorted(fs.ls(path, detail=False))
    stats = [n for n in names if n.endswith("_stats.json")]
    if stats:  # img2dataset: a shard is complete only when its stats file exists
        tars = [n[: -len("_stats.json")] + ".tar" for n in stats]
        tars = [t for t in tars if fs.exists(t)]
    else:
        tars = [n for n in names if n.endswith(".tar")]
    if not tars:
        raise ShardError(f"no .tar shards in directory {url!r}")
    return [_unstrip(url, fs, t) for t in tars]


@dataclass(frozen=True)
class Corpus:
    """Shards of one corpus and its weight in a resampled mix."""

    urls: tuple[str, ...]
    weight: float = 1.0


def _expand_corpus(corpus: str) -> list[str]:
    expanded = list(braceexpand.braceexpand(corpus))
    if corpus.startswith(PIPE_PREFIX):
        return expanded
    if len(expanded) == 1 and not expanded[0].endswith(".tar") and _is_dir(expanded[0]):
        return _shards_in_dir(expanded[0])
    return expanded


def expand_corpora(spec: str, weights: str = "") -> list[Corpus]:
    """The corpora named by `spec` (joined with `::`), each with its shards in order and weight."""
    return [Corpus(tuple(_expand_corpus(part)), weight)
            for part, weight in zip(split_corpora(spec), parse_weights(weights, spec))]


def all_urls(corpora: list[Corpus]) -> list[str]:
    """Every shard of `corpora`, in order."""
    return [url for corpus in corpora for url in corpus.urls]


def expand_urls(spec: str) -> list[str]:
    """All shard URLs named by `spec`, in order, corpora joined with `::`."""
    return all_urls(expand_corpora(spec))


def _sidecar_counts(directory: str) -> dict[str, int]:
    """Per-shard sample counts from `sizes.json` (our synth, open_clip) or img2dataset `_stats.json`."""
    fs, path = fsspec.core.url_to_fs(directory)
    sizes = posixpath.join(path, "sizes.json")
    if fs.exists(sizes):
        with fs.open(sizes, "r") as f:
            return {k: int(v) for k, v in json.load(f).items()}
    counts = {}
    for name in fs.glob(posixpath.join(path, "*_stats.json")):
        with fs.open(name, "r") as f:
            stats = json.load(f)
        shard = posixpath.basename(name)[: -len("_stats.json")] + ".tar"
        counts[shard] = int(stats.get("successes", stats.get("count", 0)))
    return counts


def count_samples(urls: list[str]) -> int:
    """Total samples of `urls` from the sidecar files beside them; error naming a shard without one."""
    total, cache = 0, {}
    for url in urls:
        if url.startswith(PIPE_PREFIX):
            raise ShardError(f"no sample count for {url!r}: pipe: shards have no sizes.json beside them; "
                             f"set data.num_samples")
        directory, name = posixpath.split(url)
        if directory not in cache:
            cache[directory] = _sidecar_counts(directory or ".")
        if name not in cache[directory]:
            raise ShardError(
                f"no sample count for shard {url!r}: set data.num_samples, or put a sizes.json "
                f"(shard name -> count) or img2dataset _stats.json files beside the shards")
        total += cache[directory][name]
    return total


@dataclass(frozen=True)
class SlotShare:
    """What one reader (a rank's data-loader worker) reads: its shards, and which samples of them.

    With at least as many shards as readers each reader owns whole shards. With fewer shards (a
    tiny corpus on many ranks) every reader opens all shards and keeps every n-th sample, so no
    reader sits empty and every rank still sees data.
    """

    urls: tuple[str, ...]
    sample_stride: int = 1
    sample_offset: int = 0


def share_for_slot(urls: list[str], slot: int, num_slots: int) -> SlotShare:
    if not urls:
        raise ShardError("no shards to read")
    if len(urls) >= num_slots:
        return SlotShare(tuple(urls[slot::num_slots]))
    return SlotShare(tuple(urls), sample_stride=num_slots, sample_offset=slot)


def _within(timeout_s: float, what: str, fn):
    """fn() in a daemon thread, so that a host that never answers cannot hang the caller (nor
    its exit); raises ShardError naming `what` after `timeout_s`."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="shard-check")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ShardError(f"no answer within {timeout_s:g} s while {what} (data.connect_timeout_s): "
                         f"is the host right and reachable from here?")
    if "error" in result:
        raise result["error"]
    return result["value"]


def is_missing(exc: BaseException) -> bool:
    """True where `exc` says the file does not exist. fsspec's HTTP filesystem reports a refused
    connection as FileNotFoundError too; its cause tells the two apart."""
    cause = exc.__cause__
    return isinstance(exc, FileNotFoundError) and not (isinstance(cause, OSError) and
                                                        not isinstance(cause, FileNotFoundError))


def _probe(url: str) -> str | None:
    """None if `url` exists, else why not."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.info(path)
        return None
    except Exception as exc:  # missing; or refused connection, DNS, permissions
        if is_missing(exc):
            return "does not exist"
        cause = exc.__cause__ or exc
        return f"cannot be reached ({type(cause).__name__}: {cause})"


def check_reachable(urls: list[str]) -> list[str]:
    """Looks up the first, middle and last shard (pipe: commands are not run). Raises ShardError
    when none of them can be read, so a misspelt bucket or host fails at start-up instead of
    after every reader has tried every shard; returns a warning for each one that is missing."""
    probed = [u for u in dict.fromkeys([urls[0], urls[len(urls) // 2], urls[-1]]) if not u.startswith(PIPE_PREFIX)]
    problems = {url: why for url in probed if (why := _probe(url))}
    if probed and len(problems) == len(probed):
        listing = "; ".join(f"{url} {why}" for url, why in problems.items())
        raise ShardError(f"none of the shards looked up can be read: {listing}. Check the bucket, host and "
                         f"path in data.train (and credentials: AWS_*/GOOGLE_* environment variables)")
    return [f"shard {url} {why}" for url, why in problems.items()]


def resolve_corpora(spec: str, weights: str, timeout_s: float) -> tuple[list[Corpus], list[str]]:
    """`expand_corpora` plus `check_reachable`, bounded by `timeout_s`: (corpora, warnings)."""
    def resolve():
        corpora = expand_corpora(spec, weights)
        return corpora, check_reachable(all_urls(corpora))

    return _within(timeout_s, f"listing and looking up the shards of {spec!r}", resolve)
