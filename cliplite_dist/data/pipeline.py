"""The training stream: shards -> samples -> decode -> caption pick -> tokenize -> batches.

Each data-loader worker of each rank is one slot (`slots.SlotReader`): it reads its share of the
shards for as long as it is asked, so a rank never runs short: the trainer takes exactly
`steps_per_epoch` batches from every rank, which keeps DeepSpeed's collectives in step whatever
the shard counts. Every batch carries its reader's position and bad-data counts; the trainer
keeps the newest of each (`DataProgress`) and saves them with checkpoints, so a restarted run
continues its epoch exactly where it stopped, without repeating or skipping a sample.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cliplite_dist.config import DataConfig
from cliplite_dist.data.augment import Augmented, BatchAugment, unwrap_augmented, with_augment
from cliplite_dist.data.badsamples import BadDataCounter, BadDataTally
from cliplite_dist.data.handoff import HandOff, SharedBuffers, collate_batch, collate_jpegs, forget
from cliplite_dist.data.imagebatch import BoxedImage
from cliplite_dist.data.jpeg import jpeg_size
from cliplite_dist.data.opener import ShardOpener
from cliplite_dist.data.shards import Corpus
from cliplite_dist.data.slots import SlotPosition, SlotReader, stable_seed
from cliplite_dist.data.transforms import RandomResizedCropUint8, decode_pil, decode_uint8
from cliplite_dist import memlimit, stopping

log = logging.getLogger(__name__)


class MissingCaption(ValueError):
    """No caption field, or only empty ones (bad-data kind `no_caption`)."""


@dataclass
class SampleDecoder:
    """Turns a raw webdataset sample into (image tensor, caption text). `decode` turns image bytes
    into what `transform` takes: a PIL image (evaluation, open_clip's transforms) or a uint8
    tensor (training: transforms.decode_uint8 with transforms.uint8_train_transform)."""

    transform: Callable
    caption_key: str
    image_keys: tuple[str, ...]
    pick_first_caption: bool = False  # evaluation: deterministic caption
    decode: Callable = decode_pil

    def _image_data(self, sample: dict) -> bytes | None:
        """The encoded image under the first of `image_keys` the sample has."""
        for key in self.image_keys:
            if key in sample:
                return sample[key]
        return None

    def image(self, sample: dict) -> torch.Tensor | BoxedImage:
        data = self._image_data(sample)
        if data is None:
            raise KeyError(f"no image under any of {self.image_keys}")
        return self.transform(self.decode(data))

    @property
    def sends_whole_jpegs(self) -> bool:
        """Whether `whole_jpeg` applies: uint8 decoding, crops cut and resized on the device."""
        return self.decode is decode_uint8 and isinstance(self.transform, RandomResizedCropUint8) \
            and not self.transform.resize

    def whole_jpeg(self, sample: dict) -> tuple[bytes, int, int, tuple[int, int, int, int]] | Augmented | None:
        """(JPEG data, height, width, crop box) of the sample's image, to be decoded straight into
        a batch buffer (`handoff.collate_jpegs`), `Augmented` if the transform drew a flip and
        jitter with the box; None if it is not a JPEG `jpeg` decodes."""
        data = self._image_data(sample)
        size = None if data is None else jpeg_size(data)
        if size is None:
            return None
        box, augment = self.transform.draw(*size)
        return with_augment((data, *size, box), augment)

    def caption(self, sample: dict, pick: int) -> str:
        """The caption: of a list, the non-empty one at `pick` modulo their number (the first
        with pick_first_caption). Raises MissingCaption for absent or empty ones;
        UnicodeDecodeError / json.JSONDecodeError for undecodable ones."""
        if self.caption_key == "txt":
            if "txt" not in sample:
                raise MissingCaption("no .txt field")
            captions = sample["txt"].decode("utf-8")
        else:
            field_name = self.caption_key.split(":", 1)[1]
            if "json" not in sample:
                raise MissingCaption("no .json field")
            captions = json.loads(sample["json"].decode("utf-8")).get(field_name)
        if isinstance(captions, list):
            captions = [c for c in captions if isinstance(c, str) and c.strip()]
            if not captions:
                raise MissingCaption("empty caption list")
            captions = captions[0 if self.pick_first_caption else pick % len(captions)]
        if not isinstance(captions, str) or not captions.strip():
            raise MissingCaption(f"empty caption ({self.caption_key})")
        return captions.strip()


def _where(sample: dict) -> str:
    return f"{sample.get('__url__')}:{sample.get('__key__')}"


def image_or_none(sample: dict, decoder: SampleDecoder, counter: BadDataCounter
                  ) -> torch.Tensor | BoxedImage | Augmented | None:
    try:
        return decoder.image(sample)
    except Exception as exc:  # undecodable, truncated, no image field
        counter.record("image", sample.get("__url__", "?"), _where(sample), exc)
        return None


def decoded_images(samples, decoder: SampleDecoder, counter: BadDataCounter) -> Iterator[tuple[dict, torch.Tensor]]:
    """(sample, image tensor) of every sample whose image decodes; the rest counted and skipped."""
    for sample in samples:
        image = image_or_none(sample, decoder, counter)
        if image is not None:
            yield sample, image


def caption_or_none(sample: dict, decoder: SampleDecoder, counter: BadDataCounter, pick: int) -> str | None:
    try:
        return decoder.caption(sample, pick)
    except MissingCaption as exc:
        counter.record("no_caption", sample.get("__url__", "?"), _where(sample), exc)
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:  # non-UTF-8, bad JSON, not a dict
        counter.record("bad_caption", sample.get("__url__", "?"), _where(sample), exc)
    return None


@dataclass
class BatchInfo:
    """What rides along with a batch: which reader made it, where that reader now stands, its
    bad-data counts so far, (with data.record_keys) the samples' `url#key`s, from a loader worker
    the lease on the shared memory holding the batch's images and tokens (the DataLoader's
    pinning leaves it alone: it stays the worker's byte), and the flips and colour jitter the
    device applies (`DeviceTransform`; None with data.augment=open_clip)."""

    epoch: int
    reader: int  # logical worker index within the rank
    position: dict
    bad: dict
    keys: list[str] = field(default_factory=list)
    lease: torch.Tensor | None = None  # handoff.SharedBuffers' flag byte
    augment: BatchAugment | None = None

    def release(self) -> None:
        """Let the worker that wrote this batch's images and tokens overwrite them: call once
        nothing reads them again (nor the copies that share their memory: CPU `.to()` makes none)."""
        if self.lease is not None:
            self.lease.fill_(0)


class BatchStream(IterableDataset):
    """Endless batches of (images, tokens, BatchInfo) for one rank; images as
    `imagebatch.collate_images` makes them (a uint8 tensor, or RaggedImages: whole images and
    the crop boxes the device cuts).
    From a loader worker, release each batch (`BatchInfo.release`) once done with it, or the
    worker writes every batch into fresh shared memory.

    `set_epoch` before each `iter()` says which epoch to read and where each reader starts.
    """

    def __init__(self, corpora: list[Corpus], cfg: DataConfig, decoder: SampleDecoder, tokenizer,
                 rank: int, world_size: int, seed: int):
        self.corpora, self.cfg, self.decoder, self.tokenizer = corpora, cfg, decoder, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.opener = ShardOpener(cfg.cache_dir)
        self.id = int.from_bytes(os.urandom(8), "little")  # names the buffers its workers hand over
        weakref.finalize(self, forget, self.id)
        self.epoch, self.first_reader = 0, 0
        self.starts: dict[int, tuple[SlotPosition, dict | None]] = {}

    def set_epoch(self, epoch: int, first_reader: int = 0,
                  starts: dict[int, tuple[SlotPosition, dict | None]] | None = None) -> None:
        """Read `epoch`; reader `first_reader` serves the first batch (the loader always asks its
        worker 0 first: rotating keeps batch k of an epoch with reader k mod workers after a
        restart); `starts` maps readers to (position, bad-data snapshot) to continue from."""
        self.epoch, self.first_reader, self.starts = epoch, first_reader, dict(starts or {})

    def _reader(self) -> tuple[int, int, int]:
        """(slot, number of slots, logical reader index) of the calling worker."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader = (worker + self.first_reader) % workers
        return self.rank * workers + reader, self.world_size * workers, reader

    def _captioned(self, samples: Iterator[tuple[dict, SlotPosition]], wanted: int,
                   counter: BadDataCounter) -> tuple[list[tuple[dict, str]], SlotPosition | None]:
        """The next `wanted` samples that have a caption, each with it, and the position after the
        last sample read (None if the stream had none left); the others are counted and skipped."""
        taken, position = [], None
        for sample, position in samples:
            # The caption pick depends on (seed, epoch, sample) only: the same after a restart.
            pick = stable_seed(self.seed, self.epoch, sample["__url__"], sample["__key__"])
            caption = caption_or_none(sample, self.decoder, counter, pick)
            if caption is not None:
                taken.append((sample, caption))
                if len(taken) == wanted:
                    break
        return taken, position

    def __iter__(self):
        slot, num_slots, reader = self._reader()
        position, snapshot = self.starts.get(reader, (SlotPosition(), None))
        counter = BadDataCounter.from_snapshot(snapshot)
        samples = SlotReader(self.corpora, self.cfg.resampled, self.cfg.shuffle_buffer, self.seed, self.epoch,
                             slot, num_slots, counter, self.opener).samples(position)
        batch_size, record = self.cfg.batch_size, self.cfg.record_keys
        buffers = SharedBuffers() if get_worker_info() is not None else None  # in-process: no hand-off
        while True:
            taken, read_to = self._captioned(samples, batch_size, counter)
            position = read_to or position
            made = self._jpeg_batch(taken, buffers) if self.decoder.sends_whole_jpegs else None
            if made is not None:
                counter.good += len(taken)
            else:  # decoded image by image; samples whose image fails are replaced
                images, chosen = [], []
                while taken:
                    # Captions first, then the images in a row: decoding back to back keeps the
                    # decoder's code and tables in cache.
                    for sample, caption in taken:
                        image = image_or_none(sample, self.decoder, counter)
                        if image is not None:
                            counter.good += 1
                            images.append(image)
                            chosen.append((sample, caption))
                    if len(images) == batch_size:
                        break
                    taken, read_to = self._captioned(samples, batch_size - len(images), counter)
                    position = read_to or position
                made = self._collate(collate_batch, images, [caption for _, caption in chosen], buffers)
                taken = chosen
            images, tokens, lease, augment = made
            keys = [f"{sample['__url__']}#{sample['__key__']}" for sample, _ in taken] if record else []
            batch = images, tokens, BatchInfo(self.epoch, reader, position.to_dict(), counter.snapshot(), keys, lease,
                                              augment)
            yield batch if buffers is None else HandOff(self.id, buffers, batch)

    def _jpeg_batch(self, taken: list[tuple[dict, str]], buffers: SharedBuffers | None) -> tuple | None:
        """The batch of `taken` with every JPEG decoded straight into its buffer; None if one is
        not a JPEG `jpeg` decodes or turns out damaged (then the batch is decoded image by image,
        which counts and replaces bad ones)."""
        jpegs = []
        for sample, _ in taken:
            jpeg = self.decoder.whole_jpeg(sample)
            if jpeg is None:
                return None
            jpegs.append(jpeg)
        return self._collate(collate_jpegs, jpegs, [caption for _, caption in taken], buffers)

    def _collate(self, collate: Callable, items: list, captions: list[str], buffers: SharedBuffers | None
                 ) -> tuple | None:
        """(images, tokens, lease, flips and jitter) of `collate(items, tokens, buffers)`: the
        items' draws (`augment.Augmented`) taken off, and the captions of flipped samples swapped
        (left <-> right) before they are tokenised; None where `collate` gives None."""
        items, augment = unwrap_augmented(items)
        if augment is not None:
            captions = augment.captions(captions)
        made = collate(items, self.tokenizer(captions), buffers)
        return None if made is None else (*made, augment)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve allocations up to 1 GiB from the heap and keep what is freed,
    instead of mapping each large block fresh and handing freed memory back to the system.

    A worker allocates the same large blocks every batch (decoded images, the batch buffer), and
    first touching a fresh page costs more than copying into it: with glibc's defaults every batch
    faults in fresh pages; reused, they stay mapped (docs/design.md has the rates). The price:
    a worker holds on to its peak heap (a couple of batches) until it exits. For data-loader
    worker processes only; the training process keeps glibc's defaults. Returns whether it
    applied (not on a C library without mallopt)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


def configure_worker(_worker_id: int = 0) -> None:
    """Every loader worker's first call (DataLoader's worker_init_fn): one intra-op thread per
    worker (the trainer process needs the cores for the model), large blocks reused
    (`keep_freed_memory`), and stop signals left to the training process."""
    torch.set_num_threads(1)
    keep_freed_memory()
    stopping.leave_to_parent()


def as_raised(exc: Exception) -> Exception:
    """The error as the loader worker raised it. PyTorch re-raises a worker's error in the
    training process with the worker's whole traceback as its message, under which our data
    errors' own message (which shards, what was wrong with each) ends up buried."""
    text, marker = str(exc), f"{type(exc).__name__}: "
    if not text.startswith("Caught ") or marker not in text:
        return exc
    try:
        return type(exc)(text.rsplit(marker, 1)[1].strip())
    except TypeError:  # an error type that takes other arguments stays as PyTorch raised it
        return exc


PREFETCH_BATCHES = 4  # batches each loader worker prepares ahead (the DataLoader's prefetch_factor)
SHARED_MEMORY = "/dev/shm"  # where PyTorch's shared tensors (the workers' batch buffers) live


class SharedMemoryShortfall(RuntimeError):
    """The loader's batch buffers would not fit in shared memory: a bus error mid-run otherwise."""


def check_shared_memory(cfg: DataConfig, image_size: int, ranks_here: int, where: str = SHARED_MEMORY) -> int:
    """Stop at start-up, with the fix in words, if the loader workers of the `ranks_here` ranks of
    this machine would need more shared memory than `where` has free, or than the job's memory
    limit leaves (shared memory counts against it). Each worker has about PREFETCH_BATCHES + 3
    batches in flight (prefetched, being pinned, in the step, being written), each in a buffer a
    quarter larger than the batch (handoff.SharedBuffers). Returns the bytes needed, a floor:
    resized uint8 images (whole JPEGs are smaller, unresized crops larger)."""
    if cfg.workers == 0:
        return 0
    batch = cfg.batch_size * 3 * image_size * image_size
    need = ranks_here * cfg.workers * (PREFETCH_BATCHES + 3) * batch * 5 // 4
    stat = os.statvfs(where)
    free = stat.f_bavail * stat.f_frsize
    limit = memlimit.tightest()
    if need <= free and (limit is None or need <= limit.headroom):
        return need
    what = (f"the data loader needs about {need / 2**30:.2f} GiB of shared memory in {where} ({ranks_here} rank(s) "
            f"x data.workers={cfg.workers} x {PREFETCH_BATCHES + 3} batches in flight of data.batch_size="
            f"{cfg.batch_size} at {image_size} px)")
    if need > free:
        raise SharedMemoryShortfall(
            f"{what}, and {free / 2**30:.2f} GiB is free there. Lower data.workers or data.batch_size, or give the "
            f"job more shared memory (docker run --shm-size=..., a larger {where} mount; on SLURM, --mem counts it "
            f"on most clusters)")
    raise SharedMemoryShortfall(
        f"{what}, which counts against this job's memory limit, and that leaves {limit.headroom / 2**30:.2f} GiB "
        f"({limit.limit / 2**30:.2f} GiB limit, {limit.usage / 2**30:.2f} GiB in use, cgroup {limit.cgroup}). Lower "
        f"data.workers or data.batch_size, or ask for more memory (SLURM: --mem, or --mem-per-gpu)")


def make_loader(stream: BatchStream, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=configure_worker, prefetch_factor=PREFETCH_BATCHES if workers else None,
                      persistent_workers=False)


class DataProgress:
    """The training process's record of consumed batches: the newest position and bad-data
    snapshot of each reader, saved with checkpoints (per rank) so that a restart continues them."""

    def __init__(self, readers: int, world_size: int):
        self.readers, self.world_size = readers, world_size
        self.epoch = 0
        self.positions: dict[int, SlotPosition] = {}
        self.tally = BadDataTally()

    def update(self, info: BatchInfo) -> None:
        if info.epoch != self.epoch:
            self.epoch, self.positions = info.epoch, {}
        self.positions[info.reader] = SlotPosition(**info.position)
        self.tally.update((info.epoch, info.reader), info.bad)

    def starts(self, epoch: int) -> dict[int, tuple[SlotPosition, dict | None]]:
        """Where each reader continues in `epoch` (empty for an epoch not begun)."""
        if epoch != self.epoch:
            return {}
        return {r: (p, self.tally.by_reader.get((epoch, r))) for r, p in self.positions.items()}

    def state_dict(self) -> dict:
        return {"readers": self.readers, "world_size": self.world_size, "epoch": self.epoch,
                "positions": {r: p.to_dict() for r, p in self.positions.items()},
                "tally": self.tally.by_reader}

    def load_state_dict(self, state: dict) -> str | None:
        """Restore; returns why the positions cannot be used (None if they can). Bad-data counts
        are kept either way."""
        self.tally = BadDataTally(state["tally"])
        if (state["readers"], state["world_size"]) != (self.readers, self.world_size):
            return (f"saved with {state['world_size']} rank(s) x {state['readers']} reader(s), now "
                    f"{self.world_size} x {self.readers}")
        self.epoch = state["epoch"]
        self.positions = {int(r): SlotPosition(**p) for r, p in state["positions"].items()}
        return None
