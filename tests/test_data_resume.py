"""Whole runs over real shards: a killed run resumed from its checkpoint trains on exactly the
samples of an uninterrupted one; too much bad data stops a run, naming the shards; a rank with
nothing to read stops every rank instead of leaving them waiting."""
import io
import json
import os
import signal
import subprocess
import tarfile
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runkit import RECIPE, clean_env, metric_steps, run, tiny_overrides, torchrun_command, train_command
from shardkit import write_shards

EXIT_BAD_DATA = 65


def keys_by_step(run_dir, ranks: int) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> the keys trained on; a step recorded again after a resume replaces the
    record of the killed run (whose last line may be cut off by the kill)."""
    out = {}
    for rank in range(ranks):
        for line in (run_dir / "data" / f"keys-rank{rank}.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(rank, record["step"])] = record["keys"]
    return out


def resume_overrides(corpus, out, steps):
    return tiny_overrides(corpus, out, **{
        "data.train": str(corpus), "data.eval": "''", "data.eval_zeroshot": "''", "data.batch_size": 4,
        "data.workers": 2, "data.shuffle_buffer": 5, "data.record_keys": "true", "train.steps": steps,
        "train.log_every": 1, "train.checkpoint_every": 4, "model.name": "micro-vit"})


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers are not in its process group)."""
    family, todo = [], [pid]
    while todo:
        parent = todo.pop()
        family.append(parent)
        todo += [int(c) for c in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                                                 text=True).stdout.split()]
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_run_resumes_on_exactly_the_samples_of_an_uninterrupted_one(tmp_path):
    """2 ranks x 2 workers, 60 samples: 7 batches per rank per epoch, so 10 steps cross an epoch;
    shuffle blocks (5), shards (12) and passes (a reader owns 1-2 of the 5 shards) are crossed
    too. SIGKILL, not a polite signal."""
    corpus = tmp_path / "corpus"
    write_shards(corpus, 5, 12)
    straight = run(torchrun_command() + [RECIPE] + resume_overrides(corpus, tmp_path / "a", 10), timeout=400)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    killed = subprocess.Popen(torchrun_command() + [RECIPE] + resume_overrides(corpus, tmp_path / "b", 10),
                              env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    run_dir = tmp_path / "b" / "t"
    deadline = time.monotonic() + 300
    while not any(m.get("step", 0) >= 5 for m in metric_steps(run_dir)):
        assert killed.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    kill_tree(killed.pid)
    killed.wait()
    time.sleep(1)
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved in ("step_00000004", "step_00000008")
    assert not (run_dir / "checkpoints" / "step_00000010").exists()  # really stopped

    resumed = run(torchrun_command() + [RECIPE] + resume_overrides(corpus, tmp_path / "b", 10), timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in resumed.stdout
    want, got = keys_by_step(tmp_path / "a" / "t", 2), keys_by_step(run_dir, 2)
    assert sorted(want) == sorted(got) == [(r, s) for r in range(2) for s in range(1, 11)]
    assert got == want  # every step of every rank: the same samples, in the same order
    seen = [k for keys in want.values() for k in keys]
    assert len(seen) == 80 and len(set(seen)) >= 50  # the corpus, not a few samples over and over


def write_undecodable_shard(path, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for name, data in ((f"broken{i}.jpg", b"\xff\xd8 not really a jpeg"), (f"broken{i}.txt", b"a square"),
                               (f"broken{i}.json", b'{"captions": ["a square"]}')):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_too_much_bad_data_stops_the_run_naming_the_worst_shard(tmp_path):
    corpus = tmp_path / "corpus"
    write_shards(corpus, 3, 20, sizes=False)
    write_undecodable_shard(corpus / "shard-00003.tar", 20)
    (corpus / "sizes.json").write_text(json.dumps({f"shard-0000{i}.tar": 20 for i in range(4)}))
    proc = run(train_command() + [RECIPE] + tiny_overrides(corpus, tmp_path, **{
        "data.train": str(corpus), "data.eval": "''", "data.eval_zeroshot": "''", "data.max_bad_fraction": 0.1,
        "train.steps": 60, "train.log_every": 2, "train.checkpoint_every": 0, "model.name": "micro-vit"}))
    assert proc.returncode == EXIT_BAD_DATA, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bad data above data.max_bad_fraction=0.1" in proc.stderr
    assert f"Worst shards:\n  {corpus / 'shard-00003.tar'}: " in proc.stderr
    run_dir = tmp_path / "t"
    stopped_at = max(m["step"] for m in metric_steps(run_dir))
    assert 2 <= stopped_at < 60
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()  # nothing lost
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    bad_images = [e.value for e in events.Scalars("data/bad_image")]
    assert bad_images == sorted(bad_images) and bad_images[-1] >= 10
    assert events.Scalars("data/bad_sample_fraction")[-1].value > 0.1


def test_a_rank_with_nothing_to_read_stops_both_ranks(tmp_path):
    corpus = tmp_path / "corpus"
    write_shards(corpus, 1, 40, sizes=False)
    (corpus / "shard-00001.tar").write_bytes(b"")  # zero bytes: one rank's only shard
    start = time.monotonic()
    proc = run(torchrun_command() + [RECIPE] + tiny_overrides(corpus, tmp_path, **{
        "data.train": str(corpus), "data.num_samples": 80, "data.eval": "''", "data.eval_zeroshot": "''",
        "data.workers": 1, "data.shuffle_buffer": 4, "train.steps": 20, "model.name": "micro-vit"}), timeout=400)
    assert proc.returncode != 0
    assert time.monotonic() - start < 300  # no collective left waiting for the default 30 min
    logs = {rank: (tmp_path / "t" / "logs" / f"train-rank{rank}.log").read_text() for rank in (0, 1)}
    failed = [rank for rank, log in logs.items() if "ERROR" in log and "could not read its data" not in log]
    assert len(failed) == 1, logs
    other = 1 - failed[0]
    for log in logs.values():  # both name the shard and what was wrong, not the loader worker's wrapping
        assert "shard(s) in a row" in log and "shard-00001.tar: empty_shard" in log, log[-2000:]
        assert "Caught EmptyStreamError" not in log
    assert f"rank {failed[0]} could not read its data: data reader" in logs[other]
    assert "skipping bad data (empty_shard)" in logs[failed[0]]
    assert f"exitcode  : {EXIT_BAD_DATA}" in proc.stdout + proc.stderr


def test_resampled_run_resumes_with_a_fresh_recorded_seed(tmp_path):
    import re

    import torch

    corpus = tmp_path / "corpus"
    write_shards(corpus, 3, 10)

    def train(steps):
        return run(train_command() + [RECIPE] + tiny_overrides(corpus, tmp_path, **{
            "data.train": str(corpus), "data.eval": "''", "data.eval_zeroshot": "''", "data.resampled": "true",
            "data.samples_per_epoch": 200, "data.batch_size": 4, "data.record_keys": "true",
            "train.steps": steps, "train.checkpoint_every": 0, "model.name": "micro-vit"}))

    assert train(2).returncode == 0
    resumed = train(4)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    seed = int(re.search(r"data: resampled stream; continuing with fresh data seed (\d+)", resumed.stdout).group(1))
    run_dir = tmp_path / "t"
    saved = torch.load(run_dir / "checkpoints" / "step_00000004" / "trainer_state_rank0.pt", weights_only=True)
    assert saved["data_seed"] == seed != 0  # the seed that drew steps 3-4, recorded beside them
    assert sorted(step for _, step in keys_by_step(run_dir, 1)) == [1, 2, 3, 4]
