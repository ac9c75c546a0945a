"""A worker's batch of uint8 training images, as one buffer.

Images resized in the worker all have the model's input size and are stacked into one tensor, in
the memory layout they come in (libjpeg-turbo decodes to HWC memory, and stacking it as NHWC is
a plain copy where NCHW would be a slow transpose). Images whose crop the training device cuts
and resizes (`data.resize_on=device`) travel whole, back to back in one flat buffer with their
shapes and crop boxes (`RaggedImages`), pinned and copied to the device as one block. In a
loader worker the buffer is shared memory that also holds the batch's token ids (`handoff`).
The small tensors the device builds from a batch's Python values (crop boxes, flipped rows)
go over the same way, pinned (`device_tensor`).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class BoxedImage:
    """A decoded CHW image and the crop box (top, left, height, width) the training device cuts
    from it (data.resize_on=device). The worker ships the whole image, one plain copy per image,
    instead of cutting the crop, a strided copy of nearly as many bytes that takes twice as long."""

    image: torch.Tensor
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class RaggedImages:
    """uint8 images of different sizes: `pixels` holds each one's HWC bytes back to back,
    `shapes` their (height, width, channels) and `boxes` the (top, left, height, width) of each
    that is the training input (`images`). Shapes and boxes stay Python ints, so cutting the
    buffer on a GPU needs no device-to-host read."""

    pixels: torch.Tensor
    shapes: tuple[tuple[int, int, int], ...]
    boxes: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.shapes)

    def pin_memory(self) -> RaggedImages:
        """Called by the DataLoader's pinning thread (pin_memory=True), like Tensor.pin_memory."""
        return RaggedImages(self.pixels.pin_memory(), self.shapes, self.boxes)

    def to(self, device: torch.device, non_blocking: bool = False) -> RaggedImages:
        return RaggedImages(self.pixels.to(device, non_blocking=non_blocking), self.shapes, self.boxes)

    def images(self) -> Iterator[torch.Tensor]:
        """Each image's box as a CHW view of the buffer."""
        offset = 0
        for (h, w, c), (top, left, box_h, box_w) in zip(self.shapes, self.boxes):
            image = self.pixels[offset:offset + h * w * c].view(h, w, c).permute(2, 0, 1)
            yield image[:, top:top + box_h, left:left + box_w]
            offset += h * w * c


def device_tensor(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of `values` on `device` without stalling the host: a copy from pinned
    memory is queued like a kernel, a copy from pageable memory may wait for the GPU."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _copy_image(slot: torch.Tensor, image: torch.Tensor, hwc: bool) -> None:
    """Write a CPU CHW image into a flat contiguous slot of its size and dtype, HWC if `hwc`. An
    image already laid out so in memory is one block: one memmove, half the time of torch's
    copy_ for a 256 px image."""
    source = image.permute(1, 2, 0) if hwc else image
    if source.is_contiguous() and slot.is_contiguous() and slot.numel() == source.numel() \
            and slot.dtype == source.dtype:
        ctypes.memmove(slot.data_ptr(), source.data_ptr(), source.numel() * source.element_size())
    else:
        slot.view(*source.shape).copy_(source)


def image_tensors(images: list[torch.Tensor | BoxedImage]) -> list[torch.Tensor]:
    """The decoded tensors of a batch's images (a BoxedImage's whole image)."""
    return [image.image if isinstance(image, BoxedImage) else image for image in images]


def collate_images(images: list[torch.Tensor | BoxedImage], pixels: torch.Tensor | None = None
                   ) -> torch.Tensor | RaggedImages:
    """CHW images -> one [B, C, H, W] tensor if they share a shape (channels-last strides if the
    first one has its channels innermost), else, or if they come with crop boxes, RaggedImages;
    either way in one buffer: `pixels` (as many elements as the images have) if given, else a
    new one."""
    tensors = image_tensors(images)
    shapes = [tuple(image.shape) for image in tensors]
    ragged = len(set(shapes)) > 1 or any(isinstance(image, BoxedImage) for image in images)
    if pixels is None:
        pixels = torch.empty(sum(image.numel() for image in tensors), dtype=tensors[0].dtype if tensors else torch.uint8)
    # Written in the layout the images have in memory (a transposing copy is 4x slower):
    # channels innermost (decoded JPEGs and crops of them) as HWC; ragged images always are.
    hwc = ragged or tensors[0].stride(0) < tensors[0].stride(2)
    offset = 0
    for image in tensors:
        _copy_image(pixels[offset:offset + image.numel()], image, hwc)
        offset += image.numel()
    if ragged:
        boxes = tuple(image.box if isinstance(image, BoxedImage) else (0, 0, h, w)
                      for image, (_, h, w) in zip(images, shapes))
        return RaggedImages(pixels, tuple((h, w, c) for c, h, w in shapes), boxes)
    c, h, w = shapes[0]
    return pixels.view(len(images), h, w, c).permute(0, 3, 1, 2) if hwc else pixels.view(len(images), c, h, w)
