import json

import pytest

from cliplite_dist.data.shards import count_samples, expand_urls, share_for_slot
from cliplite_dist.shardspec import ShardError
from shardkit import write_shards


def test_brace_patterns_and_corpus_joining(tmp_path):
    a = write_shards(tmp_path / "a", 3, 2)
    b = write_shards(tmp_path / "b", 2, 5)
    spec = f"{tmp_path}/a/shard-{{00000..00002}}.tar::{tmp_path}/b/shard-{{00000..00001}}.tar"
    assert expand_urls(spec) == a + b
    assert count_samples(expand_urls(spec)) == 3 * 2 + 2 * 5


def test_directory_of_img2dataset_output_skips_incomplete_shards(tmp_path):
    paths = write_shards(tmp_path, 4, 3, prefix="x", sizes=False)
    # img2dataset names shards NNNNN.tar; shard 2 failed (no stats), shard 3's tar is missing
    for i, path in enumerate(paths):
        (tmp_path / f"{i:05d}.tar").write_bytes(open(path, "rb").read())
    for i in (0, 1, 3):
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    (tmp_path / "00003.tar").unlink()
    urls = expand_urls(str(tmp_path))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar"]
    assert count_samples(urls) == 6


def test_missing_counts_name_the_shard(tmp_path):
    paths = write_shards(tmp_path, 2, 3, sizes=False)
    with pytest.raises(ShardError, match="shard-00000.tar"):
        count_samples(paths)


def test_empty_corpus_and_empty_directory_are_errors(tmp_path):
    with pytest.raises(ShardError, match="empty corpus"):
        expand_urls(f"{tmp_path}/a.tar::")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .tar shards"):
        expand_urls(str(tmp_path / "empty"))


def test_slot_shares_cover_everything_once():
    urls = [f"s{i}.tar" for i in range(7)]
    shares = [share_for_slot(urls, s, 4) for s in range(4)]
    assert sorted(u for sh in shares for u in sh.urls) == sorted(urls)
    assert all(sh.sample_stride == 1 for sh in shares)
    few = [share_for_slot(urls[:3], s, 4) for s in range(4)]  # fewer shards than readers
    assert all(sh.urls == tuple(urls[:3]) and sh.sample_stride == 4 for sh in few)
    assert sorted(sh.sample_offset for sh in few) == [0, 1, 2, 3]
