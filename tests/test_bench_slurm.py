"""A benchmark run as SLURM job arrays through our launcher, on the local cluster: one array of
one-rank cells and one of two-rank cells, results collected from rank 0 of each task."""
import json
import sys

import pytest
from PIL import Image

from runkit import REPO, run


@pytest.mark.timeout(900)
def test_scaling_benchmark_as_job_arrays(slurm_cluster, tmp_path):
    proc = run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--slurm", "--ranks", "1,2",
                "--batch", "4", "--repeats", "2", "--cpus-per-task", "1", "--time", "15",
                "--results-dir", str(tmp_path), "--machine-name", "slurm-test"], timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("submitted ") == 2  # one array per world size
    folder = tmp_path / "scaling" / "slurm-test"
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert sorted((r["row"], r["ranks"]) for r in rows) == sorted(
        [("infonce", 1), ("cliplite-shift", 1), ("infonce", 2), ("cliplite-shift", 2), ("cliplite-cross_rank", 2)])
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["bus_bandwidth_gbs"] > 0 for r in rows if r["ranks"] == 2)
    with Image.open(folder / "projected_scaling.png") as image:
        assert image.size[0] > 500
    assert "Cost model against the measured multi-rank runs" in (folder / "results.md").read_text()
