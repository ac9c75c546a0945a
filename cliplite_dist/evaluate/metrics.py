"""Evaluation metrics: retrieval with several captions per image, zero-shot classification,
VOC2007 mAP, and a linear probe on frozen features.

Pure functions on tensors (no model, no I/O, no collectives), so each can be checked by hand and
called on any rank. One ranking convention holds everywhere: a tie counts against the target and a
NaN score is the lowest score, so a collapsed or diverged model scores 0 rather than 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- ranking helpers

def _nan_lowest(scores: Tensor) -> Tensor:
    """NaN compares false with everything, which would make a NaN target beat every candidate."""
    return scores.masked_fill(scores.isnan(), float("-inf"))


def _target_rank(scores: Tensor, target: Tensor) -> Tensor:
    """Per row, how many OTHER columns score >= the target column (0 = ranked first)."""
    scores = _nan_lowest(scores)
    target_score = scores.gather(1, target.unsqueeze(1))
    return (scores >= target_score).sum(dim=1) - 1


def _ks_with_one(ks) -> list[int]:
    """The requested cut-offs plus 1, which the summary keys (mean_R@1, top1) always need."""
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"cut-offs must be >= 1, got {ks}")
    return sorted(set(ks) | {1})


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _fraction(mask: Tensor) -> float:
    return mask.double().mean().item()


# ----------------------------------------------------------------------------- retrieval

def _check_retrieval_inputs(image_emb: Tensor, text_emb: Tensor, text_image: Tensor, chunk: int) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need image_emb [N, D] and text_emb [M, D], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_image.shape != (text_emb.shape[0],) or not _is_integer(text_image):
        raise ValueError(f"text_image must be integer [M={text_emb.shape[0]}], got "
                         f"{text_image.dtype} {tuple(text_image.shape)}")
    n = image_emb.shape[0]
    if int(text_image.min()) < 0 or int(text_image.max()) >= n:
        raise ValueError(f"text_image values must lie in [0, {n}), got [{int(text_image.min())}, "
                         f"{int(text_image.max())}]")
    missing = (torch.bincount(text_image.long().cpu(), minlength=n) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"images without any caption: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def _i2t_ranks(images: Tensor, texts: Tensor, text_image: Tensor, chunk: int) -> Tensor:
    """Per image, the other images' captions scoring >= its best caption: the worst-case position
    of its first hit. The image's own captions never count against it (any one of them is a hit)."""
    ranks = []
    for start in range(0, images.shape[0], chunk):
        sim = _nan_lowest(images[start:start + chunk] @ texts.T)
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = text_image.unsqueeze(0) == rows.unsqueeze(1)
        best_own = sim.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((sim >= best_own) & ~own).sum(dim=1))
    return torch.cat(ranks)


def _t2i_ranks(texts: Tensor, images: Tensor, text_image: Tensor, chunk: int) -> Tensor:
    ranks = []
    for start in range(0, texts.shape[0], chunk):
        sim = texts[start:start + chunk] @ images.T
        ranks.append(_target_rank(sim, text_image[start:start + chunk]))
    return torch.cat(ranks)


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_image: Tensor, ks=(1, 5, 10),
                      chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways for N images and M captions, caption m describing image text_image[m].

    Image->text counts a hit when any of the image's captions is in the top k (COCO). Similarities
    are float32 and computed `chunk` rows at a time, so memory stays bounded by chunk x max(N, M).
    """
    _check_retrieval_inputs(image_emb, text_emb, text_image, chunk)
    n, m = image_emb.shape[0], text_emb.shape[0]
    images, texts = image_emb.float(), text_emb.float()
    text_image = text_image.to(images.device, torch.long)
    ranks = {"i2t": _i2t_ranks(images, texts, text_image, chunk),
             "t2i": _t2i_ranks(texts, images, text_image, chunk)}
    metrics = {f"{direction}_R@{k}": _fraction(rank < k)
               for direction, rank in ranks.items() for k in _ks_with_one(ks)}
    metrics["mean_R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    captions_per_image = torch.bincount(text_image, minlength=n).double()
    # random scores put one of an image's c captions first with probability c / M
    metrics["chance_i2t_R@1"] = (captions_per_image / m).mean().item()
    metrics["chance_t2i_R@1"] = 1.0 / n
    metrics["num_images"] = n
    metrics["num_texts"] = m
    return metrics


# ----------------------------------------------------------------------------- zero-shot

def _check_labels(labels: Tensor, n: int, name: str = "labels") -> int:
    """Validates integer class labels [n]; returns the number of classes they imply."""
    if labels.shape != (n,) or not _is_integer(labels):
        raise ValueError(f"{name} must be integer [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(labels.min())}")
    return int(labels.max()) + 1


def zeroshot_metrics(logits: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy (k clipped to C) and mean per-class recall, which is not dominated by the
    frequent classes of an imbalanced test set."""
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty [N, C], got {tuple(logits.shape)}")
    n, c = logits.shape
    if _check_labels(labels, n) > c:
        raise ValueError(f"labels must lie in [0, {c}), got max {int(labels.max())}")
    labels = labels.to(logits.device, torch.long)
    rank = _target_rank(logits, labels)
    metrics = {f"top{k}": _fraction(rank < min(k, c)) for k in _ks_with_one(ks)}
    hits = torch.zeros(c, dtype=torch.float64, device=logits.device).index_add_(0, labels, (rank == 0).double())
    counts = torch.bincount(labels, minlength=c)
    present = counts > 0
    metrics["mean_per_class_recall"] = (hits[present] / counts[present]).mean().item()
    metrics["num_samples"] = n
    metrics["num_classes"] = c
    metrics["chance_top1"] = 1.0 / c
    return metrics


