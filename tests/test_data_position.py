"""Exact continuation of the data stream after a restart, corpus mixing, and the bad-data limit.

The stream's promise: the batches after a restart, started from the positions the trainer saved,
are exactly the batches an uninterrupted run would have produced (same samples, same order)."""
from collections import Counter

import open_clip
import pytest
import torch
from torchvision import transforms

from cliplite_dist.config import ConfigError, DataConfig, load_config
from cliplite_dist.data.badsamples import BAD_KINDS, exceeds, fractions, too_much_bad_data
from cliplite_dist.data.pipeline import DataProgress, SampleDecoder, BatchStream, make_loader
from cliplite_dist.data.shards import Corpus, expand_corpora
from runkit import RECIPE
from shardkit import write_shards

TOKENIZER = open_clip.SimpleTokenizer(context_length=8)
TRANSFORM = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])


def make_stream(corpora, rank=0, world=1, **data):
    cfg = DataConfig(train="x", **{"batch_size": 4, "shuffle_buffer": 6, "record_keys": True, **data})
    return BatchStream(corpora, cfg, SampleDecoder(TRANSFORM, "txt", ("jpg",)), TOKENIZER, rank, world, seed=3)


def batches(stream, workers, epoch, count, first_reader=0, starts=None):
    """`count` batches of `epoch` through a real DataLoader with `workers` worker processes."""
    stream.set_epoch(epoch, first_reader=first_reader, starts=starts)
    loader = make_loader(stream, workers, pin_memory=False)
    it = iter(loader)
    out = [next(it) for _ in range(count)]
    del it
    return out


@pytest.mark.parametrize("workers, world, stop_at", [(0, 1, 5), (2, 1, 3), (2, 2, 7), (3, 2, 10)])
def test_restart_from_saved_positions_gives_the_uninterrupted_batches(tmp_path, workers, world, stop_at):
    """Positions cross shuffle blocks (6 samples), shards (7 samples) and passes (one rank-slot's
    share is 1-2 shards): the restarted batches equal the uninterrupted ones, key for key."""
    corpora = [Corpus(tuple(write_shards(tmp_path, 5, 7)))]
    total = 14
    for rank in range(world):
        straight = [info.keys for _, _, info in batches(make_stream(corpora, rank, world), workers, 2, total)]
        progress = DataProgress(max(1, workers), world)
        for _, _, info in batches(make_stream(corpora, rank, world), workers, 2, stop_at):
            progress.update(info)
        saved = DataProgress(max(1, workers), world)
        assert saved.load_state_dict(progress.state_dict()) is None
        resumed = batches(make_stream(corpora, rank, world), workers, 2, total - stop_at,
                          first_reader=stop_at % max(1, workers), starts=saved.starts(2))
        assert [info.keys for _, _, info in resumed] == straight[stop_at:]
        assert len({k for keys in straight for k in keys}) >= 10  # many samples, not one repeated


def test_saved_progress_survives_torch_save_and_refuses_another_shape(tmp_path):
    corpora = [Corpus(tuple(write_shards(tmp_path, 2, 5)))]
    progress = DataProgress(1, 1)
    for _, _, info in batches(make_stream(corpora), 0, 0, 3):
        progress.update(info)
    torch.save(progress.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again = DataProgress(1, 1)
    assert again.load_state_dict(state) is None and again.starts(0) == progress.starts(0)
    other = DataProgress(2, 1)
    assert "1 rank(s) x 1 reader(s), now 1 x 2" in other.load_state_dict(state)
    assert other.tally.totals()["good"] == 12  # counts kept even where positions are not


def test_new_epoch_starts_fresh_and_differs(tmp_path):
    corpora = [Corpus(tuple(write_shards(tmp_path, 3, 4)))]
    progress = DataProgress(1, 1)
    first = batches(make_stream(corpora), 0, 0, 2)
    for _, _, info in first:
        progress.update(info)
    assert progress.starts(1) == {}
    assert [i.keys for _, _, i in batches(make_stream(corpora), 0, 1, 2)] != [i.keys for _, _, i in first]


def test_weighted_mix_draws_corpora_in_proportion(tmp_path):
    a = write_shards(tmp_path / "a", 4, 10, prefix="a")
    b = write_shards(tmp_path / "b", 4, 10, prefix="b")
    spec = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    corpora = expand_corpora(spec, "1;3")
    assert [c.urls for c in corpora] == [tuple(a), tuple(b)] and [c.weight for c in corpora] == [1.0, 3.0]
    stream = make_stream(corpora, resampled=True, samples_per_epoch=1000, shuffle_buffer=10)
    keys = [k for _, _, info in batches(stream, 0, 0, 150) for k in info.keys]
    from_b = sum("#b" in k for k in keys) / len(keys)
    assert 0.65 < from_b < 0.85, from_b  # 600 samples in 60 shard draws, expected 0.75


def test_mixing_needs_resampling_and_one_weight_per_corpus(tmp_path):
    two = "train=/d/a/{0..3}.tar::/d/b/{0..3}.tar"
    with pytest.raises(ConfigError, match="data.train_weights='1;3' needs data.resampled=true"):
        load_config(RECIPE, [f"data.{two}", "data.train_weights=1;3"])
    with pytest.raises(ConfigError, match="need 2 positive number"):
        load_config(RECIPE, [f"data.{two}", "data.train_weights=1;2;3", "data.resampled=true"])
    cfg = load_config(RECIPE, [f"data.{two}", "data.train_weights=1;3", "data.resampled=true",
                               "data.samples_per_epoch=100"])
    assert cfg.data.train_weights == "1;3"


def test_bad_fraction_is_judged_only_on_enough_data_and_names_worst_shards():
    totals = {kind: 0 for kind in BAD_KINDS} | {"good": 90, "shards_opened": 3, "image": 5}
    assert fractions(totals) == (0.0, 0.0)  # 95 samples, 3 shards: too few to judge
    totals.update(good=180, image=20, missing_shard=2, shards_opened=8)
    assert fractions(totals) == (0.1, 0.2)
    assert exceeds(totals, 0.15) and not exceeds(totals, 0.2)
    error = too_much_bad_data(totals, Counter({"s3://b/00007.tar": 12, "s3://b/00001.tar": 3}), 0.15)
    message = str(error)
    assert "data.max_bad_fraction=0.15" in message and "missing_shard 2, image 20" in message
    assert message.index("00007.tar: 12 bad") < message.index("00001.tar: 3 bad")
