"""The held-out evaluations a training run makes (`data.eval`, `data.eval_zeroshot`,
`data.eval_probe`): prepared once at set-up, run every `train.eval_every` steps and at the end."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from cliplite_dist.config import DataConfig
from cliplite_dist.evaluate import tasks
from cliplite_dist.evaluate.embed import DistributedEmbedder
from cliplite_dist.models import average_batchnorm_statistics

log = logging.getLogger("cliplite_dist")


class TrainingEvaluations:
    def __init__(self, cfg: DataConfig, towers):
        """`towers`: a models.Towers (its evaluation transform and tokenizer)."""
        transform, tokenizer, limit = towers.eval_transform, towers.tokenizer, cfg.eval_max_samples
        self.batch_size = cfg.eval_batch_size
        self.retrieval = tasks.prepare_retrieval(cfg.eval, transform, tokenizer, limit) if cfg.eval else None
        self.zeroshot = tasks.prepare_zeroshot(cfg.eval_zeroshot, transform, tokenizer, limit) \
            if cfg.eval_zeroshot else None
        self.probes = {Path(spec.rstrip("/")).name: tasks.prepare_probe(spec, transform, limit)
                       for spec in cfg.eval_probe.split("::") if spec}

    def run(self, engine, device: torch.device, dtype: torch.dtype, step: int) -> dict:
        """Collective (every rank embeds its share): held-out retrieval, zero-shot and linear
        probes of the model at `step`, logged; the engine is back in training mode on return."""
        embedder = DistributedEmbedder(engine, self.batch_size, device, dtype)
        results = {}
        average_batchnorm_statistics(engine.module)
        engine.eval()
        try:
            if self.retrieval is not None:
                results.update(tasks.retrieval(embedder, self.retrieval))
                log.info("eval step %d: held-out retrieval R@1 i2t %.3f t2i %.3f (chance %.4f; %d images, "
                         "%d captions)", step, results["i2t_R@1"], results["t2i_R@1"],
                         results["chance_t2i_R@1"], results["num_images"], results["num_texts"])
            if self.zeroshot is not None:
                zeroshot = tasks.zeroshot(embedder, self.zeroshot)
                results.update({f"zeroshot_{k}": v for k, v in zeroshot.items()})
                log.info("eval step %d: zero-shot top-1 %.3f top-5 %.3f (chance %.4f, %d classes)", step,
                         zeroshot["top1"], zeroshot["top5"], zeroshot["chance_top1"], zeroshot["num_classes"])
            if self.probes:
                towers = DistributedEmbedder(engine, self.batch_size, device, dtype, towers_only=True)
                for name, data in self.probes.items():
                    probe = tasks.probe(towers, data)
                    results[f"probe_{name}_{probe.metric}"] = probe.value
                    log.info("eval step %d: linear probe on %s: %s %.3f", step, name, probe.metric, probe.value)
        finally:
            engine.train()
        return results
