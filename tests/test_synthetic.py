"""The synthetic corpus: reproducible, readable as webdataset, and its captions tell the truth."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cliplite_dist.data import synthetic as syn


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """25 training samples in shards of 10, plus 30 eval samples, in one directory."""
    out = tmp_path_factory.mktemp("synth")
    train = syn.write_corpus(out, 25, split="train", shard_size=10, seed=3)
    evals = syn.write_corpus(out, 30, split="eval", shard_size=100, seed=3)
    return out, train, evals


def read_wds(paths):
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def test_shard_layout_and_sizes(corpus):
    out, train, evals = corpus
    assert [p.name for p in train] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert [p.name for p in evals] == ["eval-00000.tar"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-00000.tar": 10, "train-00001.tar": 10, "train-00002.tar": 5,
                     "eval-00000.tar": 30}
    for path in train + evals:
        assert len(read_wds([path])) == sizes[path.name]
    assert sorted(p.name for p in out.iterdir()) == sorted([*sizes, "sizes.json"])  # no temp files


def test_samples_are_complete_with_unique_keys(corpus):
    _, train, evals = corpus
    samples = read_wds(train + evals)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) == 55
    assert keys[0] == "train000000000" and keys[-1] == "eval000000029"
    for sample in samples:
        meta = json.loads(sample["json"].decode("utf-8"))
        assert meta["key"] == sample["__key__"]
        assert sample["txt"].decode("utf-8") == meta["captions"][0]
        assert len(set(meta["captions"])) == len(meta["captions"]) >= 3
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)


def test_plain_tarfile_sees_three_members_per_sample(corpus):
    _, train, _ = corpus
    with tarfile.open(train[0]) as tar:
        names = tar.getnames()
    assert len(names) == 30
    assert names[:3] == ["train000000000.jpg", "train000000000.txt", "train000000000.json"]


def test_same_seed_and_split_give_identical_bytes(tmp_path):
    a = syn.write_corpus(tmp_path / "a", 12, split="train", shard_size=5, seed=7)
    b = syn.write_corpus(tmp_path / "b", 12, split="train", shard_size=5, seed=7)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_different_split_or_seed_gives_different_scenes(tmp_path):
    def scenes(split, seed):
        paths = syn.write_corpus(tmp_path / f"{split}{seed}", 20, split=split, seed=seed)
        return [json.loads(s["json"])["objects"] for s in read_wds(paths)]

    train = scenes("train", 0)
    assert sum(a != b for a, b in zip(train, scenes("eval", 0))) >= 18
    assert sum(a != b for a, b in zip(train, scenes("train", 1))) >= 18


def test_rewrite_with_fewer_samples_drops_stale_shards(tmp_path):
    syn.write_corpus(tmp_path, 30, split="train", shard_size=10)
    syn.write_corpus(tmp_path, 5, split="eval")
    syn.write_corpus(tmp_path, 15, split="train", shard_size=10)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"train-00000.tar": 10, "train-00001.tar": 5, "eval-00000.tar": 5}
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(sizes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "num_samples"),
    (dict(shard_size=0), "shard_size"),
    (dict(image_size=16), "image_size"),
    (dict(split="Train"), "split"),
    (dict(split="../x"), "split"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    args = dict(num_samples=4, split="train", shard_size=10, image_size=64, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        syn.write_corpus(tmp_path, args.pop("num_samples"), **args)
    assert not list(tmp_path.iterdir())


def faithful_samples(n=150, image_size=64):
    """(decoded image, parsed json) of generated samples, as a training reader would see them."""
    for index in range(n):
        sample = syn.make_sample(11, "check", index, image_size)
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
        yield image, json.loads(sample["json"])


@pytest.mark.parametrize("image_size", [32, 64])
def test_object_centres_have_the_named_colour(image_size):
    """Near the named RGB (up to JPEG error and colour jitter), and nearer it than any other."""
    names = list(syn.COLOURS)
    palette = np.array([syn.COLOURS[n] for n in names])
    for image, meta in faithful_samples(image_size=image_size):
        for obj in meta["objects"]:
            pixel = image[obj["y"], obj["x"]]
            where = (meta["key"], obj, pixel)
            assert np.abs(pixel - syn.COLOURS[obj["colour"]]).max() <= 48, where
            assert names[np.abs(palette - pixel).sum(1).argmin()] == obj["colour"], where


def test_layout_matches_position_and_relation_without_overlap():
    for image, meta in faithful_samples():
        size = image.shape[0]
        if meta["relation"] is None:
            (obj,) = meta["objects"]
            dx, dy = obj["x"] - size / 2, obj["y"] - size / 2
            expected = {"left": dx < -size / 8, "right": dx > size / 8, "top": dy < -size / 8,
                        "bottom": dy > size / 8, "center": max(abs(dx), abs(dy)) < size / 8}
            assert expected[meta["position"]], meta
        else:
            a, b = meta["objects"]
            dx, dy = a["x"] - b["x"], a["y"] - b["y"]
            expected = {"left of": dx < -2 * abs(dy), "right of": dx > 2 * abs(dy),
                        "above": dy < -2 * abs(dx), "below": dy > 2 * abs(dx)}
            assert expected[meta["relation"]], meta
            reach = (syn.SIZES[a["size"]] + syn.SIZES[b["size"]]) * size
            assert math.hypot(dx, dy) > reach, meta


def test_every_caption_names_each_object_and_the_layout():
    seen_pair = seen_single = False
    for _, meta in faithful_samples():
        for caption in meta["captions"]:
            for obj in meta["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in caption, (caption, meta)
            if meta["relation"] is None:
                seen_single = True
                assert meta["position"] in caption
                assert not any(p in caption for p in syn.POSITIONS if p != meta["position"])
            else:
                seen_pair = True
                axis = {meta["relation"], syn.INVERSE[meta["relation"]]}
                words = [w for w, relation in DIRECTION_WORDS.items() if relation in axis]
                assert any(w in caption for w in words), (caption, meta)
    assert seen_pair and seen_single


DIRECTION_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above",
                   "below": "below", "under": "below", "beneath": "below"}


def read_relation(caption, objects):
    """Parse 'X <dir> Y' or 'X ... Y <dir> it/its <dir>' back into (subject, relation, reference).

    English, not the generator's templates: without a pronoun the first-named object is placed
    relative to the second; with one ("to its right", "below it") the second relative to the first.
    """
    names = [f"{o['colour']} {o['shape']}" for o in objects]
    first, second = sorted(names, key=caption.index)
    words = caption.replace(",", " ").replace(":", " ").split()
    (direction,) = [DIRECTION_WORDS[w] for w in words if w in DIRECTION_WORDS]
    if "its" in words or words[-1] == "it":
        return second, direction, first
    return first, direction, second


def test_captions_state_the_true_relation():
    pairs = 0
    for _, meta in faithful_samples():
        if meta["relation"] is None:
            continue
        pairs += 1
        a, b = (f"{o['colour']} {o['shape']}" for o in meta["objects"])
        truth = {(a, meta["relation"], b), (b, syn.INVERSE[meta["relation"]], a)}
        for caption in meta["captions"]:
            assert read_relation(caption, meta["objects"]) in truth, (caption, meta)
    assert pairs >= 50


def test_held_out_first_captions_are_diverse():
    firsts = []
    for index in range(500):
        rng = syn.sample_rng(0, "eval", index)
        _, scene = syn.render_scene(rng, 64)
        firsts.append(syn.captions_for(scene, rng)[0])
    assert len(set(firsts)) >= 0.9 * len(firsts)
