"""A worker's batch of uint8 training images, as one buffer.

Images resized in the worker all have the model's input size and are stacked into one tensor, in
the memory layout they come in (torchvision.io decodes to HWC memory, so an unresized crop is
channels-last, and stacking it as NHWC is a plain copy where NCHW would be a slow transpose).
Crops left for the training device to resize (`data.resize_on`) differ in size: they travel back
to back in one flat buffer with their shapes (`RaggedImages`), pinned and copied to the device as
one block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class RaggedImages:
    """uint8 images of different sizes: `pixels` holds each one's HWC bytes back to back and
    `shapes` their (height, width, channels). The shapes stay Python ints, so splitting the
    buffer on a GPU needs no device-to-host read."""

    pixels: torch.Tensor
    shapes: tuple[tuple[int, int, int], ...]

    def __len__(self) -> int:
        return len(self.shapes)

    def pin_memory(self) -> RaggedImages:
        """Called by the DataLoader's pinning thread (pin_memory=True), like Tensor.pin_memory."""
        return RaggedImages(self.pixels.pin_memory(), self.shapes)

    def to(self, device: torch.device, non_blocking: bool = False) -> RaggedImages:
        return RaggedImages(self.pixels.to(device, non_blocking=non_blocking), self.shapes)

    def images(self) -> Iterator[torch.Tensor]:
        """Each image as a CHW view of the buffer."""
        offset = 0
        for h, w, c in self.shapes:
            yield self.pixels[offset:offset + h * w * c].view(h, w, c).permute(2, 0, 1)
            offset += h * w * c


def collate_images(images: list[torch.Tensor]) -> torch.Tensor | RaggedImages:
    """uint8 CHW images -> one [B, C, H, W] tensor if they share a shape (channels-last strides if
    the first one has them), else RaggedImages."""
    if len({tuple(image.shape) for image in images}) == 1:
        if images[0].permute(1, 2, 0).is_contiguous():  # HWC memory: stack as NHWC, view as NCHW
            return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
        return torch.stack(images)
    pixels = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8)
    offset = 0
    for image in images:
        c, h, w = image.shape
        pixels[offset:offset + image.numel()].view(h, w, c).copy_(image.permute(1, 2, 0))
        offset += image.numel()
    return RaggedImages(pixels, tuple((h, w, c) for c, h, w in (image.shape for image in images)))
