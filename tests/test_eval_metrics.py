"""Evaluation math on tensors: kNN vs scikit-learn, similarity vs numpy, t-SNE PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from clim_fast.evaluation.measures import class_similarity, holdout_split, knn_classify, knn_scores, tsne_plot


def _blobs(n_per_class, classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)
    return feats[perm].astype(np.float32), labels[perm]


def _sklearn_knn(train_x, train_y, test_x, k, t):
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / t))
    clf.fit(train_x, train_y)
    return clf


@pytest.mark.parametrize("k,t", [(200, 0.07), (15, 0.5), (1, 0.07)])
def test_knn_equals_sklearn_weighted_knn(k, t):
    train_x, train_y = _blobs(60, 7, 24, spread=1.6, seed=1)  # overlapping classes: errors happen
    test_x, test_y = _blobs(25, 7, 24, spread=1.6, seed=2)
    clf = _sklearn_knn(train_x, train_y, test_x, k=min(k, len(train_y)), t=t)
    proba = clf.predict_proba(test_x)
    ref_pred = clf.classes_[proba.argmax(1)]
    true_p = proba[np.arange(len(test_y)), test_y]
    ref_top5_hit = ((proba > true_p[:, None]).sum(1) < 5) & (true_p > 0)

    scores = knn_scores(train_x, train_y, test_x, k=k, t=t, num_classes=7)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), ref_pred)
    np.testing.assert_allclose((scores / scores.sum(1, keepdim=True)).numpy(), proba, rtol=1e-4, atol=1e-6)

    got = knn_classify(torch.from_numpy(train_x), torch.from_numpy(train_y), test_x, test_y, k=k, t=t)
    assert got["top1"] == pytest.approx(100.0 * np.mean(ref_pred == test_y))
    assert got["top5"] == pytest.approx(100.0 * np.mean(ref_top5_hit))
    assert got["top5"] >= got["top1"]
    assert 0 < got["top1"] < 100  # the data is hard enough that the comparison means something


def test_knn_is_chunk_invariant_and_clamps_k():
    train_x, train_y = _blobs(10, 3, 8, spread=1.0, seed=3)
    test_x, _ = _blobs(7, 3, 8, spread=1.0, seed=4)
    a = knn_scores(train_x, train_y, test_x, k=500, t=0.1, chunk=3)
    b = knn_scores(train_x, train_y, test_x, k=30, t=0.1, chunk=1000)
    torch.testing.assert_close(a, b)


def _numpy_similarity(feats, labels):
    f = feats.astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    classes = np.unique(labels)
    intra = []
    for c in classes:
        x = f[labels == c]
        if len(x) < 2:
            continue
        sims = [x[i] @ x[j] for i in range(len(x)) for j in range(len(x)) if i != j]
        intra.append(np.mean(sims))
    inter = []
    for a in classes:
        for b in classes:
            if a < b:
                inter.append(np.mean(f[labels == a] @ f[labels == b].T))
    return float(np.mean(intra)), float(np.mean(inter))


def test_class_similarity_equals_numpy():
    feats, labels = _blobs(9, 5, 16, spread=0.8, seed=5)
    labels[0] = 9  # a singleton class: no intra pairs, still part of inter
    labels = labels.copy()
    got = class_similarity(feats, labels)
    intra, inter = _numpy_similarity(feats, labels)
    assert got["intra"] == pytest.approx(intra, abs=1e-9)
    assert got["inter"] == pytest.approx(inter, abs=1e-9)
    assert got["classes"] == 6
    assert got["intra"] > got["inter"]


def test_class_similarity_extremes():
    labels = np.array([0, 0, 1, 1])
    same = np.array([[1, 0], [2, 0], [0, 3], [0, 1]], dtype=np.float32)
    got = class_similarity(torch.from_numpy(same), labels)
    assert got["intra"] == pytest.approx(1.0)
    assert got["inter"] == pytest.approx(0.0)


def test_tsne_png_is_written(tmp_path):
    from PIL import Image

    feats, labels = _blobs(20, 12, 16, spread=0.5, seed=6)
    info = tsne_plot(feats, labels, tmp_path / "tsne.png", classes=10, seed=0,
                     class_names=[f"class {i}" for i in range(12)], iterations=250)
    img = Image.open(tmp_path / "tsne.png")
    assert img.format == "PNG" and img.size[0] > 300
    assert len(info["classes"]) == 10 and info["points"] == 200
    # the picture is not blank: several colours
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def test_holdout_split_partitions_ids():
    train, test = holdout_split(105, every=10)
    assert test.tolist() == list(range(0, 105, 10))
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(105))
