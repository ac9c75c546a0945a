"""Training augmentation presets (`data.augment`): what a loader worker draws per sample, and the
flips and colour jitter the training device applies to a whole batch at once.

`open_clip` is open_clip's own train transform: a random resized crop of the model's scale
(0.9, 1) and nothing else. `paper` is the CLIP-Lite reference code's (Shrivastava et al. 2023,
built on VirTex): a wider crop, a horizontal flip that also swaps "left" and "right" in the
caption (so the caption stays true of the mirrored image), and colour jitter.

A worker draws every random parameter of a sample in one place (`RandomResizedCropUint8.draw`,
Python's RNG, seeded per loader worker): the crop box, then the preset's flip and jitter. Flipped
samples get their caption swapped before tokenisation; the draws ride with the batch as plain
Python values (`BatchAugment`, in the batch's `BatchInfo`), and `DeviceTransform` applies them,
batched, to the float images on the training device, after the resize and before normalisation.
The ops follow torchvision's float semantics (transforms.v2.functional.adjust_*), with one
factor per image.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cliplite_dist.data.imagebatch import device_tensor


@dataclass(frozen=True)
class SampleAugment:
    """What the training device does to one image beyond its crop: a horizontal flip or not, and
    colour jitter or not: a factor per op, indexed as JITTER_OPS (brightness, contrast, saturation:
    multipliers; hue: a shift in turns of the hue circle), and the order the four ops run in."""

    flip: bool
    jitter: tuple[float, float, float, float] | None = None
    order: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Preset:
    """One `data.augment` choice: its crop and the flip and colour jitter drawn per sample."""

    scale: tuple[float, float] | None = None  # crop area as a fraction of the image; None: the model's own
    ratio: tuple[float, float] | None = None  # crop aspect (width / height) range; None: the model's own
    flip: float = 0.0  # probability of a horizontal flip (with "left" and "right" swapped in the caption)
    jitter: float = 0.0  # probability of colour jitter
    brightness: float = 0.0  # factor drawn from [max(0, 1 - x), 1 + x]
    contrast: float = 0.0  # likewise
    saturation: float = 0.0  # likewise
    hue: float = 0.0  # shift drawn from [-x, x] of the hue circle

    def draw(self, rng: random.Random) -> SampleAugment | None:
        """A sample's flip and jitter; None, with nothing drawn, for a preset that has neither (so
        the crop boxes of `open_clip` come from the same draws as they always did)."""
        if not self.flip and not self.jitter:
            return None
        flip = rng.random() < self.flip
        if rng.random() >= self.jitter:
            return SampleAugment(flip)

        def factor(strength: float) -> float:
            return rng.uniform(max(0.0, 1 - strength), 1 + strength)

        factors = (factor(self.brightness), factor(self.contrast), factor(self.saturation),
                   rng.uniform(-self.hue, self.hue))
        return SampleAugment(flip, factors, tuple(rng.sample(range(len(factors)), len(factors))))


# The keys are config.Augment's choices (tests/test_augment.py checks they agree).
PRESETS: dict[str, Preset] = {
    "open_clip": Preset(),
    "paper": Preset(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8,
                    brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
}


_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}


def _other_side(match: re.Match) -> str:
    word = match.group(0)
    other = _OTHER_SIDE[word.lower()]
    if word.isupper():
        return other.upper()
    return other.capitalize() if word[0].isupper() else other


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: the whole words "left" and "right" exchanged ("bright"
    and "leftover" stay), an initial capital or all capitals kept; phrases such as "to the left
    of" and "on its right" follow from the words. The reference code's substring replace would
    turn "bright" into "bleft"."""
    return _SIDES.sub(_other_side, caption)


@dataclass(frozen=True)
class Augmented:
    """A worker's item for one sample (a crop, a BoxedImage, or the JPEG to decode into the batch)
    with the flip and jitter drawn for it; unwrapped, batch by batch, by `unwrap_augmented`."""

    item: Any
    augment: SampleAugment


def with_augment(item: Any, augment: SampleAugment | None) -> Any:
    """`item` wrapped with its draws; `item` itself where the preset drew none."""
    return item if augment is None else Augmented(item, augment)


@dataclass(frozen=True)
class BatchAugment:
    """The flips and colour jitter of a batch's samples (`SampleAugment`'s fields, one tuple per
    field, in batch order). Plain tuples: it travels in the batch's BatchInfo, pickled with it
    from the loader worker (tuples pickle much faster than an object per sample, and no tensor
    means no shared-memory descriptor of its own), and the device reads no number back."""

    flips: tuple[bool, ...]
    jitters: tuple[tuple[float, float, float, float] | None, ...]
    orders: tuple[tuple[int, int, int, int] | None, ...]

    def captions(self, captions: Sequence[str]) -> list[str]:
        """The batch's captions, those of flipped samples with left and right swapped."""
        return [swap_left_right(caption) if flip else caption for caption, flip in zip(captions, self.flips)]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """`images` ([B, 3, H, W] floats in [0, 1], on the device) flipped and jittered in place,
        each row by its own draws; also returned."""
        flipped = [row for row, flip in enumerate(self.flips) if flip]
        if flipped:
            rows = device_tensor(flipped, images.device, torch.long)
            images.index_copy_(0, rows, images.index_select(0, rows).flip(-1))
        jittered = [(row, jitter, order) for row, (jitter, order) in enumerate(zip(self.jitters, self.orders))
                    if jitter is not None]
        if jittered:
            _jitter(images, jittered)
        return images


