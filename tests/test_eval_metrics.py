"""Evaluation metrics: retrieval with several captions per image, zero-shot accuracy, VOC07 AP and
the linear probe, checked against hand-computed values and brute-force references."""
from __future__ import annotations

import pytest
import torch

from cliplite_dist.evaluate.metrics import (ProbeResult, _split, average_precision_voc07, average_precisions_voc07,
                                            linear_probe, mean_ap, mean_average_precision_voc07, retrieval_metrics,
                                            zeroshot_metrics)


@pytest.fixture(autouse=True)
def one_thread():
    """The probes' matrices are tiny: extra threads only fight over a possibly busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- retrieval

# 3 images x 5 captions; captions 0,1 describe image 0, captions 2,3 image 1, caption 4 image 2
TEXT_IMAGE = torch.tensor([0, 0, 1, 1, 2])
SIM = torch.tensor([
    [0.9, 0.1, 0.3, 0.2, 0.0],  # image 0: own caption 0 first                -> i2t rank 0
    [0.1, 0.2, 0.3, 0.9, 0.4],  # image 1: its SECOND caption (3) first       -> i2t rank 0
    [0.6, 0.6, 0.2, 0.1, 0.6],  # image 2: captions 0, 1 tie its 0.6 (against) -> i2t rank 2
])
# text->image reads the columns: caption 0 [.9 .1 .6] -> 0; caption 1 [.1 .2 .6] target .1 -> 2;
# caption 2 [.3 .3 .2] ties image 0 -> 1; caption 3 [.2 .9 .1] -> 0; caption 4 [0 .4 .6] -> 0


def _from_similarity(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose image @ text.T is exactly `sim`."""
    return torch.eye(sim.shape[0]), sim.T.clone()


def _brute_force_ranks(sim: torch.Tensor, text_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions from a full argsort (no ties in random data): i2t = first own caption's position."""
    i2t_order = sim.argsort(dim=1, descending=True)
    i2t = torch.tensor([int((text_image[i2t_order[i]] == i).nonzero()[0]) for i in range(sim.shape[0])])
    t2i_order = sim.T.argsort(dim=1, descending=True)
    t2i = (t2i_order == text_image.unsqueeze(1)).int().argmax(dim=1)
    return i2t, t2i


def _random_retrieval(n: int, captions_per_image: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(n * captions_per_image, dim, generator=g), dim=1)
    text_image = torch.arange(n).repeat_interleave(captions_per_image)[torch.randperm(n * captions_per_image,
                                                                                     generator=g)]
    return images, texts, text_image


def test_retrieval_hand_computed():
    images, texts = _from_similarity(SIM)
    m = retrieval_metrics(images, texts, TEXT_IMAGE, ks=(1, 2, 3))
    # i2t ranks [0, 0, 2]; t2i ranks [0, 2, 1, 0, 0]
    assert m["i2t_R@1"] == pytest.approx(2 / 3) and m["i2t_R@2"] == pytest.approx(2 / 3) and m["i2t_R@3"] == 1
    assert m["t2i_R@1"] == pytest.approx(3 / 5) and m["t2i_R@2"] == pytest.approx(4 / 5) and m["t2i_R@3"] == 1
    assert m["mean_R@1"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert m["chance_i2t_R@1"] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5) / 3)
    assert m["chance_t2i_R@1"] == pytest.approx(1 / 3)
    assert (m["num_images"], m["num_texts"]) == (3, 5)


def test_retrieval_default_keys_and_r1_always_reported():
    images, texts = _from_similarity(SIM)
    assert set(retrieval_metrics(images, texts, TEXT_IMAGE)) == {
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R@1",
        "chance_i2t_R@1", "chance_t2i_R@1", "num_images", "num_texts"}
    assert "i2t_R@1" in retrieval_metrics(images, texts, TEXT_IMAGE, ks=(5,))


def test_retrieval_collapsed_model_scores_zero():
    images, texts = _from_similarity(torch.full((3, 5), 0.5))
    m = retrieval_metrics(images, texts, TEXT_IMAGE, ks=(1, 2))
    assert m["i2t_R@1"] == m["t2i_R@1"] == m["i2t_R@2"] == m["t2i_R@2"] == 0.0


def test_retrieval_nan_scores_never_hit():
    images, texts = _from_similarity(SIM)
    m = retrieval_metrics(images * float("nan"), texts, TEXT_IMAGE, ks=(1, 2))
    assert m["i2t_R@1"] == m["t2i_R@1"] == 0.0


def test_retrieval_own_captions_do_not_compete():
    """Two captions of image 0 tied at the top: one of them is first, a hit."""
    sim = SIM.clone()
    sim[0, :2] = 0.9
    images, texts = _from_similarity(sim)
    assert retrieval_metrics(images, texts, TEXT_IMAGE, ks=(1,))["i2t_R@1"] == pytest.approx(2 / 3)


