"""The loss-scaling benchmark's communication numbers on a real 2-rank gloo group: the bytes each
rank passes to torch.distributed in one forward+backward equal the closed formula the benchmark
reports, and both equal figures worked out by hand here, so neither can drift alone.
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loss_scaling import analytic_bytes, count_step  # noqa: E402

WORLD, B, D = 2, 8, 16  # ranks, rows per rank, embedding width (fp32: 4 bytes)
# By hand, per rank, sent + received. InfoNCE: forward all_gather of [8, 32] (1024 B each way),
# backward all_reduce of [16, 32] (2048 B, ring at W=2: 2048 B each way). SigLIP: the other
# rank's [8, 16] text features (512 B) in, ours out, forward, and their gradients backward.
# cross_rank: [8, 16] (512 B) to one neighbour and from the other, forward and backward.
BY_HAND = {"infonce": 6144, "siglip": 2048, "cliplite-cross_rank": 2048, "cliplite-shift": 0}
CALLS = {"infonce": {"all_gather_into_tensor": 1, "all_reduce": 1},
         "siglip": {"batch_isend_irecv": 2, "isend": 2, "irecv": 2},
         "cliplite-cross_rank": {"batch_isend_irecv": 2, "isend": 2, "irecv": 2},
         "cliplite-shift": {}}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        originals = [(module, name, getattr(module, name)) for module in (dist, c10d)
                     for name in ("all_reduce", "all_gather_into_tensor", "isend", "batch_isend_irecv")]
        results = {}
        for row in BY_HAND:
            counter = count_step(row, B, D)
            results[row] = {"sent": counter.sent, "received": counter.received, "total": counter.total,
                            "calls": dict(counter.calls)}
        results["restored"] = all(getattr(module, name) is fn for module, name, fn in originals)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("loss-scaling")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD)
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("row", list(BY_HAND))
def test_measured_bytes_equal_analytic_and_hand_computed(ranks, row):
    assert analytic_bytes(row, WORLD, B, D) == BY_HAND[row]
    for rank in ranks:
        assert rank[row]["total"] == BY_HAND[row]
        assert rank[row]["sent"] == rank[row]["received"] == BY_HAND[row] / 2
        assert rank[row]["calls"] == CALLS[row]


def test_counter_restores_torch_distributed(ranks):
    assert all(rank["restored"] for rank in ranks)


def test_analytic_scaling_in_world_size():
    """InfoNCE and SigLIP grow with W - 1 (every rank's features pass by); cross_rank stays one
    neighbour exchange; nothing communicates on one rank."""
    assert analytic_bytes("infonce", 9, B, D) == 8 * BY_HAND["infonce"]
    assert analytic_bytes("siglip", 9, B, D) == 8 * BY_HAND["siglip"]
    assert analytic_bytes("cliplite-cross_rank", 64, B, D) == BY_HAND["cliplite-cross_rank"]
    assert analytic_bytes("infonce", 1, B, D) == analytic_bytes("cliplite-cross_rank", 1, B, D) == 0
