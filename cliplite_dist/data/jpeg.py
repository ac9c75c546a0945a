"""JPEG decoding by libjpeg-turbo through simplejpeg, into a buffer of our choosing.

Web corpora are JPEGs, and decoding them is most of a data-loader worker's time. simplejpeg
drives the same libjpeg-turbo as torchvision.io (the same pixels: tests/test_jpeg.py), a little
faster, and writes into a given buffer: a batch whose crops the training device cuts
(`data.resize_on=device`) is decoded straight into the shared memory the training process reads,
with no copy after decoding (measurements: docs/design.md). JPEGs in other colour spaces (CMYK, YCCK: libjpeg-turbo's conversion differs
from PIL's) and other formats are left to `transforms.decode_uint8`'s other decoders.
"""
from __future__ import annotations

import numpy as np
import simplejpeg
import torch

# Colour spaces libjpeg-turbo turns into RGB as torchvision.io and PIL do.
RGB_DECODABLE = frozenset({"YCbCr", "Gray", "RGB"})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG this module decodes; None for other data."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # not a JPEG, or a header libjpeg-turbo cannot read
        return None
    return (height, width) if colorspace in RGB_DECODABLE else None


def decode_jpeg(data: bytes) -> torch.Tensor | None:
    """uint8 CHW RGB (a view of HWC memory, like torchvision.io's), or None if `data` is not a JPEG
    this module decodes. Raises ValueError for a damaged one."""
    if jpeg_size(data) is None:
        return None
    return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)


def decode_jpeg_into(data: bytes, out: np.ndarray, height: int, width: int) -> bool:
    """Decode a JPEG of `jpeg_size` (height, width) into `out` (uint8, height * width * 3, HWC);
    False if it turns out damaged (nothing else is written)."""
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    except ValueError:  # truncated or corrupt data past a readable header
        return False
    return image.shape == (height, width, 3)
