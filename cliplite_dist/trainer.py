"""The training loop: batches -> objective -> engine, logging, evaluation, checkpoints, signals.

The same code runs as one process, under torchrun and under srun. Signals (SIGTERM, SIGUSR1,
SIGUSR2) only set a flag; all ranks agree on it at the next step boundary, checkpoint together
and exit with EXIT_INTERRUPTED, so a scheduler (or the user) can rerun the same command to resume.
"""
from __future__ import annotations

import json
import logging
import random
import signal
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from cliplite_dist import checkpoint, resume, rundir, runlog, stopping
from cliplite_dist.config import Config, dump_config
from cliplite_dist.data import training as data
from cliplite_dist.distributed import DistEnv, host_group, init_distributed, pick_device
from cliplite_dist.engine import build_engine, lr_factor, set_lr
from cliplite_dist.evaluate.during_training import TrainingEvaluations
from cliplite_dist.metrics import MetricLogger
from cliplite_dist.models import average_batchnorm_statistics, build_model, image_size

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; run again to resume
EXIT_BAD_DATA = 65  # EX_DATAERR: the data cannot be read (or too much of it is bad); not worth a requeue
EXIT_CONFIG = 78  # EX_CONFIG: the config cannot run on this machine (e.g. too little shared memory)

log = logging.getLogger("cliplite_dist")