def test_retrieval_chunk_size_does_not_matter():
    images, texts, text_image = _random_retrieval(n=7, captions_per_image=3)
    reference = retrieval_metrics(images, texts, text_image, chunk=1000)
    for chunk in (1, 2, 5):
        assert retrieval_metrics(images, texts, text_image, chunk=chunk) == reference


@pytest.mark.parametrize("captions_per_image", [1, 5])
def test_retrieval_matches_brute_force(captions_per_image):
    images, texts, text_image = _random_retrieval(n=20, captions_per_image=captions_per_image, seed=1)
    i2t, t2i = _brute_force_ranks(images @ texts.T, text_image)
    m = retrieval_metrics(images.double(), texts.double(), text_image, ks=(1, 5, 10), chunk=6)
    for k in (1, 5, 10):
        assert m[f"i2t_R@{k}"] == pytest.approx((i2t < k).float().mean().item())
        assert m[f"t2i_R@{k}"] == pytest.approx((t2i < k).float().mean().item())
    assert m["chance_i2t_R@1"] == pytest.approx(captions_per_image / (20 * captions_per_image))
    assert m["chance_t2i_R@1"] == pytest.approx(1 / 20)


def test_retrieval_errors():
    images, texts = _from_similarity(SIM)
    with pytest.raises(ValueError, match=r"without any caption: \[1\]"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 2, 2, 2]))
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1, 3]))
    with pytest.raises(ValueError, match="text_image must be integer"):
        retrieval_metrics(images, texts, TEXT_IMAGE.float())
    with pytest.raises(ValueError, match="image_emb"):
        retrieval_metrics(images, texts[:, :2], TEXT_IMAGE)


# ----------------------------------------------------------------------------- zero-shot

def test_zeroshot_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 2.0],   # label 0: rank 0
                           [1.0, 3.0, 2.0],   # label 2: rank 1
                           [2.0, 2.0, 1.0],   # label 1: tied with class 0 -> rank 1
                           [0.0, 1.0, 5.0]])  # label 2: rank 0
    m = zeroshot_metrics(logits, torch.tensor([0, 2, 1, 2]), ks=(1, 2, 5))
    assert m["top1"] == 0.5 and m["top2"] == 1.0 and m["top5"] == 1.0  # top5 clipped to C = 3
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert (m["num_samples"], m["num_classes"], m["chance_top1"]) == (4, 3, pytest.approx(1 / 3))