# ----------------------------------------------------------------------------- VOC07 average precision

def _check_binary(targets: Tensor) -> None:
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must contain only 0 and 1")


def _precision_recall(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall after each item, best score first; tied negatives go before tied
    positives, so ties count against the ranking (and the input order cannot matter)."""
    negatives_first = torch.argsort(targets, stable=True)
    by_score = torch.argsort(_nan_lowest(scores.double())[negatives_first], descending=True, stable=True)
    true_positives = targets[negatives_first[by_score]].double().cumsum(0)
    seen = torch.arange(1, len(targets) + 1, dtype=torch.float64, device=targets.device)
    return true_positives / seen, true_positives / true_positives[-1]


def average_precision_voc07(scores: Tensor, targets: Tensor) -> float:
    """VOC2007's 11-point interpolated AP: mean over recall levels t = 0, 0.1, ..., 1 of the best
    precision reached at recall >= t (0 if none); the levels are k/10 exactly."""
    if scores.dim() != 1 or scores.shape != targets.shape or scores.numel() == 0:
        raise ValueError(f"need non-empty scores [N] and targets [N], got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    _check_binary(targets)
    targets = targets.to(scores.device, torch.long)
    if int(targets.sum()) == 0:
        raise ValueError("average precision is undefined without a positive target")
    precision, recall = _precision_recall(scores, targets)
    levels = torch.arange(11, dtype=torch.float64, device=scores.device) / 10
    reached = recall.unsqueeze(0) >= levels.unsqueeze(1)  # [11, N]
    return torch.where(reached, precision.unsqueeze(0), 0.0).amax(dim=1).mean().item()


def average_precisions_voc07(scores: Tensor, targets: Tensor) -> list[float | None]:
    """Each class's VOC07 AP; None for a class without a positive target (AP is undefined)."""
    if scores.dim() != 2 or scores.shape != targets.shape or scores.numel() == 0:
        raise ValueError(f"need non-empty scores [N, C] and multi-hot targets [N, C], got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    _check_binary(targets)
    present = (targets != 0).any(dim=0).tolist()
    return [average_precision_voc07(scores[:, c], targets[:, c]) if present[c] else None
            for c in range(targets.shape[1])]


def mean_ap(per_class: list[float | None]) -> float:
    """Mean over the classes whose AP is defined (a subset of classes: pass its slice)."""
    defined = [ap for ap in per_class if ap is not None]
    if not defined:
        raise ValueError("mean average precision is undefined: no class has a positive target")
    return sum(defined) / len(defined)


def mean_average_precision_voc07(scores: Tensor, targets: Tensor) -> float:
    """Mean VOC07 AP over the classes with at least one positive."""
    return mean_ap(average_precisions_voc07(scores, targets))


# ----------------------------------------------------------------------------- linear probe

@dataclass
class ProbeResult:
    metric: str  # "top1" (single-label) or "mAP_voc07" (multi-label)
    value: float  # on the test features
    weight_decay: float  # the regularisation chosen on the validation split
    sweep: list[tuple[float, float]]  # (weight_decay, validation metric) for every candidate
    # multi-label: each class's test AP (None: no positive), for the mAP of a subset of classes
    per_class: list[float | None] = field(default_factory=list)


def _check_features(train_x: Tensor, test_x: Tensor) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"need train_x [N, D] and test_x [N_test, D], got {tuple(train_x.shape)} "
                         f"and {tuple(test_x.shape)}")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0 or train_x.shape[1] == 0:
        raise ValueError(f"empty features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise ValueError("features contain NaN or inf")


def _num_outputs(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, multilabel: bool) -> int:
    """Validates the targets; returns the classifier's output width."""
    if multilabel:
        num_classes = train_y.shape[-1] if train_y.dim() else 0
        if train_y.shape != (train_x.shape[0], num_classes) or test_y.shape != (test_x.shape[0], num_classes):
            raise ValueError(f"multi-label targets must be train_y [N, C] and test_y [N_test, C] matching the "
                             f"features, got {tuple(train_y.shape)} and {tuple(test_y.shape)}")
        _check_binary(train_y)
        _check_binary(test_y)
        if not (train_y != 0).any():
            raise ValueError("multi-label train_y has no positive target")
        return num_classes
    num_classes = max(_check_labels(train_y, train_x.shape[0], "train_y"),
                      _check_labels(test_y, test_x.shape[0], "test_y"))
    if torch.unique(train_y).numel() < 2:
        raise ValueError(f"train_y has a single class ({int(train_y[0])}): nothing to discriminate")
    return num_classes


def _strata(train_y: Tensor, multilabel: bool) -> Tensor:
    """One stratum per sample: its label, or for multi-label its rarest positive class (C if none),
    so that rare classes land in both halves of the split."""
    if not multilabel:
        return train_y
    positive = train_y != 0
    frequency = positive.sum(dim=0).double()
    rarest = torch.where(positive, frequency, float("inf")).argmin(dim=1)
    return torch.where(positive.any(dim=1), rarest, train_y.shape[1])


def _split(strata: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split: every stratum with >= 2 samples puts >= 1 in each part."""
    generator = torch.Generator().manual_seed(seed)
    strata = strata.cpu()
    order = torch.randperm(len(strata), generator=generator)
    fit, val = [], []
    for stratum in torch.unique(strata):
        members = order[strata[order] == stratum]
        size = len(members)
        n_val = 0 if size < 2 else min(max(round(size * val_fraction), 1), size - 1)
        val.append(members[:n_val])
        fit.append(members[n_val:])
    fit, val = torch.cat(fit).sort().values, torch.cat(val).sort().values
    if len(val) == 0:
        raise ValueError("no class has 2 training samples: cannot carve a validation split")
    return fit, val


def _standardise(fit_x: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale by the fitting rows' statistics only, so no validation or test data leaks into the fit."""
    mean = fit_x.mean(dim=0)
    std = fit_x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay at 0
    return [(x - mean) / std for x in (fit_x, *others)]


def _loss(logits: Tensor, y: Tensor, multilabel: bool) -> Tensor:
    """Mean over samples; multi-label sums the C independent one-vs-rest losses."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
    return F.cross_entropy(logits, y)


def _fit(x: Tensor, y: Tensor, num_outputs: int, multilabel: bool, weight_decay: float, max_iter: int,
         start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS on the strictly convex L2-regularised logistic loss, from zero or from
    `start` (the solution for a nearby weight decay): its unique minimum either way, deterministic;
    a warm start only gets there in fewer iterations."""
    weight = torch.zeros(x.shape[1], num_outputs, dtype=x.dtype, device=x.device)
    bias = torch.zeros(num_outputs, dtype=x.dtype, device=x.device)
    if start is not None:
        weight, bias = start[0].clone(), start[1].clone()
    weight.requires_grad_()
    bias.requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _loss(x @ weight + bias, y, multilabel) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under no_grad
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _score(logits: Tensor, y: Tensor, multilabel: bool) -> float:
    if multilabel:
        return mean_average_precision_voc07(logits, y)
    return _fraction(_target_rank(logits, y) == 0)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, multilabel: bool = False,
                 val_fraction: float = 0.2, weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), seed: int = 0,
                 max_iter: int = 200) -> ProbeResult:
    """Logistic regression on frozen features (the CLIP linear-probe protocol).

    The weight decay is chosen on a seeded stratified validation split of train (never on test;
    ties go to the stronger regularisation), then the probe is refit on all of train and scored on
    test: top-1 for single-label (train_y [N] long), VOC07 mAP for multi-label (train_y [N, C]).
    """
    _check_features(train_x, test_x)
    num_outputs = _num_outputs(train_x, train_y, test_x, test_y, multilabel)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    weight_decays = [float(wd) for wd in weight_decays]
    if not weight_decays or any(not wd >= 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    train_x, test_x = train_x.double(), test_x.to(train_x.device, torch.float64)
    target_dtype = torch.float64 if multilabel else torch.long
    train_y, test_y = train_y.to(train_x.device, target_dtype), test_y.to(train_x.device, target_dtype)
    fit, val = (idx.to(train_x.device) for idx in _split(_strata(train_y, multilabel), val_fraction, seed))
    fit_x, val_x = _standardise(train_x[fit], train_x[val])
    # Along the regularisation path, strongest first, each fit starting from the previous solution.
    solutions, scores, start = {}, {}, None
    for wd in sorted(set(weight_decays), reverse=True):
        start = solutions[wd] = _fit(fit_x, train_y[fit], num_outputs, multilabel, wd, max_iter, start)
        scores[wd] = _score(val_x @ start[0] + start[1], train_y[val], multilabel)
    sweep = [(wd, scores[wd]) for wd in weight_decays]
    chosen = max(sweep, key=lambda entry: (entry[1], entry[0]))[0]
    all_x, test_x = _standardise(train_x, test_x)
    weight, bias = _fit(all_x, train_y, num_outputs, multilabel, chosen, max_iter, solutions[chosen])
    logits = test_x @ weight + bias
    if multilabel:
        per_class = average_precisions_voc07(logits, test_y)
        return ProbeResult("mAP_voc07", mean_ap(per_class), chosen, sweep, per_class)
    return ProbeResult("top1", _score(logits, test_y, multilabel), chosen, sweep)
