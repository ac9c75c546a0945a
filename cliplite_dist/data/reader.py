"""Reading shards: walk a tar's members in stream order, group them into samples, and say what
went wrong, by kind.

webdataset's tar expander (tarfile underneath) reports every failure alike, and its default
handler ends the run; a long run needs to know whether a shard was missing, its server
unreachable, or the file empty or cut short, and to keep the samples that came before the
damage. Sample keys follow webdataset's convention: the member path up to the first dot of its
basename; the rest, lower-cased, names the field (`000123.jpg` -> key `000123`, field `jpg`).
"""
from __future__ import annotations

import gzip
import zlib
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


BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"


class BrokenTar(ValueError):
    """A tar stream that ends mid-member, or whose header does not check out."""


class _Blocks:
    """Exact-size reads from a stream, served from 1 MiB chunks (a member is a few small reads)."""

    CHUNK = 1 << 20

    def __init__(self, stream, head: bytes = b""):
        self.stream, self.buffer, self.pos = stream, head, 0

    def read(self, n: int) -> bytes:
        """`n` bytes, or fewer only at the end of the stream."""
        while len(self.buffer) - self.pos < n:
            more = self.stream.read(max(self.CHUNK, n))
            if not more:
                break
            self.buffer = self.buffer[self.pos:] + more
            self.pos = 0
        out = self.buffer[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _byte_sum(header: bytes) -> int:
    """The ustar checksum of a header: the sum of its bytes with the checksum field read as
    spaces. Summed by zlib.adler32, whose low half is 1 + the byte sum modulo 65521: exact for
    pieces whose bytes sum below that (at most 255 per byte: 148, 244 and 112 bytes), and a tenth
    of the cost of Python's sum() over 512 bytes, which was a fifth of reading a small sample."""
    return ((zlib.adler32(header[:148]) & 0xFFFF) + (zlib.adler32(header[156:400]) & 0xFFFF)
            + (zlib.adler32(header[400:BLOCK]) & 0xFFFF) - 3 + 8 * 32)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("LEN key=value\n" records), if it has one."""
    for line in records.split(b"\n"):
        _, _, keyvalue = line.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream (gzip-compressed too), in order.

    Our own reader instead of tarfile's: a shard is read once per epoch by every reader, and
    tarfile's header parsing was most of a 64 px sample's read time. It knows ustar names with
    prefixes, GNU long names and pax `path` records, and verifies every header's checksum; other
    member types (directories, links) are skipped. Raises BrokenTar for a stream cut anywhere
    before its end-of-archive blocks or a bad header; an empty stream yields nothing.
    """
    head = stream.read(BLOCK)
    if head[:2] == _GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=_Blocks(stream, head))
        head = b""
    blocks = _Blocks(stream, head)
    long_name, started = None, False
    while True:
        header = blocks.read(BLOCK)
        if header.count(0) == len(header) == BLOCK:  # the end-of-archive blocks
            return
        if not header:  # zero bytes: nothing to read; a tar that stops without its end: cut short
            if started:
                raise BrokenTar("stream ends without the end-of-archive blocks (truncated)")
            return
        started = True
        if len(header) < BLOCK:
            raise BrokenTar(f"stream ends inside a header ({len(header)} of {BLOCK} bytes)")
        if _octal(header[148:156]) != _byte_sum(header):
            raise BrokenTar("header checksum mismatch (not a tar, or corrupted)")
        size, kind = _octal(header[124:136]), header[156:157]
        data = blocks.read(-(-size // BLOCK) * BLOCK)
        if len(data) < size:
            raise BrokenTar(f"stream ends inside a member ({len(data)} of {size} bytes)")
        data = data[:size]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0"):
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            long_name = None
            yield name, data
        else:
            long_name = None


def _grouped(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Samples of consecutive members sharing a key; the last one is yielded only once the
    archive ended cleanly (an error while reading it propagates first)."""
    current: dict | None = None
    for name, data in members:
        parts = split_member_name(name)
        if parts is None:
            continue
        key, field = parts
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
        for sample in _grouped(tar_members(stream), url):
            samples += 1
            yield sample
        if samples == 0:
            counter.record("empty_shard", url, url, "no samples (zero bytes, or an empty archive)")
    except (BrokenTar, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        counter.record("corrupt_shard", url, f"{url} after {samples} sample(s)", f"{exc} (truncated, or not a tar)")
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
