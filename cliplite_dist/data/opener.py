"""Opening one shard as a binary stream: fsspec for URLs, a shell command for `pipe:`, and an
optional local cache so that later epochs of a remote corpus read from node-local disk.

Every stream returned here is closed by the reader, whatever happens (webdataset leaves them open).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import fsspec

from cliplite_dist.config import is_remote
from cliplite_dist.shardspec import PIPE_PREFIX


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


def cache_path(cache_dir: str, url: str) -> Path:
    """Where `url` is cached: its basename behind a hash of the whole URL, so that `a/00000.tar`
    and `b/00000.tar` (two corpora numbered alike) never collide."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}-{posixpath.basename(url)}"


class CachingReader:
    """Reads a remote shard while writing a copy beside the cache; the copy becomes the cached
    shard on close only if it holds every byte of the remote file (the rest is read on close, so
    a reader that stopped early still completes the copy). Otherwise the partial copy is removed."""

    def __init__(self, source, size: int | None, target: Path):
        self.source, self.size, self.target = source, size, target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        self.copy = open(self.partial, "wb")
        self.written = 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.copy.write(data)
        self.written += len(data)
        return data

    def close(self) -> None:
        try:
            if self.size is not None:
                while self.written < self.size and self.read(1 << 20):
                    pass
        finally:
            self.copy.close()
            self.source.close()
            if self.size is not None and self.written == self.size:
                os.replace(self.partial, self.target)
            else:
                self.partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardOpener:
    """Opens shard URLs. `pipe:` URLs run their command (only where the recipe set
    data.allow_pipe; the config refuses them otherwise); anything else goes through fsspec (local
    paths, file://, http(s)://, s3://, gs:// ...). With `cache_dir`, remote shards are kept there
    after their first complete read and opened from disk afterwards."""

    cache_dir: str = ""

    def __call__(self, url: str):
        if url.startswith(PIPE_PREFIX):
            return PipeStream(url)
        if not self.cache_dir or not is_remote(url):
            return fsspec.open(url, "rb").open()
        cached = cache_path(self.cache_dir, url)
        if cached.exists():
            return open(cached, "rb")
        remote = fsspec.open(url, "rb").open()
        return CachingReader(remote, getattr(remote, "size", None), cached)
