"""Shards from real servers on 127.0.0.1, started and stopped by pid: HTTP (`python -m
http.server`) and S3 (moto's server, through s3fs); unreachable and silent servers; the local
shard cache; and `pipe:` URLs, which run only where the recipe allows them."""
import io
import logging
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cliplite_dist.config import ConfigError, load_config
from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.opener import ShardOpener, cache_path
from cliplite_dist.data.reader import iterate_samples
from cliplite_dist.data.shards import count_samples, expand_urls, resolve_corpora
from cliplite_dist.shardspec import ShardError
from runkit import RECIPE, free_port, metric_steps, run, tiny_overrides, train_command

SHARDS = "train/train-{00000..00002}.tar"


@pytest.fixture(scope="module")
def http_corpus(tiny_corpus):
    """`python -m http.server` serving the tiny corpus on a free loopback port."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tiny_corpus)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/train/sizes.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the loopback HTTP server did not come up")
        yield base
    finally:
        server.kill()
        server.wait()


def _samples(urls, opener=ShardOpener()):
    counter = BadDataCounter()
    return [(s["__key__"], s["jpg"], s["json"]) for s in iterate_samples(urls, counter, opener)], counter


@pytest.fixture(scope="module")
def s3_corpus(s3_server, tiny_corpus):
    """The tiny corpus's training shards (and sizes.json) in bucket `corpus` of the loopback S3."""
    s3_server.upload_dir(tiny_corpus / "train", "corpus/train")
    return "s3://corpus/train"


def test_http_shards_read_exactly_like_local_ones(http_corpus, tiny_corpus):
    remote = expand_urls(f"{http_corpus}/{SHARDS}")
    local = expand_urls(str(tiny_corpus / "train"))
    assert [u.rsplit("/", 1)[1] for u in remote] == [u.rsplit("/", 1)[1] for u in local]
    (got, counter), (want, _) = _samples(remote), _samples(local)
    assert got == want and len(got) == 600 and not counter.counts
    assert count_samples(remote) == count_samples(local) == 600  # sizes.json read over HTTP


