"""The data benchmark's measuring code on one tiny generated shard: every stage processes each
sample exactly once, and both decoders' batches are what a trainer would get (the pixels of the
two paths are compared in test_transforms.py)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import data as bench  # noqa: E402  (benchmarks/data.py)

from cliplite_dist.data.imagebatch import RaggedImages  # noqa: E402
from cliplite_dist.data.synthetic import write_corpus  # noqa: E402

NUM_SAMPLES = 24


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("bench-data")
    return [str(p) for p in write_corpus(out, NUM_SAMPLES, shard_size=NUM_SAMPLES, image_size=64)]


@pytest.fixture(scope="module")
def tiny():
    return bench.towers("tiny-vit")


def test_every_stage_processes_each_sample_once(shard, tiny):
    images, captions = bench.load_shards(tuple(shard))
    assert len(images) == len(captions) == NUM_SAMPLES
    assert bench.read_stage(shard) == NUM_SAMPLES
    assert bench.tokenise_stage(captions, tiny.tokenizer, batch_size=5) == NUM_SAMPLES  # ragged end
    for stage, decoder, resize in bench.STAGES:
        if stage in ("read", "loader"):
            continue
        cell = {"urls": shard, "model": "tiny-vit", "stage": stage, "decoder": decoder, "resize": resize}
        run = bench.stage_runner(cell)
        # pipeline: NUM_SAMPLES // 64 = 0 whole batches of the benchmark's size from a 24-sample shard
        assert run() == (0 if stage == "pipeline" else NUM_SAMPLES), cell
    for decoder, resize in (("PIL", "worker"), ("simplejpeg", "worker"), ("simplejpeg", "device")):
        stream = bench.make_stream(shard, bench.make_decoder(decoder, tiny.train_transform, resize), tiny.tokenizer,
                                   batch_size=8)
        assert bench.pipeline_stage(iter(stream), NUM_SAMPLES // 8) == NUM_SAMPLES


@pytest.mark.parametrize("decoder", bench.DECODERS)
def test_pipeline_batches_are_what_the_trainer_gets(shard, tiny, decoder):
    sample_decoder = bench.make_decoder(decoder, tiny.train_transform)
    stream = bench.make_stream(shard, sample_decoder, tiny.tokenizer, batch_size=8)
    images, tokens, info = next(iter(stream))
    assert images.shape == (8, 3, 64, 64)
    assert images.dtype == (torch.float32 if decoder == "PIL" else torch.uint8)  # uint8: normalised on the device
    assert tokens.shape == (8, 32)
    assert not any(info.bad["counts"].values()) and info.bad["good"] >= 8


def test_resize_on_device_batches_carry_whole_images_and_crop_boxes(shard, tiny):
    stream = bench.make_stream(shard, bench.make_decoder("simplejpeg", tiny.train_transform, "device"),
                               tiny.tokenizer, batch_size=8)
    crops, tokens, _ = next(iter(stream))
    assert isinstance(crops, RaggedImages) and len(crops) == 8 and tokens.shape == (8, 32)
    assert crops.shapes == ((64, 64, 3),) * 8  # 64 px shards, sent whole
    assert all(0 <= top and 0 <= left and top + h <= 64 and left + w <= 64 and h * w >= 0.9 * 64 * 64 * 3 / 4
               for top, left, h, w in crops.boxes)  # open_clip's crop: scale (0.9, 1), ratio (3/4, 4/3)


def test_loader_passes_time_the_worker_that_made_the_batches(shard, tiny):
    from cliplite_dist.data.pipeline import make_loader

    stream = bench.make_stream(shard, bench.make_decoder("simplejpeg", tiny.train_transform, "device"),
                               tiny.tokenizer, batch_size=4)
    batches = iter(make_loader(stream, workers=1, pin_memory=False))
    # 150 batches a pass (the shard over and over): tens of ms of the worker's CPU, several of
    # /proc's 10 ms ticks (one pass over the 24-sample shard came to less than one)
    samples, wall, cpu = bench.loader_passes(batches, 150, repeats=2)
    assert samples == 600 and wall > 0
    assert cpu > 0  # the worker's own seconds: this process only waited
    del batches
    assert bench.worker_cpu_seconds() == 0  # no live child left to count


def test_ceilings_and_ratios_are_taken_from_the_matching_rows():
    rates = {("read", "-", "-"): 100, ("tokenise", "open_clip", "-"): 100, ("tokenise", "ours", "-"): 300, ("decode", "PIL", "-"): 50,
             ("decode", "torchvision.io", "-"): 64, ("decode", "simplejpeg", "-"): 80, ("decode+augment", "PIL", "worker"): 20,
             ("decode+augment", "simplejpeg", "worker"): 40, ("decode+augment", "simplejpeg", "device"): 70,
             ("pipeline", "PIL", "worker"): 10, ("pipeline", "simplejpeg", "worker"): 30,
             ("pipeline", "simplejpeg", "device"): 60, ("loader", "simplejpeg", "worker"): 20,
             ("loader", "simplejpeg", "device"): 40, ("device resize", "simplejpeg", "device"): 5}
    rows = [{"model": model, "image_px": px, "stage": stage, "decoder": decoder, "resize": resize,
             "samples_per_cpu_s": rates[stage, decoder, resize] * px, "samples_per_s": 1, "cpu_share": 1.0,
             "samples": 64, "repeats": 1}
            for model, px in bench.SETS for stage, decoder, resize in bench.STAGES]
    rows = bench.add_ceiling(rows)
    device = next(r for r in rows if r["stage"] == "pipeline" and r["resize"] == "device")
    assert (device["pct_of_decode"], device["pct_of_augment"]) == (75.0, round(100 * 60 / 70, 1))
    loader = next(r for r in rows if r["stage"] == "loader" and r["resize"] == "device")
    assert (loader["pct_of_decode"], loader["pct_of_augment"]) == (50.0, round(100 * 40 / 70, 1))
    pil = next(r for r in rows if r["stage"] == "pipeline" and r["decoder"] == "PIL")
    assert (pil["pct_of_decode"], pil["pct_of_augment"]) == (20.0, 50.0)
    ratios = {(row[1], row[2]): row[3] for row in bench.speedups(rows)}
    assert ratios[256, "decode: simplejpeg ÷ PIL"] == "1.60x"
    assert ratios[256, "decode: simplejpeg ÷ torchvision.io"] == "1.25x"
    assert ratios[512, "full pipeline: resize on device ÷ in worker"] == "2.00x"
    assert ratios[64, "tokenise: ours ÷ open_clip"] == "3.00x"
    assert "| 75% | 86% |" in bench.render_markdown(rows)
