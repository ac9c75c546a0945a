"""The data benchmark's measuring code on one tiny generated shard: every stage processes each
sample exactly once, and the torchvision.io path sees the same pixels as the PIL path, so its
samples/s compare like for like."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import data as bench  # noqa: E402  (benchmarks/data.py)

from cliplite_dist.data.synthetic import write_corpus  # noqa: E402
from cliplite_dist.models import preprocess_config  # noqa: E402

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
        transform = pil if name == "PIL" else bench.tensor_train_transform(pil)
        assert bench.decode_stage(images, decode) == NUM_SAMPLES
        assert bench.augment_stage(images, decode, transform) == NUM_SAMPLES
        stream = bench.make_stream(shard, bench.make_decoder(name, pil), tiny.tokenizer, batch_size=8)
        assert bench.pipeline_stage(iter(stream), NUM_SAMPLES // 8) == NUM_SAMPLES


@pytest.mark.parametrize("decoder", bench.DECODERS)
def test_pipeline_batches_are_what_the_trainer_gets(shard, tiny, decoder):
    sample_decoder = bench.make_decoder(decoder, tiny.train_transform)
    stream = bench.make_stream(shard, sample_decoder, tiny.tokenizer, batch_size=8)
    images, tokens, info = next(iter(stream))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert tokens.shape == (8, 32)
    assert not any(info.bad["counts"].values()) and info.bad["good"] >= 8


def test_decoders_agree_within_jpeg_tolerance(shard):
    images, _ = bench.load_shards(tuple(shard))
    for data in images:
        pil = np.asarray(bench.decode_pil(data), dtype=np.int16)
        tensor = bench.decode_tensor(data).permute(1, 2, 0).numpy().astype(np.int16)
        assert pil.shape == tensor.shape
        assert np.abs(pil - tensor).max() <= 2  # libjpeg builds may round the IDCT differently


def test_tensor_transform_matches_open_clip_on_a_whole_image_crop(shard):
    """With scale (1, 1) only a square crop of the whole image fits (RandomResizedCrop's fallback
    too), so the random part is gone and both train transforms must give the same normalised
    pixels: same crop arguments, interpolation, scaling, mean and std."""
    preprocess = PreprocessCfg(**preprocess_config(bench.towers("tiny-vit").model_cfg))
    pil_transform = image_transform_v2(preprocess, True, aug_cfg={"scale": (1.0, 1.0)})
    tensor_transform = bench.tensor_train_transform(pil_transform)
    images, _ = bench.load_shards(tuple(shard))
    for data in images[:4]:
        image = bench.decode_pil(data)  # one decode for both: this test is about the transforms
        expected = pil_transform(image)
        got = tensor_transform(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # same uint8 pixels in both


def test_tensor_transform_refuses_steps_it_cannot_mirror():
    with pytest.raises(ValueError, match="ColorJitter"):
        bench.tensor_train_transform(
            T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4), T.Normalize([0.5], [0.5])]))