@pytest.mark.timeout(300)
def test_training_streams_shards_from_http(http_corpus, tiny_corpus, tmp_path):
    proc = run(train_command() + [RECIPE] + tiny_overrides(
        tiny_corpus, tmp_path, **{"data.train": f"{http_corpus}/{SHARDS}", "train.steps": 3,
                                  "train.log_every": 1, "train.checkpoint_every": 0, "data.eval": "''",
                                  "data.eval_zeroshot": "''"}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = metric_steps(tmp_path / "t")
    assert steps[-1]["step"] == 3 and steps[-1]["train/bad"] == 0


def test_s3_shards_read_exactly_like_local_ones(s3_env, s3_corpus, tiny_corpus):
    remote = expand_urls(s3_corpus)  # a directory listing over S3
    local = expand_urls(str(tiny_corpus / "train"))
    assert remote == [f"s3://corpus/train/train-0000{i}.tar" for i in range(3)]
    (got, counter), (want, _) = _samples(remote), _samples(local)
    assert got == want and len(got) == 600 and not counter.counts
    assert count_samples(remote) == 600
    corpora, warnings = resolve_corpora(s3_corpus + "/train-{00000..00003}.tar", "", 30)
    assert warnings == ["shard s3://corpus/train/train-00003.tar does not exist"]


def test_gcs_shards_read_exactly_like_local_ones(gcs_env, tiny_corpus):
    gcs_env.upload_dir(tiny_corpus / "train", "corpus/train")
    remote = expand_urls("gs://corpus/train")
    assert remote == [f"gs://corpus/train/train-0000{i}.tar" for i in range(3)]
    assert _samples(remote)[0] == _samples(expand_urls(str(tiny_corpus / "train")))[0]
    assert count_samples(remote) == 600
    with pytest.raises(ShardError, match="gs://corpsu/train/train-00000.tar does not exist"):
        resolve_corpora("gs://corpsu/train/train-{00000..00002}.tar", "", 30)


@pytest.mark.timeout(300)
def test_training_streams_shards_from_s3(s3_server, s3_corpus, tiny_corpus, tmp_path):
    proc = run(train_command() + [RECIPE] + tiny_overrides(
        tiny_corpus, tmp_path, **{"data.train": s3_corpus, "train.steps": 3, "train.log_every": 1,
                                  "train.checkpoint_every": 0, "data.eval": "''", "data.eval_zeroshot": "''"}),
        **s3_server.env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert metric_steps(tmp_path / "t")[-1]["step"] == 3


def test_misspelt_bucket_fails_at_start_naming_it(s3_server, s3_corpus, tiny_corpus, tmp_path):
    start = time.monotonic()
    proc = run(train_command() + [RECIPE] + tiny_overrides(
        tiny_corpus, tmp_path, **{"data.train": "s3://corpsu/train/train-{00000..00002}.tar"}), **s3_server.env)
    assert proc.returncode == 65, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "s3://corpsu/train/train-00000.tar does not exist" in proc.stderr
    assert "Check the bucket, host and path in data.train" in proc.stderr
    assert time.monotonic() - start < 60  # no engine, no rendezvous, no retries
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_refused_connection_is_counted_not_waited_for(caplog):
    url = f"http://127.0.0.1:{free_port()}/train-00000.tar"  # nothing listens there
    with caplog.at_level(logging.WARNING):
        got, counter = _samples([url])
    assert got == [] and counter.counts["unreachable"] == 1
    assert url in caplog.text
    with pytest.raises(ShardError, match="cannot be reached"):
        resolve_corpora(url, "", 30)


def test_a_host_that_never_answers_fails_within_the_timeout():
    """A loopback listener that accepts and then says nothing: the TCP view of a black-holed host."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/shards/{{00000..00009}}.tar"
        start = time.monotonic()
        with pytest.raises(ShardError, match=r"no answer within 2 s .*data.connect_timeout_s"):
            resolve_corpora(url, "", 2)
        assert time.monotonic() - start < 10


def test_cache_keeps_remote_shards_after_a_complete_read(http_corpus, tiny_corpus, tmp_path):
    url = f"{http_corpus}/train/train-00000.tar"
    opener = ShardOpener(str(tmp_path / "cache"))
    first, _ = _samples([url], opener)
    cached = cache_path(opener.cache_dir, url)
    assert cached.read_bytes() == (tiny_corpus / "train" / "train-00000.tar").read_bytes()
    stream = opener(url)
    assert isinstance(stream, io.BufferedReader)  # served from disk now
    stream.close()
    assert _samples([url], opener)[0] == first
    # A reader that stops early still completes the copy; another corpus's 00000.tar gets its own file.
    other = f"{http_corpus}/train/../train/train-00001.tar"
    samples = iterate_samples([other], BadDataCounter(), opener)
    next(samples)
    samples.close()
    assert cache_path(opener.cache_dir, other).stat().st_size == (tiny_corpus / "train" / "train-00001.tar").stat().st_size
    assert len(list((tmp_path / "cache").iterdir())) == 2  # no partial files left behind


def test_a_failed_download_leaves_nothing_in_the_cache(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/train-00000.tar"
    got, counter = _samples([url], ShardOpener(str(tmp_path / "cache")))
    assert counter.counts["unreachable"] == 1
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_pipe_urls_need_the_recipe_to_allow_them(tiny_corpus, tmp_path):
    spec = f"pipe:cat {tiny_corpus}/train/train-0000{{0..2}}.tar"
    with pytest.raises(ConfigError, match="data.train=.*pipe:.*data.allow_pipe=true"):
        load_config(RECIPE, [f"data.train={spec}"])
    cfg = load_config(RECIPE, [f"data.train={spec}", "data.allow_pipe=true"])
    urls = expand_urls(cfg.data.train)
    assert urls == [f"pipe:cat {tiny_corpus}/train/train-0000{i}.tar" for i in range(3)]
    assert _samples(urls)[0] == _samples(expand_urls(str(tiny_corpus / "train")))[0]
    with pytest.raises(ShardError, match="data.num_samples"):
        count_samples(urls)


def test_failing_pipe_command_is_counted_with_its_status(tmp_path, caplog):
    missing = tmp_path / "missing.tar"
    with caplog.at_level(logging.WARNING):
        got, counter = _samples([f"pipe:cat {missing}"])
    assert got == [] and counter.counts["unreachable"] >= 1
    assert "exited with status 1" in caplog.text and str(missing) in caplog.text


def test_reader_stopping_early_is_not_a_failed_pipe(tiny_corpus):
    shard = tiny_corpus / "train" / "train-00000.tar"
    assert shard.stat().st_size > 2**17  # larger than a pipe's buffer: cat is still writing when we stop
    counter = BadDataCounter()
    samples = iterate_samples([f"pipe:cat {shard}"], counter)
    next(samples)
    samples.close()  # closes the stream: cat gets SIGPIPE
    assert not counter.counts
