"""Handing batches from a data-loader worker to the training process.

The DataLoader pickles what a worker yields: a tensor not yet in shared memory is first copied
into fresh shared memory, page by page, and every shared buffer travels as a file descriptor
through multiprocessing's resource sharer (a connection, a handshake and a thread wake-up on
each side); both cost more than the copy itself (docs/design.md). So a worker writes each
batch, its images and token ids, into one of a few shared buffers it reuses (`SharedBuffers`),
and a buffer's descriptor crosses once: the training process keeps the buffers it received, and
later batches in one only say which it is and where their tensors lie in it (`HandOff`).

A buffer is reused once the training process has released the batch in it
(`pipeline.BatchInfo.release`); a batch nobody releases is never overwritten.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from cliplite_dist.data.imagebatch import BoxedImage, RaggedImages, collate_images, image_tensors
from cliplite_dist.data.jpeg import decode_jpeg_into

LEASE_BYTES = 64  # ahead of the batch in a shared buffer (keeps it aligned); byte 0 is the lease
TOKEN_ALIGN = 64  # byte offset of the token ids after the pixels (int64 views need 8)


class SharedBuffers:
    """One loader worker's batch buffers, in shared memory, each reused once the training process
    has released the batch written into it.

    A buffer's first byte is its lease: 1 from the moment a batch is written into it until the
    training process releases the batch. While no kept buffer is free and large enough, a new one
    is made, and beyond `keep` buffers new ones are not kept (each batch then gets fresh shared
    memory, as without this pool). With the loader's prefetched batches
    (pipeline.PREFETCH_BATCHES, 4), the one being pinned and the one in the step, about 7 are in
    flight per worker either way; `keep` bounds what a consumer that never releases costs."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.pool = (os.getpid(), int.from_bytes(os.urandom(8), "little"))  # names this pool in the trainer
        self.buffers: dict[int, torch.Tensor] = {}  # index -> whole buffer, lease byte first
        self.sent: set[int] = set()  # indices of buffers whose descriptor the training process got
        self.dropped: list[int] = []  # indices of sent buffers dropped since the last hand-off
        self._next_index = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of shared memory after a kept buffer's LEASE_BYTES (its lease set), or of a
        fresh unpooled buffer (no lease: nothing waits for its release)."""
        free = [index for index, buffer in self.buffers.items() if not buffer[0]]
        fitting = [index for index in free if self.buffers[index].numel() >= LEASE_BYTES + nbytes]
        if fitting:
            buffer = self.buffers[fitting[0]]
        else:
            for index in free:  # released, but too small for batches this large
                del self.buffers[index]
                if index in self.sent:
                    self.dropped.append(index)
            # a quarter more than asked: image sizes vary from batch to batch
            buffer = torch.empty(LEASE_BYTES + nbytes * 5 // 4, dtype=torch.uint8).share_memory_()
            if len(self.buffers) >= self.keep:
                return buffer[LEASE_BYTES:LEASE_BYTES + nbytes]
            self.buffers[self._next_index] = buffer
            self._next_index += 1
        buffer[0] = 1
        return buffer[LEASE_BYTES:LEASE_BYTES + nbytes]

    def index_of(self, storage: torch.UntypedStorage) -> int | None:
        """The kept buffer with this storage; None for an unpooled one."""
        return next((index for index, buffer in self.buffers.items()
                     if buffer.untyped_storage().data_ptr() == storage.data_ptr()), None)


def lease_of(tensor: torch.Tensor, buffers: SharedBuffers | None) -> torch.Tensor | None:
    """The lease byte of the kept buffer under `tensor`; None outside a pool or for unpooled ones."""
    if buffers is None or buffers.index_of(tensor.untyped_storage()) is None:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage(), 0, (1,), (1,))


def _batch_buffer(image_bytes: int, tokens: torch.Tensor, buffers: SharedBuffers | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(`image_bytes` of memory for the pixels, a copy of `tokens` after them, lease) in one
    buffer: from `buffers` in a loader worker (the lease to release it by; None if unpooled),
    else a new one (lease None)."""
    token_offset = -(-image_bytes // TOKEN_ALIGN) * TOKEN_ALIGN
    nbytes = token_offset + tokens.numel() * tokens.element_size()
    buffer = buffers.take(nbytes) if buffers is not None else torch.empty(nbytes, dtype=torch.uint8)
    token_copy = buffer[token_offset:nbytes].view(tokens.dtype).view(tokens.shape)
    token_copy.copy_(tokens)
    return buffer[:image_bytes], token_copy, lease_of(buffer, buffers)


def collate_batch(images: list[torch.Tensor | BoxedImage], tokens: torch.Tensor, buffers: SharedBuffers | None = None
                  ) -> tuple[torch.Tensor | RaggedImages, torch.Tensor, torch.Tensor | None]:
    """(images as `imagebatch.collate_images` makes them, a copy of `tokens`, lease) in one buffer
    (`_batch_buffer`)."""
    tensors = image_tensors(images)
    dtype = tensors[0].dtype if tensors else torch.uint8
    pixels, token_copy, lease = _batch_buffer(sum(image.numel() for image in tensors) * dtype.itemsize, tokens, buffers)
    return collate_images(images, pixels.view(dtype)), token_copy, lease


def collate_jpegs(jpegs: list[tuple[bytes, int, int, tuple[int, int, int, int]]], tokens: torch.Tensor,
                  buffers: SharedBuffers | None = None) -> tuple[RaggedImages, torch.Tensor, torch.Tensor | None] | None:
    """Like `collate_batch` for whole images with crop boxes, given as (JPEG data, height, width,
    box) of `jpeg.jpeg_size`'d JPEGs: each decoded straight into its place in the buffer. None if
    one turns out damaged (its buffer is released; the caller decodes the batch another way)."""
    sizes = [height * width * 3 for _, height, width, _ in jpegs]
    pixels, token_copy, lease = _batch_buffer(sum(sizes), tokens, buffers)
    out, offset = pixels.numpy(), 0
    for (data, height, width, _), size in zip(jpegs, sizes):
        if not decode_jpeg_into(data, out[offset:offset + size], height, width):
            if lease is not None:
                lease.fill_(0)
            return None
        offset += size
    shapes = tuple((height, width, 3) for _, height, width, _ in jpegs)
    return RaggedImages(pixels, shapes, tuple(box for *_, box in jpegs)), token_copy, lease


Place = tuple[torch.dtype, int, tuple[int, ...], tuple[int, ...]]  # a view's dtype, offset, size, stride


def _place(tensor: torch.Tensor) -> Place:
    return tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())


