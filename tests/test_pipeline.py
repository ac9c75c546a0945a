import ctypes
import io
import tarfile

import open_clip
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from cliplite_dist.config import DataConfig
from cliplite_dist.data.badsamples import BadDataCounter, BadDataTally
from cliplite_dist.data.pipeline import SampleDecoder, BatchStream, make_loader
from cliplite_dist.data.shards import Corpus
from cliplite_dist.data.slots import EmptyStreamError, SlotReader
from shardkit import jpeg, write_shards

TOKENIZER = open_clip.SimpleTokenizer(context_length=16)
TRANSFORM = transforms.Compose([transforms.Resize(16), transforms.ToTensor()])


def decoder(caption_key="txt", first=False):
    return SampleDecoder(TRANSFORM, caption_key, ("jpg", "png"), pick_first_caption=first)


def stream(urls, rank=0, world=1, **data):
    cfg = DataConfig(train="x", **{"batch_size": 4, "shuffle_buffer": 8, **data})
    corpora = urls if isinstance(urls[0], Corpus) else [Corpus(tuple(urls))]
    return BatchStream(corpora, cfg, decoder(cfg.caption_key), TOKENIZER, rank, world, seed=1)


def one_pass_keys(s: BatchStream, slot: int, num_slots: int, count: int) -> list[str]:
    reader = SlotReader(s.corpora, False, 1, s.seed, 0, slot, num_slots, BadDataCounter(), s.opener)
    samples = reader.samples()
    return [next(samples)[0]["__key__"] for _ in range(count)]


@pytest.mark.parametrize("num_shards, per_shard", [(3, 5), (8, 2)])
def test_ranks_and_workers_read_disjoint_parts_covering_the_corpus(tmp_path, num_shards, per_shard):
    urls = write_shards(tmp_path, num_shards, per_shard)
    slots = 4  # 2 ranks x 2 workers
    s = stream(urls)
    keys = []
    for slot in range(slots):
        if num_shards >= slots:
            expected = per_shard * len(range(slot, num_shards, slots))
        else:
            expected = num_shards * len(range(slot, per_shard, slots))
        keys.append(one_pass_keys(s, slot, slots, expected))
    flat = [k for part in keys for k in part]
    assert len(flat) == len(set(flat)) == num_shards * per_shard


def test_three_shards_two_ranks_two_workers_give_equal_batches_without_hang(tmp_path):
    urls = write_shards(tmp_path, 3, 7)  # 21 samples: shards cannot be split evenly
    batches_per_epoch = 21 // (4 * 2)
    for rank in range(2):
        s = stream(urls, rank=rank, world=2)
        loader = make_loader(s, workers=2, pin_memory=False)
        for epoch in range(3):  # more batches than one pass holds: the stream cycles
            s.set_epoch(epoch)
            it = iter(loader)
            for _ in range(batches_per_epoch + 3):
                images, tokens, info = next(it)
                assert images.shape == (4, 3, 16, 16) and tokens.shape == (4, 16)
                assert sum(info.bad["counts"].values()) == 0
            del it


def test_epochs_differ_but_repeat_exactly(tmp_path):
    urls = write_shards(tmp_path, 4, 6)

    def first_tokens(epoch):
        s = stream(urls)
        s.set_epoch(epoch)
        it = iter(s)
        return torch.cat([next(it)[1] for _ in range(4)])  # 16 samples

    assert torch.equal(first_tokens(0), first_tokens(0))
    assert not torch.equal(first_tokens(0), first_tokens(1))


