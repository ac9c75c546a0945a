"""The training loop: batches -> objective -> engine, logging, evaluation, checkpoints, signals.

The same code runs as one process, under torchrun and under srun. Signals (SIGTERM, SIGUSR1,
SIGUSR2) only set a flag; all ranks agree on it at the next step boundary, checkpoint together
and exit with EXIT_INTERRUPTED, so a scheduler (or the user) can rerun the same command to resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from cliplite_dist import checkpoint, rundir, stopping
from cliplite_dist.config import Config, dump_config
from cliplite_dist.data.augment import PRESETS
from cliplite_dist.data.badsamples import (BAD_KINDS, SAMPLE_KINDS, TooMuchBadData, exceeds, fractions,
                                           too_much_bad_data)
from cliplite_dist.data.pipeline import DataProgress, SampleDecoder, SharedMemoryShortfall, ShardStream, as_raised, \
    check_shared_memory, make_loader
from cliplite_dist.data.shards import all_urls, count_samples, resolve_corpora
from cliplite_dist.data.slots import EmptyStreamError, SlotPosition, stable_seed
from cliplite_dist.data.synthetic import ensure_corpus
from cliplite_dist.data.tokens import BatchTokenizer
from cliplite_dist.data.transforms import DeviceTransform, decode_uint8, uint8_train_transform
from cliplite_dist.distributed import DistEnv, host_group, init_distributed, pick_device, run_and_agree
from cliplite_dist.engine import build_engine, lr_factor, param_groups, set_lr
from cliplite_dist.evaluate import tasks
from cliplite_dist.evaluate.embed import DistributedEmbedder
from cliplite_dist.metrics import MetricLogger
from cliplite_dist.models import average_batchnorm_statistics, build_model, image_size
from cliplite_dist.shardspec import ShardError

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; run again to resume
EXIT_BAD_DATA = 65  # EX_DATAERR: the data cannot be read (or too much of it is bad); not worth a requeue
EXIT_CONFIG = 78  # EX_CONFIG: the config cannot run on this machine (e.g. too little shared memory)
DATA_ERRORS = (EmptyStreamError, TooMuchBadData, ShardError)

log = logging.getLogger("cliplite_dist")


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


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    def __init__(self, cfg: Config, on_stop: Callable[[], None] | None = None):
        """`on_stop` runs on rank 0 after a signal-triggered checkpoint, while every rank still
        waits at a barrier (the SLURM job uses it to requeue itself before any task exits)."""
        self.cfg = cfg
        self.on_stop = on_stop
        self.env = DistEnv.from_environ()
        self.device = pick_device(cfg.engine.device, self.env.local_rank)
        self.run_dir = cfg.run_dir  # local: a run with a remote output_dir is staged here
        self.ckpt_root = self.run_dir / "checkpoints"
        self.stop = stopping.StopFlag()
        self.sync: rundir.RunDirSync | None = None  # remote output_dir: local rank 0 of each node

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.stop.install()
        # A misspelt bucket or host fails here, in seconds, on every rank, before any rendezvous;
        # a run that writes its own synthetic corpus looks its shards up once they are written.
        resolve = lambda: resolve_corpora(cfg.data.train, cfg.data.train_weights, cfg.data.connect_timeout_s)
        resolved = None if cfg.data.synthetic.train_samples else resolve()
        check_shared_memory(cfg.data, image_size(cfg.model), env.local_world_size)
        init_distributed(env, self.device)
        self.stop.group = host_group()
        self.sync = rundir.start_sync(cfg, env, self.device)  # before the logs open: they continue the remote's
        setup_logging(self.run_dir, env.rank)
        if self.sync is not None:
            log.info("syncing %s to %s every %g s", self.run_dir, cfg.run_url, cfg.run.sync_every_s)
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            ensure_corpus(cfg.data.synthetic)
        dist.barrier()
        corpora, shard_warnings = resolved or resolve()
        for warning in shard_warnings:
            log.warning(warning)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model, towers = build_model(cfg.model, cfg.objective)
        self.towers = towers  # tokenizer, transforms and architecture, for evaluations after training
        if env.is_main:  # the export needs the towers' architecture, whatever model.name pointed at
            (self.run_dir / "model_cfg.json").write_text(json.dumps(towers.model_cfg, indent=1) + "\n")
        self.resume_from = self._checkpoint_to_resume()
        self.resume_mode, self.resume_how = "exact", ""
        if self.resume_from:
            optimizer = cfg.optim.name + (" in Lookahead" if cfg.optim.lookahead_k else "")
            sizes = [sum(p.numel() for p in group["params"]) for group in param_groups(model, cfg.optim)]
            self.resume_mode, self.resume_how = checkpoint.resume_mode(
                *self.resume_from, env.world_size, cfg.engine.zero_stage, optimizer, sizes)
        if self.resume_mode == "warm_start":
            model.load_state_dict(checkpoint.consolidated_state_dict(*self.resume_from))
        self.universal = self._universal_copy() if self.resume_mode == "universal" else None
        self.engine_info = build_engine(model, cfg, self.device, load_universal=self.universal is not None)
        self.engine = self.engine_info.engine
        torch.manual_seed(cfg.train.seed * 1000 + env.rank)  # per-rank randomness from here on
        random.seed(cfg.train.seed * 1000 + env.rank)  # augmentation draws when data.workers=0 (workers seed their own)

        num_samples = cfg.data.samples_per_epoch or cfg.data.num_samples or count_samples(all_urls(corpora))
        self.batches_per_epoch = max(1, num_samples // (cfg.data.batch_size * env.world_size))
        resize_in_worker = cfg.data.resize_on == "worker" or (cfg.data.resize_on == "auto"
                                                              and self.device.type != "cuda")
        train_transform = uint8_train_transform(towers.train_transform, resize=resize_in_worker,
                                                augment=PRESETS[cfg.data.augment])
        decoder = SampleDecoder(train_transform, cfg.data.caption_key, tuple(cfg.data.image_keys.split(";")),
                                decode=decode_uint8)
        self.image_transform = DeviceTransform(towers.train_transform, self.device, self.engine_info.input_dtype,
                                               resizes=not resize_in_worker)
        self.stream = ShardStream(corpora, cfg.data, decoder, BatchTokenizer(towers.tokenizer), env.rank,
                                  env.world_size, cfg.train.seed)
        self.loader = make_loader(self.stream, cfg.data.workers, pin_memory=self.device.type == "cuda")
        self.progress = DataProgress(max(1, cfg.data.workers), env.world_size)
        self.fresh_data_order = False  # set on resume where positions cannot be continued
        self.keys_file = None
        if cfg.data.record_keys:
            (self.run_dir / "data").mkdir(exist_ok=True)
            self.keys_file = open(self.run_dir / "data" / f"keys-rank{env.rank}.jsonl", "a", encoding="utf-8")
        self.eval_retrieval = self.eval_zeroshot = None
        if cfg.data.eval:
            self.eval_retrieval = tasks.prepare_retrieval(cfg.data.eval, towers.eval_transform, towers.tokenizer,
                                                          cfg.data.eval_max_samples)
        if cfg.data.eval_zeroshot:
            self.eval_zeroshot = tasks.prepare_zeroshot(cfg.data.eval_zeroshot, towers.eval_transform,
                                                        towers.tokenizer, cfg.data.eval_max_samples)
        self.eval_probes = {Path(spec.rstrip("/")).name: tasks.prepare_probe(spec, towers.eval_transform,
                                                                             cfg.data.eval_max_samples)
                            for spec in cfg.data.eval_probe.split("::") if spec}
        self.metrics = MetricLogger(self.run_dir / "tensorboard" if env.is_main else None)
        log.info("run %s: %s, %d rank(s) (%s), device %s, %s, ZeRO %d; %d samples, %d batches of %d "
                 "per rank per epoch", self.run_dir, cfg.objective.name, env.world_size, env.source,
                 self.device, self.engine_info.precision, cfg.engine.zero_stage, num_samples,
                 self.batches_per_epoch, cfg.data.batch_size)

    def _checkpoint_to_resume(self) -> tuple[Path, str] | None:
        """(checkpoints folder, tag) of the newest checkpoint (run.resume=auto, after a remote run
        directory's newest complete one has come down: collective) or the one named; None to start."""
        mode = self.cfg.run.resume
        if mode == "never":
            return None
        if mode == "auto" and self.cfg.run_url:
            rundir.pull_for_resume(self.sync, self.device)
        root, tag = (self.ckpt_root, checkpoint.find_latest(self.ckpt_root)) if mode == "auto" else \
            (Path(mode).parent, Path(mode).name)
        return None if tag is None else (root, tag)

    def _universal_copy(self) -> Path:
        """The checkpoint to resume in DeepSpeed's universal form, converted by local rank 0 of
        every node into the node's scratch space (collective; a failure stops every rank)."""
        root, tag = self.resume_from
        name = hashlib.sha1(str((root / tag).resolve()).encode()).hexdigest()[:10]
        out = Path(tempfile.gettempdir()) / f"cliplite-universal-{name}-node{self.env.node}"

        def convert() -> None:
            checkpoint.universal_copy(root, tag, out)

        run_and_agree(convert if self.env.local_rank == 0 else None, self.device,
                      f"converting {root / tag} to a universal checkpoint")
        return out

    def _resume(self) -> int:
        """Restore the checkpoint found at set-up, if any; returns the optimizer step to start at.
        On another number of ranks than it was saved with (ZeRO 1-3), say how it was resharded."""
        if self.resume_from is None:
            return 0
        root, tag = self.resume_from
        state = checkpoint.load(self.engine, root, tag, self.resume_mode, self.universal)
        log.info("resumed from %s at step %d", root / tag, state["step"])
        if self.resume_mode != "exact":
            log.warning("resuming a checkpoint of %d rank(s) on %d at ZeRO %d through %s",
                        checkpoint.saved_world_size(root, tag), self.env.world_size, self.cfg.engine.zero_stage,
                        self.resume_how)
        if self.universal is not None:
            dist.barrier()  # every rank has read it
            if self.env.local_rank == 0:
                shutil.rmtree(self.universal, ignore_errors=True)
        self._restore_data(state)
        return int(state["step"])

    def _restore_data(self, state: dict) -> None:
        """Continue each reader where the checkpoint left it. Resampled streams, and checkpoints
        whose readers do not match this run's (other world size or worker count), continue with a
        fresh data seed instead, recorded in later checkpoints: a new order, never a replay."""
        why = self.progress.load_state_dict(state["data"]) if "data" in state else "no data position saved"
        seed = state.get("data_seed", self.stream.seed)
        if self.cfg.data.resampled or why:
            seed = stable_seed(self.cfg.train.seed, "restart", state["step"])
            self.fresh_data_order = True
            log.warning("data: %s; continuing with fresh data seed %d", why or "resampled stream", seed)
        self.stream.seed = seed

    # ---- loop ---------------------------------------------------------------------------------
    def _batches(self, micro: int):
        """Micro-batches from global micro-batch index `micro` on, epoch after epoch; a restart
        inside an epoch continues every reader from its saved position."""
        readers = self.progress.readers
        while True:
            epoch, within = divmod(micro, self.batches_per_epoch)
            starts = self.progress.starts(epoch)
            if self.fresh_data_order:  # keep the bad-data counts, not the positions
                starts = {r: (SlotPosition(), bad) for r, (_, bad) in starts.items()}
                self.fresh_data_order = False
            self.stream.set_epoch(epoch, first_reader=within % readers, starts=starts)
            with stopping.held():  # forks the epoch's loader workers
                iterator = iter(self.loader)
            for _ in range(within, self.batches_per_epoch):
                yield epoch, next(iterator)
                micro += 1
            del iterator  # shuts the epoch's workers down

    def _plain_grad_norm(self) -> float | None:
        """Gradient norm before clipping where DeepSpeed reports none (fp32 without ZeRO: it clips
        but discards the norm); None where the engine's own optimizer wrapper records it."""
        if self.cfg.engine.zero_stage or self.engine_info.precision != "fp32":
            return None
        norms = [p.grad.detach().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _save(self, step: int, epoch: int) -> None:
        average_batchnorm_statistics(self.engine.module)
        state = {"step": step, "epoch": epoch, "data": self.progress.state_dict(), "data_seed": self.stream.seed}
        checkpoint.save(self.engine, self.ckpt_root, step, state, self.cfg.train.keep_checkpoints)
        self.saved_step = step
        log.info("checkpoint saved: %s", self.ckpt_root / checkpoint.tag_for(step))

    def _evaluate(self, step: int) -> dict:
        """Held-out retrieval and zero-shot on every rank; logged under eval/ by rank 0."""
        embedder = DistributedEmbedder(self.engine, self.cfg.data.eval_batch_size, self.device,
                                       self.engine_info.input_dtype)
        results = {}
        average_batchnorm_statistics(self.engine.module)
        self.engine.eval()
        try:
            if self.eval_retrieval is not None:
                results.update(tasks.retrieval(embedder, self.eval_retrieval))
                log.info("eval step %d: held-out retrieval R@1 i2t %.3f t2i %.3f (chance %.4f; %d images, "
                         "%d captions)", step, results["i2t_R@1"], results["t2i_R@1"],
                         results["chance_t2i_R@1"], results["num_images"], results["num_texts"])
            if self.eval_zeroshot is not None:
                zeroshot = tasks.zeroshot(embedder, self.eval_zeroshot)
                results.update({f"zeroshot_{k}": v for k, v in zeroshot.items()})
                log.info("eval step %d: zero-shot top-1 %.3f top-5 %.3f (chance %.4f, %d classes)", step,
                         zeroshot["top1"], zeroshot["top5"], zeroshot["chance_top1"], zeroshot["num_classes"])
            if self.eval_probes:
                towers = DistributedEmbedder(self.engine, self.cfg.data.eval_batch_size, self.device,
                                             self.engine_info.input_dtype, towers_only=True)
                for name, data in self.eval_probes.items():
                    probe = tasks.probe(towers, data)
                    results[f"probe_{name}_{probe.metric}"] = probe.value
                    log.info("eval step %d: linear probe on %s: %s %.3f", step, name, probe.metric, probe.value)
        finally:
            self.engine.train()
        self.metrics.scalars({f"eval/{k}": v for k, v in results.items()}, step)
        return results

    def _next(self, batches):
        """(epoch, batch) and None, or None and the error that kept this rank from getting one."""
        try:
            return next(batches), None
        except Exception as exc:  # every rank must hear of it, or the others wait in a collective
            return None, as_raised(exc)

    def _data_health(self) -> tuple[dict[str, float], TooMuchBadData | None]:
        """Bad-data counts of all ranks for TensorBoard, and the error to stop with once the bad
        fraction passes data.max_bad_fraction (the same decision on every rank)."""
        totals = self.progress.tally.totals()
        names = list(totals)
        summed = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        totals = dict(zip(names, summed.tolist()))
        sample_fraction, shard_fraction = fractions(totals)
        metrics = {f"data/bad_{kind}": totals[kind] for kind in BAD_KINDS}
        metrics.update({"data/bad_sample_fraction": sample_fraction, "data/lost_shard_fraction": shard_fraction,
                        "data/samples_read": totals["good"] + sum(totals[k] for k in SAMPLE_KINDS)})
        if not exceeds(totals, self.cfg.data.max_bad_fraction):
            return metrics, None
        worst = [None] * self.env.world_size
        dist.all_gather_object(worst, self.progress.tally.worst_shards())
        return metrics, too_much_bad_data(totals, sum(worst, Counter()), self.cfg.data.max_bad_fraction)

    def _stop_on_data_error(self, step: int, epoch: int, error: Exception | None, between_steps: bool,
                            failed_rank: int = 0) -> None:
        """Every rank: save what was trained (so nothing is lost), then raise. `failed_rank` (1 +
        its rank): the rank whose fetch failed sends its message to the others (collective), so
        every rank's log says what and where; it raises its own error, they one quoting it.
        Inside an accumulation step nothing is saved: the checkpoint's data positions would skip
        its micro-batches."""
        if failed_rank:
            message = [str(error) if self.env.rank == failed_rank - 1 else None]
            dist.broadcast_object_list(message, src=failed_rank - 1, group=self.stop.group)
            if error is None:
                error = EmptyStreamError(f"rank {failed_rank - 1} could not read its data: {message[0]}")
        if between_steps and step != self.saved_step:
            self._save(step, epoch)
        log.error("stopping at step %d (newest checkpoint: step %d): %s", step, self.saved_step, error)
        raise error

    def close_outputs(self) -> None:
        """Flush TensorBoard, metrics.jsonl and the key record: also on the way out of an error."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "keys_file", None) is not None:
            self.keys_file.close()
            self.keys_file = None

    def run(self) -> int:
        self._setup()
        cfg, engine = self.cfg, self.engine
        accum, total = cfg.optim.grad_accum, cfg.train.steps
        step = self._resume()
        self.saved_step = step
        samples_per_step = cfg.data.batch_size * self.env.world_size * accum
        window_start, data_wait = time.perf_counter(), 0.0
        window_steps, epoch = 0, step * accum // self.batches_per_epoch
        set_lr(engine.optimizer, lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
        batches = self._batches(step * accum)
        stopped, micro = False, 0
        while step < total:
            fetch_start = time.perf_counter()
            fetched, failure = self._next(batches)
            data_wait += time.perf_counter() - fetch_start
            signalled, failed_rank = self.stop.agreed(failure is not None)
            if failed_rank:
                self._stop_on_data_error(step, epoch, failure, micro % accum == 0, failed_rank)
            if signalled and micro % accum == 0:  # only between optimizer steps
                stopped = True
                break
            epoch, (images, tokens, info) = fetched
            self.progress.update(info)
            if self.keys_file is not None:
                self.keys_file.write(json.dumps({"step": step + 1, "keys": info.keys}) + "\n")
            inputs = self.image_transform(images.to(self.device, non_blocking=True), info.augment)
            token_ids = tokens.to(self.device, non_blocking=True, copy=True)
            info.release()  # both copied: its loader worker may write the next batch over them
            out = engine(inputs, token_ids)
            engine.backward(out.loss)
            micro += 1
            log_now = micro % accum == 0 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == total)
            grad_norm = self._plain_grad_norm() if log_now else None
            engine.step()
            self.metrics.accumulate(out)
            if micro % accum:
                continue
            step += 1
            window_steps += 1
            set_lr(engine.optimizer, lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
            if log_now:
                elapsed = time.perf_counter() - window_start
                rate = window_steps * samples_per_step / elapsed
                if grad_norm is None:
                    grad_norm = float(engine.get_global_grad_norm())
                data_metrics, bad_data = self._data_health()
                extra = {"lr": engine.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                         "samples_per_s": rate, "data_wait_frac": data_wait / elapsed, "epoch": epoch,
                         "bad": int(sum(data_metrics[f"data/bad_{k}"] for k in BAD_KINDS))}
                if self.device.type == "cuda":  # the allocator's own count: no device sync
                    extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                line = self.metrics.flush(step, extra, data_metrics)
                eta = (total - step) * elapsed / window_steps
                log.info("step %d/%d | %s | eta %s", step, total, line, _fmt_duration(eta))
                window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
                if self.keys_file is not None:
                    self.keys_file.flush()
                if bad_data is not None:
                    self._stop_on_data_error(step, epoch, bad_data, True)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                self._evaluate(step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                self._save(step, epoch)
        saved_now = step != self.saved_step
        if saved_now:
            self._save(step, epoch)
        if stopped:
            log.warning("stopped by signal %d (%s) at step %d; %s, run the same command to resume",
                        self.stop.signum, signal.Signals(self.stop.signum).name, step,
                        "checkpoint saved" if saved_now else "nothing new to save")
            self.close_outputs()
            rundir.upload_now(self.sync)  # every node's share is up before a requeue ends the job
            if self.on_stop is not None and self.env.is_main:
                self.on_stop()
            dist.barrier()
            return EXIT_INTERRUPTED
        results = self._evaluate(step)
        self.close_outputs()
        if "i2t_R@1" in results and self.env.is_main:
            print(f"held-out retrieval R@1 = {results['i2t_R@1']:.3f} image->text, "
                  f"{results['t2i_R@1']:.3f} text->image (chance {results['chance_t2i_R@1']:.4f})", flush=True)
        log.info("done at step %d; TensorBoard logs: tensorboard --logdir %s", step, self.run_dir / "tensorboard")
        return 0


def train(cfg: Config, on_stop: Callable[[], None] | None = None) -> int:
    """Run `cfg`; a remote run directory gets its last sync on the way out, whatever ended the run.
    After a signal, every node uploads the stop checkpoint before rank 0 calls `on_stop`."""
    trainer = Trainer(cfg, on_stop)
    try:
        return trainer.run()
    except DATA_ERRORS as exc:  # unreadable or too-bad data: a requeue would fail the same way
        print(f"cliplite-train: data error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_DATA
    except SharedMemoryShortfall as exc:  # raised before any collective: no rank is left waiting
        print(f"cliplite-train: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        trainer.close_outputs()
        if dist.is_initialized():
            dist.destroy_process_group()
        if trainer.sync is not None:  # no collectives left: the other ranks need not wait for it
            trainer.sync.close()  # raises SyncError if the last upload fails
