"""A loader worker's batches (images and token ids in one buffer) go into reused shared memory: a
buffer is written again only after the training process released the batch in it, never while a
batch is still held, and a batch reaches the training process as one shared buffer."""
import torch
from torch.utils.data import DataLoader, IterableDataset

from cliplite_dist.data.imagebatch import LEASE_BYTES, RaggedImages, SharedBuffers, collate_batch
from cliplite_dist.data.pipeline import BatchInfo


def crops(value: int, sizes=((30, 20), (25, 40))) -> list[torch.Tensor]:
    return [torch.full((3, h, w), value, dtype=torch.uint8) for h, w in sizes]


def token_ids(value: int, rows: int = 2) -> torch.Tensor:
    return torch.arange(rows * 7, dtype=torch.int64).view(rows, 7) + 1000 * value


def batch(value: int, buffers: SharedBuffers, sizes=((30, 20), (25, 40))) -> tuple:
    images, tokens, lease = collate_batch(crops(value, sizes), token_ids(value, len(sizes)), buffers)
    return images, tokens, BatchInfo(0, 0, {}, {}, [], lease)


def pixel_values(images) -> list[int]:
    return [int(v) for image in (images.images() if isinstance(images, RaggedImages) else images)
            for v in (image.min(), image.max())]


def test_images_and_tokens_share_one_buffer_and_a_fresh_one_without_a_pool():
    images, tokens, lease = collate_batch(crops(4), token_ids(4))
    assert lease is None and not images.pixels.is_shared()
    assert torch.equal(tokens, token_ids(4)) and pixel_values(images) == [4, 4, 4, 4]
    images, tokens, lease = collate_batch(crops(5), token_ids(5), SharedBuffers())
    storage = images.pixels.untyped_storage()
    assert storage.data_ptr() == tokens.untyped_storage().data_ptr() == lease.untyped_storage().data_ptr()
    assert images.pixels.is_shared() and int(lease) == 1
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
    assert buffers.buffers and all(b.numel() >= LEASE_BYTES + large[0].pixels.numel() for b in buffers.buffers)
    held = [batch(i, buffers, sizes=((100, 90), (80, 70))) for i in range(3)]
    assert len(buffers.buffers) == 2 and held[-1][2].lease is None  # beyond `keep`: fresh and unpooled
    held[-1][2].release()  # no lease: nothing to do
    for _, _, info in held[:-1]:
        info.release()
    stacked, tokens, info = batch(5, buffers, sizes=((10, 10), (10, 10)))
    assert isinstance(stacked, torch.Tensor) and stacked.is_shared() and int(info.lease) == 1  # pooled too
    assert stacked.shape == (2, 3, 10, 10) and pixel_values(stacked) == [5, 5, 5, 5]


class _Batches(IterableDataset):
    """Eight batches from one worker's pool, each filled with its number, with the pool's size
    when it was made; even ones ragged, odd ones stacked."""

    def __iter__(self):
        buffers = SharedBuffers()
        for i in range(8):
            yield *batch(i, buffers, sizes=((30, 20), (25, 40)) if i % 2 == 0 else ((16, 16), (16, 16))), \
                len(buffers.buffers)


def test_through_a_loader_worker_released_buffers_come_back_and_a_held_batch_stays_intact():
    loader = DataLoader(_Batches(), batch_size=None, num_workers=1, prefetch_factor=2)
    pool_sizes = []
    held = None
    for images, tokens, info, pool_size in loader:
        pixels = images.pixels if isinstance(images, RaggedImages) else images
        assert pixels.is_shared() and info.lease is not None
        # one buffer crossed the process boundary: images, tokens and lease share its memory here too
        assert pixels.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr() \
            == info.lease.untyped_storage().data_ptr()
        pool_sizes.append(pool_size)
        if held is None:
            held = images, tokens  # never released: its buffer must never be written again
        else:
            info.release()
    assert pixel_values(held[0]) == [0, 0, 0, 0] and torch.equal(held[1], token_ids(0))
    assert len(pool_sizes) == 8 and max(pool_sizes) <= 5, pool_sizes  # released buffers were reused