def write_bad_shard(path):
    """Good samples mixed with every kind of bad one; returns the number of good samples."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(6):
            add(f"good{i}.jpg", jpeg((200, 10, 10)))
            add(f"good{i}.txt", b"a red square")
        add("badimg.jpg", b"not a jpeg at all")
        add("badimg.txt", b"a broken image")
        add("nocap.jpg", jpeg((0, 0, 0)))
        add("emptycap.jpg", jpeg((0, 0, 0)))
        add("emptycap.txt", b"   ")
        add("latin1.jpg", jpeg((0, 0, 0)))
        add("latin1.txt", "caf\xe9 au lait".encode("latin-1"))
    return 6


def test_bad_samples_are_counted_by_kind_and_skipped(tmp_path, caplog):
    good = write_bad_shard(tmp_path / "bad-00000.tar")
    truncated = write_shards(tmp_path / "t", 1, 20, sizes=False)[0]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])  # cut mid-sample
    missing = str(tmp_path / "missing-00000.tar")
    empty = tmp_path / "empty-00000.tar"
    empty.write_bytes(b"")
    s = stream([str(tmp_path / "bad-00000.tar"), truncated, missing, str(empty)], batch_size=2, shuffle_buffer=1)
    tally = BadDataTally()
    it = iter(s)
    for _ in range(12):
        images, tokens, info = next(it)
        tally.update((info.epoch, info.reader), info.bad)
    totals = tally.totals()
    assert totals["image"] >= 1, totals  # not a JPEG
    assert totals["no_caption"] >= 2, totals  # missing, blank
    assert totals["bad_caption"] >= 1, totals  # latin-1 bytes
    assert totals["corrupt_shard"] >= 1 and totals["missing_shard"] >= 1 and totals["empty_shard"] >= 1, totals
    assert totals["good"] >= 24 and good > 0
    worst = tally.worst_shards()
    assert worst[str(tmp_path / "bad-00000.tar")] >= 4  # four bad samples per pass over it
    assert "skipping bad data (missing_shard)" in caplog.text and missing in caplog.text


def test_a_corpus_of_only_bad_samples_fails_fast(tmp_path):
    path = tmp_path / "allbad-00000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("x.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "empty-00000.tar").write_bytes(b"")
    shards = [str(path), str(tmp_path / "gone.tar"), str(tmp_path / "empty-00000.tar")]
    with pytest.raises(EmptyStreamError, match="got no sample from 3 shard.s. in a row"):
        next(iter(stream(shards)))


def test_nothing_readable_names_every_shard_and_what_was_wrong(tmp_path):
    """A truncated, a zero-byte and a missing shard: the error lists each with its kind in words."""
    (good,) = write_shards(tmp_path, 1, 4, prefix="cut")
    data = open(good, "rb").read()
    open(good, "wb").write(data[:700])  # cut inside the first member
    (tmp_path / "empty-00000.tar").write_bytes(b"")
    shards = [good, str(tmp_path / "gone.tar"), str(tmp_path / "empty-00000.tar")]
    with pytest.raises(EmptyStreamError) as err:
        next(iter(stream(shards)))
    lines = str(err.value).splitlines()
    assert any(good in line and "corrupt_shard" in line and "cut short or not a tar" in line for line in lines), lines
    assert any("gone.tar" in line and "missing_shard x" in line and "does not exist" in line for line in lines), lines
    assert any("empty-00000.tar" in line and "empty_shard x" in line and "zero bytes" in line for line in lines), lines
    assert "Check data.train" in lines[-1]


def test_caption_from_json_list_is_picked_per_sample(tmp_path):
    urls = write_shards(tmp_path, 1, 4)
    sample = {"json": b'{"captions": ["one", "two", "  "]}', "txt": b"t"}
    picked = [decoder("json:captions").caption(sample, pick) for pick in range(4)]
    assert picked == ["one", "two", "one", "two"]  # the empty caption is never picked
    assert decoder("json:captions", first=True).caption(sample, 1) == "one"
    with pytest.raises(ValueError):
        decoder("json:captions").caption({"json": b'{"captions": []}'}, 0)
    images, tokens, _ = next(iter(stream(urls, caption_key="json:captions", batch_size=4)))
    assert tokens.shape == (4, 16)


def test_resampled_mode_draws_shards_with_replacement_forever(tmp_path):
    urls = write_shards(tmp_path, 2, 3)
    s = stream(urls, resampled=True, samples_per_epoch=100, batch_size=2, shuffle_buffer=1)
    it = iter(s)
    batches = [next(it) for _ in range(20)]  # 40 samples from a 6-sample corpus
    assert all(b[0].shape == (2, 3, 16, 16) for b in batches)


def test_synth_cli_writes_a_readable_corpus(tmp_path, capsys):
    from cliplite_dist.cli import synth_main
    from cliplite_dist.data.shards import count_samples, expand_urls

    synth_main([str(tmp_path), "--samples", "25", "--shard-size", "10"])
    assert "wrote 25 samples in 3 shard(s)" in capsys.readouterr().out
    assert count_samples(expand_urls(str(tmp_path))) == 25
    with pytest.raises(SystemExit):
        synth_main([str(tmp_path), "--samples", "0"])


class _Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes per read, as sockets and pipes may."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.data.read(100 if n < 0 else min(n, 100))


def test_tar_reader_handles_long_names_pax_gzip_short_reads_and_damage(tmp_path):
    import gzip

    from cliplite_dist.data.reader import BrokenTar, tar_members

    long_key = "d/" + "k" * 150  # longer than a ustar name field: pax or GNU headers carry it
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in ((f"{long_key}.jpg" if fmt != tarfile.USTAR_FORMAT else "a/b.jpg", b"\x01" * 700),
                               ("a/b.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        for stream in (io.BytesIO(raw), io.BytesIO(gzip.compress(raw)), _Trickle(raw)):
            got = list(tar_members(stream))
            assert [len(d) for _, d in got] == [700, 7] and got[1] == ("a/b.txt", b"caption")
            assert got[0][0] == (f"{long_key}.jpg" if fmt != tarfile.USTAR_FORMAT else "a/b.jpg")
        members_end = -(-len(raw.rstrip(b"\0")) // 512) * 512
        for cut in (1000, 1500, members_end):  # in a member, in a header, before the end blocks
            with pytest.raises(BrokenTar, match="inside a member|inside a header|without the end"):
                list(tar_members(io.BytesIO(raw[:cut])))
        damaged = bytearray(raw)
        damaged[100] ^= 0xFF  # the first header's mode field
        with pytest.raises(BrokenTar, match="checksum"):
            list(tar_members(io.BytesIO(bytes(damaged))))
    assert list(tar_members(io.BytesIO(b""))) == []


def test_tar_header_checksum_is_the_exact_byte_sum_even_for_extreme_headers():
    import random

    from cliplite_dist.data.reader import _byte_sum

    rng = random.Random(0)
    headers = [bytes([255]) * 512, bytes(512), bytes([128]) * 512,
               *(bytes(rng.getrandbits(8) for _ in range(512)) for _ in range(200))]
    for header in headers:  # tar's rule: every byte counted, the checksum field as 8 spaces
        assert _byte_sum(header) == sum(header[:148]) + 8 * ord(" ") + sum(header[156:])


class _MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2` (every field a size_t)."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class _FreedMemory(torch.utils.data.IterableDataset):
    """In a worker: its torch threads, where glibc's malloc put a 64 MiB block (the growth of
    bytes in blocks mapped on their own while it is held), and what the heap keeps free once the
    block is freed (the block, and any free space it reused). Asked of the allocator itself, in a
    fresh (spawned) worker: a forked one inherits the test process's heap and malloc settings,
    and in CI both the resident-set count and the heap's growth (the block partly reused free
    space the parent left) misled."""

    def __iter__(self):
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallocInfo
        before = mallinfo2()
        block = bytearray(64 << 20)
        mapped_alone = mallinfo2().hblkhd - before.hblkhd
        del block
        yield torch.get_num_threads(), mapped_alone, mallinfo2().fordblks


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)")
def test_loader_workers_run_one_thread_and_keep_freed_memory_for_the_next_batch():
    from cliplite_dist.data.pipeline import configure_worker

    def one_worker(**init):
        loader = DataLoader(_FreedMemory(), batch_size=None, num_workers=1, multiprocessing_context="spawn", **init)
        (result,) = loader
        return result

    threads, mapped_alone, kept = one_worker(worker_init_fn=configure_worker)
    assert threads == 1
    assert mapped_alone < 16 << 20 and kept >= 64 << 20  # in the heap, and kept there for the next batch
    _, default_mapped_alone, _ = one_worker()
    assert default_mapped_alone >= 64 << 20  # glibc's default: a block this large is mapped alone, unmapped when freed
