"""The same random crops resized in a loader worker (uint8) and left whole for the training device,
and how near the device's float resize must come to the worker's: shared by the CPU test and its
CUDA twin, so the bounds the GPU checks are proven here first."""
from __future__ import annotations

import random

import torch
from torchvision import transforms as T

from cliplite_dist.data.imagebatch import RaggedImages, collate_images
from cliplite_dist.data.synthetic import make_sample
from cliplite_dist.data.transforms import decode_uint8, uint8_train_transform

# Two image sizes: the batched resize then takes its several-groups branch (one per shape).
IMAGE_SIZES = (96, 72)


def worker_and_device_crops(train_transform: T.Compose, count: int = 32, seed: int = 5
                            ) -> tuple[torch.Tensor, RaggedImages]:
    """(the worker's resized uint8 batch, the same boxes on whole images for the device) of
    `count` synthetic images: hard-edged shapes, where bicubic overshoots most."""
    images = [decode_uint8(make_sample(0, "train", i, IMAGE_SIZES[i % len(IMAGE_SIZES)])["jpg"])
              for i in range(count)]
    worker = uint8_train_transform(train_transform)
    unresized = uint8_train_transform(train_transform, resize=False)
    random.seed(seed)
    resized = collate_images([worker(image) for image in images])
    random.seed(seed)
    return resized, collate_images([unresized(image) for image in images])


def assert_near_the_workers_resize(on_device: torch.Tensor, resized: torch.Tensor) -> None:
    """The worker's uint8 resize clamps its horizontal pass to [0, 255] and rounds it before the
    vertical one, so next to hard edges it is several levels off the float resize (0.02% of the
    pixels here, up to 6 levels), elsewhere within rounding (0.3 on average). One box of 32 one
    pixel off puts 0.5% or more beyond 1.5 levels, a wrong filter 10% or more."""
    difference = (on_device.cpu() - resized.float()).abs()
    beyond = (difference > 1.5).float().mean()
    assert difference.mean() <= 0.35 and beyond <= 1e-3, (difference.mean(), beyond, difference.max())
