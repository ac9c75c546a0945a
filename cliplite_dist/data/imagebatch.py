"""A worker's batch of uint8 training images, as one buffer.

Images resized in the worker all have the model's input size and are stacked into one tensor, in
the memory layout they come in (torchvision.io decodes to HWC memory, so an unresized crop is
channels-last, and stacking it as NHWC is a plain copy where NCHW would be a slow transpose).
Crops left for the training device to resize (`data.resize_on`) differ in size: they travel back
to back in one flat buffer with their shapes (`RaggedImages`), pinned and copied to the device as
one block.

The buffer is plain `torch.empty` memory: in a data-loader worker, glibc is told to keep freed
memory (`pipeline.keep_freed_memory`), so each batch reuses pages the previous one touched. Tried
and left out: (a) huge-page-advised mappings for large buffers (81% of the decode-only rate at
512 px against 86% with reused heap pages); (b) writing a worker's batch straight into shared
memory, where the DataLoader moves it: ~2% of a worker's CPU saved, but the copy the DataLoader's
feeder thread makes in parallel with decoding was lost (11% fewer batches per second with a
core to spare).
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
    """CHW images -> one [B, C, H, W] tensor if they share a shape (channels-last strides if the
    first one has its channels innermost), else RaggedImages (uint8 crops); either way in one
    buffer."""
    shapes = [tuple(image.shape) for image in images]
    pixels = torch.empty(sum(image.numel() for image in images), dtype=images[0].dtype if images else torch.uint8)
    same = len(set(shapes)) == 1
    # Written in the layout the images have in memory (a transposing copy is 4x slower):
    # channels innermost (decoded JPEGs and crops of them) as HWC; ragged crops always are.
    hwc = not same or images[0].stride(0) < images[0].stride(2)
    offset = 0
    for image, (c, h, w) in zip(images, shapes):
        slot = pixels[offset:offset + image.numel()]
        if hwc:
            slot.view(h, w, c).copy_(image.permute(1, 2, 0))
        else:
            slot.view(c, h, w).copy_(image)
        offset += image.numel()
    if not same:
        return RaggedImages(pixels, tuple((h, w, c) for c, h, w in shapes))
    c, h, w = shapes[0]
    return pixels.view(len(images), h, w, c).permute(0, 3, 1, 2) if hwc else pixels.view(len(images), c, h, w)
