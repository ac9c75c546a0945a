"""Writing shards and their sidecars so that a reader never sees half a file.

Shared by every writer of shards (the synthetic corpus, corpus preparation): a shard is written
under a temporary name and renamed when complete, so an interrupted writer never leaves a
truncated `.tar` that looks whole, and `sizes.json` (shard name -> sample count, which the shard
reader uses for epoch lengths) is replaced in one step.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import posixpath
import tarfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

SIZES_NAME = "sizes.json"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata (mtime, owner), so shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_tar(path: pathlib.Path, samples) -> int:
    """Write samples ({"__key__": key, ext: bytes, ...}; members in the dict's order) to a
    temporary name, rename when complete: a final name always means a whole shard. Returns the
    number of samples written."""
    tmp, count = _tmp_name(path), 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.items():
                    if ext != "__key__":
                        _add_member(tar, f"{sample['__key__']}.{ext}", data)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def write_text(path, text: str) -> None:
    """Replace a small text file atomically (readers may be polling it). A local path or file://
    URL goes through a temporary name and a rename; on an object store (s3://, gs:// ...) one
    upload already replaces the object whole."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(fs_path, text.encode("utf-8"))
        return
    local = pathlib.Path(fs_path)
    tmp = _tmp_name(local)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_sizes(directory, counts: dict[str, int]) -> None:
    """Replace `directory/sizes.json` with `counts` (shard basename -> samples), sorted by name."""
    text = json.dumps(dict(sorted(counts.items())), indent=1) + "\n"
    write_text(posixpath.join(str(directory), SIZES_NAME), text)
