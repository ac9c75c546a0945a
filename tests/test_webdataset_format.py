"""The shard format we claim to share with webdataset, proven both ways: shards that webdataset's
own TarWriter writes in img2dataset's layout are read by our reader sample for sample, and the
shards our synthetic corpus and cliplite-prep write are read by `webdataset.WebDataset` the same
as by us. (The package itself does not import webdataset: our reader replaced its tar expander,
for read speed, bad-data kinds and resume positions; tests keep it as the reference.)"""
import json

import webdataset as wds

from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.prep import prep_csv
from cliplite_dist.data.reader import iterate_samples
from cliplite_dist.data.synthetic import write_corpus
from shardkit import jpeg


def _ours(paths) -> dict[str, dict[str, bytes]]:
    counter = BadDataCounter()
    samples = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
               for s in iterate_samples([str(p) for p in paths], counter)}
    assert not counter.snapshot()["counts"], counter.snapshot()
    return samples


def _webdataset(paths) -> dict[str, dict[str, bytes]]:
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)}


def test_img2dataset_shards_written_by_webdataset_are_read_by_us(tmp_path):
    path = tmp_path / "00000.tar"
    written = {}
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            key = f"0000{i:05d}"
            sample = {"jpg": jpeg((40 * i, 0, 0), 16), "txt": f"caption {i}".encode(),
                      "json": json.dumps({"key": key, "caption": f"caption {i}"}).encode()}
            sink.write({"__key__": key, **sample})
            written[key] = sample
    assert _ours([path]) == written == _webdataset([path])


def test_our_shards_are_read_by_webdataset(tmp_path):
    synthetic = write_corpus(tmp_path / "synthetic", 12, shard_size=5, image_size=32)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg((9, 9, 9), 8))
    (tmp_path / "list.csv").write_text("image,caption\na.jpg,a grey square\n")
    prep_csv(tmp_path / "list.csv", tmp_path / "prepped", image_col="image", caption_col="caption",
             image_root=tmp_path / "pics")
    for paths in (synthetic, sorted((tmp_path / "prepped").glob("*.tar"))):
        ours = _ours(paths)
        assert ours and ours == _webdataset(paths)