class Trainer:
    def __init__(self, cfg: Config, on_stop: Callable[[], None] | None = None):
        """`on_stop` runs on rank 0 after a signal-triggered checkpoint, while every rank still
        waits at a barrier (the SLURM job uses it to requeue itself before any task exits)."""
        self.cfg = cfg
        self.on_stop = on_stop
        self.env = DistEnv.from_environ()
        self.device = pick_device(cfg.engine.device, self.env)
        self.run_dir = cfg.run_dir  # local: a run with a remote output_dir is staged here
        self.stop = stopping.StopFlag()
        self.sync: rundir.RunDirSync | None = None  # remote output_dir: local rank 0 of each node
        self.data: data.TrainingData | None = None
        self.metrics: MetricLogger | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.stop.install()
        # A misspelt bucket or host fails here, in seconds, on every rank, before any rendezvous;
        # a run that writes its own synthetic corpus looks its shards up once they are written.
        found = None if cfg.data.synthetic.train_samples else data.find_corpora(cfg.data)
        data.check_shared_memory(cfg.data, image_size(cfg.model), env.local_world_size)
        init_distributed(env, self.device, cfg.engine.collective_timeout_s)
        self.stop.group = host_group(cfg.engine.collective_timeout_s)
        self.sync = rundir.start_sync(cfg, env, self.device)  # before the logs open: they continue the remote's
        runlog.setup_logging(self.run_dir, env.rank)
        if self.sync is not None:
            log.info("syncing %s to %s every %g s", self.run_dir, cfg.run_url, cfg.run.sync_every_s)
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            data.write_synthetic_corpus(cfg.data)
        dist.barrier()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model, self.towers = build_model(cfg.model, cfg.objective)  # towers: also for evaluations after training
        if env.is_main:  # the export needs the towers' architecture, whatever model.name pointed at
            (self.run_dir / "model_cfg.json").write_text(json.dumps(self.towers.model_cfg, indent=1) + "\n")
        self.resume = resume.prepare(cfg, env, self.device, self.sync, model)
        self.engine_info = build_engine(model, cfg, self.device,
                                        load_universal=self.resume is not None and self.resume.universal is not None)
        self.engine = self.engine_info.engine
        torch.manual_seed(cfg.train.seed * 1000 + env.rank)  # per-rank randomness from here on
        random.seed(cfg.train.seed * 1000 + env.rank)  # augmentation draws when data.workers=0 (workers seed their own)
        self.data = data.TrainingData(cfg.data, self.towers, env, self.device, self.engine_info.input_dtype,
                                      cfg.train.seed, self.run_dir, found)
        self.evaluations = TrainingEvaluations(cfg.data, self.towers)
        self.metrics = MetricLogger(self.run_dir / "tensorboard" if env.is_main else None)
        compute = self.engine_info.precision
        if self.device.type == "cuda":  # what the operations left in fp32 compute in
            compute += ", fp32 as TF32" if cfg.engine.tf32 else ", full fp32"
        if cfg.model.compile:
            compute += ", compiled towers"
        log.info("run %s: %s, %d rank(s) (%s), device %s, %s, ZeRO %d; %d samples, %d batches of %d "
                 "per rank per epoch", self.run_dir, cfg.objective.name, env.world_size, env.source,
                 self.device, compute, cfg.engine.zero_stage, self.data.num_samples,
                 self.data.batches_per_epoch, cfg.data.batch_size)

    def _resume(self) -> int:
        """Restore the checkpoint found at set-up, if any; returns the optimizer step to start at."""
        if self.resume is None:
            return 0
        state = self.resume.load(self.engine, self.env, self.cfg.engine.zero_stage)
        self.data.load_state_dict(state)
        return int(state["step"])

    # ---- one step -----------------------------------------------------------------------------
    def _train_step(self, step: int) -> bool:
        """Optimizer step `step` + 1 over optim.grad_accum micro-batches; False, before any, where
        the ranks agreed to stop. A failed fetch on any rank stops every rank (`_stop_on_data_error`)."""
        accum = self.cfg.optim.grad_accum
        for micro in range(accum):
            batch, failure = self.data.fetch()
            signalled, failed_rank = self.stop.agreed(failure is not None)  # one host round trip
            if failed_rank:
                self._stop_on_data_error(step, failure, between_steps=micro == 0, failed_rank=failed_rank)
            if signalled and micro == 0:  # only between optimizer steps
                return False
            images, tokens = self.data.take(batch, step + 1)
            out = self.engine(images, tokens)
            self.engine.backward(out.loss)
            self.engine_info.step()  # the weights change at the last micro-batch only
            self.metrics.accumulate(out)
        return True

    def _set_lr(self, step: int) -> None:
        optim = self.cfg.optim
        set_lr(self.engine.optimizer, lr_factor(step, self.cfg.train.steps, optim.warmup_steps, optim.min_lr_ratio))

    # ---- after a step -------------------------------------------------------------------------
    def _logs(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def _log(self, step: int) -> None:
        """Training metrics of the steps since the last log line (TensorBoard, metrics.jsonl, the
        console); collective (bad-data counts, data waits), and stops every rank once too much data
        is bad."""
        cfg, now = self.cfg, time.perf_counter()
        elapsed, steps = now - self.window[0], step - self.window[1]
        data_metrics, waits, bad_data = self.data.health(elapsed)
        samples = steps * cfg.data.batch_size * self.env.world_size * cfg.optim.grad_accum
        extra = {"lr": self.engine.optimizer.param_groups[0]["lr"], "grad_norm": self.engine_info.grad_norm(),
                 "samples_per_s": samples / elapsed, "data_wait_frac": waits[self.env.rank]}
        if len(waits) > 1:  # the rank that waited longest for its batches: the others wait for it at each reduction
            slowest = max(range(len(waits)), key=waits.__getitem__)
            extra.update(data_wait_frac_max=waits[slowest], data_wait_slowest_rank=slowest)
        extra.update(epoch=self.data.epoch, bad=data.TrainingData.bad_count(data_metrics))
        if self.device.type == "cuda":  # the allocator's own count: no device sync
            extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        line = self.metrics.flush(step, extra, data_metrics)
        eta = (cfg.train.steps - step) * elapsed / steps
        log.info("step %d/%d | %s | eta %s", step, cfg.train.steps, line, runlog.duration(eta))
        self.window = time.perf_counter(), step
        if bad_data is not None:
            self._stop_on_data_error(step, bad_data, between_steps=True)

    def _save(self, step: int) -> None:
        average_batchnorm_statistics(self.engine.module)
        state = {"step": step, "epoch": self.data.epoch, **self.data.state_dict()}
        root = self.run_dir / rundir.CHECKPOINTS
        checkpoint.save(self.engine, root, step, state, self.cfg.train.keep_checkpoints)
        self.saved_step = step
        log.info("checkpoint saved: %s", root / checkpoint.tag_for(step))

    def _evaluate(self, step: int) -> dict:
        """Held-out retrieval, zero-shot and probes on every rank; logged under eval/ by rank 0."""
        results = self.evaluations.run(self.engine, self.device, self.engine_info.input_dtype, step)
        self.metrics.scalars({f"eval/{k}": v for k, v in results.items()}, step)
        return results

    def _stop_on_data_error(self, step: int, error: Exception | None, between_steps: bool,
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
                error = data.EmptyStreamError(f"rank {failed_rank - 1} could not read its data: {message[0]}")
        if between_steps and step != self.saved_step:
            self._save(step)
        log.error("stopping at step %d (newest checkpoint: step %d): %s", step, self.saved_step, error)
        raise error

    def _stopped(self, step: int) -> int:
        """After an agreed signal: checkpoint, upload, let `on_stop` requeue, exit 75."""
        saved_now = step != self.saved_step
        if saved_now:
            self._save(step)
        log.warning("stopped by signal %d (%s) at step %d; %s, run the same command to resume",
                    self.stop.signum, signal.Signals(self.stop.signum).name, step,
                    "checkpoint saved" if saved_now else "nothing new to save")
        self.close_outputs()
        rundir.upload_now(self.sync)  # every node's share is up before a requeue ends the job
        if self.on_stop is not None and self.env.is_main:
            self.on_stop()
        dist.barrier()
        return EXIT_INTERRUPTED

    def close_outputs(self) -> None:
        """Flush TensorBoard, metrics.jsonl and the key record: also on the way out of an error."""
        if self.metrics is not None:
            self.metrics.close()
        if self.data is not None:
            self.data.close()

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        self._setup()
        train = self.cfg.train
        step = self.saved_step = self._resume()
        self.data.start(step * self.cfg.optim.grad_accum)
        self._set_lr(step)
        self.window = time.perf_counter(), step  # (start, step) of the steps the next log line covers
        while step < train.steps:
            if not self._train_step(step):
                return self._stopped(step)
            step += 1
            self._set_lr(step)
            if self._logs(step):
                self._log(step)
            if train.eval_every and step % train.eval_every == 0 and step < train.steps:
                self._evaluate(step)
            if train.checkpoint_every and step % train.checkpoint_every == 0:
                self._save(step)
        if step != self.saved_step:
            self._save(step)
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
    except data.DATA_ERRORS as exc:  # unreadable or too-bad data: a requeue would fail the same way
        print(f"cliplite-train: data error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_DATA
    except data.SharedMemoryShortfall as exc:  # raised before any collective: no rank is left waiting
        print(f"cliplite-train: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        trainer.close_outputs()
        if dist.is_initialized():
            dist.destroy_process_group()
        if trainer.sync is not None:  # no collectives left: the other ranks need not wait for it
            trainer.sync.close()  # raises SyncError if the last upload fails
