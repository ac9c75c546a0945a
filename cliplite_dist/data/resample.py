"""A batch of crops of different sizes resized to one size in two batched matrix products.

`torch.nn.functional.interpolate` resizes one input size per call, so a batch whose crops all
differ (a random resized crop draws a new box per image) took a call, several kernel launches,
per crop: 256 crops kept the host launching while the GPU idled. Resampling is linear and
separable: each output row is a weighted sum of input rows, each output column of input
columns. So a crop's resize is `Wy @ image @ Wx^T`, with `Wy` [out_h, H] and `Wx` [out_w, W]
holding the filter's taps for that crop's box (zero outside it) over the whole image; built for
the whole batch at once on the device, B resizes become two batched matrix products, and the
crops are never cut out.

The taps are torch's own: for antialiased bicubic and bilinear, PIL's filters (Keys' cubic with
a = -0.5, the triangle) stretched by the scale when shrinking and normalised per output pixel,
computed in float32 as torch does; for nearest, torch's `floor(i * scale)` rule. Results match
`interpolate` to float rounding (the products sum in another order).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from cliplite_dist.data.imagebatch import RaggedImages, device_tensor


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp_min(0)


# mode -> (the filter, its half-width in input pixels at scale 1)
FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bicubic": (_keys_cubic, 2.0), "bilinear": (_triangle, 1.0)}
MODES = ("nearest", *FILTERS)


def batched(mode: str, antialias: bool) -> bool:
    """Whether `resize_crops` reproduces interpolate(mode, antialias): nearest, or an
    antialiased filter (open_clip's crops are antialiased bicubic)."""
    return mode == "nearest" or (mode in FILTERS and antialias)


def resampling_matrices(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, out_size: int,
                        mode: str) -> torch.Tensor:
    """[B, out_size, in_size] float32: row i of matrix b gives output pixel i of a crop of
    `lengths[b]` input pixels starting at `starts[b]` (float32 [B] tensors on the device), as
    weights over all `in_size` input pixels."""
    device = starts.device
    scale = lengths / out_size  # [B]
    i = torch.arange(out_size, dtype=torch.float32, device=device)
    local = torch.arange(in_size, dtype=torch.float32, device=device)[None, None, :] - starts[:, None, None]
    if mode == "nearest":
        source = torch.minimum(torch.floor(i[None, :] * scale[:, None]), lengths[:, None] - 1)
        return (local == source[:, :, None]).float()
    kernel, half_width = FILTERS[mode]
    stretch = scale.clamp_min(1.0)  # shrinking widens the filter (the antialiasing), enlarging does not
    support = half_width * stretch
    center = scale[:, None] * (i[None, :] + 0.5)  # [B, out]
    # taps from trunc(center - support + 0.5) (at least 0) to trunc(center + support + 0.5) (at most the length)
    first = (center - support[:, None] + 0.5).trunc().clamp_min(0)
    last = torch.minimum((center + support[:, None] + 0.5).trunc(), lengths[:, None])
    weights = kernel((local - center[:, :, None] + 0.5) / stretch[:, None, None])
    weights = weights * ((local >= first[:, :, None]) & (local < last[:, :, None]))
    return weights / weights.sum(-1, keepdim=True)


def _image_offsets(shapes: tuple[tuple[int, int, int], ...]) -> list[int]:
    offsets, offset = [], 0
    for h, w, c in shapes:
        offsets.append(offset)
        offset += h * w * c
    return offsets


def _same_shape_images(crops: RaggedImages, shape: tuple[int, int, int], index: list[int]) -> torch.Tensor:
    """[n, H, W, C] uint8 of the images `index` (all of `shape`): a view when they are the whole
    buffer, else one stacking copy."""
    h, w, c = shape
    if len(index) == len(crops):
        return crops.pixels.view(len(index), h, w, c)
    offsets = _image_offsets(crops.shapes)
    return torch.stack([crops.pixels[offsets[i]:offsets[i] + h * w * c].view(h, w, c) for i in index])


def _resize_group(crops: RaggedImages, shape: tuple[int, int, int], index: list[int], size: tuple[int, int],
                  mode: str) -> torch.Tensor:
    device = crops.pixels.device
    boxes = device_tensor([crops.boxes[i] for i in index], device, torch.float32)  # [n, 4]: top, left, height, width
    rows = resampling_matrices(boxes[:, 0], boxes[:, 2], shape[0], size[0], mode)
    cols = resampling_matrices(boxes[:, 1], boxes[:, 3], shape[1], size[1], mode)
    images = _same_shape_images(crops, shape, index).permute(0, 3, 1, 2).float()  # [n, C, H, W]
    return rows[:, None] @ (images @ cols.transpose(1, 2)[:, None])


def resize_crops(crops: RaggedImages, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[B, C, size] float32 on the crops' device (not clamped: bicubic overshoots [0, 255] as
    interpolate does): each image's box resized. Images are grouped by shape, one group (two
    matrix products) per shape; a batch of one image size is one group."""
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, shape in enumerate(crops.shapes):
        groups[shape].append(i)
    if len(groups) == 1:
        (shape, index), = groups.items()
        return _resize_group(crops, shape, index, size, mode)
    channels = crops.shapes[0][2] if len(crops) else 3
    device = crops.pixels.device
    out = torch.empty(len(crops), channels, *size, device=device)
    for shape, index in groups.items():  # out[list] would copy the list to the GPU synchronously
        out.index_copy_(0, device_tensor(index, device, torch.long), _resize_group(crops, shape, index, size, mode))
    return out
