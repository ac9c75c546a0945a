"""Corpus preparation: captioned image collections -> webdataset shards `NNNNN.tar` + sizes.json.

Three sources:
- COCO captions: one sample per image keeping every caption (`KEY.json` {"captions": [...],
  "image_id", "file_name"}), so a recipe trains with `data.caption_key: json:captions` and the
  pipeline picks a fresh caption each step instead of repeating the image once per caption.
- CSV/TSV lists of local image paths and captions (`KEY.txt`).
- `stats` for shards written elsewhere (img2dataset) that only lack the sizes.json our shard reader
  uses for epoch lengths.

Images keep their original bytes (no re-encoding: nothing lost, no time spent) once PIL has
verified that they decode, so a broken file is skipped and counted here rather than in the middle
of a training run. Input that cannot be prepared at all (a missing JSON key, a CSV column that is
not there) fails before anything is written, and the output only ever holds whole shards
(tarfiles.write_tar renames a shard into place when it is complete).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

import fsspec
from PIL import Image, UnidentifiedImageError

from cliplite_dist.data.reader import split_member_name
from cliplite_dist.data.tarfiles import write_sizes, write_tar

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # img2dataset: written only once its shard is complete
_STALE_RE = re.compile(r"\d+(\.tar|_stats\.json)")  # shard files an --overwrite replaces
_NUMBERED_RE = re.compile(r"(\d+)(?:\.tar|_stats\.json)")
_LISTED = 10  # names shown per summary line


class PrepError(ValueError):
    """Input that cannot be prepared; the message names the file, key or value."""


@dataclass
class PrepSummary:
    """What a prep wrote, and what it skipped: reason -> count, and the first case of each."""

    out: str
    shards: int = 0
    samples: int = 0
    captions: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, case: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, case)

    def skip_lines(self) -> list[str]:
        return [f"skipped {n} {reason} (first: {self.first_skipped[reason]})"
                for reason, n in self.skipped.items()]

    def render(self) -> str:
        return "\n".join([f"wrote {self.samples} samples ({self.captions} captions) in {self.shards} "
                          f"shard(s) under {self.out}", *self.skip_lines()])


@dataclass
class StatsSummary:
    """Sample counts of a directory of shards, as written to its sizes.json."""

    directory: str
    counts: dict[str, int]  # complete shard -> samples
    source: str  # where the counts came from
    incomplete: list[str]  # shards left out: no _stats.json (img2dataset failed or still writing)
    gaps: list[str]  # shard numbers with no file at all (img2dataset's failed shards)

    def render(self) -> str:
        counts = self.counts.values()
        lines = [f"{len(self.counts)} shard(s), {sum(counts)} samples ({min(counts)}-{max(counts)} per "
                 f"shard, from {self.source}) -> {posixpath.join(self.directory, 'sizes.json')}"]
        if self.incomplete:
            lines.append(f"skipped {len(self.incomplete)} incomplete shard(s) without {STATS_SUFFIX}: "
                         f"{_some(self.incomplete)}")
        if self.gaps:
            lines.append(f"gaps: {len(self.gaps)} shard number(s) missing: {_some(self.gaps)}")
        return "\n".join(lines)


def _some(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" ... and {more} more" if more > 0 else "")


# --- shared by the converters -------------------------------------------------------------------

def _read_image(path: Path, summary: PrepSummary) -> tuple[bytes, str] | None:
    """The file's bytes and member extension (its suffix, else PIL's format name) if PIL can
    decode it; otherwise the skip is counted and None returned."""
    if not path.is_file():
        summary.skip("images: missing file", str(path))
        return None
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        summary.skip("images: unreadable", f"{path}: not an image format PIL knows")
        return None
    except Exception as exc:  # PIL raises many kinds for a broken file
        summary.skip("images: unreadable", f"{path}: {exc}")
        return None
    return data, path.suffix[1:].lower() or fmt.lower()


def _check_shard_size(shard_size: int) -> None:
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise PrepError(f"shard size must be an integer >= 1, got {shard_size!r}")


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse a non-empty one unless overwriting (its shards are then replaced)."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrepError(f"output directory {out} is not empty; pass --overwrite to replace its shards")
    out.mkdir(parents=True, exist_ok=True)


def _write_shards(out: Path, samples: Iterator[dict], shard_size: int, summary: PrepSummary) -> None:
    """Shards of `shard_size` samples, then sizes.json; finally remove shard files of an earlier
    run in an overwritten directory, so a listing of it names only this run's shards."""
    samples, counts = iter(samples), {}
    for first in samples:  # a shard is opened only once it has a sample: no empty last shard
        path = out / f"{len(counts):05d}.tar"
        counts[path.name] = write_tar(path, chain([first], islice(samples, shard_size - 1)))
        log.info("%s: %d samples (%d so far, %d skipped)", path.name, counts[path.name],
                 sum(counts.values()), sum(summary.skipped.values()))
    if not counts:
        raise PrepError("\n".join([f"no usable samples; nothing written to {out}", *summary.skip_lines()]))
    write_sizes(out, counts)
    for path in out.iterdir():
        if _STALE_RE.fullmatch(path.name) and path.name not in counts:
            path.unlink()
    summary.shards, summary.samples = len(counts), sum(counts.values())