def _view(storage: torch.UntypedStorage, place: Place) -> torch.Tensor:
    dtype, offset, size, stride = place
    return torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)


# In the training process: each stream's received buffers, by (worker pid, pool id) and index.
_RECEIVED: dict[int, dict[tuple[int, int], dict[int, torch.UntypedStorage]]] = {}


def forget(stream: int) -> None:
    """Drop the buffers a stream's workers sent (the stream is gone)."""
    _RECEIVED.pop(stream, None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is another user's process now
        return False
    return True


@dataclasses.dataclass(frozen=True)
class HandOff:
    """A worker's batch (images, tokens, info with its lease) in one of its SharedBuffers, as the
    worker yields it. Pickled (by the DataLoader, in the worker's feeder thread) as the place of
    each tensor in the buffer, plus the buffer's storage the first time (and for unpooled ones);
    unpickled in the training process as the plain (images, tokens, info) tuple."""

    stream: int  # the BatchStream's id: its received buffers are dropped with it
    buffers: SharedBuffers
    batch: tuple

    def __reduce__(self):
        images, tokens, info = self.batch
        storage = tokens.untyped_storage()  # the batch's buffer, token ids last
        index = self.buffers.index_of(storage)
        send = index is None or index not in self.buffers.sent
        if index is not None:
            self.buffers.sent.add(index)
        dropped = self.buffers.dropped[:]
        del self.buffers.dropped[:len(dropped)]  # the worker's thread may append meanwhile
        if isinstance(images, RaggedImages):
            layout: tuple = ("ragged", _place(images.pixels), images.shapes, images.boxes)
        else:
            layout = ("stacked", _place(images))
        return _received, (self.stream, self.buffers.pool, index, storage if send else None, dropped, layout,
                           _place(tokens), info.lease is not None, dataclasses.replace(info, lease=None))


def _received(stream: int, pool: tuple[int, int], index: int | None, storage: torch.UntypedStorage | None,
              dropped: list[int], layout: tuple, tokens: Place, leased: bool, info: Any) -> tuple:
    """The batch a HandOff describes, rebuilt in the training process over the buffer it names."""
    pools = _RECEIVED.setdefault(stream, {})
    if pool not in pools:  # a new worker: the pools of workers that have exited are done with
        for gone in [p for p in pools if not _alive(p[0])]:
            del pools[gone]
    received = pools.setdefault(pool, {})
    for gone in dropped:
        received.pop(gone, None)
    if storage is None:
        if index not in received:
            raise RuntimeError(f"a batch from loader worker {pool[0]} names its shared buffer {index}, which this "
                               f"process never received or already dropped (a stream iterated by persistent "
                               f"workers across set_epoch?)")
        storage = received[index]
    elif index is not None:
        received[index] = storage
    if layout[0] == "ragged":
        _, pixels, shapes, boxes = layout
        images: Any = RaggedImages(_view(storage, pixels), shapes, boxes)
    else:
        images = _view(storage, layout[1])
    lease = _view(storage, (torch.uint8, 0, (1,), (1,))) if leased else None
    return images, _view(storage, tokens), dataclasses.replace(info, lease=lease)
