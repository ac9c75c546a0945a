"""data.augment: `paper` widens the crop, flips images with their captions' left and right swapped,
and jitters colours on the device as torchvision would, image by image; `open_clip` draws and
applies nothing beyond the crop it always had."""
import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from cliplite_dist.config import Augment, DataConfig, choices
from cliplite_dist.data.augment import (JITTER_OPS, PRESETS, Augmented, adjust_brightness, adjust_contrast, adjust_hue,
                                        adjust_saturation, swap_left_right, unwrap_augmented)
from cliplite_dist.data.imagebatch import BoxedImage, RaggedImages
from cliplite_dist.data.pipeline import BatchInfo, SampleDecoder, BatchStream, make_loader
from cliplite_dist.data.shards import Corpus
from cliplite_dist.data.tarfiles import write_tar
from cliplite_dist.data.transforms import DeviceTransform, crop_box, decode_uint8, uint8_train_transform

PIL_TRANSFORM = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0)), T.ToTensor(),
                           T.Normalize([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])])
TORCHVISION_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def test_presets_are_the_configs_choices_and_open_clip_is_the_default():
    assert tuple(PRESETS) == choices(Augment)
    assert DataConfig().augment == "open_clip"


@pytest.mark.parametrize("caption, mirrored", [
    ("a red circle on the left", "a red circle on the right"),
    ("Left of the tree, a bright light; right: a leftover kite",
     "Right of the tree, a bright light; left: a leftover kite"),
    ("a cat to the left of a dog, a bird on its right", "a cat to the right of a dog, a bird on its left"),
    ("TURN LEFT, then Right", "TURN RIGHT, then Left"),
    ("left-hand side (right)", "right-hand side (left)"),
    ("outright brightness, no sides", "outright brightness, no sides"),
])
def test_captions_swap_the_whole_words_left_and_right(caption, mirrored):
    assert swap_left_right(caption) == mirrored
    assert swap_left_right(mirrored) == caption


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Float images in [0, 1] with the hard cases of HSV: a grey image, channel ties, 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 13, 17, generator=generator)
    images[1] = images[1].mean(0, keepdim=True)
    images[2] = (images[2] * 4).round() / 4
    images[3, :, :4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    return images


@pytest.mark.parametrize("ours, theirs, low, high", [
    (adjust_brightness, F.adjust_brightness, 0.6, 1.4), (adjust_contrast, F.adjust_contrast, 0.6, 1.4),
    (adjust_saturation, F.adjust_saturation, 0.6, 1.4), (adjust_hue, F.adjust_hue, -0.1, 0.1),
    (adjust_hue, F.adjust_hue, -0.5, 0.5),
])
def test_batched_colour_ops_match_torchvision_image_by_image(images, ours, theirs, low, high):
    factors = torch.linspace(low, high, len(images))
    expected = torch.stack([theirs(image, float(factor)) for image, factor in zip(images, factors)])
    torch.testing.assert_close(ours(images.clone(), factors), expected, atol=1e-5, rtol=0)


def test_a_batchs_flips_and_jitter_match_torchvision_image_by_image(images):
    rng = random.Random(1)
    samples = [PRESETS["paper"].draw(rng) for _ in images]
    assert {s.flip for s in samples} == {True, False} and {s.jitter is None for s in samples} == {True, False}
    _, augment = unwrap_augmented([Augmented(None, sample) for sample in samples])
    expected = []
    for image, sample in zip(images, samples):
        image = F.horizontal_flip(image) if sample.flip else image
        for op in sample.order or ():
            image = TORCHVISION_OPS[op](image, sample.jitter[op])
        expected.append(image)
    torch.testing.assert_close(augment.apply(images.clone()), torch.stack(expected), atol=1e-5, rtol=0)
    assert len(JITTER_OPS) == len(TORCHVISION_OPS)


def test_paper_draws_flips_jitter_and_crops_below_open_clips_scale():
    crop = uint8_train_transform(PIL_TRANSFORM, augment=PRESETS["paper"])
    assert crop.scale == (0.2, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    random.seed(0)
    draws = [crop.draw(48, 64) for _ in range(2000)]
    areas = [h * w / (48 * 64) for (_, _, h, w), _ in draws]
    assert 0.19 <= min(areas) < 0.3 and max(areas) > 0.95 and np.mean([a < 0.9 for a in areas]) > 0.8
    samples = [sample for _, sample in draws]
    assert 0.45 < np.mean([s.flip for s in samples]) < 0.55
    jittered = [s for s in samples if s.jitter is not None]
    assert 0.75 < len(jittered) / len(samples) < 0.85
    factors = np.array([s.jitter for s in jittered])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and np.abs(factors[:, 3]).max() <= 0.1
    assert all(sorted(s.order) == [0, 1, 2, 3] for s in jittered) and len({s.order for s in jittered}) == 24


@pytest.mark.parametrize("resize", [True, False])
def test_open_clip_draws_nothing_but_the_crop_box(resize):
    """Same draws as before data.augment existed, so the same crops, and nothing for the device."""
    crop = uint8_train_transform(PIL_TRANSFORM, resize=resize)
    assert crop.augment == PRESETS["open_clip"] and crop.scale == (0.9, 1.0)
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)
    random.seed(7)
    out = crop(image)
    rng = random.Random(7)
    box = crop_box(40, 52, (0.9, 1.0), crop.ratio, rng)
    assert random.getstate() == rng.getstate()
    if resize:
        assert isinstance(out, torch.Tensor)
    else:
        assert isinstance(out, BoxedImage) and out.box == box
    assert unwrap_augmented([out]) == ([out], None)
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    device = DeviceTransform(PIL_TRANSFORM, torch.device("cpu"), torch.float32)
    assert torch.equal(device(batch, None), device(batch))


def ramp(width: int = 64, height: int = 48) -> np.ndarray:
    """A grey image dark on the left, bright on the right: any crop of it, however jittered, is
    brighter on its right half unless mirrored (the jitter ops keep grey grey and order)."""
    row = np.linspace(40, 160, width)
    return np.repeat(np.broadcast_to(row, (height, width))[:, :, None], 3, axis=2).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


CAPTIONS = ("the bright side is on the right", "Right: bright. Left: dark.", "dark to the left of light")


@pytest.mark.parametrize("resize_on", ["worker", "device"])
def test_flipped_images_and_only_they_get_captions_with_left_and_right_swapped(tmp_path, resize_on):
    """Through a loader worker (the batch's draws pickled with its BatchInfo), the device's
    transform and the tokenizer: a sample's caption says the bright side is on the right exactly
    when its image, as the model sees it, is brighter on the right. One PNG makes the device-resize
    batches it lands in take the image-by-image path too."""
    keys = [f"s{i:02d}" for i in range(20)]
    captions = {key: CAPTIONS[i % len(CAPTIONS)] for i, key in enumerate(keys)}
    files = {key: ("png", encode(ramp(), "PNG")) if i == 0 else ("jpg", encode(ramp(), "JPEG"))
             for i, key in enumerate(keys)}
    write_tar(tmp_path / "s-00000.tar", ({"__key__": key, files[key][0]: files[key][1], "txt": captions[key].encode()}
                                         for key in keys))
    resize = resize_on == "worker"
    decoder = SampleDecoder(uint8_train_transform(PIL_TRANSFORM, resize=resize, augment=PRESETS["paper"]), "txt",
                            ("jpg", "png"), decode=decode_uint8)
    tokenizer = open_clip.SimpleTokenizer(context_length=24)
    cfg = DataConfig(train="x", batch_size=8, shuffle_buffer=4, record_keys=True, workers=1)
    stream = BatchStream([Corpus((str(tmp_path / "s-00000.tar"),))], cfg, decoder, tokenizer, 0, 1, seed=1)
    device = DeviceTransform(PIL_TRANSFORM, torch.device("cpu"), torch.float32, resizes=not resize)
    torch.manual_seed(0)  # seeds the loader worker's Python RNG
    batches = iter(make_loader(stream, workers=1, pin_memory=False))
    flips = jittered = 0
    for _ in range(6):
        images, tokens, info = next(batches)
        assert isinstance(images, RaggedImages) != resize and pin_memory(info) is info
        inputs = device(images, info.augment)
        plain = device(images)
        for row, key in enumerate(info.keys):
            original = captions[key.rsplit("#", 1)[1]]
            flipped = info.augment.flips[row]
            caption = swap_left_right(original) if flipped else original
            assert torch.equal(tokens[row], tokenizer([caption])[0]), (caption, key)
            width = inputs.shape[-1]
            right_brighter = inputs[row, :, :, width // 2:].mean() > inputs[row, :, :, :width // 2].mean()
            assert right_brighter == (caption == original), (caption, key)
            jitter = info.augment.jitters[row]
            if not flipped:
                assert torch.allclose(inputs[row], plain[row], atol=1e-5, rtol=0) == (jitter is None)
            flips += flipped
            jittered += jitter is not None
        info.release()  # its tokens were read: the worker may write the next batch over them
    assert 12 <= flips <= 36 and 30 <= jittered
