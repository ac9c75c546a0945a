"""Autograd-aware communication: gradients flow back to the rank whose tensor was sent.

A plain `all_gather` or `send` cuts the graph, so the other ranks' towers would never learn from
the features they contributed. Both functions here use the default process group and expect
every rank to pass a tensor of the same shape.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows in rank order.

    Every rank's loss uses the gathered rows, so the gradient of this rank's rows is the sum over
    ranks of the gathered gradient: all-reduce it, then keep our own slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` stacked along dim 0 (rank order), differentiable; `x` itself on one process."""
    if world()[1] == 1:
        return x
    return _GatherRows.apply(x)


class _AllReduceSum(torch.autograd.Function):
    """Every rank gets the sum of every rank's `x`; each summand's gradient is the sum of every
    rank's output gradient (every output depends on every input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `x` (same shape on every rank), differentiable; `x` on one process."""
    if world()[1] == 1:
        return x
    return _AllReduceSum.apply(x)


def _ring_shift(x: torch.Tensor, dst: int, src: int) -> torch.Tensor:
    """Send `x` to `dst` and receive a tensor of the same shape from `src`.

    Both in one `batch_isend_irecv`, so every rank sending before receiving cannot deadlock.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, dst), dist.P2POp(dist.irecv, out, src)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


class _FromPreviousRank(torch.autograd.Function):
    """Forward: rank r gets rank r-1's tensor. Backward: that gradient goes back to rank r-1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.size = rank, size
        return _ring_shift(x, dst=(rank + 1) % size, src=(rank - 1) % size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _ring_shift(grad, dst=(ctx.rank - 1) % ctx.size, src=(ctx.rank + 1) % ctx.size)


def from_previous_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank r-1's `x` (cyclically), with gradients returned to rank r-1. Needs world size >= 2."""
    return _FromPreviousRank.apply(x)