def test_zeroshot_imbalanced_mean_per_class_recall():
    """Four right answers of class 0, one wrong of class 1; class 2 never appears and is skipped."""
    logits = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    m = zeroshot_metrics(logits, torch.tensor([0, 0, 0, 0, 1]))
    assert m["top1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_zeroshot_errors():
    with pytest.raises(ValueError, match="lie in"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be integer"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- VOC07 AP

def test_ap_voc07_hand_computed():
    # 3 positives. Ranked:      1    2    3    4    5    6
    #   target                  1    0    1    0    0    1
    #   precision               1   1/2  2/3  2/4  2/5  3/6
    #   recall                 1/3  1/3  2/3  2/3  2/3   1
    # max precision at recall >= t: t in {0, .1, .2, .3} -> 1; t in {.4, .5, .6} -> 2/3 (at recall 2/3);
    # t in {.7, .8, .9, 1} -> 1/2 (only recall 1 reaches).  AP = (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8/11
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = torch.tensor([1, 0, 1, 0, 0, 1])
    assert average_precision_voc07(scores, targets) == pytest.approx(8 / 11)
    shuffled = torch.tensor([5, 2, 0, 4, 1, 3])
    assert average_precision_voc07(scores[shuffled], targets[shuffled]) == pytest.approx(8 / 11)


def test_ap_voc07_extremes_and_ties():
    assert average_precision_voc07(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    # all positives last: precision 1/3 at recall 1 (the only recall reached beyond 0)
    assert average_precision_voc07(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0, 0, 1])) == pytest.approx(1 / 3)
    # a positive tied with a negative ranks after it: precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> 2/3
    for order in ([0, 1, 2], [1, 0, 2]):
        order = torch.tensor(order)
        ap = average_precision_voc07(torch.tensor([1.0, 1.0, 0.0])[order], torch.tensor([1, 0, 1])[order])
        assert ap == pytest.approx(2 / 3)


def test_map_voc07_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.4, 0.9], [0.1, 0.3, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    expected = (average_precision_voc07(scores[:, 0], targets[:, 0])
                + average_precision_voc07(scores[:, 2], targets[:, 2])) / 2
    assert mean_average_precision_voc07(scores, targets) == pytest.approx(expected)
    # class 0: ranks 1, 3 positive -> (6 * 1 + 5 * 2/3) / 11; class 2: first -> 1
    assert expected == pytest.approx(((6 + 5 * 2 / 3) / 11 + 1) / 2)


def test_ap_errors():
    with pytest.raises(ValueError, match="without a positive"):
        average_precision_voc07(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        average_precision_voc07(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision_voc07(torch.zeros(2, 2), torch.zeros(2, 2))


# ----------------------------------------------------------------------------- linear probe

def _blobs(n: int, num_classes: int, dim: int, g: torch.Generator, spread: float = 4.0):
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    labels = torch.arange(n) % num_classes
    return centers[labels] + torch.randn(n, dim, generator=g), labels


def test_probe_separable_blobs():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = _blobs(200, 5, 16, g)
    test_x, test_y = _blobs(100, 5, 16, g)
    result = linear_probe(train_x * 100 + 7, train_y, test_x * 100 + 7, test_y)  # scale-free by standardising
    assert isinstance(result, ProbeResult) and result.metric == "top1"
    assert result.value >= 0.97
    assert [wd for wd, _ in result.sweep] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    best = max(v for _, v in result.sweep)
    assert result.weight_decay == max(wd for wd, v in result.sweep if v == best)  # ties: stronger decay
    assert linear_probe(train_x, train_y, test_x, test_y) == linear_probe(train_x, train_y, test_x, test_y)


def test_probe_noise_labels_near_chance():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)
    train_y, test_y = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (400,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=(1e-4, 1e-1))
    assert result.value < 0.36  # chance 0.25; 400 test samples give a std of about 0.02


def test_probe_heavy_regularisation_wins_on_tiny_noisy_train():
    """Pure-noise features, 80/20 labels, 60 training samples: fitting the noise loses on validation
    to a near-zero weight that predicts the majority class through the (unregularised) bias."""
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 30, generator=g), torch.randn(200, 30, generator=g)
    train_y = (torch.rand(60, generator=g) < 0.2).long()
    test_y = (torch.rand(200, generator=g) < 0.2).long()
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=(1e-4, 1e-2, 10.0), val_fraction=0.5)
    assert result.weight_decay == 10.0
    assert result.sweep[-1][1] > max(v for _, v in result.sweep[:-1])
    assert result.value == pytest.approx(1 - test_y.float().mean().item(), abs=0.03)
    # the choice is made without looking at test: flipping the test labels changes only the value
    flipped = linear_probe(train_x, train_y, test_x, 1 - test_y, weight_decays=(1e-4, 1e-2, 10.0),
                           val_fraction=0.5)
    assert (flipped.weight_decay, flipped.sweep) == (result.weight_decay, result.sweep)
    assert flipped.value == pytest.approx(1 - result.value)


def test_probe_multilabel_blobs():
    g = torch.Generator().manual_seed(2)
    prototypes = torch.randn(4, 12, generator=g) * 3

    def sample(n):
        y = (torch.rand(n, 4, generator=g) < 0.4).long()
        return y.float() @ prototypes + torch.randn(n, 12, generator=g), y

    train_x, train_y = sample(200)
    test_x, test_y = sample(100)
    with torch.no_grad():  # as evaluation loops call it
        result = linear_probe(train_x, train_y, test_x, test_y, multilabel=True, weight_decays=(1e-4, 1e-2))
    assert result.metric == "mAP_voc07" and result.value > 0.95
    assert len(result.per_class) == 4 and result.value == pytest.approx(sum(result.per_class) / 4)
    # a class without a positive has no AP, and a subset's mAP leaves it out
    aps = average_precisions_voc07(torch.tensor([[0.9, 0.1], [0.2, 0.3]]), torch.tensor([[1, 0], [0, 0]]))
    assert aps == [1.0, None] and mean_ap(aps) == 1.0 and mean_ap(aps[1:] + [0.5]) == 0.5
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_ap([None])


def test_split_is_stratified_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 1)
    fit, val = _split(labels, 0.2, seed=0)
    assert sorted(fit.tolist() + val.tolist()) == list(range(13))
    assert set(labels[val].tolist()) == {0, 1} and set(labels[fit].tolist()) == {0, 1, 2}
    assert (labels[val] == 0).sum() == 2
    again = _split(labels, 0.2, seed=0)
    assert torch.equal(fit, again[0]) and torch.equal(val, again[1])


def test_probe_errors():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="train_x"):
        linear_probe(x, y, torch.randn(4, 5), y[:4])
    with pytest.raises(ValueError, match="empty"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="train_y must be integer"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, val_fraction=0.0)
    with pytest.raises(ValueError, match="single class"):
        linear_probe(x, torch.zeros(10, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match="multi-label targets"):
        linear_probe(x, torch.zeros(10, 2), x, torch.zeros(10, 3), multilabel=True)
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(x * float("nan"), y, x, y)
