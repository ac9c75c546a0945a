"""The training stream's tokenizer gives open_clip's ids exactly: on the fast path (printable
ASCII), on captions it must hand to open_clip (HTML entities, non-ASCII, control characters),
truncated or empty."""
import random
import string

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from cliplite_dist.data.synthetic import make_sample
from cliplite_dist.data.tokens import BatchTokenizer


@pytest.fixture(scope="module")
def theirs() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=16)


def same_ids(theirs: SimpleTokenizer, texts: list[str]) -> BatchTokenizer:
    ours = BatchTokenizer(theirs)
    for _ in range(2):  # the second pass reads the word cache
        got = ours(texts)
        assert got.dtype == torch.long and got.shape == (len(texts), 16)
        expected = theirs(texts)
        for text, row, want in zip(texts, got, expected):
            assert row.tolist() == want.tolist(), text
    return ours


def test_plain_ascii_captions_take_the_fast_path_with_the_same_ids(theirs):
    texts = [make_sample(0, "train", i, 16)["txt"].decode() for i in range(20)] + [
        "A Dog's  toy, isn't it?", "  two\tcats ", "3 x 4 = 12!!", "re-used... (again) 'quoted' it'll",
        "ALL CAPS and MiXeD", "a very long caption " * 10, "", "   ", "x"]
    assert all(t.isascii() for t in texts)
    ours = same_ids(theirs, texts)
    assert ours.fast and ours.word_ids  # words were looked up by the fast path


def test_captions_ftfy_or_html_would_change_go_through_open_clip(theirs):
    texts = ["fish &amp; chips", "caf\u00e9 cr\u00e8me", "\u201ccurly\u201d quotes", "line\nbreak\r\nhere",
             "bell\x07char", "mojibake Ã©t", "emoji \U0001F600 face", "&lt;b&gt;bold&lt;/b&gt;", "ﬁne ligature"]
    assert not same_ids(theirs, texts).word_ids  # every one went through open_clip


def test_random_printable_ascii_matches(theirs):
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation.replace("&", "") + "    "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    same_ids(theirs, texts)


def test_other_tokenizers_are_called_as_they_are():
    class Upper:
        def __call__(self, texts):
            return torch.tensor([[len(t)] for t in texts])

    assert BatchTokenizer(Upper())(["ab", "c"]).tolist() == [[2], [1]]
    canonical = SimpleTokenizer(context_length=8, clean="canonicalize")
    assert BatchTokenizer(canonical)(["Hello, World!"]).tolist() == canonical(["Hello, World!"]).tolist()
    assert not BatchTokenizer(canonical).fast
    assert not BatchTokenizer(SimpleTokenizer(context_length=8, reduction_mask="simple")).fast
