"""A worker's batch, uint8 training images and token ids, in one buffer.

Images resized in the worker all have the model's input size and are stacked into one tensor, in
the memory layout they come in (torchvision.io decodes to HWC memory, so an unresized crop is
channels-last, and stacking it as NHWC is a plain copy where NCHW would be a slow transpose).
Crops left for the training device to resize (`data.resize_on`) differ in size: they travel back
to back in one flat buffer with their shapes (`RaggedImages`), pinned and copied to the device as
one block. The batch's token ids follow the images in the same buffer (`collate_batch`).

In a data-loader worker, glibc is told to keep freed memory (`pipeline.keep_freed_memory`), so
each batch reuses pages the previous one touched: on the machine we measured, first touching a
fresh 4 KiB page cost ~2 us, more than copying into it. The DataLoader hands a batch to the
training process by copying each tensor into fresh shared memory, page by page, unless it is
there already, and then passes a file descriptor per buffer (~0.5 ms of each side's CPU). So a
worker writes its batches into `SharedBuffers`, shared memory it reuses once the training
process has released the batch it held (`pipeline.BatchInfo.release`), and images and tokens
share one buffer: one descriptor per batch.

Tried and left out: huge-page-advised mappings for the batch buffer (81% of the decode-only rate
at 512 px against 86% with reused heap pages), and fresh shared memory per batch (it only saved
the DataLoader's copy, which its feeder thread had been making in parallel with decoding).
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


LEASE_BYTES = 64  # ahead of the pixels in a shared buffer (keeps them aligned); byte 0 is the lease


class SharedBuffers:
    """One loader worker's batch buffers, in shared memory, each reused once the training process
    has released the batch written into it.

    A buffer's first byte is its lease: 1 from the moment a batch is written into it until the
    training process calls `pipeline.BatchInfo.release`. A batch nobody releases is never
    overwritten: while no kept buffer is free and large enough, a new one is made, and beyond
    `keep` buffers new ones are not kept (each batch then gets fresh shared memory, as without this pool). With
    the loader's prefetched batches (pipeline.PREFETCH_BATCHES, 4), the one being pinned and the
    one in the step, about 7 are in flight per worker either way; `keep` bounds what a consumer
    that never releases costs."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.buffers: list[torch.Tensor] = []

    def take(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels: `nbytes` of shared memory, lease to hand on with them, or None if unpooled)."""
        free = [buffer for buffer in self.buffers if not buffer[0]]
        fitting = [buffer for buffer in free if buffer.numel() >= LEASE_BYTES + nbytes]
        if fitting:
            buffer = fitting[0]
        else:
            for small in free:  # released, but too small for batches this large
                self.buffers.remove(small)
            # a quarter more than asked: crop sizes vary from batch to batch
            buffer = torch.empty(LEASE_BYTES + nbytes * 5 // 4, dtype=torch.uint8).share_memory_()
            if len(self.buffers) >= self.keep:
                return buffer[LEASE_BYTES:LEASE_BYTES + nbytes], None
            self.buffers.append(buffer)
        buffer[0] = 1
        return buffer[LEASE_BYTES:LEASE_BYTES + nbytes], buffer[:1]


def collate_images(images: list[torch.Tensor], pixels: torch.Tensor | None = None) -> torch.Tensor | RaggedImages:
    """CHW images -> one [B, C, H, W] tensor if they share a shape (channels-last strides if the
    first one has its channels innermost), else RaggedImages (uint8 crops); either way in one
    buffer: `pixels` (uint8, as many elements as the images have) if given, else a new one."""
    shapes = [tuple(image.shape) for image in images]
    same = len(set(shapes)) == 1
    numel = sum(image.numel() for image in images)
    if pixels is None:
        pixels = torch.empty(numel, dtype=images[0].dtype if images else torch.uint8)
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


TOKEN_ALIGN = 64  # byte offset of the token ids after the pixels (int64 views need 8)


def collate_batch(images: list[torch.Tensor], tokens: torch.Tensor, buffers: SharedBuffers | None = None
                  ) -> tuple[torch.Tensor | RaggedImages, torch.Tensor, torch.Tensor | None]:
    """(images as `collate_images` makes them, a copy of `tokens`, lease) in one buffer: from
    `buffers` in a loader worker (the lease to release it by; None if unpooled), else a new one
    (lease None)."""
    dtype = images[0].dtype if images else torch.uint8
    image_bytes = sum(image.numel() for image in images) * dtype.itemsize
    token_offset = -(-image_bytes // TOKEN_ALIGN) * TOKEN_ALIGN
    nbytes = token_offset + tokens.numel() * tokens.element_size()
    buffer, lease = buffers.take(nbytes) if buffers is not None else (torch.empty(nbytes, dtype=torch.uint8), None)
    pixels = buffer[:image_bytes].view(dtype)
    token_copy = buffer[token_offset:nbytes].view(tokens.dtype).view(tokens.shape)
    token_copy.copy_(tokens)
    return collate_images(images, pixels), token_copy, lease
