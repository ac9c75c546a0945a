"""The run's text log: one file per rank under RUN_DIR/logs/, rank 0's INFO also on stdout."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.WARNING)  # libraries (open_clip logs model building at INFO) stay quiet
    logging.getLogger("cliplite_dist").setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(run_dir / "logs" / f"train-rank{rank}.log")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in (file_handler, console):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def duration(seconds: float) -> str:
    """`1h05m` or `4m09s`, for ETAs."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
