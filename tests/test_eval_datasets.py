"""Reading evaluation sets in CLIP_benchmark's layout and caption shards."""
import pytest
import torch
from torchvision import transforms

from cliplite_dist.data.synthetic import (CLASS_NAMES, write_classification_set, write_multilabel_set,
                                          write_retrieval_set)
from cliplite_dist.evaluate.datasets import classnames, load_labelled, load_retrieval, templates

TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])


def test_classification_set(tmp_path):
    write_classification_set(tmp_path, 30, split="test", shard_size=12)
    data = load_labelled(str(tmp_path / "test"), TRANSFORM)
    assert len(data.images) == 30 and data.labels.shape == (30,) and not data.multilabel
    assert data.images[torch.tensor([0, 29])].shape == (2, 3, 32, 32) and data.images[:3].shape == (3, 3, 32, 32)
    assert classnames(str(tmp_path)) == list(CLASS_NAMES)
    assert all("{c}" in t for t in templates(str(tmp_path)))
    assert len(load_labelled(str(tmp_path / "test"), TRANSFORM, max_samples=7).labels) == 7


def test_multilabel_set(tmp_path):
    write_multilabel_set(tmp_path, 20, split="train")
    data = load_labelled(str(tmp_path / "train"), TRANSFORM)
    assert data.multilabel and data.labels.shape == (20, len(classnames(str(tmp_path))))
    assert set(data.labels.unique().tolist()) <= {0, 1} and (data.labels.sum(dim=1) >= 1).all()


def test_retrieval_set_keeps_every_caption(tmp_path):
    write_retrieval_set(tmp_path, 10)
    data = load_retrieval(str(tmp_path), TRANSFORM)
    assert len(data.images) == 10 and len(data.captions) == len(data.text_image) > 10
    assert torch.equal(data.text_image.unique(), torch.arange(10))


def test_missing_layout_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        classnames(str(tmp_path))
