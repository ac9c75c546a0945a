"""cliplite-prep: COCO captions and CSV lists become shards our pipeline trains on; bad input is
skipped and counted or refused by name; stats writes sizes.json for img2dataset-like output."""
import io
import json
import subprocess
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from PIL import Image
from runkit import console_command
from shardkit import jpeg, write_shards

from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.pipeline import SampleDecoder, caption_or_none, decoded_images
from cliplite_dist.data.prep import PrepError, prep_coco, prep_csv, shard_stats
from cliplite_dist.data.reader import iterate_samples
from cliplite_dist.data.shards import count_samples, expand_urls
from cliplite_dist.data.tarfiles import write_tar

GOOD = {1: 2, 2: 5, 3: 3, 4: 4}  # image id -> number of captions, for images that must survive


def prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*console_command("cliplite-prep"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def coco(tmp_path):
    """7 images: 4 good with 2-5 captions, one whose file is missing, one corrupt JPEG, one
    without captions; plus an annotation of an image id that is not listed."""
    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    images, annotations, captions = [], [], {}
    for image_id in range(1, 8):
        name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 32})
        if image_id in GOOD or image_id == 7:
            (images_dir / name).write_bytes(jpeg((image_id * 30, 100, 200 - image_id * 20)))
        elif image_id == 6:
            (images_dir / name).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        if image_id != 7:
            captions[image_id] = [f"image {image_id} caption {c}" for c in range(GOOD.get(image_id, 2))]
            annotations += [{"id": len(annotations), "image_id": image_id, "caption": c}
                            for c in captions[image_id]]
    annotations.append({"id": 999, "image_id": 99, "caption": "an orphan"})
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path, images_dir, captions


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}


def test_coco_one_sample_per_image_with_every_caption(coco, tmp_path):
    captions_file, images_dir, captions = coco
    out = tmp_path / "shards"
    result = prep("coco", "--captions", captions_file, "--images", images_dir, "--out", out, "--shard-size", 3)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 samples (14 captions) in 2 shard(s)" in result.stdout
    for line in ("skipped 1 images: missing file", "skipped 1 images: unreadable",
                 "skipped 1 images: no captions", "skipped 1 captions: image_id not in images"):
        assert line in result.stdout, result.stdout
    assert "000000000005.jpg" in result.stdout and "image_id 7" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "sizes.json"]  # no temp files
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}

    samples = {**read_tar(out / "00000.tar"), **read_tar(out / "00001.tar")}
    assert sorted(samples) == [f"{i:012d}" for i in GOOD]
    for image_id in GOOD:
        sample = samples[f"{image_id:012d}"]
        meta = json.loads(sample["json"])
        assert meta == {"captions": captions[image_id], "image_id": image_id,
                        "file_name": f"{image_id:012d}.jpg"}
        assert sample["jpg"] == (images_dir / meta["file_name"]).read_bytes()  # not re-encoded
    assert count_samples(expand_urls(str(out))) == 4

    # What a train recipe with data.caption_key=json:captions reads: every sample, a real caption.
    counter = BadDataCounter()
    decoder = SampleDecoder(lambda img: img.size, "json:captions", ("jpg", "jpeg", "png", "webp"))
    decoded = [(sample["__key__"], size, caption_or_none(sample, decoder, counter, 0))
               for sample, size in decoded_images(iterate_samples(expand_urls(str(out)), counter), decoder, counter)]
    assert not counter.counts
    assert len(decoded) == 4
    for key, size, caption in decoded:
        assert size == (32, 32) and caption in captions[int(key)]


