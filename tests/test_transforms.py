"""The trainer's image path (torchvision.io decode, uint8 crop, normalisation on the device) gives
the pixels of open_clip's PIL train transform, and falls back to PIL where torchvision.io cannot
decode; crops resized on the device match those resized in the worker."""
import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

from cliplite_dist.config import ModelConfig
from cliplite_dist.data import resample
from cliplite_dist.data.synthetic import make_sample
from cliplite_dist.data.imagebatch import BoxedImage, RaggedImages, collate_images
from cliplite_dist.data.transforms import DeviceTransform, crop_box, decode_pil, decode_uint8, uint8_train_transform
from cliplite_dist.models import build_towers, preprocess_config
from cropkit import IMAGE_SIZES, assert_near_the_workers_resize, worker_and_device_crops


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [make_sample(0, "train", i, 64)["jpg"] for i in range(6)]


def test_decoders_agree_within_jpeg_tolerance(jpegs):
    for data in jpegs:
        pil = np.asarray(decode_pil(data), dtype=np.int16)
        tensor = decode_uint8(data).permute(1, 2, 0).numpy().astype(np.int16)
        assert pil.shape == tensor.shape
        assert np.abs(pil - tensor).max() <= 2  # libjpeg builds may round the IDCT differently


def test_formats_torchvision_cannot_decode_go_through_pil():
    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (200, 10, 30)).save(buf, format="BMP")
    image = decode_uint8(buf.getvalue())
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 10)
    assert image[:, 0, 0].tolist() == [200, 10, 30]


def test_uint8_crop_then_device_normalize_equals_open_clip_train_transform(jpegs):
    """With scale (1, 1) only a square crop of the whole image fits, so the random part is gone
    and both paths must give the same normalised pixels: same crop arguments, interpolation,
    scaling, mean and std."""
    model_cfg = build_towers(ModelConfig(name="tiny-vit")).model_cfg
    pil_transform = image_transform_v2(PreprocessCfg(**preprocess_config(model_cfg)), True,
                                       aug_cfg={"scale": (1.0, 1.0)})
    crop = uint8_train_transform(pil_transform)
    normalize = DeviceTransform(pil_transform, torch.device("cpu"), torch.float32)
    for data in jpegs[:4]:
        image = decode_pil(data)  # one decode for both: this test is about the transforms
        expected = pil_transform(image)
        got = normalize(crop(torch.from_numpy(np.array(image)).permute(2, 0, 1))[None])[0]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert DeviceTransform(pil_transform, torch.device("cpu"), torch.bfloat16)(
        torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).dtype == torch.bfloat16


def test_steps_without_a_uint8_equivalent_are_refused():
    with pytest.raises(ValueError, match="ColorJitter"):
        uint8_train_transform(T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4), T.Normalize([0.5], [0.5])]))


