"""Evaluation tasks on prepared inputs, for any embedder (in training or standalone)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cliplite_dist.evaluate.datasets import (EncodedImages, LabelledImages, classnames, load_labelled,
                                             load_retrieval, templates)
from cliplite_dist.evaluate.metrics import ProbeResult, linear_probe, retrieval_metrics, zeroshot_metrics


@dataclass
class RetrievalInputs:
    images: EncodedImages
    tokens: torch.Tensor
    text_image: torch.Tensor  # caption m describes image text_image[m]


def prepare_retrieval(spec: str, transform, tokenizer, max_images: int = 0) -> RetrievalInputs:
    data = load_retrieval(spec, transform, max_images)
    return RetrievalInputs(data.images, tokenizer(data.captions), data.text_image)


def retrieval(embedder, data: RetrievalInputs) -> dict:
    return retrieval_metrics(embedder.images(data.images), embedder.texts(data.tokens), data.text_image)


@dataclass
class ZeroshotInputs:
    test: LabelledImages
    prompt_tokens: torch.Tensor  # [C * T, context]: class c's prompts are rows c*T .. c*T+T-1
    num_prompts: int


def prepare_zeroshot(dataset_dir: str, transform, tokenizer, max_images: int = 0) -> ZeroshotInputs:
    test = load_labelled(dataset_dir.rstrip("/") + "/test", transform, max_images)
    if test.multilabel:
        raise ValueError(f"{dataset_dir} is a multi-label set: use it for a linear probe")
    prompts = templates(dataset_dir)
    texts = [p.replace("{c}", name) for name in classnames(dataset_dir) for p in prompts]
    return ZeroshotInputs(test, tokenizer(texts), len(prompts))


def zeroshot(embedder, data: ZeroshotInputs) -> dict:
    """Classifier = each class's mean prompt embedding, renormalised; logits = image @ classes."""
    prompts = embedder.texts(data.prompt_tokens)
    classes = F.normalize(prompts.reshape(-1, data.num_prompts, prompts.shape[1]).mean(dim=1), dim=1)
    return zeroshot_metrics(embedder.images(data.test.images) @ classes.T, data.test.labels)


@dataclass
class ProbeInputs:
    train: LabelledImages
    test: LabelledImages


def prepare_probe(dataset_dir: str, transform, max_images: int = 0) -> ProbeInputs:
    """A CLIP_benchmark set's train and test splits (DIR/train, DIR/test)."""
    root = dataset_dir.rstrip("/")
    return ProbeInputs(load_labelled(f"{root}/train", transform, max_images),
                       load_labelled(f"{root}/test", transform, max_images))


def probe(embedder, data: ProbeInputs) -> ProbeResult:
    """Linear probe on the embedder's image features: top-1, or mAP for a multi-label set."""
    return linear_probe(embedder.images(data.train.images), data.train.labels, embedder.images(data.test.images),
                        data.test.labels, multilabel=data.train.multilabel)
