"""Shard lists: URL patterns, corpus joining, sample counts and the split over ranks and workers.

A shard spec is one or more corpora joined with `::`; each is a brace pattern
(`s3://b/cc3m/{00000..00331}.tar`), a single URL, or a directory holding shards (img2dataset
output included: only shards with a `_stats.json` are complete, and failed shards leave gaps).
"""
from __future__ import annotations

import json
import posixpath
import signal
import subprocess
from dataclasses import dataclass

import braceexpand
import fsspec


PIPE_PREFIX = "pipe:"  # a shard URL that is a shell command (data.allow_pipe)


class ShardError(ValueError):
    """A shard spec that names nothing readable; the message says which part."""


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


def expand_urls(spec: str) -> list[str]:
    """All shard URLs named by `spec`, in order, corpora joined with `::`."""
    urls: list[str] = []
    for corpus in spec.split("::"):
        corpus = corpus.strip()
        if not corpus:
            raise ShardError(f"empty corpus in shard spec {spec!r}")
        expanded = list(braceexpand.braceexpand(corpus))
        if corpus.startswith(PIPE_PREFIX):
            urls.extend(expanded)
        elif len(expanded) == 1 and not expanded[0].endswith(".tar") and _is_dir(expanded[0]):
            urls.extend(_shards_in_dir(expanded[0]))
        else:
            urls.extend(expanded)
    return urls


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


class PipeStream:
    """The standard output of a `pipe:COMMAND` shard URL, read like a file. Closing it waits for
    the command and raises if it failed; a command stopped by SIGPIPE because the reader stopped
    early (e.g. at the end of an epoch's share) did not fail."""

    EARLY_STOP = (-signal.SIGPIPE, 128 + signal.SIGPIPE)  # killed directly, or reported by the shell

    def __init__(self, url: str):
        self.command = url[len(PIPE_PREFIX):]
        self._proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.read = self._proc.stdout.read

    def close(self, timeout_s: float = 30) -> None:
        self._proc.stdout.close()
        try:
            _, stderr = self._proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise OSError(f"pipe command {self.command!r} did not exit within {timeout_s:.0f} s of its "
                          f"output being closed; killed") from None
        code = self._proc.returncode
        if code != 0 and code not in self.EARLY_STOP:
            tail = stderr.decode("utf-8", "replace").strip()[-300:]
            raise OSError(f"pipe command {self.command!r} exited with status {code}: {tail}")


def open_shard(url: str):
    """A binary stream of one shard: `pipe:` URLs run their command (only where the recipe set
    data.allow_pipe; the config refuses them otherwise), anything else goes through fsspec
    (local paths, file://, http(s)://, s3://, gs:// ...)."""
    if url.startswith(PIPE_PREFIX):
        return PipeStream(url)
    return fsspec.open(url, "rb").open()


def uses_pipe(spec: str) -> bool:
    return any(corpus.strip().startswith(PIPE_PREFIX) for corpus in spec.split("::"))


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
