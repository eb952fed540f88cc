"""One mining round over features that stay where they were computed: each rank holds the
features of its own share (rows `ids`), nothing N x d is ever gathered onto a rank.

- K-means (spherical Lloyd): each rank assigns its rows, the per-cluster sums and counts are
  all-reduced (float64, so the result does not depend on how rows are split), every rank gets the
  same centroids. The initial centroids are the same seeded rows as `kmeans.initial_centroids`.
- kNN: each rank searches its own rows against every rank's rows in turn (rank r's block is
  broadcast, searched, merged into a running top-(k+1) ordered by score then id), so at most two
  blocks are resident.
- Selection of a rank's own rows, with the cluster and centre similarity of every sample
  (N numbers, gathered); then only the finished table rows are gathered.

In one process the same code runs with one block: the single-process table is the distributed
table (tests/test_mining_model.py checks it with two gloo processes).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from clim_fast import distributed as dd
from clim_fast.machine import synchronize
from clim_fast.mining.knn import drop_self, exact_fp32_matmul, knn_search, search_dtype
from clim_fast.mining.select import select_positives
from shards.neighbours import NeighbourTable


@torch.no_grad()
def _assign(x: torch.Tensor, centroids: torch.Tensor):
    """Most similar centroid of each row: (sims float32 [n], ids int64 [n]) in x's precision."""
    budget = (1 << 30) if x.device.type == "cuda" else (64 << 20)  # one [rows, m] score block
    chunk = max(256, budget // max(1, centroids.shape[0] * x.element_size()))
    sims = torch.empty(x.shape[0], device=x.device)
    ids = torch.empty(x.shape[0], device=x.device, dtype=torch.int64)
    c = centroids.to(x.dtype)
    with exact_fp32_matmul():
        for s in range(0, x.shape[0], chunk):
            best = (x[s:s + chunk] @ c.T).max(dim=1)
            sims[s:s + chunk], ids[s:s + chunk] = best.values.float(), best.indices
    return sims, ids


def initial_rows(num_samples: int, clusters: int, seed: int) -> np.ndarray:
    """The ids of the m distinct samples that start K-means (every engine starts from them)."""
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=clusters, replace=False))


@torch.no_grad()
def kmeans(x: torch.Tensor, ids: torch.Tensor, num_samples: int, clusters: int, *, niter: int = 20,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical K-means over every rank's rows. Returns (centroids float32 [m, d] (the same on
    every rank), assignment int64 [n], centre_sim float32 [n]) for this rank's rows."""
    d = x.shape[1]
    chosen = torch.from_numpy(initial_rows(num_samples, clusters, seed))
    slot = torch.full((num_samples,), -1, dtype=torch.int64)
    slot[chosen] = torch.arange(clusters)
    mine = slot[ids.cpu()].to(x.device)
    init = torch.zeros(clusters, d, dtype=torch.float64, device=x.device)
    init[mine[mine >= 0]] = x[mine >= 0].double()
    centroids = dd.all_reduce_sum(init).float()
    # Lloyd iterations assign in fp16 on CUDA (tensor cores; K-means tolerates the odd near-tie
    # flipping), the final assignment is exact fp32
    x_low = x.to(search_dtype(x.device))
    for _ in range(niter):
        sims, assignment = _assign(x_low, centroids)
        sums = torch.zeros(clusters, d, dtype=torch.float64, device=x.device).index_add_(0, assignment, x.double())
        counts = torch.bincount(assignment, minlength=clusters)
        sums, counts = dd.all_reduce_sum(sums), dd.all_reduce_sum(counts)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():  # re-seed empty clusters with the rows that fit their centroid worst
            sums[empty] = _worst_rows(x, ids, sims, empty.numel()).to(sums.device)
        centroids = F.normalize(sums, dim=1).float()
    sims, assignment = _assign(x, centroids)
    return centroids, assignment, sims


def _worst_rows(x, ids, sims, count: int) -> torch.Tensor:
    """The `count` rows with the lowest sim over all ranks (ties: smaller id), float64 [count, d]."""
    take = min(count, x.shape[0])
    local = torch.topk(sims, take, largest=False).indices
    cand_sims = dd.all_gather_varlen(sims[local].cpu())
    cand_ids = dd.all_gather_varlen(ids[local].cpu())
    order = np.lexsort((cand_ids.numpy(), cand_sims.numpy()))[:count]
    wanted = cand_ids[torch.from_numpy(order)]
    rows = torch.zeros(count, x.shape[1], dtype=torch.float64, device=x.device)
    hit = (ids.cpu()[:, None] == wanted[None, :])
    r, c = hit.nonzero(as_tuple=True)
    rows[c.to(x.device)] = x[r.to(x.device)].double()
    return dd.all_reduce_sum(rows)


