"""Launching real training runs from tests: clean environments and tiny overrides."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny-cpu.yaml")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict:
    """This process's environment without torch.distributed / SLURM variables (the test session
    has its own single-rank group), one intra-op thread per process on the 2-core machine."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(corpus: Path, out: Path, **kw) -> list[str]:
    values = {
        "run.output_dir": str(out), "run.name": "t",
        "data.train": str(corpus / "train"), "data.eval": str(corpus / "heldout"),
        "data.eval_zeroshot": str(corpus / "classes"),
        "data.synthetic.train_samples": 0, "data.batch_size": 8, "data.workers": 1,
        "data.shuffle_buffer": 50, "data.eval_max_samples": 64, "data.eval_batch_size": 32,
        "train.steps": 6, "train.log_every": 2, "train.checkpoint_every": 3,
        "optim.warmup_steps": 2,
    }
    values.update(kw)
    return [f"{k}={v}" for k, v in values.items()]


def console_command(name: str) -> list[str]:
    """The installed console script: beside this interpreter (a venv not on PATH), else on PATH,
    else (the package importable but not installed, as on a GPU machine that gets it on
    PYTHONPATH) its entry-point function run by this interpreter: setup.py points
    cliplite-NAME at cliplite_dist.cli's NAME_main."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found:
        return [found]
    function = name.removeprefix("cliplite-") + "_main"
    return [sys.executable, "-c", f"import sys; from cliplite_dist.cli import {function} as main; "
                                  f"sys.argv[0] = {name!r}; main()"]


def train_command() -> list[str]:
    return console_command("cliplite-train")


def torchrun_command(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "cliplite_dist"]


def descendants(pid: int) -> list[int]:
    """Every process under `pid`: children, theirs, and so on (torchrun's workers start their own
    sessions, so a process group would miss them)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found] + [grand for child in found for grand in descendants(int(child))]


def run(cmd: list[str], timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=clean_env(**extra_env), capture_output=True, text=True, timeout=timeout)


def metric_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
