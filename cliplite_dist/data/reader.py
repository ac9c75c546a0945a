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
import struct
import zlib
from typing import Callable, Iterable, Iterator

from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.opener import ShardOpener
from cliplite_dist.data.shards import is_missing


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, field) of a tar member, or None for names without a field (skipped)."""
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), field.lower()


BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"


class BrokenTar(ValueError):
    """A tar stream that ends mid-member, or whose header does not check out."""


def _byte_sum(header) -> int:
    """The ustar checksum of a header (bytes, or a memoryview of one): the sum of its bytes with
    the checksum field read as spaces. Summed by zlib.adler32, whose low half is 1 + the byte sum
    modulo 65521: exact for pieces whose bytes sum below that (at most 255 per byte: 148, 244 and
    112 bytes), and a tenth of the cost of Python's sum() over 512 bytes, which was a fifth of
    reading a small sample."""
    return ((zlib.adler32(header[:148]) & 0xFFFF) + (zlib.adler32(header[156:400]) & 0xFFFF)
            + (zlib.adler32(header[400:BLOCK]) & 0xFFFF) - 3 + 8 * 32)


def _octal(field: bytes) -> int:
    """A numeric header field: octal digits ended by NUL or space, or GNU base-256."""
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.partition(b"\0")[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("LEN key=value\n" records), if it has one."""
    for line in records.split(b"\n"):
        _, _, keyvalue = line.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


# The header fields the reader uses, in one unpack: name, size, checksum, type, magic, prefix.
_HEADER = struct.Struct("100s24x12s12x8s1s100x6s2x80x155s")
_NO_CHECKSUM = bytes(8)
CHUNK = 1 << 20  # bytes read from the stream at a time (a member is a few slices of one chunk)


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream (gzip-compressed too), in order.

    Our own reader instead of tarfile's: a shard is read once per epoch by every reader, and
    tarfile's header parsing was most of a 64 px sample's read time. It knows ustar names with
    prefixes, GNU long names and pax `path` records, and verifies every header's checksum; other
    member types (directories, links) are skipped. Headers are parsed in place in 1 MiB chunks
    (one struct unpack, checksums over memoryview slices); only a member's data is copied out.
    Raises BrokenTar for a stream cut anywhere before its end-of-archive blocks or a bad header;
    an empty stream yields nothing.
    """
    buffer = stream.read(BLOCK)
    if buffer[:2] == _GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=_Prefixed(buffer, stream))
        buffer = b""
    pos, long_name, started = 0, None, False
    while True:
        while len(buffer) - pos < BLOCK:  # streams may return less than asked before their end
            more = stream.read(CHUNK)
            if not more:
                break
            buffer, pos = buffer[pos:] + more, 0
        if pos == len(buffer):  # nothing more: fine before the first header, cut short after it
            if started:
                raise BrokenTar("stream ends without the end-of-archive blocks (truncated)")
            return
        if len(buffer) - pos < BLOCK:
            raise BrokenTar(f"stream ends inside a header ({len(buffer) - pos} of {BLOCK} bytes)")
        started = True
        name, size, checksum, kind, magic, prefix = _HEADER.unpack_from(buffer, pos)
        if checksum == _NO_CHECKSUM and buffer.count(0, pos, pos + BLOCK) == BLOCK:  # end-of-archive
            return
        if _octal(checksum) != _byte_sum(memoryview(buffer)[pos:pos + BLOCK]):
            raise BrokenTar("header checksum mismatch (not a tar, or corrupted)")
        size = _octal(size)
        start, end = pos + BLOCK, pos + BLOCK + -(-size // BLOCK) * BLOCK
        while len(buffer) < end:
            more = stream.read(max(CHUNK, end - len(buffer)))
            if not more:
                break
            buffer, start, end, pos = buffer[pos:] + more, start - pos, end - pos, 0
        if len(buffer) < start + size:
            raise BrokenTar(f"stream ends inside a member ({len(buffer) - start} of {size} bytes)")
        data, pos = buffer[start:start + size], min(end, len(buffer))
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0"):
            if long_name is None:
                name = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = prefix.split(b"\0", 1)[0] if magic[:5] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            else:
                name, long_name = long_name, None
            yield name, data
        else:
            long_name = None


class _Prefixed:
    """A stream with bytes already read from it put back in front (for GzipFile)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


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
