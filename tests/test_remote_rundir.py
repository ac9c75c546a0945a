"""Run directories on S3 (moto's server on 127.0.0.1): what the background sync uploads and in
which order, pruning, retries, multi-node markers, pulling for resume, and two real runs on two
"machines" (staging directories) continuing one remote run."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from cliplite_dist import checkpoint
from cliplite_dist.config import ConfigError, load_config
from cliplite_dist.export import export_run
from cliplite_dist.launch.submit import output_root
from cliplite_dist.rundir import RunDirSync, SyncError
from cliplite_dist.trainer import EXIT_INTERRUPTED
from runkit import RECIPE, clean_env, free_port, metric_steps, run, tiny_overrides, train_command
from test_multiprocess import rank_pid
from test_train import wait_for_step


@pytest.fixture
def url(s3_env):
    """A run directory in a fresh bucket."""
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    s3_env.filesystem().mkdir(bucket)
    return f"s3://{bucket}/runs/t"


def remote_files(s3_server, url: str) -> dict[str, bytes]:
    fs, root = s3_server.filesystem(), url.removeprefix("s3://")
    # s3fs's find falls back to info(root) when its listing is empty; an upload landing between the
    # two makes it return root itself as a "directory", so keep files only.
    found = fs.find(root, detail=True)
    return {path[len(root) + 1:]: fs.cat_file(path) for path, info in found.items() if info["type"] == "file"}


def save(run_dir, step: int, files=("mp_rank_00_model_states.pt", "trainer_state_rank0.pt"), nodes: int = 1,
         complete: bool = True):
    """A checkpoint folder as checkpoint.save leaves it: data files, then COMPLETE."""
    folder = run_dir / "checkpoints" / checkpoint.tag_for(step)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(f"{name} of step {step}".encode())
    if complete:
        (folder / checkpoint.COMPLETE).write_text(f"{step}\nnodes {nodes}\n")
    return folder


def record_calls(monkeypatch, sync: RunDirSync) -> list[tuple[str, str]]:
    """(operation, run-relative path) of every upload, marker and removal the sync makes."""
    calls = []
    for op in ("put_file", "pipe_file", "rm"):
        original = getattr(sync.fs, op)

        def wrapped(*args, _op=op, _original=original, **kwargs):
            remote = args[1] if _op == "put_file" else args[0]
            calls.append((_op, remote[len(sync.root) + 1:]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(sync.fs, op, wrapped)
    return calls


def test_files_go_up_once_and_again_when_they_change(url, s3_env, tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    (tmp_path / "config.yaml").write_text("a: 1\n")
    (tmp_path / "logs" / "train-rank0.log").write_text("line 1\n")
    (tmp_path / ".config.yaml.tmp123").write_text("half written")  # hidden: never uploaded
    sync = RunDirSync(tmp_path, url, every_s=60)
    calls = record_calls(monkeypatch, sync)
    sync.sync()
    assert remote_files(s3_env, url) == {"config.yaml": b"a: 1\n", "logs/train-rank0.log": b"line 1\n"}
    calls.clear()
    sync.sync()
    assert calls == []  # nothing changed
    with open(tmp_path / "logs" / "train-rank0.log", "a") as log:
        log.write("line 2\n")
    sync.sync()
    assert calls == [("put_file", "logs/train-rank0.log")]
    assert remote_files(s3_env, url)["logs/train-rank0.log"] == b"line 1\nline 2\n"


def test_checkpoint_goes_up_once_complete_data_before_markers(url, s3_env, tmp_path, monkeypatch):
    sync = RunDirSync(tmp_path, url, every_s=60)
    calls = record_calls(monkeypatch, sync)
    folder = save(tmp_path, 2, complete=False)  # a save in progress
    sync.sync()
    assert calls == [] and sync.remote_complete() == []
    (folder / checkpoint.COMPLETE).write_text("2\nnodes 1\n")
    later = time.time() + 5  # a file newer than COMPLETE: the same step being saved again
    os.utime(folder / "trainer_state_rank0.pt", (later, later))
    sync.sync()
    assert calls == []
    os.utime(folder / checkpoint.COMPLETE, (later + 1, later + 1))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text(folder.name + "\n")
    sync.sync()
    tag = folder.name
    assert sorted(calls[:2]) == [("put_file", f"checkpoints/{tag}/mp_rank_00_model_states.pt"),
                                 ("put_file", f"checkpoints/{tag}/trainer_state_rank0.pt")]
    assert calls[2:] == [("put_file", f"checkpoints/{tag}/COMPLETE"),
                         ("pipe_file", f"checkpoints/{tag}/UPLOADED-node0"),
                         ("put_file", "checkpoints/latest")]  # the pointer after what it names
    assert sync.remote_complete() == [tag]


def test_checkpoints_pruned_here_go_remotely_markers_first(url, s3_env, tmp_path, monkeypatch):
    sync = RunDirSync(tmp_path, url, every_s=60)
    old, new = save(tmp_path, 2), save(tmp_path, 4)
    sync.sync()
    assert sync.remote_complete() == [old.name, new.name]
    calls = record_calls(monkeypatch, sync)
    shutil.rmtree(old)  # what checkpoint._prune does
    sync.sync()
    assert calls[0] == ("rm", f"checkpoints/{old.name}/COMPLETE")
    assert calls[-1] == ("rm", f"checkpoints/{old.name}")
    assert sync.remote_complete() == [new.name]
    assert not any(name.startswith(f"checkpoints/{old.name}") for name in remote_files(s3_env, url))


def test_background_errors_are_logged_and_retried(url, s3_env, tmp_path, monkeypatch, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    sync = RunDirSync(tmp_path, url, every_s=0.2)
    real_put, failures = sync.fs.put_file, []

    def flaky_put(*args, **kwargs):
        if len(failures) < 2:
            failures.append(args)
            raise ConnectionError("the store is down")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(sync.fs, "put_file", flaky_put)
    with caplog.at_level(logging.WARNING, logger="cliplite_dist"):
        sync.start()
        deadline = time.monotonic() + 20
        while "metrics.jsonl" not in remote_files(s3_env, url) and time.monotonic() < deadline:
            time.sleep(0.1)
        sync.close()
    assert len(failures) == 2 and remote_files(s3_env, url) == {"metrics.jsonl": b'{"step": 1}\n'}
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 2 and url in warnings[0] and "the store is down" in warnings[0]


def test_a_failing_last_sync_raises_naming_both_places(url, s3_env, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    sync = RunDirSync(tmp_path, url, every_s=60)

    def down(*args, **kwargs):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(sync.fs, "put_file", down)
    with pytest.raises(SyncError, match=f"{tmp_path} to {url} failed .*the store is down"):
        sync.close()


def test_two_nodes_mark_their_own_files(url, s3_env, tmp_path):
    """Each node stages its own ranks' files; node 1 never sees rank 0's COMPLETE locally."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    sync0, sync1 = RunDirSync(node0, url, 60, nodes=(0,)), RunDirSync(node1, url, 60, nodes=(1,))
    first = save(node0, 2, files=("mp_rank_00_model_states.pt", "trainer_state_rank0.pt"), nodes=2).name
    save(node1, 2, files=("trainer_state_rank1.pt",), complete=False)
    sync1.sync()
    assert remote_files(s3_env, url) == {}  # node 1 waits for rank 0's COMPLETE
    sync0.sync()
    assert sync0.remote_complete() == []  # node 1's share is not up yet
    sync1.sync()
    assert sync0.remote_complete() == [first]
    assert f"checkpoints/{first}/trainer_state_rank1.pt" in remote_files(s3_env, url)

    # rank 0 saves step 4 and prunes step 2; node 1 follows both
    second = save(node0, 4, nodes=2).name
    save(node1, 4, files=("trainer_state_rank1.pt",), complete=False)
    shutil.rmtree(node0 / "checkpoints" / first)
    sync0.sync()
    sync1.sync()
    assert sync0.remote_complete() == [second]
    assert not (node1 / "checkpoints" / first).exists()
    assert not any(name.startswith(f"checkpoints/{first}") for name in remote_files(s3_env, url))

    # the run ends: node 1's last pass uploads its share without waiting for rank 0's COMPLETE
    third = save(node1, 6, files=("trainer_state_rank1.pt",), complete=False).name
    sync1.close()
    assert f"checkpoints/{third}/UPLOADED-node1" in remote_files(s3_env, url)
    assert sync0.remote_complete() == [second]  # still needs node 0's files and COMPLETE


