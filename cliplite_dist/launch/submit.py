"""Submitting runs: one job, or a sweep as one job array, through submitit on SLURM (or locally).

Every configuration is loaded and validated before anything is submitted. A job runs one task
per GPU (or `tasks_per_node` tasks on CPU partitions); each task runs `TrainJob`, which takes its
rank from the SLURM environment. Job logs go to `OUTPUT_DIR/slurm/`; each run directory gets a
`job.json` naming its job id and log files, which `cliplite-status` reads.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from cliplite_dist.config import Config, ConfigError, load_config
from cliplite_dist.launch.job import TrainJob
from cliplite_dist.launch.status import job_state


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU, or 1 without GPUs
    cpus_per_task: int = 0  # 0: data.workers + 1 (the loader's workers and the training process)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "60"  # SLURM time format: minutes, HH:MM:SS, D-HH[:MM[:SS]]
    constraint: str = ""
    exclude: str = ""
    mem: str = ""  # per node, SLURM format (e.g. 64G); "" = SLURM's default
    signal_delay: int = 120  # seconds before the time limit at which USR2 arrives
    max_requeues: int = 3
    job_name: str = ""

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(text: str) -> int:
    """SLURM's time formats in whole minutes (rounded up): `90`, `30:00` (min:s), `1:30:00`,
    `2-00`, `2-12:00`, `2-12:00:00`."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r} must be positive")
    return -(-seconds // 60)


def validate_options(opts: SlurmOptions) -> None:
    for name in ("nodes", "max_requeues", "signal_delay", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
        value = getattr(opts, name)
        if value < (1 if name == "nodes" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} {value} is out of range")
    minutes = time_minutes(opts.time)
    if opts.signal_delay >= minutes * 60:
        raise ConfigError(f"--signal-delay {opts.signal_delay}s is not shorter than --time {opts.time}")


def slurm_parameters(opts: SlurmOptions, cfg: Config) -> dict:
    """submitit SlurmExecutor parameters (their names follow sbatch's options). The job's comment
    is the output root, where `cliplite-status JOB_ID` finds the run directory. srun is given the
    CPUs per task too: from Slurm 22.05 to 23.02 it ignores the job's, and a task and its loader
    workers got one core."""
    cpus = opts.cpus_per_task or cfg.data.workers + 1
    params = {
        "nodes": opts.nodes, "ntasks_per_node": opts.ntasks_per_node, "time": time_minutes(opts.time),
        "signal_delay_s": opts.signal_delay, "job_name": opts.job_name or cfg.run.name,
        "comment": str(output_root(cfg)), "cpus_per_task": cpus, "srun_args": ["--cpus-per-task", str(cpus)],
    }
    optional = {"gpus_per_node": opts.gpus_per_node,
                "partition": opts.partition, "account": opts.account, "qos": opts.qos,
                "constraint": opts.constraint, "exclude": opts.exclude, "mem": opts.mem}
    params.update({k: v for k, v in optional.items() if v})
    return params


def output_root(cfg: Config) -> Path:
    """The local folder holding the run directories (job logs go to its slurm/): run.output_dir,
    or run.local_dir for a remote output_dir, where the runs are staged."""
    if cfg.run_url and not cfg.run.local_dir:
        raise ConfigError(f"run.output_dir={cfg.run.output_dir!r} is remote, but job logs need a folder that this "
                          f"machine and the nodes share: set run.local_dir (the runs are staged there too)")
    return cfg.run_dir.parent.resolve()


class ScriptOnlyExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor that only writes the sbatch script: it does not look for SLURM's
    client tools (submitit's own refuses to start without `srun`), so a dry run works on a laptop
    or a CI runner, and it cannot submit."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _internal_process_submissions(self, delayed_submissions):
        raise RuntimeError("a script-only executor submits nothing")


def make_executor(opts: SlurmOptions, cfg: Config, local: bool, script_only: bool = False) -> submitit.Executor:
    """The executor for runs like `cfg`; job logs go to OUTPUT_DIR/slurm/. `script_only`: for
    writing the sbatch script, also where SLURM is not installed."""
    folder = output_root(cfg) / "slurm"
    if local:
        if opts.nodes != 1:
            raise ConfigError("--local runs on this machine: --nodes must be 1")
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(tasks_per_node=opts.ntasks_per_node, timeout_min=time_minutes(opts.time),
                                   gpus_per_node=opts.gpus_per_node, signal_delay_s=opts.signal_delay)
        return executor
    executor_class = ScriptOnlyExecutor if script_only else submitit.SlurmExecutor
    executor = executor_class(folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(**slurm_parameters(opts, cfg))
    return executor


def parse_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`--sweep objective.name=cliplite,infonce` -> [("objective.name", ["cliplite", "infonce"])]."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {spec!r}: expected key=v1,v2,... (e.g. data.batch_size=32,64,128)")
        axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return axes


def _slug(key: str, value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", f"{key.split('.')[-1]}={value}")


def sweep_points(recipe: str, overrides: list[str], axes: list[tuple[str, list[str]]]) -> list[tuple[dict, Config]]:
    """Every point of the grid as (its values, its validated config), one run directory each."""
    base = load_config(recipe, overrides)
    if not axes:
        return [({}, base)]
    points = []
    for values in itertools.product(*(vals for _, vals in axes)):
        point = dict(zip((k for k, _ in axes), values))
        name = base.run.name + "-" + "-".join(_slug(k, v) for k, v in point.items())
        extra = [f"{k}={v}" for k, v in point.items()] + [f"run.name={name}"]
        points.append((point, load_config(recipe, overrides + extra)))
    return points


def dry_run_script(opts: SlurmOptions, cfg: Config, array_size: int = 0) -> str:
    """The sbatch script that would be submitted (the same executor code path, nothing submitted;
    SLURM need not be installed)."""
    executor = make_executor(opts, cfg, local=False, script_only=True)
    if array_size:
        executor.update_parameters(array_parallelism=array_size, map_count=array_size)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def _record(job, cfg: Config) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    info = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (cfg.run_dir / "job.json").write_text(json.dumps(info, indent=1) + "\n")


def submit(points: list[tuple[dict, Config]], opts: SlurmOptions, local: bool = False) -> list:
    """Submit one job per point (several points: one job array). Returns the submitit jobs."""
    first = points[0][1]
    executor = make_executor(opts, first, local)
    if len(points) == 1:
        jobs = [executor.submit(TrainJob(first, opts.max_requeues))]
    else:
        with executor.batch():
            jobs = [executor.submit(TrainJob(cfg, opts.max_requeues)) for _, cfg in points]
    for job, (_, cfg) in zip(jobs, points):
        _record(job, cfg)
    return jobs


ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def _wait_until_slurm_lets_go(job_id: str, poll_s: float, limit_s: float = 120) -> None:
    """The results exist once the tasks are done; SLURM still lists the job until its batch
    script and epilog end. `--wait` means "until the job ends", so wait for that too."""
    deadline = time.monotonic() + limit_s
    while job_state(job_id).split()[0] in ACTIVE_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)


def follow(job, out=sys.stdout, poll_s: float = 2.0) -> int:
    """Print task 0's log as it grows until the job ends; 0 if it completed, else 1.

    Success is read from the job's result file, not its SLURM state: without an accounting
    database SLURM (and so submitit) may not know the final state.
    """
    printed = 0
    while True:
        done = job.done()
        path = Path(job.paths.stdout)
        if path.exists():
            text = path.read_text(errors="replace")
            out.write(text[printed:])
            out.flush()
            printed = len(text)
        if done:
            break
        time.sleep(poll_s)
    _wait_until_slurm_lets_go(job.job_id, poll_s)
    try:
        job.results()  # one per task
    except Exception as exc:  # the job's own exception, or no result at all (killed, cancelled)
        err = Path(job.paths.stderr)
        tail = err.read_text(errors="replace")[-3000:] if err.exists() else ""
        out.write(f"\njob {job.job_id} failed: {exc}\n{tail}\n")
        return 1
    return 0
