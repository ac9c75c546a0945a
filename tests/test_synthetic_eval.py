"""Synthetic evaluation sets: CLIP_benchmark's webdataset layout, faithful labels, reproducible."""
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cliplite_dist.data import synthetic as syn

WRITERS = {"classification": syn.write_classification_set,
           "multilabel": syn.write_multilabel_set,
           "retrieval": syn.write_retrieval_set}
LABEL_EXT = {"classification": "cls", "multilabel": "npy", "retrieval": "txt"}
PALETTE_NAMES = list(syn.COLOURS)
PALETTE = np.array([syn.COLOURS[n] for n in PALETTE_NAMES])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Each kind in its own directory: a 'test' split of 30 in shards of 8, a 'train' split of 5."""
    root = tmp_path_factory.mktemp("evalsets")
    out = {}
    for kind, write in WRITERS.items():
        d = root / kind
        test = write(d, 30, split="test", seed=4, shard_size=8)
        train = write(d, 5, split="train", seed=4, shard_size=8)
        out[kind] = (d, test, train)
    return out


def read_wds(paths):
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def read_like_clip_benchmark(d, split):
    """How CLIP_benchmark's build_wds_dataset reads a local directory."""
    nshards = int((d / split / "nshards.txt").read_text())
    type_path = d / "dataset_type.txt"
    dataset_type = type_path.read_text().strip().lower() if type_path.exists() else "classification"
    pattern = str(d / split / ("{0..%d}.tar" % (nshards - 1)))
    images = ["webp", "png", "jpg", "jpeg"]
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode(
        wds.autodecode.ImageHandler("pil", extensions=images))
    if dataset_type == "retrieval":
        return dataset_type, list(dataset.to_tuple(images, "txt").map_tuple(None, str.splitlines))
    label = "npy" if dataset_type == "multilabel" else "cls"
    return dataset_type, list(dataset.to_tuple(images, label))


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def nearest_colour(image_bytes, obj):
    image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
    pixel = image[obj["y"], obj["x"]]
    return PALETTE_NAMES[np.abs(PALETTE - pixel).sum(1).argmin()]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_layout(sets, kind):
    d, test, train = sets[kind]
    for split, paths, n in (("test", test, 30), ("train", train, 5)):
        expected = [f"{i}.tar" for i in range(-(-n // 8))]
        assert [p.name for p in paths] == expected
        assert (d / split / "nshards.txt").read_text().strip() == str(len(expected))
        assert sorted(p.name for p in (d / split).iterdir()) == sorted(expected + ["nshards.txt"])
        assert len(read_wds(paths)) == n
    top = sorted(p.name for p in d.iterdir() if p.is_file())
    if kind == "classification":
        assert top == ["classnames.txt", "zeroshot_classification_templates.txt"]
        assert lines(d / "classnames.txt") == list(syn.CLASS_NAMES)
        assert len(syn.CLASS_NAMES) == len(syn.COLOURS) * len(syn.SHAPES)
    elif kind == "multilabel":
        assert top == ["classnames.txt", "dataset_type.txt", "zeroshot_classification_templates.txt"]
        assert lines(d / "classnames.txt") == list(syn.COLOURS) + list(syn.SHAPES) == list(syn.LABEL_NAMES)
        assert lines(d / "dataset_type.txt") == ["multilabel"]
    else:
        assert top == ["dataset_type.txt"]
        assert lines(d / "dataset_type.txt") == ["retrieval"]
    if kind != "retrieval":
        templates = lines(d / "zeroshot_classification_templates.txt")
        assert len(templates) >= 4 and all(t.strip() == t and t.count("{c}") == 1 for t in templates)
        assert templates[0].format(c="red circle")


@pytest.mark.parametrize("kind", list(WRITERS))
def test_members_and_clip_benchmark_reading(sets, kind):
    d, test, _ = sets[kind]
    with tarfile.open(test[0]) as tar:
        names = tar.getnames()
    assert names[:3] == [f"test000000000.{ext}" for ext in ("jpg", LABEL_EXT[kind], "json")]
    dataset_type, items = read_like_clip_benchmark(d, "test")
    assert dataset_type == {"classification": "classification"}.get(kind, kind)
    assert len(items) == 30
    image, label = items[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    if kind == "classification":
        assert isinstance(label, int) and 0 <= label < len(syn.CLASS_NAMES)
    elif kind == "multilabel":
        assert label.shape == (len(syn.LABEL_NAMES),) and label.dtype == np.uint8
    else:
        assert isinstance(label, list) and len(label) >= 2


def test_classification_labels_are_faithful(sets):
    samples = read_wds(sets["classification"][1])
    samples += [syn.make_eval_sample("classification", 9, "test", i) for i in range(120)]
    labels, sizes, positions = set(), set(), set()
    for s in samples:
        meta = json.loads(s["json"])
        (obj,) = meta["objects"]
        label = int(s["cls"].decode("ascii"))
        assert s["cls"] == str(label).encode()
        assert label == meta["label"] == list(syn.COLOURS).index(obj["colour"]) * len(syn.SHAPES) \
            + syn.SHAPES.index(obj["shape"]) == syn.class_index(obj["colour"], obj["shape"])
        assert syn.CLASS_NAMES[label] == f"{obj['colour']} {obj['shape']}"
        assert nearest_colour(s["jpg"], obj) == obj["colour"], meta
        labels.add(label)
        sizes.add(obj["size"])
        positions.add(meta["position"])
    assert len(labels) >= 35 and sizes == set(syn.SIZES) and positions == set(syn.POSITIONS)


def test_multilabel_vectors_match_objects(sets):
    samples = read_wds(sets["multilabel"][1])
    samples += [syn.make_eval_sample("multilabel", 9, "test", i) for i in range(60)]
    counts = set()
    for s in samples:
        meta = json.loads(s["json"])
        vector = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
        present = {o[attr] for o in meta["objects"] for attr in ("colour", "shape")}
        assert vector.dtype == np.uint8
        assert vector.tolist() == meta["labels"] == [int(x in present) for x in (*syn.COLOURS, *syn.SHAPES)]
        assert 2 <= vector.sum() <= 4
        for obj in meta["objects"]:
            assert nearest_colour(s["jpg"], obj) == obj["colour"], meta
        counts.add(len(meta["objects"]))
    assert counts == {1, 2}


def test_retrieval_texts_list_all_captions(sets):
    for s in read_wds(sets["retrieval"][1]):
        meta = json.loads(s["json"])
        captions = s["txt"].decode("utf-8").split("\n")
        assert captions == meta["captions"] and len(set(captions)) == len(captions) >= 2
        for caption in captions:
            for obj in meta["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in caption, (caption, meta)


def member_bytes(paths):
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


@pytest.mark.parametrize("kind", list(WRITERS))
def test_deterministic_and_independent_of_shard_size(tmp_path, kind):
    a = WRITERS[kind](tmp_path / "a", 9, seed=2, shard_size=4)
    b = WRITERS[kind](tmp_path / "b", 9, seed=2, shard_size=4)
    c = WRITERS[kind](tmp_path / "c", 9, seed=2, shard_size=100)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert member_bytes(a) == member_bytes(c)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
        assert (tmp_path / "a" / name).exists() == (tmp_path / "c" / name).exists()


def test_splits_seeds_kinds_and_training_streams_draw_different_scenes(tmp_path):
    def objects(kind, split="test", seed=0, n=20):
        return [json.loads(syn.make_eval_sample(kind, seed, split, i)["json"])["objects"]
                for i in range(n)]

    def differ(x, y):
        return sum(a != b for a, b in zip(x, y))

    base = objects("retrieval")
    assert differ(base, objects("retrieval", split="train")) >= 18
    assert differ(base, objects("retrieval", seed=1)) >= 18
    assert differ(base, objects("multilabel")) >= 18
    training = [json.loads(syn.make_sample(0, "test", i)["json"])["objects"] for i in range(20)]
    assert differ(base, training) >= 18
    # The eval streams are names that no training split can take.
    with pytest.raises(ValueError, match="split"):
        syn.write_corpus(tmp_path, 1, split=syn.eval_stream("retrieval", "test"))


def test_rewrite_with_fewer_samples_drops_stale_shards(tmp_path):
    syn.write_classification_set(tmp_path, 10, shard_size=3)
    syn.write_classification_set(tmp_path, 4, split="train", shard_size=3)
    paths = syn.write_classification_set(tmp_path, 5, shard_size=3)
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["0.tar", "1.tar", "nshards.txt"]
    assert (tmp_path / "test" / "nshards.txt").read_text().strip() == "2"
    assert len(read_wds(paths)) == 5
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["0.tar", "1.tar", "nshards.txt"]


def test_other_kinds_do_not_mix_in_one_directory(tmp_path):
    syn.write_classification_set(tmp_path, 3, split="test")
    syn.write_classification_set(tmp_path, 3, split="train")
    with pytest.raises(ValueError, match="classification set"):
        syn.write_retrieval_set(tmp_path, 3, split="test")
    # With a single split, rewriting it as another kind replaces the metadata wholesale.
    syn.write_multilabel_set(tmp_path / "one", 3)
    syn.write_retrieval_set(tmp_path / "one", 3)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["dataset_type.txt", "test"]
    syn.write_classification_set(tmp_path / "one", 3)
    assert not (tmp_path / "one" / "dataset_type.txt").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "num_samples"),
    (dict(shard_size=0), "shard_size"),
    (dict(image_size=16), "image_size"),
    (dict(split="Test"), "split"),
    (dict(split="../x"), "split"),
    (dict(seed=-1), "seed"),
    (dict(num_samples=2.0), "num_samples"),
])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_bad_arguments_are_rejected(tmp_path, kind, kwargs, message):
    args = dict(num_samples=4, split="test", shard_size=10, image_size=64, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        WRITERS[kind](tmp_path, args.pop("num_samples"), **args)
    assert not list(tmp_path.iterdir())


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        syn.make_eval_sample("segmentation", 0, "test", 0)
