"""A loader worker's batches (images and token ids in one buffer) go into reused shared memory: a
buffer is written again only after the training process released the batch in it, never while a
batch is still held; a buffer's descriptor crosses to the training process once, later batches in
it name it."""
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
from torch.multiprocessing.reductions import init_reductions
from torch.utils.data import DataLoader, IterableDataset

from cliplite_dist.data import handoff
from cliplite_dist.data.handoff import LEASE_BYTES, HandOff, SharedBuffers, collate_batch
from cliplite_dist.data.imagebatch import RaggedImages
from cliplite_dist.data.pipeline import BatchInfo

init_reductions()  # torch's pickling of shared storages, as in a DataLoader's queues


def crops(value: int, sizes=((30, 20), (25, 40))) -> list[torch.Tensor]:
    return [torch.full((3, h, w), value, dtype=torch.uint8) for h, w in sizes]


def token_ids(value: int, rows: int = 2) -> torch.Tensor:
    return torch.arange(rows * 7, dtype=torch.int64).view(rows, 7) + 1000 * value


def batch(value: int, buffers: SharedBuffers | None, sizes=((30, 20), (25, 40))) -> tuple:
    images, tokens, lease = collate_batch(crops(value, sizes), token_ids(value, len(sizes)), buffers)
    return images, tokens, BatchInfo(0, 0, {}, {}, [], lease)


def pixel_values(images) -> list[int]:
    return [int(v) for image in (images.images() if isinstance(images, RaggedImages) else images)
            for v in (image.min(), image.max())]


def test_images_and_tokens_share_one_buffer_and_a_fresh_one_without_a_pool():
    images, tokens, info = batch(4, None)
    assert info.lease is None and not images.pixels.is_shared()
    assert torch.equal(tokens, token_ids(4)) and pixel_values(images) == [4, 4, 4, 4]
    images, tokens, info = batch(5, SharedBuffers())
    storage = images.pixels.untyped_storage()
    assert storage.data_ptr() == tokens.untyped_storage().data_ptr() == info.lease.untyped_storage().data_ptr()
    assert images.pixels.is_shared() and int(info.lease) == 1
    assert torch.equal(tokens, token_ids(5)) and pixel_values(images) == [5, 5, 5, 5]
    assert tokens.data_ptr() % 8 == 0 and tokens.data_ptr() >= images.pixels.data_ptr() + images.pixels.numel()


def test_a_buffer_is_reused_only_after_its_batch_is_released():
    buffers = SharedBuffers(keep=3)
    first = batch(1, buffers)
    second = batch(2, buffers)  # the first is held: a second buffer
    assert second[0].pixels.data_ptr() != first[0].pixels.data_ptr()
    first[2].release()
    third = batch(3, buffers)  # the first's buffer again, written afresh
    assert third[0].pixels.data_ptr() == first[0].pixels.data_ptr() and len(buffers.buffers) == 2
    assert pixel_values(third[0]) == [3, 3, 3, 3] and torch.equal(third[1], token_ids(3))
    assert pixel_values(second[0]) == [2, 2, 2, 2] and torch.equal(second[1], token_ids(2))  # held: untouched


def test_small_released_buffers_are_dropped_and_the_pool_stays_bounded():
    buffers = SharedBuffers(keep=2)
    batch(1, buffers)[2].release()
    large = batch(2, buffers, sizes=((100, 90), (80, 70)))  # too big for the first buffer
    assert list(buffers.buffers) == [1] and buffers.buffers[1].numel() >= LEASE_BYTES + large[0].pixels.numel()
    held = [batch(i, buffers, sizes=((100, 90), (80, 70))) for i in range(3)]
    assert len(buffers.buffers) == 2 and held[-1][2].lease is None  # beyond `keep`: fresh and unpooled
    held[-1][2].release()  # no lease: nothing to do
    for _, _, info in held[:-1]:
        info.release()
    large[2].release()
    stacked, tokens, info = batch(5, buffers, sizes=((10, 10), (10, 10)))
    assert isinstance(stacked, torch.Tensor) and stacked.is_shared() and int(info.lease) == 1  # pooled too
    assert stacked.shape == (2, 3, 10, 10) and pixel_values(stacked) == [5, 5, 5, 5]


