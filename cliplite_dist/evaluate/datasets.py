"""Evaluation sets: CLIP_benchmark's webdataset layout, and plain caption shards for retrieval.

CLIP_benchmark layout (so the public `wds_*` evaluation sets work unchanged):
    DIR/classnames.txt, DIR/zeroshot_classification_templates.txt (templates with {c}),
    DIR/dataset_type.txt ("retrieval" | "multilabel"; absent: single-label classification),
    DIR/SPLIT/nshards.txt and DIR/SPLIT/0.tar ... with an image plus .cls (class index),
    .npy (multi-hot labels) or .txt (the image's captions, one per line).
Everything is read through fsspec, like training shards.
"""
from __future__ import annotations

import io
import itertools
import json
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from cliplite_dist.config import DataConfig
from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.pipeline import SampleDecoder, decoded_images
from cliplite_dist.data.reader import iterate_samples
from cliplite_dist.data.shards import expand_urls

IMAGE_KEYS = tuple(DataConfig.image_keys.split(";"))


def read_text(url: str) -> str | None:
    """A small text file's content, or None if it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def dataset_type(dataset_dir: str) -> str:
    return (read_text(posixpath.join(dataset_dir, "dataset_type.txt")) or "classification").strip().lower()


def split_urls(split_dir: str) -> list[str]:
    """Shards of one split: `nshards.txt` names 0.tar..N-1.tar; otherwise any shard spec."""
    count = read_text(posixpath.join(split_dir, "nshards.txt"))
    if count is not None:
        return [posixpath.join(split_dir, f"{i}.tar") for i in range(int(count))]
    return expand_urls(split_dir)


def _lines(dataset_dir: str, name: str) -> list[str]:
    text = read_text(posixpath.join(dataset_dir, name))
    if text is None:
        raise FileNotFoundError(f"{posixpath.join(dataset_dir, name)} is missing (CLIP_benchmark layout)")
    return [line.strip() for line in text.splitlines() if line.strip()]


def classnames(dataset_dir: str) -> list[str]:
    return _lines(dataset_dir, "classnames.txt")


def templates(dataset_dir: str) -> list[str]:
    found = _lines(dataset_dir, "zeroshot_classification_templates.txt")
    bad = [t for t in found if "{c}" not in t]
    if bad:
        raise ValueError(f"templates without the {{c}} placeholder in {dataset_dir}: {bad[:3]}")
    return found


class EncodedImages:
    """An evaluation set's images, held as their encoded bytes and decoded a batch at a time:
    `images[rows]` (a slice or a tensor of indices) is the [n, 3, H, W] batch. Tens of KB per image
    on every rank, instead of 600 KB of float32 at 224 px for the whole set."""

    def __init__(self, decoder: SampleDecoder):
        self.decoder = decoder
        self.samples: list[dict] = []  # just the image of each sample, under its own key

    def append(self, sample: dict) -> None:
        self.samples.append({key: sample[key] for key in self.decoder.image_keys if key in sample})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        picked = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
        return torch.stack([self.decoder.image(self.samples[i]) for i in picked])


@dataclass
class LabelledImages:
    images: EncodedImages
    labels: torch.Tensor  # [N] long, or [N, C] multi-hot for multi-label sets
    multilabel: bool


def _decoded(urls, decoder: SampleDecoder, max_samples: int):
    """(sample, image tensor) for the first `max_samples` decodable samples (0: all); unreadable
    parts and undecodable images are counted and logged by the counter, then skipped. Decoding
    every image once here means a batch decoded later never meets a bad one."""
    pairs = decoded_images(iterate_samples(urls, BadDataCounter()), decoder, BadDataCounter())
    return itertools.islice(pairs, max_samples or None)


def load_labelled(split_dir: str, transform, max_samples: int = 0) -> LabelledImages:
    """Images and labels of a classification split (`DIR/test`, `DIR/train`)."""
    parent = posixpath.dirname(split_dir.rstrip("/"))
    multilabel = dataset_type(parent) == "multilabel"
    decoder = SampleDecoder(transform, "txt", IMAGE_KEYS)
    images, labels = EncodedImages(decoder), []
    for sample, _ in _decoded(split_urls(split_dir), decoder, max_samples):
        if multilabel:
            labels.append(torch.from_numpy(np.load(io.BytesIO(sample["npy"]), allow_pickle=False)).long())
        else:
            labels.append(torch.tensor(int(sample["cls"])))
        images.append(sample)
    if not len(images):
        raise ValueError(f"no samples in {split_dir}")
    return LabelledImages(images, torch.stack(labels), multilabel)


@dataclass
class RetrievalSet:
    images: EncodedImages
    captions: list[str]  # M captions
    text_image: torch.Tensor  # [M]: the image each caption describes


def _all_captions(sample: dict) -> list[str]:
    """Every caption of a sample: json "captions" (a list or a string), else the .txt lines."""
    if "json" in sample:
        value = json.loads(sample["json"].decode("utf-8")).get("captions")
        if value:
            value = [value] if isinstance(value, str) else value
            return [c.strip() for c in value if isinstance(c, str) and c.strip()]
    if "txt" in sample:
        return [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    return []


def load_retrieval(spec: str, transform, max_images: int = 0) -> RetrievalSet:
    """A CLIP_benchmark retrieval set (DIR with dataset_type.txt = retrieval: its `test` split,
    captions one per line in .txt), or caption shards (json "captions", else .txt lines). Every
    caption of an image is kept: a hit is any of them (the COCO way)."""
    urls = split_urls(posixpath.join(spec, "test")) if dataset_type(spec) == "retrieval" else expand_urls(spec)
    decoder = SampleDecoder(transform, "txt", IMAGE_KEYS)
    images, captions, owners = EncodedImages(decoder), [], []
    for sample, _ in _decoded(urls, decoder, max_images):
        texts = _all_captions(sample)
        if not texts:
            continue
        captions.extend(texts)
        owners.extend([len(images)] * len(texts))
        images.append(sample)
    if not len(images):
        raise ValueError(f"no samples with captions in {spec}")
    return RetrievalSet(images, captions, torch.tensor(owners))
