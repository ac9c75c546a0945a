"""Ragged batches in a loader worker go into reused shared memory: a buffer is written again only
after the training process released the batch in it, and never while a batch is still held."""
import torch
from torch.utils.data import DataLoader, IterableDataset

from cliplite_dist.data.imagebatch import LEASE_BYTES, RaggedImages, SharedBuffers, collate_images, release


def crops(value: int, sizes=((30, 20), (25, 40))) -> list[torch.Tensor]:
    return [torch.full((3, h, w), value, dtype=torch.uint8) for h, w in sizes]


def test_a_buffer_is_reused_only_after_its_batch_is_released():
    buffers = SharedBuffers(keep=3)
    first = collate_images(crops(1), buffers)
    assert isinstance(first, RaggedImages) and first.pixels.is_shared() and int(first.lease) == 1
    second = collate_images(crops(2), buffers)  # the first is held: a second buffer
    assert second.pixels.data_ptr() != first.pixels.data_ptr()
    first.release()
    third = collate_images(crops(3), buffers)  # the first's buffer again, written afresh
    assert third.pixels.data_ptr() == first.pixels.data_ptr() and len(buffers.buffers) == 2
    assert [int(image.max()) for image in third.images()] == [3, 3]
    assert [int(image.max()) for image in second.images()] == [2, 2]  # held: untouched


def test_small_released_buffers_are_dropped_and_the_pool_stays_bounded():
    buffers = SharedBuffers(keep=2)
    small = collate_images(crops(1), buffers)
    small.release()
    large = collate_images(crops(2, sizes=((100, 90), (80, 70))), buffers)  # too big for the first
    assert buffers.buffers and all(b.numel() >= LEASE_BYTES + large.pixels.numel() for b in buffers.buffers)
    held = [collate_images(crops(i, sizes=((100, 90), (80, 70))), buffers) for i in range(3)]
    assert len(buffers.buffers) == 2 and held[-1].lease is None  # beyond `keep`: fresh and unpooled
    release(held[-1])  # no lease: nothing to do
    same_shape = collate_images(crops(5, sizes=((10, 10), (10, 10))), buffers)
    assert isinstance(same_shape, torch.Tensor)  # stacked batches are not pooled
    release(same_shape)


class _Batches(IterableDataset):
    """Eight ragged batches from one worker's pool, each filled with its number, with the pool's
    size when it was made."""

    def __iter__(self):
        buffers = SharedBuffers()
        for i in range(8):
            yield collate_images(crops(i), buffers), len(buffers.buffers)


def test_through_a_loader_worker_released_buffers_come_back_and_a_held_batch_stays_intact():
    loader = DataLoader(_Batches(), batch_size=None, num_workers=1, prefetch_factor=2)
    pool_sizes = []
    held = None
    for batch, pool_size in loader:
        assert batch.pixels.is_shared() and batch.lease is not None
        pool_sizes.append(pool_size)
        if held is None:
            held = batch  # never released: its buffer must never be written again
        else:
            batch.release()
    assert [int(image.min()) for image in held.images()] == [0, 0]
    assert [int(image.max()) for image in held.images()] == [0, 0]
    assert len(pool_sizes) == 8 and max(pool_sizes) <= 5, pool_sizes  # released buffers were reused