# --- COCO captions ------------------------------------------------------------------------------

def _load_coco(path: Path) -> tuple[list, list]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PrepError(f"captions file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepError(f"captions file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PrepError(f"captions file {path}: expected a JSON object with 'images' and 'annotations', "
                        f"got a {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise PrepError(f"captions file {path} has no key '{key}' (keys: {', '.join(sorted(data))})")
        if not isinstance(data[key], list):
            raise PrepError(f"captions file {path}: '{key}' must be a list, got a {type(data[key]).__name__}")
    return data["images"], data["annotations"]


def _field(entry, name: str, kind: type, where: str):
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PrepError(f"{where}: '{name}' must be a {kind.__name__}, got {value!r}")
    return value


def _coco_index(path: Path, summary: PrepSummary) -> tuple[list[tuple[int, str]], dict[int, list[str]]]:
    """(image id, file name) per image in file order, and each image's captions in file order."""
    images_raw, annotations = _load_coco(path)
    images, seen = [], set()
    for i, entry in enumerate(images_raw):
        image_id = _field(entry, "id", int, f"{path}: images[{i}]")
        if image_id < 0 or image_id in seen:
            raise PrepError(f"{path}: images[{i}]: id {image_id} is negative or used twice")
        seen.add(image_id)
        images.append((image_id, _field(entry, "file_name", str, f"{path}: images[{i}]")))
    captions: dict[int, list[str]] = {}
    for i, entry in enumerate(annotations):
        image_id = _field(entry, "image_id", int, f"{path}: annotations[{i}]")
        caption = _field(entry, "caption", str, f"{path}: annotations[{i}]")
        if image_id not in seen:
            summary.skip("captions: image_id not in images", f"annotations[{i}] image_id {image_id}")
        elif not caption.strip():
            summary.skip("captions: empty", f"annotations[{i}]")
        else:
            captions.setdefault(image_id, []).append(caption)
    return images, captions


def _coco_samples(images, captions, image_dir: Path, summary: PrepSummary) -> Iterator[dict]:
    for image_id, file_name in images:
        texts = captions.get(image_id)
        if not texts:
            summary.skip("images: no captions", f"image_id {image_id} ({file_name})")
            continue
        image = _read_image(image_dir / file_name, summary)
        if image is None:
            continue
        data, ext = image
        meta = {"captions": texts, "image_id": image_id, "file_name": file_name}
        summary.captions += len(texts)
        yield {"__key__": f"{image_id:012d}", ext: data,
               "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def prep_coco(captions_file, image_dir, out_dir, *, shard_size: int = 1000,
              overwrite: bool = False) -> PrepSummary:
    """COCO captions JSON + image folder -> shards of one sample per image with all its captions
    (key: the zero-padded image id)."""
    _check_shard_size(shard_size)
    image_dir, out = Path(image_dir), Path(out_dir)
    summary = PrepSummary(str(out))
    images, captions = _coco_index(Path(captions_file), summary)
    if not image_dir.is_dir():
        raise PrepError(f"image directory {image_dir} not found")
    _prepare_output(out, overwrite)
    _write_shards(out, _coco_samples(images, captions, image_dir, summary), shard_size, summary)
    return summary


# --- CSV / TSV lists ----------------------------------------------------------------------------

def _csv_samples(reader: csv.DictReader, image_col: str, caption_col: str, root: Path,
                 summary: PrepSummary) -> Iterator[dict]:
    for row_number, row in enumerate(reader, start=1):  # the key: traceable to the data row
        caption = row.get(caption_col) or ""
        name = (row.get(image_col) or "").strip()
        if not caption.strip():
            summary.skip("rows: empty caption", f"row {row_number}")
            continue
        if not name:
            summary.skip("images: missing file", f"row {row_number}: empty {image_col!r}")
            continue
        image = _read_image(root / name, summary)  # an absolute name replaces the root
        if image is None:
            continue
        data, ext = image
        summary.captions += 1
        yield {"__key__": f"{row_number:09d}", ext: data, "txt": caption.encode("utf-8")}


def prep_csv(table_file, out_dir, *, image_col: str, caption_col: str, shard_size: int = 1000,
             image_root=None, overwrite: bool = False) -> PrepSummary:
    """A CSV (TSV for a .tsv/.tab file) of image paths and captions -> shards of `KEY.EXT` (the
    image's own bytes and extension) + `KEY.txt`; relative paths resolve against `image_root`,
    else the table's folder."""
    _check_shard_size(shard_size)
    path, out = Path(table_file), Path(out_dir)
    root = Path(image_root) if image_root else path.parent
    summary = PrepSummary(str(out))
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if not path.is_file():
        raise PrepError(f"table {path} not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            for column in (image_col, caption_col):
                if column not in columns:
                    raise PrepError(f"{path} has no column {column!r}; columns: "
                                    f"{', '.join(map(repr, columns)) or '(none: empty file)'}")
            _prepare_output(out, overwrite)
            _write_shards(out, _csv_samples(reader, image_col, caption_col, root, summary), shard_size, summary)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise PrepError(f"{path}: cannot read line {reader.line_num}: {exc}") from None
    return summary


# --- sizes.json for existing shards -------------------------------------------------------------

def _successes(fs, path: str) -> int:
    try:
        with fs.open(path, "r") as f:
            value = json.load(f).get("successes")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise PrepError(f"{path} is not an img2dataset stats object: {exc}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PrepError(f"{path}: 'successes' must be a count >= 0, got {value!r}")
    return value


def _count_keys(fs, path: str) -> int:
    """Distinct sample keys, as our shard reader groups the members."""
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            return len({parts[0] for m in tar if m.isfile() and (parts := split_member_name(m.name))})
    except (tarfile.TarError, EOFError) as exc:
        raise PrepError(f"cannot read shard {path}: {exc}") from None


def _gaps(names: set[str]) -> list[str]:
    numbered = [m.group(1) for m in map(_NUMBERED_RE.fullmatch, names) if m]
    if not numbered:
        return []
    width, present = max(map(len, numbered)), {int(n) for n in numbered}
    return [f"{n:0{width}d}" for n in range(max(present) + 1) if n not in present]


def shard_stats(directory: str) -> StatsSummary:
    """Count the samples of each complete shard in `directory` (local path or fsspec URL) and
    write its sizes.json: from img2dataset's `_stats.json` files where there are any (a shard
    without one is incomplete and left out), else by scanning every tar."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.isdir(root):
        raise PrepError(f"shard directory {directory} not found")
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    tars = sorted(n for n in names if n.endswith(".tar"))
    stats = sorted(n for n in names if n.endswith(STATS_SUFFIX))
    if stats:
        complete = [n[: -len(STATS_SUFFIX)] + ".tar" for n in stats]
        counts = {t: _successes(fs, posixpath.join(root, s))
                  for s, t in zip(stats, complete) if t in names}
        incomplete = [t for t in tars if t not in counts]
        source = f"img2dataset {STATS_SUFFIX}"
    else:
        counts = {t: _count_keys(fs, posixpath.join(root, t)) for t in tars}
        incomplete, source = [], "scanning the tars"
    if not counts:
        raise PrepError(f"no complete .tar shards in {directory}")
    write_sizes(directory, counts)
    return StatsSummary(directory, counts, source, incomplete, _gaps(names))
