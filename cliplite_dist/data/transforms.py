"""Training images as uint8 tensors: decoded by libjpeg-turbo, cropped in uint8, normalised on the
device.

A data-loader worker's time goes to decoding and augmenting. libjpeg-turbo (simplejpeg for JPEGs,
torchvision.io for other formats) plus transforms.v2 on uint8 tensors is faster per worker than
PIL with open_clip's transforms (docs/design.md, benchmarks/data.py), and a uint8 batch is a
quarter of the bytes a float batch puts through the workers' shared memory and the host-to-device
copy. Scaling to [0, 1] and mean/std normalisation then run once per batch on the training device
(`DeviceTransform`). The crop mirrors open_clip's train transform exactly (same arguments,
interpolation and antialiasing); evaluation keeps open_clip's own PIL transforms.

Resizing the crop costs a worker about as much as decoding a 256 px JPEG. With
`data.resize_on=device` (the default on CUDA) a worker only draws the box and sends it with the
whole image (`imagebatch.BoxedImage`), and `DeviceTransform` resizes every box on the training
device, in float32 (clamped to [0, 255], not rounded: 0.3 grey levels from the worker's uint8
resize on average, and within 1.5 except next to hard edges, where the worker clamps the bicubic
overshoot of its first, horizontal, pass to [0, 255] before the second and is off by up to several
levels); on a GPU the whole batch at once (`resample`).

`data.augment` (`augment.PRESETS`) may widen the crop and add a flip and colour jitter: the worker
draws them with the box (`RandomResizedCropUint8.draw`), `DeviceTransform` applies them to the
float batch, whichever side resized it.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from cliplite_dist.data import resample
from cliplite_dist.data.augment import PRESETS, Augmented, BatchAugment, Preset, SampleAugment, with_augment
from cliplite_dist.data.imagebatch import BoxedImage, RaggedImages
from cliplite_dist.data.jpeg import decode_jpeg

# open_clip train-transform steps that only change the container (PIL -> tensor), not the pixels.
FORMAT_ONLY = frozenset({"MaybeConvertMode", "MaybeToTensor", "ToTensor"})


def decode_pil(data: bytes) -> Image.Image:
    """RGB PIL image; `convert` forces PIL's lazy decode, so the pixels are really there."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def decode_torchvision(data: bytes) -> torch.Tensor:
    """uint8 CHW RGB via torchvision.io (JPEG, PNG, WebP, GIF); RuntimeError for what it cannot
    read. bytearray: torch.frombuffer warns on read-only bytes, and copying a compressed image
    costs microseconds."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_uint8(data: bytes) -> torch.Tensor:
    """uint8 CHW RGB (a view of HWC memory): JPEGs via simplejpeg (`jpeg`), other formats via
    torchvision.io, and the rest, with the rare files libjpeg-turbo refuses but PIL reads (CMYK
    JPEGs, say), through PIL."""
    image = decode_jpeg(data)
    if image is not None:
        return image
    try:
        return decode_torchvision(data)
    except RuntimeError:
        return pil_to_tensor(decode_pil(data))


def _crop_and_norm(pil_transform: T.Compose) -> tuple[T.RandomResizedCrop, T.Normalize]:
    crop = norm = None
    for step in pil_transform.transforms:
        if isinstance(step, T.RandomResizedCrop):
            crop = step
        elif isinstance(step, T.Normalize):
            norm = step
        elif type(step).__name__ not in FORMAT_ONLY:
            raise ValueError(f"no uint8-tensor equivalent for train-transform step {step!r}")
    if crop is None or norm is None:
        raise ValueError(f"expected a RandomResizedCrop and a Normalize in {pil_transform!r}")
    return crop, norm


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's algorithm (up to 10 draws of area
    and log-uniform aspect, then the central crop closest to the ratio range), drawn with Python's
    RNG. torchvision draws with a handful of tiny torch ops per sample, which cost more than the
    crop of a 64 px image here. The draws are `rng.uniform`'s, spelled out: with open_clip's scale
    (0.9, 1) most of the 10 miss a square image, and the calls were most of a box's cost."""
    area, draw = height * width, rng.random
    scale_low, scale_span = scale[0], scale[1] - scale[0]
    log_low = math.log(ratio[0])
    log_span = math.log(ratio[1]) - log_low
    for _ in range(10):
        target = area * (scale_low + scale_span * draw())
        aspect = math.exp(log_low + log_span * draw())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class RandomResizedCropUint8:
    """open_clip's RandomResizedCrop on a uint8 CHW tensor: same box distribution, interpolation
    and antialiasing (data-loader workers seed Python's RNG per worker, as they do torch's), or
    the `augment` preset's crop, with its flip and colour jitter drawn alongside (an `Augmented`
    crop, for `DeviceTransform`). With `resize=False` it returns the image with its box, for
    `DeviceTransform` to cut and resize."""

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: v2.InterpolationMode
    antialias: bool
    resize: bool = True
    augment: Preset = PRESETS["open_clip"]

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], SampleAugment | None]:
        """Every random parameter of one sample, from Python's RNG in this order: the (top, left,
        h, w) of a crop of an image of this size, then the preset's flip and jitter (None, with
        nothing drawn, for a preset without them)."""
        return crop_box(height, width, self.scale, self.ratio, random), self.augment.draw(random)

    def __call__(self, image: torch.Tensor) -> torch.Tensor | BoxedImage | Augmented:
        (top, left, h, w), augment = self.draw(image.shape[-2], image.shape[-1])
        if not self.resize:
            return with_augment(BoxedImage(image, (top, left, h, w)), augment)
        crop = v2.functional.resized_crop(image, top, left, h, w, list(self.size), interpolation=self.interpolation,
                                          antialias=self.antialias)
        return with_augment(crop, augment)


