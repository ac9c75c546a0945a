"""The data benchmark's measuring code on one tiny generated shard: every stage processes each
sample exactly once, and both decoders' batches are what a trainer would get (the pixels of the
two paths are compared in test_transforms.py)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import data as bench  # noqa: E402  (benchmarks/data.py)

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
    for name, decode in bench.DECODE.items():
        pil = tiny.train_transform
        transform = bench.train_transform(name, pil)
        assert bench.decode_stage(images, decode) == NUM_SAMPLES
        assert bench.augment_stage(images, decode, transform) == NUM_SAMPLES
        stream = bench.make_stream(shard, bench.make_decoder(name, pil), tiny.tokenizer, batch_size=8)
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
