"""JPEGs decoded by simplejpeg give torchvision.io's pixels, straight into a batch buffer where
the device cuts the crops; damaged JPEGs and other formats take the image-by-image path, which
counts and replaces them."""
import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cliplite_dist.config import DataConfig
from cliplite_dist.data.handoff import SharedBuffers, collate_batch, collate_jpegs
from cliplite_dist.data.imagebatch import BoxedImage, RaggedImages
from cliplite_dist.data.jpeg import decode_jpeg, decode_jpeg_into, jpeg_size
from cliplite_dist.data.pipeline import SampleDecoder, BatchStream
from cliplite_dist.data.shards import Corpus
from cliplite_dist.data.tarfiles import write_tar
from cliplite_dist.data.transforms import decode_torchvision, decode_uint8, uint8_train_transform


def encoded(mode: str, fmt: str = "JPEG", size=(40, 52), seed: int = 0, **options) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[::2] //= 2  # some structure for the DCT
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **options)
    return buf.getvalue()


def cut_in_scan(data: bytes) -> bytes:
    """The JPEG cut a little after its scan starts: a header that reads, data that does not."""
    return data[:data.index(b"\xff\xda") + 40]


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"progressive": True}),
                                           ("L", {}), ("RGB", {"quality": 30})])
def test_jpegs_decode_to_torchvisions_pixels(mode, options):
    data = encoded(mode, **options)
    assert jpeg_size(data) == (40, 52)
    image = decode_jpeg(data)
    assert image.shape == (3, 40, 52) and image.permute(1, 2, 0).is_contiguous()  # HWC memory, as torchvision's
    torch.testing.assert_close(image, decode_torchvision(data), rtol=0, atol=0)
    out = np.full(40 * 52 * 3, 7, dtype=np.uint8)
    assert decode_jpeg_into(data, out, 40, 52)
    torch.testing.assert_close(torch.from_numpy(out).view(40, 52, 3).permute(2, 0, 1), image, rtol=0, atol=0)


def test_other_formats_and_colour_spaces_are_left_to_the_other_decoders():
    for data in (encoded("RGB", "PNG"), encoded("CMYK"), b"not an image"):
        assert jpeg_size(data) is None and decode_jpeg(data) is None
    png = encoded("RGB", "PNG")
    torch.testing.assert_close(decode_uint8(png), decode_torchvision(png), rtol=0, atol=0)
    assert decode_uint8(encoded("CMYK")).shape == (3, 40, 52)  # through PIL
    damaged = cut_in_scan(encoded("RGB"))
    assert jpeg_size(damaged) == (40, 52)  # the header reads...
    assert not decode_jpeg_into(damaged, np.empty(40 * 52 * 3, dtype=np.uint8), 40, 52)  # ...the rest fails


def test_jpegs_collated_straight_into_the_buffer_match_decoded_then_copied_ones():
    datas = [encoded("RGB", size=(40 + i, 52 - i), seed=i) for i in range(3)]
    jpegs = [(data, *jpeg_size(data), (i, 2 * i, 30, 31)) for i, data in enumerate(datas)]
    tokens = torch.arange(21, dtype=torch.int64).view(3, 7)
    buffers = SharedBuffers()
    straight, straight_tokens, lease = collate_jpegs(jpegs, tokens, buffers)
    copied, _, _ = collate_batch([BoxedImage(decode_uint8(data), box) for data, *_, box in jpegs], tokens)
    assert straight.shapes == copied.shapes and straight.boxes == copied.boxes and int(lease) == 1
    torch.testing.assert_close(straight.pixels, copied.pixels, rtol=0, atol=0)
    torch.testing.assert_close(straight_tokens, tokens, rtol=0, atol=0)
    lease.fill_(0)
    damaged = jpegs[:1] + [(cut_in_scan(datas[1]), *jpegs[1][1:])]
    assert collate_jpegs(damaged, tokens[:2], buffers) is None
    assert all(int(buffer[0]) == 0 for buffer in buffers.buffers.values())  # its buffer given back


@pytest.mark.parametrize("with_bad", [False, True])
def test_device_resize_batches_hold_every_image_whole_with_its_box(tmp_path, with_bad):
    samples = [(f"good{i}", "jpg", encoded("RGB", size=(40, 40 + i), seed=i)) for i in range(7)]
    if with_bad:
        samples += [("png", "png", encoded("RGB", "PNG", seed=9)), ("damaged", "jpg", cut_in_scan(encoded("RGB", seed=8)))]
    write_tar(tmp_path / "s-00000.tar", ({"__key__": key, field: data, "txt": f"caption of {key}".encode()}
                                         for key, field, data in samples))
    pil = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    decoder = SampleDecoder(uint8_train_transform(pil, resize=False), "txt", ("jpg", "png"), decode=decode_uint8)
    assert decoder.sends_whole_jpegs
    cfg = DataConfig(train="x", batch_size=4, shuffle_buffer=1, record_keys=True)
    stream = BatchStream([Corpus((str(tmp_path / "s-00000.tar"),))], cfg, decoder,
                         open_clip.SimpleTokenizer(context_length=16), 0, 1, seed=1)
    pixels = {key: decode_uint8(data) for key, _, data in samples if key != "damaged"}
    random.seed(0)
    it = iter(stream)
    for _ in range(6):
        images, tokens, info = next(it)
        assert isinstance(images, RaggedImages) and len(images) == 4 and tokens.shape == (4, 16)
        for key, shape, box, crop in zip(info.keys, images.shapes, images.boxes, images.images()):
            whole = pixels[key.rsplit("#", 1)[1]]
            assert shape == tuple(whole.permute(1, 2, 0).shape)
            top, left, h, w = box
            torch.testing.assert_close(crop, whole[:, top:top + h, left:left + w], rtol=0, atol=0)
    assert info.bad["counts"].get("image", 0) == (2 if with_bad else 0)  # the damaged one, once per pass of 9