def test_a_buffer_crosses_once_then_batches_in_it_only_name_it():
    buffers, stream = SharedBuffers(keep=1), 12345
    first = batch(1, buffers)
    sent = HandOff(stream, buffers, first).__reduce__()[1]
    assert isinstance(sent[3], torch.UntypedStorage)  # the buffer itself, the first time
    first[2].release()
    again = HandOff(stream, buffers, batch(2, buffers)).__reduce__()[1]
    assert again[3] is None and again[2] == sent[2]  # the same buffer, named
    unpooled = batch(3, buffers)  # the kept one is held: a fresh one, sent whole
    assert isinstance(HandOff(stream, buffers, unpooled).__reduce__()[1][3], torch.UntypedStorage)
    # pickled and rebuilt as the DataLoader does: the plain tuple over the same memory
    try:
        images, tokens, info = pickle.loads(ForkingPickler.dumps(HandOff(stream, buffers, unpooled)))
        assert torch.equal(tokens, token_ids(3)) and pixel_values(images) == [3, 3, 3, 3] and info.lease is None
    finally:
        handoff.forget(stream)


def test_the_training_process_forgets_buffers_the_worker_dropped():
    buffers, stream = SharedBuffers(), 4242
    try:
        small = batch(1, buffers)
        _, _, info = pickle.loads(ForkingPickler.dumps(HandOff(stream, buffers, small)))
        received = handoff._RECEIVED[stream][buffers.pool]
        assert list(received) == [0]
        info.release()  # the training process is done with buffer 0...
        large = batch(2, buffers, sizes=((100, 90), (80, 70)))  # ...which is too small for this one
        assert buffers.dropped == [0]
        images, _, _ = pickle.loads(ForkingPickler.dumps(HandOff(stream, buffers, large)))
        assert list(received) == [1] and buffers.dropped == [] and pixel_values(images) == [2, 2, 2, 2]
    finally:
        handoff.forget(stream)


class _Batches(IterableDataset):
    """Eight batches from one worker's pool, each filled with its number, handed over as the
    stream hands them; even ones ragged, odd ones stacked, all of the same bytes (so any released
    buffer fits the next batch)."""

    stream = 777

    def __iter__(self):
        buffers = SharedBuffers()
        for i in range(8):
            sizes = ((30, 20), (25, 40)) if i % 2 == 0 else ((20, 40), (20, 40))
            yield HandOff(self.stream, buffers, batch(i, buffers, sizes))


def test_through_a_loader_worker_released_buffers_come_back_and_a_held_batch_stays_intact():
    loader = DataLoader(_Batches(), batch_size=None, num_workers=1, prefetch_factor=2)
    held, buffers_seen = None, set()
    for i, (images, tokens, info) in enumerate(loader):
        pixels = images.pixels if isinstance(images, RaggedImages) else images
        assert pixels.is_shared() and info.lease is not None and pixel_values(images) == [i] * 4
        assert torch.equal(tokens, token_ids(i))
        # one buffer crossed the process boundary: images, tokens and lease share its memory here too
        assert pixels.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr() \
            == info.lease.untyped_storage().data_ptr()
        buffers_seen.add(tokens.untyped_storage().data_ptr())
        if held is None:
            held = images, tokens  # never released: its buffer must never be written again
        else:
            info.release()
    assert pixel_values(held[0]) == [0, 0, 0, 0] and torch.equal(held[1], token_ids(0))
    assert len(buffers_seen) <= 5, buffers_seen  # released buffers were reused
    (pid, _), = handoff._RECEIVED[_Batches.stream]  # one worker's pool, kept by this process
    assert pid != os.getpid()
    del loader
    handoff.forget(_Batches.stream)
    assert _Batches.stream not in handoff._RECEIVED