def test_another_machine_continues_the_remote_run(url, s3_env, tmp_path, monkeypatch):
    first = tmp_path / "first"
    (first / "logs").mkdir(parents=True)
    (first / "metrics.jsonl").write_text('{"step": 2}\n')
    save(first, 2)
    newest = save(first, 4).name
    bad = save(first, 6, complete=False)  # died mid-save: never counts, never pulled
    RunDirSync(first, url, 60).sync()
    (bad / checkpoint.COMPLETE).write_text("6\nnodes 2\n")  # nodes 2, yet node 1 never marked it
    RunDirSync(first, url, 60).sync()

    second = tmp_path / "second"
    sync = RunDirSync(second, url, every_s=60)
    sync.start()
    assert (second / "metrics.jsonl").read_text() == '{"step": 2}\n'  # the history, to append to
    assert sync.pull() == newest
    pulled = second / "checkpoints" / newest
    assert sorted(p.name for p in pulled.iterdir()) == ["COMPLETE", "mp_rank_00_model_states.pt",
                                                         "trainer_state_rank0.pt"]
    assert checkpoint.find_latest(second / "checkpoints") == newest
    assert sync.pull() == newest  # nothing newer remotely: nothing downloaded again
    calls = record_calls(monkeypatch, sync)
    with open(second / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 6}\n')
    sync.close()
    assert calls == [("put_file", "metrics.jsonl")]  # pulled files are not sent back
    assert remote_files(s3_env, url)["metrics.jsonl"] == b'{"step": 2}\n{"step": 6}\n'


