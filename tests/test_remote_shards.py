"""Shards over HTTP from a real server on 127.0.0.1 (started and stopped by pid here), an
unreachable server, and `pipe:` URLs, which run only where the recipe allows them."""
import logging
import subprocess
import sys
import time
import urllib.request

import pytest

from cliplite_dist.config import ConfigError, load_config
from cliplite_dist.data.pipeline import BadSampleCounter, iterate_samples
from cliplite_dist.data.shards import ShardError, count_samples, expand_urls
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


def _samples(urls):
    counter = BadSampleCounter()
    return [(s["__key__"], s["jpg"], s["json"]) for s in iterate_samples(urls, counter)], counter


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
    assert steps[-1]["step"] == 3 and steps[-1]["train/bad_read"] == 0


def test_unreachable_server_is_counted_not_waited_for(caplog):
    url = f"http://127.0.0.1:{free_port()}/train-00000.tar"  # nothing listens there
    with caplog.at_level(logging.WARNING):
        got, counter = _samples([url])
    assert got == [] and counter.counts["read"] == 1
    assert url in caplog.text


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
    assert got == [] and counter.counts["read"] >= 1
    assert "exited with status 1" in caplog.text and str(missing) in caplog.text


def test_reader_stopping_early_is_not_a_failed_pipe(tiny_corpus):
    shard = tiny_corpus / "train" / "train-00000.tar"
    assert shard.stat().st_size > 2**17  # larger than a pipe's buffer: cat is still writing when we stop
    counter = BadSampleCounter()
    samples = iterate_samples([f"pipe:cat {shard}"], counter)
    next(samples)
    samples.close()  # closes the stream: cat gets SIGPIPE
    assert not counter.counts