def uint8_train_transform(pil_transform: T.Compose, resize: bool = True,
                          augment: Preset = PRESETS["open_clip"]) -> RandomResizedCropUint8:
    """open_clip's train transform up to (not including) scaling and normalisation, on uint8
    tensors, with the crop scale and ratio of `augment` where it sets them; `resize=False` stops
    after the crop. Any step it cannot mirror is refused rather than silently dropped."""
    crop, _ = _crop_and_norm(pil_transform)
    return RandomResizedCropUint8(tuple(crop.size), augment.scale or tuple(crop.scale),
                                  augment.ratio or tuple(crop.ratio), crop.interpolation, bool(crop.antialias),
                                  resize, augment)


# torch.nn.functional.interpolate's name for each interpolation open_clip's crop can use
INTERPOLATE_MODES = {v2.InterpolationMode.BICUBIC: "bicubic", v2.InterpolationMode.BILINEAR: "bilinear",
                     v2.InterpolationMode.NEAREST: "nearest"}


class DeviceTransform:
    """The rest of the train transform, on a uint8 batch already on the device: the crops of
    images that came whole (RaggedImages) cut and resized one by one in float32, then all of it
    to [0, 1], flipped and colour-jittered as the worker drew (`augment.BatchAugment`, if any),
    minus mean, over std, in the engine's input dtype (computed in fp32)."""

    def __init__(self, pil_transform: T.Compose, device: torch.device, dtype: torch.dtype, resizes: bool = True):
        """`resizes`: crops come unresized (data.resize_on=device); an interpolation this cannot
        do on the device is then refused here, at start-up, not at the first batch."""
        crop, norm = _crop_and_norm(pil_transform)
        self.size, self.interpolation = tuple(crop.size), crop.interpolation
        if resizes and crop.interpolation not in INTERPOLATE_MODES:
            raise ValueError(f"no device resize for interpolation {crop.interpolation!r}; set data.resize_on=worker")
        self.antialias = bool(crop.antialias) and crop.interpolation != v2.InterpolationMode.NEAREST
        self.mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1) * 255
        self.dtype = dtype

    def _interpolate(self, images: torch.Tensor) -> torch.Tensor:
        if self.interpolation not in INTERPOLATE_MODES:  # built with resizes=False, yet sent crops
            raise ValueError(f"images of {tuple(images.shape[-2:])} px need a {self.interpolation!r} resize to "
                             f"{self.size}, which has no device equivalent; set data.resize_on=worker")
        return F.interpolate(images.float(), size=self.size, mode=INTERPOLATE_MODES[self.interpolation],
                             antialias=self.antialias)

    def resize(self, crops: RaggedImages) -> torch.Tensor:
        """[B, C, H, W] float32 on the crops' device, in [0, 255]. On a GPU one batched
        resampling (`resample.resize_crops`: a few launches instead of several per crop); on a
        CPU, where launches are cheap and its two matrix products over whole images are not,
        and for filters it does not reproduce, one interpolate per crop (`resize_each`)."""
        mode = INTERPOLATE_MODES.get(self.interpolation)
        if crops.pixels.device.type == "cuda" and resample.batched(mode, self.antialias):
            return resample.resize_crops(crops, self.size, mode).clamp_(0, 255)
        return self.resize_each(crops)

    def resize_each(self, crops: RaggedImages) -> torch.Tensor:
        """`resize` one crop at a time. Their sizes differ, and padding them to one would change
        the antialiasing filter's support."""
        channels = crops.shapes[0][2] if len(crops) else 3
        out = torch.empty(len(crops), channels, *self.size, device=crops.pixels.device)
        for i, crop in enumerate(crops.images()):
            out[i] = self._interpolate(crop[None])[0]
        return out.clamp_(0, 255)

    def __call__(self, images: torch.Tensor | RaggedImages, augment: BatchAugment | None = None) -> torch.Tensor:
        """uint8 images (or whole images with crop boxes), and the batch's flips and jitter ->
        normalised model input. In place on the one float32 copy: fresh tensors per operation cost
        the CPU far more."""
        if isinstance(images, RaggedImages):
            floats = self.resize(images)
        elif tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"a stacked batch of {tuple(images.shape[-2:])} px images, expected the model's "
                             f"{self.size} (crops left to the device come as RaggedImages)")
        else:
            floats = images.to(torch.float32, copy=True)
        if augment is not None:  # on [0, 1], where the ops' clamps and torchvision's float semantics hold
            augment.apply(floats.div_(255)).mul_(255)
        return floats.sub_(self.mean).div_(self.std).to(self.dtype)