def unwrap_augmented(items: list) -> tuple[list, BatchAugment | None]:
    """(the items unwrapped, their draws) of one batch; the items and None where nothing was drawn
    (a preset draws for every sample or for none)."""
    if not items or not isinstance(items[0], Augmented):
        return items, None
    samples = [item.augment for item in items]
    return [item.item for item in items], BatchAugment(tuple(sample.flip for sample in samples),
                                                       tuple(sample.jitter for sample in samples),
                                                       tuple(sample.order for sample in samples))


# torchvision's greyscale weights (rgb_to_grayscale; ITU-R 601 luma, with red rounded to 0.2989)
GREY_WEIGHTS = (0.2989, 0.587, 0.114)

# The ops below work in place on their input (also returned): on CPU, every fresh batch-sized
# tensor costs its first-touch page faults, as much as an op's arithmetic.


def _grey(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] luma of [N, 3, H, W] RGB."""
    red, green, blue = images.split(1, dim=1)
    return (red * GREY_WEIGHTS[0]).add_(green, alpha=GREY_WEIGHTS[1]).add_(blue, alpha=GREY_WEIGHTS[2])


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """factor x image + (1 - factor) x other per image, clamped to [0, 1] (torchvision's blend);
    `other` is scaled in place too."""
    factors = factors.view(-1, 1, 1, 1)
    return images.mul_(factors).add_(other.mul_(1 - factors)).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] times one factor per image, clamped."""
    return images.mul_(factors.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image blended with the mean of its greyscale version."""
    return _blend(images, _grey(images).mean(dim=(1, 2, 3), keepdim=True), factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image blended with its greyscale version."""
    return _blend(images, _grey(images), factors)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image's hue turned by its shift (a fraction of the circle), saturation and value kept.
    Through HSV, never stored: with value V = max, chroma C = max - min and hue H in sixths of the
    circle, a channel with offset n (red 5, green 3, blue 1) is V - C * clamp(2 - |k - 2|, 0, 1),
    k = (n + H) mod 6 (which stays within [min, max], so within [0, 1])."""
    minimum, value = torch.aminmax(images, dim=1, keepdim=True)
    chroma = value - minimum
    red, green, blue = images.split(1, dim=1)
    # H x C: which channel is the maximum says which sextant pair the hue lies in
    hue = torch.where(value == red, green - blue, torch.where(value == green, (blue - red).add_(chroma, alpha=2),
                                                              (red - green).add_(chroma, alpha=4)))
    hue.div_(torch.where(chroma > 0, chroma, 1.0)).add_(6 * shifts.view(-1, 1, 1, 1))  # grey: any hue, C is 0
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # made there: no copy
    weights = torch.add(hue, offsets, out=images)  # the input is read for the last time above
    weights.remainder_(6).sub_(2).abs_().neg_().add_(2).clamp_(0, 1)
    return weights.mul_(chroma).neg_().add_(value)


# indexed as SampleAugment.jitter (torchvision's ColorJitter numbers its ops the same way)
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter(images: torch.Tensor, jittered: list[tuple[int, tuple[float, ...], tuple[int, ...]]]) -> None:
    """Each (row, jitter factors, order) row through the four ops in its own order, in place. Step
    by step: the rows are sorted by the op they run at that step, gathered into one buffer, each
    op applied once to its run of rows, and written back; the orders are known on the host, so
    nothing is read back from the device."""
    steps = range(len(JITTER_OPS))
    plans = [sorted(jittered, key=lambda item: item[2][step]) for step in steps]
    rows = device_tensor([[row for row, _, _ in plan] for plan in plans], images.device, torch.long)
    factors = device_tensor([[jitter[order[step]] for _, jitter, order in plan] for step, plan in zip(steps, plans)],
                            images.device, images.dtype)
    batch = images.new_empty(len(jittered), *images.shape[1:])
    for step, plan in zip(steps, plans):
        torch.index_select(images, 0, rows[step], out=batch)
        runs = Counter(order[step] for _, _, order in plan)
        start = 0
        for op, adjust in enumerate(JITTER_OPS):
            end = start + runs[op]
            if end > start:
                adjust(batch[start:end], factors[step, start:end])
            start = end
        images.index_copy_(0, rows[step], batch)
