"""A worker's batch of uint8 training images, as one buffer.

Images resized in the worker all have the model's input size and are stacked into one tensor, in
the memory layout they come in (torchvision.io decodes to HWC memory, so an unresized crop is
channels-last, and stacking it as NHWC is a plain copy where NCHW would be a slow transpose).
Crops left for the training device to resize (`data.resize_on`) differ in size: they travel back
to back in one flat buffer with their shapes (`RaggedImages`), pinned and copied to the device as
one block.

Where that buffer lives matters as much as the copy into it: a batch is written once into fresh
memory, and on this machine first touching a fresh 4 KiB page cost about 2 us, more than copying
its bytes (a 512 px batch: 400 us per crop on fresh pages, 70 us into memory already touched).
Large buffers are therefore private memory advised for transparent huge pages (one fault per
2 MiB: 130 us per 512 px crop). Writing a worker's batch straight into shared memory instead,
where the DataLoader moves it, saved about 2% of a worker's CPU at 256 px but gave up the copy
the DataLoader's feeder thread makes in parallel with decoding (11% fewer batches per second
with a core to spare; benchmarks/data.py, loader rows), so the DataLoader still makes that copy.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Iterator

import torch

HUGE_PAGE = 2 << 20  # smaller buffers could not hold a single transparent huge page


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


def batch_buffer(numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A fresh 1-D tensor for one batch; from a huge-page-advised mapping when it is large."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype)  # the tensor keeps the mapping alive


def collate_images(images: list[torch.Tensor]) -> torch.Tensor | RaggedImages:
    """CHW images -> one [B, C, H, W] tensor if they share a shape (channels-last strides if the
    first one has its channels innermost), else RaggedImages (uint8 crops); either way in one
    `batch_buffer`."""
    shapes = [tuple(image.shape) for image in images]
    pixels = batch_buffer(sum(image.numel() for image in images), images[0].dtype if images else torch.uint8)
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
