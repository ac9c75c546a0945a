"""Shard specs as strings: corpora joined with `::`, their weights, `pipe:` URLs. Pure parsing,
no I/O: the config validates with it (at the ground floor, importing nothing from data/), and
data/shards.py expands specs into shard lists with it."""
from __future__ import annotations

PIPE_PREFIX = "pipe:"  # a shard URL that is a shell command (data.allow_pipe)


class ShardError(ValueError):
    """A shard spec that names nothing readable; the message says which part."""


def split_corpora(spec: str) -> list[str]:
    parts = [part.strip() for part in spec.split("::")]
    if not all(parts):
        raise ShardError(f"empty corpus in shard spec {spec!r}")
    return parts


def parse_weights(weights: str, spec: str) -> list[float]:
    """One positive weight per `::` corpus of `spec` ("1;3"); all 1 when `weights` is empty."""
    count = len(split_corpora(spec))
    if not weights.strip():
        return [1.0] * count
    try:
        values = [float(w) for w in weights.split(";")]
    except ValueError:
        raise ShardError(f"weights {weights!r}: expected numbers separated by ';'") from None
    if len(values) != count or min(values) <= 0:
        raise ShardError(f"weights {weights!r}: need {count} positive number(s), one per '::' corpus of {spec!r}")
    return values


def uses_pipe(spec: str) -> bool:
    return any(corpus.strip().startswith(PIPE_PREFIX) for corpus in spec.split("::"))