def test_crop_boxes_follow_torchvision_bounds():
    rng = random.Random(0)
    boxes = [crop_box(64, 96, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 64 - h and 0 <= left <= 96 - w and h > 0 and w > 0
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(torch.zeros(3, 64, 96), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    for stat in (lambda b: b[2] * b[3], lambda b: b[3] / b[2], lambda b: b[0], lambda b: b[1]):  # area, ratio, offsets
        ours_mean, their_mean = np.mean([stat(b) for b in boxes]), np.mean([stat(b) for b in theirs])
        assert abs(ours_mean - their_mean) <= 0.05 * their_mean, (ours_mean, their_mean)
    assert crop_box(64, 64, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (0, 0, 64, 64)
    assert crop_box(10, 100, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (0, 43, 10, 13)  # central, widest ratio


@pytest.fixture(scope="module")
def tiny_train_transform() -> T.Compose:
    return build_towers(ModelConfig(name="tiny-vit")).train_transform  # 64 px, bicubic, antialiased


def test_crops_resized_on_the_device_match_the_workers_resize(tiny_train_transform):
    """Same boxes both ways: the uint8 resize in the worker and the float32 one on the device
    differ by the worker's rounding and clamping (`cropkit`, which the CUDA twin in test_gpu.py
    shares); a box one pixel off in a single image is caught."""
    resized, crops = worker_and_device_crops(tiny_train_transform)
    assert isinstance(crops, RaggedImages) and len({box[2:] for box in crops.boxes}) > 1  # scale (0.9, 1)
    assert {shape[0] for shape in crops.shapes} == set(IMAGE_SIZES)  # sent whole
    device = DeviceTransform(tiny_train_transform, torch.device("cpu"), torch.float32)
    on_device = device.resize(crops)
    assert on_device.shape == resized.shape == (len(crops), 3, 64, 64)
    assert 0 <= on_device.min() and on_device.max() <= 255
    assert_near_the_workers_resize(on_device, resized)
    torch.testing.assert_close(device(crops), device(on_device), atol=0, rtol=0)  # resized, then normalised
    (top, left, h, w), *rest = crops.boxes
    off_by_one = RaggedImages(crops.pixels, crops.shapes, ((top + 1, left, h - 1, w), *rest))
    with pytest.raises(AssertionError):
        assert_near_the_workers_resize(device.resize(off_by_one), resized)


def test_crop_boxes_of_one_size_are_cut_and_resized_and_a_stacked_batch_must_have_the_model_size(
        tiny_train_transform):
    images = torch.randint(0, 256, (2, 3, 50, 40), dtype=torch.uint8)
    boxed = collate_images([BoxedImage(image, (5, 0, 40, 40)) for image in images])
    assert isinstance(boxed, RaggedImages) and boxed.boxes == ((5, 0, 40, 40),) * 2
    device = DeviceTransform(tiny_train_transform, torch.device("cpu"), torch.float32)
    expected = DeviceTransform(tiny_train_transform, torch.device("cpu"), torch.float32).resize(
        collate_images([images[0][:, 5:45], images[1][:, 5:45, :39]]))  # ragged, so resized one by one
    torch.testing.assert_close(device.resize(boxed)[0], expected[0], rtol=0, atol=0)
    assert device(boxed).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(50, 40\) px"):
        device(images)


def test_batches_keep_the_memory_layout_and_ragged_crops_round_trip(jpegs):
    decoded = [decode_uint8(data) for data in jpegs[:3]]  # CHW views of HWC memory
    nhwc = collate_images(decoded)
    assert nhwc.shape == (3, 3, 64, 64) and nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, torch.stack(decoded), rtol=0, atol=0)
    planar = [image.contiguous() for image in decoded]
    assert collate_images(planar).is_contiguous()
    crops = [decoded[0][:, :10, :20], decoded[1][:, 5:30, 3:9], decoded[2]]
    ragged = collate_images(crops)
    assert isinstance(ragged, RaggedImages) and len(ragged) == 3
    assert ragged.shapes == ((10, 20, 3), (25, 6, 3), (64, 64, 3))
    assert ragged.boxes == ((0, 0, 10, 20), (0, 0, 25, 6), (0, 0, 64, 64))
    assert ragged.pixels.numel() == sum(crop.numel() for crop in crops)
    for got, expected in zip(ragged.to(torch.device("cpu")).images(), crops):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    boxes = [(0, 0, 10, 20), (5, 3, 25, 6), (0, 0, 64, 64)]
    whole = collate_images([BoxedImage(image, box) for image, box in zip(decoded, boxes)])
    assert whole.shapes == ((64, 64, 3),) * 3 and whole.boxes == tuple(boxes)
    assert whole.pixels.numel() == sum(image.numel() for image in decoded)  # whole images travel
    for got, expected in zip(whole.images(), crops):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Collates large crops in a DataLoader worker, handed over through shared memory."""

    def __iter__(self):
        yield collate_images([torch.full((3, 800, 300 + i), i, dtype=torch.uint8) for i in range(4)])


def test_large_batches_keep_their_layout_and_round_trip_through_a_worker():
    same = [torch.randint(0, 256, (480, 480, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(4)]
    stacked = collate_images(same)  # images of HWC memory sharing a shape: stacked channels-last
    assert stacked.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(stacked, torch.stack(same), rtol=0, atol=0)
    same_crops = [image[:, 10:410, 20:420] for image in same]  # views, not contiguous, same size
    stacked = collate_images(same_crops)
    assert stacked.is_contiguous(memory_format=torch.channels_last)  # no transposing copy
    torch.testing.assert_close(stacked, torch.stack(same_crops), rtol=0, atol=0)
    crops = [image[:, i:400, :300 + i] for i, image in enumerate(same)]
    for got, expected in zip(collate_images(crops).images(), crops):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    loader = torch.utils.data.DataLoader(_WorkerBatches(), batch_size=None, num_workers=1)
    batch, = list(loader)
    assert batch.pixels.is_shared() and batch.shapes == tuple((800, 300 + i, 3) for i in range(4))
    assert [torch.unique(image).tolist() for image in batch.images()] == [[0], [1], [2], [3]]


def test_a_device_resize_it_cannot_do_names_the_setting(tiny_train_transform):
    lanczos = T.Compose([T.RandomResizedCrop(64, interpolation=T.InterpolationMode.LANCZOS),
                         T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    with pytest.raises(ValueError, match="data.resize_on=worker"):  # at start-up, before any batch
        DeviceTransform(lanczos, torch.device("cpu"), torch.float32)
    in_worker = DeviceTransform(lanczos, torch.device("cpu"), torch.float32, resizes=False)
    assert in_worker(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="data.resize_on=worker"):  # crops it was not built for
        in_worker(collate_images([torch.zeros(3, 8, 9, dtype=torch.uint8), torch.zeros(3, 9, 8, dtype=torch.uint8)]))


@pytest.mark.parametrize("mode,antialias", [("bicubic", True), ("bilinear", True), ("nearest", False)])
def test_batched_resampling_equals_interpolate_per_crop(mode, antialias):
    """The GPU's batched resize (two matrix products per image shape) against one interpolate per
    crop: boxes shrunk and enlarged, of every aspect, in images of three shapes (three groups),
    as float rounding allows."""
    rng = random.Random(0)
    images = []
    for _ in range(24):
        h, w = rng.choice([(64, 64), (72, 50), (30, 41)])
        box_h, box_w = rng.randint(1, h), rng.randint(1, w)
        box = (rng.randint(0, h - box_h), rng.randint(0, w - box_w), box_h, box_w)
        images.append(BoxedImage(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), box))
    crops = collate_images(images)
    got = resample.resize_crops(crops, (48, 56), mode)
    want = torch.stack([F.interpolate(crop[None].float(), size=(48, 56), mode=mode, antialias=antialias)[0]
                        for crop in crops.images()])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    same_shape = collate_images(images[:1] * 3)  # one shape: the buffer itself, viewed
    torch.testing.assert_close(resample.resize_crops(same_shape, (48, 56), mode), want[:1].expand(3, -1, -1, -1),
                               atol=2e-3, rtol=0)
    assert resample.batched(mode, antialias) and not resample.batched("bicubic", False)
