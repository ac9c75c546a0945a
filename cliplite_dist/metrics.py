"""Training metrics: summed on the device between log steps, read back once per log line.

Reading a GPU scalar forces a host sync, so per-step values stay as tensors and `flush` turns
the window's averages into floats in one transfer. Rank 0 writes TensorBoard events and a
`metrics.jsonl` (one object per log step) that tools like `cliplite-status` read without TensorBoard.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricLogger:
    def __init__(self, tb_dir: Path | None):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.writer = None
        self.jsonl = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))
            self.jsonl = open(tb_dir.parent / "metrics.jsonl", "a", encoding="utf-8")

    def accumulate(self, out) -> None:
        values = {"loss": out.loss.detach(), **out.metrics}
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def flush(self, step: int, extra: dict[str, float], unprinted: dict[str, float] | None = None) -> str:
        """Log the window's means plus `extra` (under train/) and `unprinted` (full names, left out
        of the text line); returns the one-line summary for the text log."""
        names = list(self.sums)
        means = (torch.stack([self.sums[n] for n in names]) / max(1, self.count)).tolist() if names else []
        values = {**dict(zip(names, means)), **extra}
        self.sums, self.count = {}, 0
        self.scalars({**{f"train/{k}": v for k, v in values.items()}, **(unprinted or {})}, step)
        return " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None or not values:  # e.g. a run without evaluation sets
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        """Flush and close; safe to call again (the trainer also closes on its way out of an error)."""
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
            self.writer = self.jsonl = None


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
