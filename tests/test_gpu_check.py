"""benchmarks/gpu_check.py rehearsed on this CPU: the one command that a lent GPU's few minutes
go into, run whole with every part at toy sizes, so that a part whose command line, script or
packing broke fails here instead of there."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from runkit import clean_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)
import vs_open_clip  # noqa: E402


def open_clip_train_deps_reachable(tmp_path: Path) -> bool:
    """open_clip_train's pinned webdataset is installed for the benchmarks already, or a package
    registry can hand it over (vs_open_clip.py installs it on first use)."""
    if vs_open_clip.open_clip_deps_installed():
        return True
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--retries", "0",
                            "--timeout", "10", "-d", str(tmp_path), vs_open_clip.OPEN_CLIP_PINS[0]],
                           capture_output=True, text=True)
    return probe.returncode == 0


def test_every_part_of_the_gpu_check_runs_in_a_cpu_rehearsal(tmp_path):
    if not open_clip_train_deps_reachable(tmp_path / "probe"):
        pytest.skip("open_clip_train's webdataset 0.2.86 is neither in benchmarks/.open_clip_deps nor on a "
                    "reachable package registry")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--rehearse", "--wheels", "", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--scratch", str(tmp_path / "scratch"),
                           "--budget-s", "1800"], cwd=REPO, env=clean_env(CUDA_VISIBLE_DEVICES=""),  # a CPU's, anywhere
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (out / "gpu_check.md").read_text()
    names = [part.name for part in gpu_check.parts("m", tmp_path, None, tmp_path, tmp_path, gpu_check.REHEARSAL)]
    for name in names:
        assert f"| {name} | ok |" in summary, summary + proc.stdout[-4000:]

    machine = gpu_check.machine_name(gpu_check.REHEARSAL)
    with tarfile.open(out / "gpu_check.tgz") as tar:  # what the device tool hands back
        packed = set(tar.getnames())
        results = {benchmark: json.load(tar.extractfile(f"gpu_check/results/{benchmark}/{machine}/results.json"))
                   for benchmark in ("vs_open_clip", "step_breakdown", "data", "recipes", "step_breakdown_compiled")}
        hollow = json.load(tar.extractfile(f"gpu_check/results/step_breakdown/{machine}-hollow/results.json"))
    assert f"gpu_check/results/gpu_tests/{machine}/junit.xml" in packed
    assert {f"gpu_check/logs/{name.replace(' ', '_')}.log" for name in names} <= packed
    assert not any("/scratch" in name or name.endswith(".tar") for name in packed)  # shards stay out
    recipes = results["recipes"]["rows"]
    assert [row["recipe"] for row in recipes] == list(gpu_check.RECIPES)
    assert all(row["exit_code"] == 0 and row["samples_per_s"] > 0 for row in recipes), recipes
    assert results["vs_open_clip"]["rows"][0]["open_clip_train_samples_per_s"] > 0
    step_rows = {row["objective"]: row for row in results["step_breakdown"]["rows"]}
    assert set(step_rows) == {"cliplite", "infonce", "open_clip_train"}
    assert all(row["precision"] == "bf16" and row["step_ms"] > 0 and row["tflop_per_s"] > 0
               for row in step_rows.values())
    assert results["step_breakdown"]["infonce_over_open_clip_train"]["median"] > 0
    assert [row["model"] for row in hollow["rows"]] == [str(gpu_check.HOLLOW)] * 3 and hollow["rows"][0]["batch"] == 2
    compiled = {row["objective"]: row for row in results["step_breakdown_compiled"]["rows"]}
    assert set(compiled) == {"cliplite", "infonce", "infonce_compiled", "open_clip_train"}
    assert results["step_breakdown_compiled"]["infonce_compiled_over_infonce"]["median"] > 0
    assert {row["step"] for row in results["data"]["rows"]} >= {"resize + normalise, batched (the trainer's)"}
