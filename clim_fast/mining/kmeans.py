"""Spherical K-means (cosine similarity, unit-norm centroids) with a faiss and a torch engine.

Both engines start from the same seeded initial centroids (m distinct data points) and run the
same Lloyd loop (assign to the most similar centroid, mean, renormalise), so on the same features
they reach the same clustering up to floating-point ties. The final assignment is always exact
fp32, whatever precision the iterations used.
"""

from __future__ import annotations

import numpy as np
import torch

from clim_fast.mining import sharded
from clim_fast.mining.knn import requested_gpu


def initial_centroids(x: np.ndarray | torch.Tensor, clusters: int, seed: int) -> np.ndarray:
    """m distinct rows of x, chosen by a seeded generator (shared by both engines)."""
    rows = sharded.initial_rows(x.shape[0], clusters, seed)
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)].float().cpu().numpy()
    return np.ascontiguousarray(x[rows], dtype=np.float32)


def kmeans_faiss(x: np.ndarray, clusters: int, *, niter: int = 20, seed: int = 0,
                 gpu: bool | int | None = False) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, d], unit rows. Returns (centroids float32 [m, d], assignment int64 [N]).
    gpu: True runs faiss on this process's GPU (torch.cuda.current_device()), an int on that
    GPU; never on all GPUs (each rank keeps to its own)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], clusters, niter=niter, spherical=True, seed=seed, gpu=False,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    device = requested_gpu(gpu)
    if device is not None:
        km._gpu_resources = faiss.StandardGpuResources()  # kept alive with the index
        km.index = faiss.index_cpu_to_gpu(km._gpu_resources, device, faiss.IndexFlatIP(x.shape[1]))
    km.train(x, init_centroids=initial_centroids(x, clusters, seed))
    _, assignment = km.assign(x)
    return km.centroids.astype(np.float32), assignment.astype(np.int64)


def kmeans_torch(x: torch.Tensor, clusters: int, *, niter: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [N, d] unit rows on any device. Returns (centroids [m, d], assignment int64 [N]).

    The online rounds' K-means (sharded.kmeans) over all rows in this process: iterations assign in
    fp16 on CUDA, the final assignment is exact fp32; empty clusters are re-seeded with the points
    that fit their centroid worst, so all m clusters stay in use."""
    x = x.float().contiguous()
    centroids, assignment, _ = sharded.kmeans(x, torch.arange(x.shape[0], device=x.device), x.shape[0], clusters,
                                              niter=niter, seed=seed)
    return centroids, assignment