def test_remote_output_dir_resolution_and_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what $TMPDIR sets (read once per process)
    a = load_config(RECIPE, ["run.output_dir=s3://bucket/runs", "run.name=x"])
    b = load_config(RECIPE, ["run.output_dir=s3://other/runs", "run.name=x"])
    assert a.run_url == "s3://bucket/runs/x" and a.run_dir.parent == tmp_path / "cliplite_dist-staging"
    assert a.run_dir.name.startswith("x-") and a.run_dir != b.run_dir
    staged = load_config(RECIPE, ["run.output_dir=s3://bucket/runs/", "run.name=x", f"run.local_dir={tmp_path}"])
    assert staged.run_url == "s3://bucket/runs/x" and staged.run_dir == tmp_path / "x"
    local = load_config(RECIPE, [f"run.output_dir={tmp_path}", "run.name=x"])
    assert local.run_url == "" and local.run_dir == tmp_path / "x"
    with pytest.raises(ConfigError, match=r"run.output_dir='abfs://c/runs'.*adlfs"):
        load_config(RECIPE, ["run.output_dir=abfs://c/runs"])
    with pytest.raises(ConfigError, match=r"run.output_dir='s3://bucket/runs'.*run.local_dir"):
        output_root(a)  # cliplite-submit: job logs need a shared local folder
    assert output_root(staged) == tmp_path.resolve()


