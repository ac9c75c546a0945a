import pytest

from cliplite_dist.cli import submit_parser
from cliplite_dist.config import ConfigError
from cliplite_dist.distributed import DistEnv
from cliplite_dist.launch.submit import (SlurmOptions, dry_run_script, parse_sweep, slurm_parameters, sweep_points,
                                         time_minutes, validate_options)
from runkit import RECIPE


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:00", 30), ("30:01", 31), ("1:30:00", 90),
                                           ("2-00", 2880), ("1-12:30", 2190), ("0-00:00:30", 1)])
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["", "abc", "1:2:3:4", "0"])
def test_bad_times_are_named(bad):
    with pytest.raises(ConfigError, match="--time"):
        time_minutes(bad)


def test_options_validation():
    with pytest.raises(ConfigError, match="--signal-delay"):
        validate_options(SlurmOptions(time="2", signal_delay=120))
    with pytest.raises(ConfigError, match="--nodes"):
        validate_options(SlurmOptions(nodes=0))


def test_one_task_per_gpu_and_cpu_default_from_workers(tmp_path):
    cfg = sweep_points(RECIPE, [f"run.output_dir={tmp_path}", "data.workers=7"], [])[0][1]
    params = slurm_parameters(SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", account="proj",
                                           qos="high", exclude="gpu013", constraint="a100", mem="400G"), cfg)
    assert params["ntasks_per_node"] == 8 and params["cpus_per_task"] == 8 and params["nodes"] == 4
    assert params["srun_args"] == ["--cpus-per-task", "8"]  # Slurm 22.05-23.02's srun ignores the job's
    assert {params[k] for k in ("partition", "account", "qos", "exclude", "constraint", "mem")} == \
        {"gpu", "proj", "high", "gpu013", "a100", "400G"}
    assert params["comment"] == str(tmp_path.resolve())
    cpu = slurm_parameters(SlurmOptions(tasks_per_node=2, cpus_per_task=1), cfg)
    assert cpu["ntasks_per_node"] == 2 and cpu["cpus_per_task"] == 1 and "gpus_per_node" not in cpu
    assert cpu["srun_args"] == ["--cpus-per-task", "1"]


def test_dry_run_is_the_sbatch_script_for_four_nodes_of_eight_gpus(tmp_path):
    cfg = sweep_points(RECIPE, [f"run.output_dir={tmp_path}"], [])[0][1]
    script = dry_run_script(SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00",
                                         signal_delay=300), cfg)
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --signal=USR2@300",
                 "#SBATCH --open-mode=append", "srun --unbuffered"):
        assert line in script, (line, script)
    srun = next(line for line in script.splitlines() if line.startswith("srun"))
    assert f" --cpus-per-task {cfg.data.workers + 1} " in srun, srun
    assert not (tmp_path / "slurm").exists() or not any((tmp_path / "slurm").iterdir())


def test_dry_run_needs_no_slurm_tools_and_every_option_has_help(tmp_path):
    """`cliplite-submit --dry-run` on a machine without SLURM's client tools (a laptop, a CI runner):
    PATH holds the Python environment alone, no srun/sbatch."""
    import sys
    from pathlib import Path

    from runkit import console_command, run

    submit = console_command("cliplite-submit")
    path = str(Path(sys.executable).parent)
    proc = run([*submit, RECIPE, "--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--dry-run",
                f"run.output_dir={tmp_path}"], PATH=path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "#SBATCH --nodes=2" in proc.stdout and "srun --unbuffered" in proc.stdout
    assert "--mem" in run([*submit, "--help"], PATH=path).stdout
    options = [a for a in submit_parser()._actions if a.option_strings and a.dest != "help"]
    assert {"dry_run", "mem", "sweep", "local", "wait"} <= {a.dest for a in options} and len(options) >= 18
    assert [a.option_strings[0] for a in options if not a.help] == []


def test_sweep_is_a_product_of_axes_with_one_run_directory_each(tmp_path):
    axes = parse_sweep(["objective.name=cliplite,infonce", "data.batch_size=32,64,128"])
    points = sweep_points(RECIPE, [f"run.output_dir={tmp_path}"], axes)
    assert len(points) == 6
    names = {cfg.run.name for _, cfg in points}
    assert len(names) == 6 and "tiny-cpu-name=infonce-batch_size=64" in names
    point, cfg = points[-1]
    assert point == {"objective.name": "infonce", "data.batch_size": "128"}
    assert cfg.objective.name == "infonce" and cfg.data.batch_size == 128


def test_a_bad_sweep_point_fails_before_anything_is_submitted(tmp_path):
    with pytest.raises(ConfigError, match="engine.zero_stage=5"):
        sweep_points(RECIPE, [f"run.output_dir={tmp_path}"], parse_sweep(["engine.zero_stage=0,5"]))
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(["objective.name"])


def test_submitit_local_executor_environment_gives_ranks():
    env = DistEnv.from_environ({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                                "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "submitit-local")


def test_local_executor_runs_the_same_job_on_two_processes(tiny_corpus, tmp_path):
    from runkit import console_command, run, tiny_overrides

    cmd = [*console_command("cliplite-submit"), RECIPE, "--local", "--tasks-per-node", "2",
           "--time", "10", "--wait"] + tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 2, "data.eval": "''"})
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = (tmp_path / "t" / "logs" / "train-rank0.log").read_text()
    assert "2 rank(s) (submitit-local)" in log and "done at step 2" in log
    assert (tmp_path / "t" / "logs" / "train-rank1.log").exists()
