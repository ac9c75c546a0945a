"""Reading shards: walk a tar's members in stream order, group them into samples, and say what
went wrong, by kind.

webdataset's tar expander reports every failure alike (and its default handler ends the run);
a long run needs to know whether a shard was missing, its server unreachable, or the file empty
or cut short, and to keep the samples that came before the damage. Sample keys follow
webdataset's convention: the member path up to the first dot of its basename; the rest, lower-
cased, names the field (`000123.jpg` -> key `000123`, field `jpg`).
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterable, Iterator

from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.opener import ShardOpener
from cliplite_dist.data.shards import is_missing


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, field) of a tar member, or None for names without a field (skipped)."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, field = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def _grouped(tar: tarfile.TarFile, url: str) -> Iterator[dict]:
    """Samples of an open tar; the last one is yielded only once the archive ended cleanly."""
    current: dict | None = None
    for member in tar:
        parts = split_member_name(member.name) if member.isfile() else None
        if parts is None:
            continue
        key, field = parts
        data = tar.extractfile(member).read()
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[field] = data
    if current is not None:
        yield current


def read_shard(url: str, counter: BadDataCounter, opener: Callable = ShardOpener()) -> Iterator[dict]:
    """Raw samples (field -> bytes, plus `__key__`, `__url__`) of one shard. A shard that cannot
    be opened, holds nothing, or breaks part-way is counted; samples before the break are kept
    (the sample being read when it broke is dropped: it may be incomplete). The stream is closed
    however the reading ends, an early stop by the consumer included."""
    try:
        stream = opener(url)
    except Exception as exc:  # missing; or refused connection, DNS failure, timeout, permissions
        counter.record("missing_shard" if is_missing(exc) else "unreachable", url, url, exc.__cause__ or exc)
        return
    counter.shards_opened += 1
    samples = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for sample in _grouped(tar, url):
                samples += 1
                yield sample
        if samples == 0:
            counter.record("empty_shard", url, url, "no samples in the archive")
    except (tarfile.TarError, EOFError) as exc:
        kind = "empty_shard" if samples == 0 and "empty file" in str(exc) else "corrupt_shard"
        counter.record(kind, url, f"{url} after {samples} sample(s)", f"{exc} (truncated, or not a tar)")
    except OSError as exc:  # the connection dropped part-way
        counter.record("unreachable", url, f"{url} after {samples} sample(s)", exc)
    finally:
        try:
            stream.close()
        except OSError as exc:  # a pipe: command that failed
            counter.record("unreachable", url, url, exc)


def iterate_samples(urls: Iterable[str], counter: BadDataCounter,
                    opener: Callable = ShardOpener()) -> Iterator[dict]:
    """Raw samples of `urls`, shard after shard."""
    for url in urls:
        yield from read_shard(url, counter, opener)