def _merge(best_s, best_i, s, i, kk: int):
    """Running top-kk by score, ties by smaller id."""
    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    by_id = torch.argsort(i, dim=1, stable=True)
    s, i = s.gather(1, by_id), i.gather(1, by_id)
    by_score = torch.argsort(s, dim=1, descending=True, stable=True)[:, :kk]
    return s.gather(1, by_score), i.gather(1, by_score)


@torch.no_grad()
def knn(x: torch.Tensor, ids: torch.Tensor, k: int, search) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours (global ids, best first, self excluded) of this rank's rows among every
    rank's rows. `search(queries, block, kk) -> (sims, rows of block)` is the exact block search."""
    kk = k + 1
    best_s = torch.full((x.shape[0], kk), float("-inf"), device=x.device)
    best_i = torch.full((x.shape[0], kk), -1, dtype=torch.int64, device=x.device)
    for src in range(dd.get_world_size()):
        block = dd.broadcast_varlen(x, src)
        block_ids = dd.broadcast_varlen(ids.to(x.device), src)
        if block.shape[0] == 0 or x.shape[0] == 0:
            continue
        s, rows = search(x, block, min(kk, block.shape[0]))
        best_s, best_i = _merge(best_s, best_i, s, block_ids[rows], kk)
    return drop_self(best_s, best_i, ids.to(x.device))


def block_search(engine: str):
    """search(queries, block, kk) -> (sims, rows of block) for sharded.knn: the top-kk of each
    query among a block's rows (no self exclusion: ids there are global), ties by smaller row.
    "faiss": faiss on the queries' data; any other engine: torch (Triton on CUDA when available)."""

    def search(queries: torch.Tensor, block: torch.Tensor, kk: int):
        none = torch.full((queries.shape[0],), -1, dtype=torch.int64)
        if engine == "faiss":
            sims, rows = knn_search(queries.cpu().numpy(), block.cpu().numpy(), kk, query_ids=none.numpy(),
                                    engine="faiss")
            return torch.as_tensor(sims).to(queries.device), torch.as_tensor(rows).long().to(queries.device)
        return knn_search(queries, block, kk, query_ids=none.to(queries.device))

    return search


def mine_round(x: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None, num_samples: int, *,
               clusters: int, k: int, seed: int, search, niter: int = 20):
    """This rank's features x [n, d] (unit rows) of samples `ids` -> (NeighbourTable, fallback bool [N],
    nearest int [N], labels [N] or None, timings) on every rank."""
    device = x.device
    timings = {}
    t0 = time.perf_counter()
    _, assignment, centre_sim = kmeans(x, ids, num_samples, clusters, niter=niter, seed=seed)
    synchronize(device)
    timings["kmeans_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, neighbours = knn(x, ids, k, search)
    synchronize(device)
    timings["knn_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids_cpu = ids.cpu()
    a_all, cs_all = dd.gather_by_id(num_samples, ids_cpu, assignment, centre_sim)
    positives, counts, fallback = select_positives(neighbours, a_all.to(device), cs_all.to(device), ids.to(device))
    timings["select_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table_rows = torch.cat([torch.from_numpy(counts)[:, None], torch.from_numpy(positives),
                            torch.from_numpy(fallback.astype(np.int32))[:, None],
                            neighbours[:, :1].int().cpu()], 1)
    if labels is None:
        table, all_labels = dd.gather_by_id(num_samples, ids_cpu, table_rows)[0].numpy(), None
    else:
        table, all_labels = (t.numpy() for t in dd.gather_by_id(num_samples, ids_cpu, table_rows, labels))
    timings["exchange_s"] = time.perf_counter() - t0
    result = NeighbourTable(np.ascontiguousarray(table[:, 1:1 + k]), np.ascontiguousarray(table[:, 0]),
                            a_all.numpy().astype(np.int32), {})
    return result, table[:, -2].astype(bool), table[:, -1], all_labels, timings
