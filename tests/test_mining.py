"""Mining core: engines, selection, table, stats (synthetic features; no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.errors import UserError
from clim_fast.mining.kmeans import kmeans_faiss, kmeans_torch
from clim_fast.mining.knn import drop_self, knn_faiss, knn_naive_torch, knn_torch
from clim_fast.mining.engine import mine_table
from clim_fast.mining.select import clamp_sizes, select_positives, table_stats
from shards.neighbours import NeighbourTable


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_features(n=600, d=32, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered_features(clusters=12, per=30, d=32, noise=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    labels = np.repeat(np.arange(clusters), per)
    x = unit(centres[labels] + noise * rng.standard_normal((clusters * per, d)))
    perm = rng.permutation(len(x))
    return x[perm], labels[perm]


def brute_force_knn(x, k):
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids


def reference_selection(neighbours, assignment, centre_sim):
    """Center-wise selection, one anchor at a time."""
    n, k = neighbours.shape
    table = np.full((n, k), -1, dtype=np.int32)
    counts = np.zeros(n, dtype=np.int32)
    for i in range(n):
        pos = [j for j in neighbours[i] if assignment[j] == assignment[i] and centre_sim[j] > centre_sim[i]]
        if not pos:
            pos = [neighbours[i][0]]
        table[i, :len(pos)] = pos
        counts[i] = len(pos)
    return table, counts


def reference_mine(x, clusters, k, seed=0):
    centroids, assignment = kmeans_faiss(x, clusters, seed=seed)
    neighbours = brute_force_knn(x, k)
    centre_sim = np.einsum("nd,nd->n", x, centroids[assignment])
    return reference_selection(neighbours, assignment, centre_sim)


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_selection_matches_brute_force_reference(data):
    x = random_features(500) if data == "random" else clustered_features()[0]
    table, stats = mine_table(x, clusters=10, k=8, engine="faiss")
    ref_table, ref_counts = reference_mine(x, 10, 8)
    np.testing.assert_array_equal(table.counts, ref_counts)
    np.testing.assert_array_equal(table.positives, ref_table)
    assert stats["mean_positives"] == pytest.approx(ref_counts.mean())


def test_select_positives_random_inputs_match_reference():
    rng = np.random.default_rng(3)
    n, k = 300, 7
    neighbours = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    assignment = rng.integers(0, 4, n)
    centre_sim = rng.random(n).astype(np.float32)
    positives, counts, fallback = select_positives(neighbours, assignment, centre_sim)
    ref_table, ref_counts = reference_selection(neighbours, assignment, centre_sim)
    np.testing.assert_array_equal(positives, ref_table)
    np.testing.assert_array_equal(counts, ref_counts)
    assert fallback.sum() > 0 and (~fallback).sum() > 0  # both branches exercised
    # a subset of anchors (as one rank selects its own rows) gives those rows of the full result
    rows = np.arange(1, n, 3)
    part = select_positives(neighbours[rows], assignment, centre_sim, anchor_ids=rows)
    for mine, ref in zip(part, (positives, counts, fallback)):
        np.testing.assert_array_equal(mine, ref[rows])


def test_fallback_is_the_nearest_neighbour():
    # anchor 0 sits at its cluster's centre: no neighbour is closer, so it falls back to its top-1.
    neighbours = np.array([[2, 1, 3], [0, 2, 3], [0, 1, 3], [2, 0, 1]])
    assignment = np.array([0, 0, 0, 1])
    centre_sim = np.array([0.99, 0.5, 0.7, 0.9], dtype=np.float32)
    positives, counts, fallback = select_positives(neighbours, assignment, centre_sim)
    np.testing.assert_array_equal(positives, [[2, -1, -1], [0, 2, -1], [0, -1, -1], [2, -1, -1]])
    np.testing.assert_array_equal(counts, [1, 2, 1, 1])
    np.testing.assert_array_equal(fallback, [True, False, False, True])
    # anchor 3 is alone in its cluster: the fallback takes a neighbour from another cluster


def test_stats_on_hand_made_case():
    neighbours = np.array([[2, 1, 3], [0, 2, 3], [0, 1, 3], [2, 0, 1]])
    assignment = np.array([0, 0, 0, 1], dtype=np.int32)
    centre_sim = np.array([0.99, 0.5, 0.7, 0.9], dtype=np.float32)
    positives, counts, fallback = select_positives(neighbours, assignment, centre_sim)
    table = NeighbourTable(positives, counts, assignment)
    labels = np.array([0, 1, 0, 1])
    stats = table_stats(table, fallback, clusters=3, labels=labels, nearest=neighbours[:, 0])
    assert stats["mean_positives"] == pytest.approx(5 / 4)
    assert stats["fallback_share"] == pytest.approx(0.5)
    assert (stats["cluster_size_min"], stats["cluster_size_median"], stats["cluster_size_max"]) == (0, 1, 3)
    assert stats["empty_clusters"] == 1
    # row purities: 0->[2] 1, 1->[0,2] 0, 2->[0] 1, 3->[2] 0
    assert stats["label_purity"] == pytest.approx(0.5)
    assert stats["label_chance"] == pytest.approx(0.5)
    assert stats["knn_top1_purity"] == pytest.approx(0.5)  # top-1: 2 ok, 0 no, 0 ok, 2 no


def test_knn_engines_agree_on_random_data():
    x = random_features(900, 24, seed=1)
    k = 10
    ref = brute_force_knn(x, k)
    _, faiss_ids = knn_faiss(x, k)
    _, torch_ids = knn_torch(torch.from_numpy(x), k)
    _, naive_ids = knn_naive_torch(torch.from_numpy(x), k)
    np.testing.assert_array_equal(faiss_ids, ref)
    np.testing.assert_array_equal(torch_ids.numpy(), ref)
    np.testing.assert_array_equal(naive_ids.numpy(), ref)


def test_low_precision_candidate_search_is_exact():
    # bf16 candidates + block-max prefilter + fp32 re-rank + certificate; duplicated vectors
    # make some rows uncertain, which must fall back to the exact search.
    x = random_features(700, 16, seed=2)
    x = np.concatenate([x, x[:50]])
    sims, ids = knn_torch(torch.from_numpy(x), 12, dtype=torch.bfloat16, group=8, candidates=20)
    exact_sims, _ = knn_naive_torch(torch.from_numpy(x), 12)
    torch.testing.assert_close(sims, exact_sims, rtol=0, atol=1e-6)
    ref = brute_force_knn(x, 12)
    canonical = lambda ids: np.where(ids >= 700, ids - 700, ids)  # a copy ties with its original
    np.testing.assert_array_equal(canonical(ids.numpy()), canonical(ref))


def test_drop_self_with_duplicates():
    base = random_features(40, 8, seed=4)
    x = np.concatenate([base] * 4)  # every vector four times
    k = 5
    sims, ids = knn_faiss(x, k)
    _, tids = knn_torch(torch.from_numpy(x), k)
    for result in (ids, tids.numpy()):
        assert result.shape == (160, k)
        assert not (result == np.arange(160)[:, None]).any()
        # the first three neighbours are the three other copies
        np.testing.assert_array_equal(np.sort(result[:, :3] % 40, axis=1), np.repeat(np.arange(160) % 40, 3).reshape(-1, 3))
    np.testing.assert_array_equal(drop_self(np.zeros((2, 3)), np.array([[5, 6, 7], [1, 0, 2]]))[1], [[5, 6], [0, 2]])


def test_kmeans_engines_agree_on_clustered_data():
    x, labels = clustered_features(clusters=12, per=30)
    c_f, a_f = kmeans_faiss(x, 12, seed=0)
    c_t, a_t = kmeans_torch(torch.from_numpy(x), 12, seed=0)
    np.testing.assert_array_equal(a_t.numpy(), a_f)
    np.testing.assert_allclose(c_t.numpy(), c_f, atol=1e-5)
    # and they found the clusters (random init may merge a pair and split another)
    majority = sum(np.bincount(labels[a_f == c]).max() for c in range(12) if (a_f == c).any())
    assert majority / len(labels) > 0.8


def test_mine_table_engines_give_the_same_table():
    x, labels = clustered_features(clusters=8, per=40, noise=0.3)
    t_f, s_f = mine_table(x, clusters=8, k=10, engine="faiss", labels=labels)
    t_t, s_t = mine_table(torch.from_numpy(x), clusters=8, k=10, engine="torch", labels=labels)
    np.testing.assert_array_equal(t_f.positives, t_t.positives)
    np.testing.assert_array_equal(t_f.assignment, t_t.assignment)
    assert s_f["engine"] == "faiss" and s_t["engine"] == "torch"
    assert s_f["label_purity"] > 0.8 > 0.2 > s_f["label_chance"]


def test_table_round_trip_and_mismatch(tmp_path):
    x = random_features(200)
    table, stats = mine_table(x, clusters=5, k=6, meta={"dataset_id": "abc", "epoch": 3, "feature": "head"})
    path = tmp_path / "t.npz"
    table.save(path)
    back = NeighbourTable.load(path)
    np.testing.assert_array_equal(back.positives, table.positives)
    np.testing.assert_array_equal(back.counts, table.counts)
    np.testing.assert_array_equal(back.assignment, table.assignment)
    assert back.meta["epoch"] == 3 and back.meta["clusters"] == 5 and back.meta["stats"] == stats
    back.check_matches("abc", 200)
    with pytest.raises(UserError, match="dataset other"):
        back.check_matches("other", 200)
    with pytest.raises(UserError, match="201 samples"):
        back.check_matches("abc", 201)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.npz"):
        NeighbourTable.load(tmp_path / "bad.npz")


def test_sizes_too_large_are_user_errors():
    x = random_features(50)
    with pytest.raises(UserError, match="--clusters 51"):
        mine_table(x, clusters=51, k=5)
    with pytest.raises(UserError, match="--k 50"):
        mine_table(x, clusters=5, k=50)
    with pytest.raises(UserError, match="NaN"):
        mine_table(np.full((10, 4), np.nan, np.float32), clusters=2, k=2)
    assert clamp_sizes(50, 10000, 40)[:2] == (12, 40)
    assert clamp_sizes(30, 5, 40)[:2] == (5, 29)
    assert clamp_sizes(1000, 100, 40) == (100, 40, [])


@pytest.mark.gpu
def test_gpu_torch_engine_matches_faiss():
    pytest.importorskip("faiss")  # the GPU machine may have torch but no faiss
    x = random_features(20000, 64, seed=5)
    ref_sims, ref = knn_faiss(x, 40)
    sims, ids = knn_torch(torch.from_numpy(x).cuda(), 40)  # Triton candidates on CUDA
    np.testing.assert_array_equal(sims.cpu().numpy(), ref_sims)  # one canonical score, ties by id
    np.testing.assert_array_equal(ids.cpu().numpy(), ref)
    # the whole torch-engine table on CUDA against the selection over its own clustering and the
    # faiss neighbours (faiss K-means may split a near-tie differently, so it is not the reference)
    xc, labels = clustered_features(clusters=20, per=100, d=64)
    t_t, _ = mine_table(torch.from_numpy(xc), clusters=20, k=10, engine="torch", device=torch.device("cuda"))
    centroids, assignment = kmeans_torch(torch.from_numpy(xc).cuda(), 20, seed=0)
    centre_sim = (torch.from_numpy(xc).cuda() * centroids[assignment]).sum(1).cpu().numpy()
    ref_table, _ = reference_selection(knn_faiss(xc, 10)[1], assignment.cpu().numpy(), centre_sim)
    np.testing.assert_array_equal(t_t.positives, ref_table)


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_sharded_round_in_one_process_equals_the_reference(data):
    """The online round's code (sharded.mine_round, here with one block) gives the brute-force
    reference selection on the same clustering."""
    from clim_fast.mining.sharded import block_search, mine_round

    x = random_features(500) if data == "random" else clustered_features()[0]
    # the rows arrive in any order: features stay with the rank (and batch) that computed them
    order = np.random.default_rng(1).permutation(len(x))
    table, fallback, nearest, _, timings = mine_round(torch.from_numpy(x[order]), torch.from_numpy(order), None,
                                                      len(x), clusters=10, k=8, seed=0, search=block_search("torch"))
    centroids, assignment = kmeans_torch(torch.from_numpy(x), 10, seed=0)
    neighbours = brute_force_knn(x, 8)
    centre_sim = (torch.from_numpy(x) * centroids[assignment]).sum(1).numpy()
    ref_table, ref_counts = reference_selection(neighbours, assignment.numpy(), centre_sim)
    np.testing.assert_array_equal(table.assignment, assignment.numpy())
    np.testing.assert_array_equal(table.counts, ref_counts)
    np.testing.assert_array_equal(table.positives, ref_table)
    np.testing.assert_array_equal(nearest, neighbours[:, 0])
    assert set(timings) == {"kmeans_s", "knn_s", "select_s", "exchange_s"}