def test_coco_bad_json_is_refused_by_key_and_file(coco, tmp_path):
    captions_file, images_dir, _ = coco
    data = json.loads(captions_file.read_text())
    del data["annotations"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    result = prep("coco", "--captions", broken, "--images", images_dir, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "'annotations'" in result.stderr and str(broken) in result.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written

    data = json.loads(captions_file.read_text())
    data["annotations"][3]["caption"] = None
    broken.write_text(json.dumps(data))
    with pytest.raises(PrepError, match=r"annotations\[3\]: 'caption' must be a str, got None"):
        prep_coco(broken, images_dir, tmp_path / "o")


def test_existing_output_is_kept_unless_overwrite(coco, tmp_path):
    captions_file, images_dir, _ = coco
    out = tmp_path / "shards"
    prep_coco(captions_file, images_dir, out, shard_size=1)
    assert len(list(out.glob("*.tar"))) == 4
    with pytest.raises(PrepError, match="not empty; pass --overwrite"):
        prep_coco(captions_file, images_dir, out, shard_size=3)
    assert len(list(out.glob("*.tar"))) == 4
    summary = prep_coco(captions_file, images_dir, out, shard_size=3, overwrite=True)
    assert (summary.shards, summary.samples) == (2, 4)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # stale ones gone
    assert count_samples(expand_urls(str(out))) == 4


def test_interrupted_shard_leaves_no_tar(tmp_path):
    def samples():
        yield {"__key__": "a", "txt": b"one"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tar(tmp_path / "00000.tar", samples())
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def table(tmp_path):
    """A CSV of a JPEG, a PNG in a subfolder, an absolute path, a missing file and an empty caption."""
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg((200, 0, 0)))
    (tmp_path / "img" / "sub" / "b.png").write_bytes(png((0, 200, 0)))
    (tmp_path / "elsewhere.JPG").write_bytes(jpeg((0, 0, 200)))
    rows = [("img/a.jpg", "a red square, with a comma"), ("img/sub/b.png", "a green square"),
            (str(tmp_path / "elsewhere.JPG"), "a blue square"), ("img/gone.jpg", "lost"),
            ("img/a.jpg", "  ")]
    path = tmp_path / "list.csv"
    path.write_text("url,caption,extra\n" + "".join(f'"{u}","{c}",x\n' for u, c in rows))
    return path


def test_csv_keeps_bytes_and_extension(table, tmp_path):
    out = tmp_path / "shards"
    result = prep("csv", table, "--image-col", "url", "--caption-col", "caption", "--out", out,
                  "--shard-size", 2)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 samples (3 captions) in 2 shard(s)" in result.stdout
    assert "skipped 1 images: missing file" in result.stdout and "gone.jpg" in result.stdout
    assert "skipped 1 rows: empty caption (first: row 5)" in result.stdout
    samples = {**read_tar(out / "00000.tar"), **read_tar(out / "00001.tar")}
    assert samples["000000001"]["jpg"] == (tmp_path / "img" / "a.jpg").read_bytes()
    assert samples["000000001"]["txt"] == b"a red square, with a comma"
    assert samples["000000002"]["png"] == (tmp_path / "img" / "sub" / "b.png").read_bytes()
    assert samples["000000003"]["jpg"] == (tmp_path / "elsewhere.JPG").read_bytes()
    assert count_samples(expand_urls(str(out))) == 3


def test_csv_missing_column_names_it_and_the_columns_present(table, tmp_path):
    result = prep("csv", table, "--image-col", "url", "--caption-col", "text", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "no column 'text'" in result.stderr and "'url', 'caption', 'extra'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_tsv_with_image_root(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(png((9, 9, 9)))
    path = tmp_path / "lists" / "list.tsv"
    path.parent.mkdir()
    path.write_text("path\ttext\nx.png\ta grey square, almost black\n")
    summary = prep_csv(path, tmp_path / "out", image_col="path", caption_col="text",
                       image_root=tmp_path / "pics")
    assert (summary.shards, summary.samples, summary.skipped) == (1, 1, {})
    assert read_tar(tmp_path / "out" / "00000.tar")["000000001"]["txt"] == b"a grey square, almost black"


def write_img2dataset_shard(directory: Path, number: int, samples: int, stats: bool) -> None:
    with wds.TarWriter(str(directory / f"{number:05d}.tar")) as sink:
        for i in range(samples):
            sink.write({"__key__": f"{number:05d}{i:04d}", "jpg": jpeg((i, i, i), 8), "txt": "x",
                        "json": "{}"})
    if stats:
        (directory / f"{number:05d}_stats.json").write_text(json.dumps({"count": samples + 1,
                                                                         "successes": samples}))


def test_stats_from_img2dataset_counts_complete_shards_only(tmp_path):
    for number, samples, stats in ((0, 3, True), (1, 4, False), (2, 2, True), (4, 1, True)):
        write_img2dataset_shard(tmp_path, number, samples, stats)
    result = prep("stats", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00002.tar": 2, "00004.tar": 1}
    assert "3 shard(s), 6 samples" in result.stdout
    assert "skipped 1 incomplete shard(s) without _stats.json: 00001.tar" in result.stdout
    assert "1 shard number(s) missing: 00003" in result.stdout
    assert count_samples(expand_urls(str(tmp_path))) == 6


def test_stats_scans_tars_without_stats(tmp_path):
    write_shards(tmp_path, 2, 3, sizes=False)
    summary = shard_stats(str(tmp_path))
    assert summary.counts == {"shard-00000.tar": 3, "shard-00001.tar": 3} and not summary.incomplete
    assert count_samples(expand_urls(str(tmp_path))) == 6

    with open(tmp_path / "shard-00001.tar", "r+b") as f:  # truncated in the middle of a member
        f.truncate(1500)
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(PrepError, match="cannot read shard .*shard-00001.tar"):
        shard_stats(str(tmp_path))
    assert not (tmp_path / "sizes.json").exists()


def test_stats_through_fsspec():
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("k0.jpg", "k0.txt", "k1.jpg", "k1.txt", "k1.json"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    fs.pipe_file("/prep-test/00000.tar", buf.getvalue())
    try:
        summary = shard_stats("memory://prep-test")
        assert summary.counts == {"00000.tar": 2}
        assert json.loads(fs.cat_file("/prep-test/sizes.json")) == {"00000.tar": 2}
    finally:
        fs.rm("/prep-test", recursive=True)