@pytest.mark.timeout(400)
def test_a_run_on_another_machine_resumes_from_the_remote_checkpoint(url, s3_server, tiny_corpus, tmp_path):
    bucket = url.removeprefix("s3://").split("/")[0]

    def train(stage: str, steps: int):
        proc = run(train_command() + [RECIPE] + tiny_overrides(tiny_corpus, tmp_path, **{
            "run.output_dir": f"s3://{bucket}/runs", "run.local_dir": str(tmp_path / stage), "train.steps": steps,
            "train.checkpoint_every": 2, "train.log_every": 1, "run.sync_every_s": 1,
            "data.eval": "''", "data.eval_zeroshot": "''"}), **s3_server.env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    first = train("stageA", 4)
    assert f"syncing {tmp_path / 'stageA' / 't'} to s3://{bucket}/runs/t every 1 s" in first.stdout
    files = remote_files(s3_server, url)
    assert {"config.yaml", "model_cfg.json", "metrics.jsonl", "logs/train-rank0.log"} <= set(files)
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in files)
    assert {"checkpoints/step_00000004/COMPLETE", "checkpoints/step_00000004/UPLOADED-node0",
            "checkpoints/step_00000004/mp_rank_00_model_states.pt"} <= set(files)
    assert files["metrics.jsonl"] == (tmp_path / "stageA" / "t" / "metrics.jsonl").read_bytes()

    second = train("stageB", 6)  # an empty staging directory: another machine
    staged = tmp_path / "stageB" / "t"
    assert f"resumed from {staged / 'checkpoints' / 'step_00000004'} at step 4" in second.stdout
    steps = [json.loads(line)["step"] for line in remote_files(s3_server, url)["metrics.jsonl"].splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first run's history, then the second run's steps 5-6 only
    files = remote_files(s3_server, url)
    assert "checkpoints/step_00000006/UPLOADED-node0" in files
    assert "resumed from" in files["logs/train-rank0.log"].decode()  # the log goes on the first run's

    exported = export_run(url, tmp_path / "export")  # cliplite-export straight from the bucket
    meta = json.loads((exported / "cliplite_meta.json").read_text())
    assert meta["step"] == 6 and meta["source_run"] == url


def start_two_nodes(tiny_corpus, tmp_path, s3_server, tmpdirs: tuple[str, str], entry: list[str] | None = None,
                    env: dict | None = None, **overrides) -> list[subprocess.Popen]:
    """Two torchrun "nodes" of one rank each on this machine, each with its own $TMPDIR and its
    own process group; `entry` replaces `-m cliplite_dist`."""
    port, procs = free_port(), []
    for node, tmpdir in enumerate(tmpdirs):
        (tmp_path / tmpdir).mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               *(entry or ["-m", "cliplite_dist"]), RECIPE] + tiny_overrides(tiny_corpus, tmp_path, **{
                   "train.checkpoint_every": 2, "train.log_every": 1, "run.sync_every_s": 1,
                   "data.eval": "''", "data.eval_zeroshot": "''", **overrides})
        procs.append(subprocess.Popen(cmd, env=clean_env(TMPDIR=str(tmp_path / tmpdir), **s3_server.env,
                                                         **(env or {})),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def train_on_two_nodes(tiny_corpus, tmp_path, s3_server, tmpdirs: tuple[str, str], **overrides) -> list[str]:
    procs = start_two_nodes(tiny_corpus, tmp_path, s3_server, tmpdirs, **overrides)
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return outputs


@pytest.mark.timeout(400)
@pytest.mark.parametrize("staging", ["node-local", "shared"])
def test_two_nodes_upload_one_checkpoint(staging, url, s3_server, tiny_corpus, tmp_path):
    """Node-local staging ($TMPDIR differs): each node uploads its rank's files and its marker, and
    a second run on two fresh nodes resumes. A shared run.local_dir: node 0 uploads for both."""
    run_url = url.rsplit("/", 1)[0]
    shared = {"run.local_dir": str(tmp_path / "shared")} if staging == "shared" else {}
    train_on_two_nodes(tiny_corpus, tmp_path, s3_server, ("a0", "a1"), **{
        "run.output_dir": run_url, "train.steps": 4, **shared})
    files = remote_files(s3_server, url)
    tag = "checkpoints/step_00000004"
    assert files[f"{tag}/COMPLETE"] == b"4\nnodes 2\n"
    assert {f"{tag}/UPLOADED-node0", f"{tag}/UPLOADED-node1", f"{tag}/trainer_state_rank0.pt",
            f"{tag}/trainer_state_rank1.pt", "logs/train-rank0.log", "logs/train-rank1.log"} <= set(files)
    syncing_on_rank1 = "syncing" in files["logs/train-rank1.log"].decode()
    assert syncing_on_rank1 == (staging == "node-local")
    if staging == "node-local":
        train_on_two_nodes(tiny_corpus, tmp_path, s3_server, ("b0", "b1"), **{
            "run.output_dir": run_url, "train.steps": 6})
        log = remote_files(s3_server, url)["logs/train-rank1.log"].decode()
        assert "at step 4" in log and "resumed from" in log
        assert RunDirSync(tmp_path, url, 60).remote_complete()[-1] == "step_00000006"


@pytest.mark.timeout(300)
def test_a_signal_stop_uploads_its_checkpoint_before_exiting(url, s3_server, tiny_corpus, tmp_path):
    """No periodic pass comes in time (sync_every_s=600): the last sync on the way out does it all."""
    cmd = train_command() + [RECIPE] + tiny_overrides(tiny_corpus, tmp_path, **{
        "run.output_dir": url.rsplit("/", 1)[0], "run.local_dir": str(tmp_path / "stage"), "train.steps": 400,
        "train.log_every": 1, "train.checkpoint_every": 0, "run.sync_every_s": 600,
        "data.eval": "''", "data.eval_zeroshot": "''"})
    proc = subprocess.Popen(cmd, env=clean_env(**s3_server.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    staged = tmp_path / "stage" / "t"
    wait_for_step(staged, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    saved = (staged / "checkpoints" / "latest").read_text().strip()
    assert RunDirSync(tmp_path, url, 60).remote_complete() == [saved]
    assert remote_files(s3_server, url)["metrics.jsonl"] == (staged / "metrics.jsonl").read_bytes()


@pytest.mark.timeout(400)
def test_a_requeue_ends_the_job_only_after_every_node_uploaded_the_stop_checkpoint(url, s3_server, tiny_corpus,
                                                                                   tmp_path):
    """Two nodes with node-local staging, no periodic pass in time (sync_every_s=600). A signal to
    node 1's rank stops both; rank 0's requeue SIGKILLs every node at once, as SLURM does, so no
    upload on the way out can help: the newest complete remote checkpoint is the stop checkpoint."""
    pids = tmp_path / "pids"
    procs = start_two_nodes(tiny_corpus, tmp_path, s3_server, ("n0", "n1"), [str(Path(__file__).parent / "requeue_kills.py")],
                            env={"CLIPLITE_TEST_JOB_PIDS": str(pids)}, **{
                                "run.output_dir": url.rsplit("/", 1)[0], "train.steps": 400,
                                "train.checkpoint_every": 0, "run.sync_every_s": 600})
    pids.write_text(" ".join(str(proc.pid) for proc in procs))
    deadline = time.monotonic() + 240
    while not any(m["step"] >= 3 for staged in (tmp_path / "n0").glob("**/metrics.jsonl")  # node 0's staging
                  for m in metric_steps(staged.parent)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step 3"
        time.sleep(0.2)
    subprocess.run(["kill", "-USR1", str(rank_pid(procs[1].pid, 1))], check=True)
    outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [-signal.SIGKILL] * 2, "\n".join(o[-2000:] for o in outputs)
    stopped = re.search(r"stopped by signal \d+ \(SIGUSR1\) at step (\d+)", outputs[0])
    assert stopped, outputs[0][-3000:]
    assert RunDirSync(tmp_path, url, 60).remote_complete()[-1] == f"step_{int(stopped.group(1)):08d}"
