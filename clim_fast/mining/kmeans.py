"""Spherical K-means (cosine similarity, unit-norm centroids) with a faiss and a torch engine.

Both engines start from the same seeded initial centroids (m distinct data points) and run the
same Lloyd loop (assign to the most similar centroid, mean, renormalise), so on the same features
they reach the same clustering up to floating-point ties. The final assignment is always exact
fp32, whatever precision the iterations used.
"""

from __future__ import annotations

import numpy as np
import torch

from clim_fast.mining.knn import exact_fp32_matmul, search_dtype


def initial_centroids(x: np.ndarray | torch.Tensor, clusters: int, seed: int) -> np.ndarray:
    """m distinct rows of x, chosen by a seeded generator (shared by both engines)."""
    n = x.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, size=clusters, replace=False))
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)].float().cpu().numpy()
    return np.ascontiguousarray(x[rows], dtype=np.float32)


def kmeans_faiss(x: np.ndarray, clusters: int, *, niter: int = 20, seed: int = 0,
                 gpu: bool | int = False) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, d], unit rows. Returns (centroids float32 [m, d], assignment int64 [N]).
    gpu: True runs faiss on this process's GPU (torch.cuda.current_device()), an int on that
    GPU; never on all GPUs (each rank keeps to its own)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], clusters, niter=niter, spherical=True, seed=seed, gpu=False,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    if gpu is not False and gpu is not None:
        device = torch.cuda.current_device() if gpu is True else int(gpu)
        km._gpu_resources = faiss.StandardGpuResources()  # kept alive with the index
        km.index = faiss.index_cpu_to_gpu(km._gpu_resources, device, faiss.IndexFlatIP(x.shape[1]))
    km.train(x, init_centroids=initial_centroids(x, clusters, seed))
    _, assignment = km.assign(x)
    return km.centroids.astype(np.float32), assignment.astype(np.int64)


def _assign(x: torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype, chunk: int):
    """Most similar centroid of each row: (sims float32 [N], ids int64 [N])."""
    c = centroids.to(dtype)
    x = x.to(dtype)  # a no-op when the caller already converted
    sims = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    ids = torch.empty(x.shape[0], device=x.device, dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        block = x[s:s + chunk] @ c.T
        best = block.max(dim=1)
        sims[s:s + chunk] = best.values.float()
        ids[s:s + chunk] = best.indices
    return sims, ids


def _chunk_rows(n_cols: int, device: torch.device, itemsize: int) -> int:
    """Rows per block so one [rows, n_cols] score block stays near 1 GiB on GPU, 64 MiB on CPU."""
    budget = (1 << 30) if device.type == "cuda" else (64 << 20)
    return max(256, budget // max(1, n_cols * itemsize))


def kmeans_torch(x: torch.Tensor, clusters: int, *, niter: int = 20, seed: int = 0,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [N, d] unit rows on any device. Returns (centroids [m, d], assignment int64 [N]).

    Iterations assign in `dtype` (fp16 on CUDA by default: K-means tolerates the odd near-tie
    flipping); the final assignment is exact fp32. Empty clusters are re-seeded with the points
    that fit their current centroid worst, so all m clusters stay in use.
    """
    x = x.float().contiguous()
    n, d = x.shape
    dtype = dtype or search_dtype(x.device)
    chunk = _chunk_rows(clusters, x.device, torch.finfo(dtype).bits // 8)
    centroids = torch.from_numpy(initial_centroids(x, clusters, seed)).to(x.device)
    x_low = x.to(dtype)
    for _ in range(niter):
        sims, ids = _assign(x_low, centroids, dtype, chunk)
        sums = torch.zeros(clusters, d, device=x.device).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=clusters)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            worst = torch.topk(sims, empty.numel(), largest=False).indices
            sums[empty] = x[worst]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    with exact_fp32_matmul():
        _, assignment = _assign(x, centroids, torch.float32, _chunk_rows(clusters, x.device, 4))
    return centroids, assignment
