"""Captions -> token ids for the training stream: open_clip's ids, at a fraction of its cost.

open_clip's SimpleTokenizer spends most of its time per caption outside BPE: ftfy's repair
pass and two HTML unescapes on every caption, then one small tensor per row. On printable ASCII
without '&' (most captions of web corpora) those repairs change nothing, so `BatchTokenizer`
skips them there, keeps each word's ids, and fills one array per batch. Every other caption,
and every tokenizer other than a SimpleTokenizer with its default "lower" cleaning, goes through
the tokenizer itself: the ids are open_clip's either way (tests/test_tokens.py compares them).
"""
from __future__ import annotations

import numpy as np
import torch
from open_clip import tokenizer as open_clip_tokenizer

WORD_CACHE_LIMIT = 200_000  # distinct words remembered; the cache restarts empty when full
# open_clip's default cleaning (ftfy, HTML unescape, whitespace, lower case); private, so looked
# up softly: an open_clip without it gets every caption tokenised by open_clip itself
_CLEAN_LOWER = getattr(open_clip_tokenizer, "_clean_lower", None)


class BatchTokenizer:
    """Call with a list of captions -> LongTensor [len, context_length], like the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = (isinstance(tokenizer, open_clip_tokenizer.SimpleTokenizer) and _CLEAN_LOWER is not None
                     and getattr(tokenizer, "clean_fn", None) is _CLEAN_LOWER
                     and getattr(tokenizer, "reduction_fn", None) is None and bool(tokenizer.context_length))
        self.word_ids: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        ids = self.word_ids.get(word)
        if ids is None:
            tok = self.tokenizer
            ids = [tok.encoder[piece] for piece in tok.bpe("".join(tok.byte_encoder[b] for b in word.encode())).split(" ")]
            if len(self.word_ids) >= WORD_CACHE_LIMIT:
                self.word_ids.clear()
            self.word_ids[word] = ids
        return ids

    def ids(self, text: str) -> list[int]:
        """The caption's ids without start/end tokens."""
        if not (text.isascii() and text.isprintable() and "&" not in text):
            return self.tokenizer.encode(text)  # ftfy and HTML unescaping may change it
        ids: list[int] = []
        known = self.word_ids.get
        for word in self.tokenizer.pat.findall(" ".join(text.split()).lower()):
            ids += known(word) or self._word(word)
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if not self.fast:
            return self.tokenizer(texts)
        tok, length = self.tokenizer, self.tokenizer.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)  # row by row: cheaper than padding lists
        for i, text in enumerate(texts):
            row = [tok.sot_token_id, *self.ids(text)][:length - 1]
            row.append(tok.eot_token_id)  # a truncated caption still ends in eot
            out[i, :len(row)] = row
        return torch.from_numpy(out)
