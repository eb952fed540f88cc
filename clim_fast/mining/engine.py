"""Offline mining (`clim-fast mine`, bench/mine.py): all features in one process, then spherical
K-means, exact kNN and the center-wise selection with the faiss or the torch engine.

Online rounds during training run sharded across ranks instead (rounds.py, sharded.py).
Sizes: `clusters` must be <= N and `k` < N (a UserError otherwise).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clim_fast.config import MINE_ENGINES
from clim_fast.data import loader_options
from clim_fast.features import extract_features, momentum_features
from clim_fast.machine import synchronize
from clim_fast.mining.kmeans import kmeans_faiss, kmeans_torch
from clim_fast.mining.knn import faiss_gpu_device, knn_faiss, knn_torch
from clim_fast.mining.select import check_sizes, round_seed, select_positives, table_origin, table_stats
from dali_pipelines import FeatureLoader
from shards.errors import UserError
from shards.neighbours import NeighbourTable


def resolve_engine(engine: str, device: torch.device | None = None) -> tuple[str, torch.device]:
    """auto: torch when a CUDA device is in reach (the GPU path), else faiss on the CPU.
    Returns (engine, device for the torch engine)."""
    if engine not in MINE_ENGINES:
        raise UserError(f"--engine {engine}: choose from {', '.join(MINE_ENGINES)}")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if engine == "auto":
        engine = "torch" if device.type == "cuda" else "faiss"
    return engine, device


def mine_table(features, *, clusters: int, k: int, engine: str = "auto", seed: int = 0, labels=None,
               meta: dict | None = None, niter: int = 20, device: torch.device | None = None):
    """Features [N, d] (torch or numpy; L2-normalised here) -> (NeighbourTable, stats dict)."""
    feats = torch.as_tensor(features).float()
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise UserError(f"features: expected a non-empty [N, d] array, got shape {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise UserError("features: contain NaN or inf (did training diverge?)")
    n = feats.shape[0]
    check_sizes(n, clusters, k)
    engine, device = resolve_engine(engine, device)
    feats = torch.nn.functional.normalize(feats, dim=1)
    timings = {}
    t0 = time.perf_counter()
    if engine == "faiss":
        gpu = faiss_gpu_device(device)  # this process's GPU, or None: the CPU
        x = feats.cpu().numpy()
        centroids, assignment = kmeans_faiss(x, clusters, niter=niter, seed=seed, gpu=gpu)
        timings["kmeans_s"] = time.perf_counter() - t0
        _, neighbours = knn_faiss(x, k, gpu=gpu)
        centre_sim = np.einsum("nd,nd->n", x, centroids[assignment])
    else:
        x = feats.to(device)
        centroids_t, assignment_t = kmeans_torch(x, clusters, niter=niter, seed=seed)
        synchronize(device)
        timings["kmeans_s"] = time.perf_counter() - t0
        _, neighbours_t = knn_torch(x, k)
        centre_sim = (x * centroids_t[assignment_t]).sum(1)
        neighbours, assignment = neighbours_t, assignment_t
    synchronize(device)
    timings["knn_s"] = time.perf_counter() - t0 - timings["kmeans_s"]
    t1 = time.perf_counter()
    if device.type == "cuda":
        neighbours, assignment, centre_sim = (torch.as_tensor(v).to(device) for v in (neighbours, assignment, centre_sim))
    positives, counts, fallback = select_positives(neighbours, assignment, centre_sim)
    neighbours, assignment = np.asarray(torch.as_tensor(neighbours).cpu()), np.asarray(torch.as_tensor(assignment).cpu())
    timings["select_s"] = time.perf_counter() - t1
    if device.type == "cuda":  # hand the score blocks' cache back to training
        torch.cuda.empty_cache()
    table_meta = dict(meta or {}, num_samples=n, clusters=int(clusters), k=int(k), engine=engine,
                      seed=int(seed), feature_dim=int(feats.shape[1]))
    table = NeighbourTable(positives, counts, assignment.astype(np.int32), table_meta)
    stats = table_stats(table, fallback, clusters, labels, neighbours[:, 0])
    stats.update(engine=engine, **{key: round(v, 4) for key, v in timings.items()})
    table.meta["stats"] = stats
    return table, stats


def mine_from_model(model, cfg, dataset, *, device: torch.device, clusters: int, k: int, engine: str,
                    batch_size: int, epoch: int, checkpoint: str = "", progress: bool = False):
    """`clim-fast mine`: features of every sample with the momentum encoder (a progress display
    with `progress`), then mine_table."""
    loader = FeatureLoader(dataset, batch_size=batch_size, image_size=cfg.image_size, **loader_options(cfg, device))
    try:
        feats, labels = extract_features(momentum_features(model, cfg.mine_feature), loader,
                                         dataset.num_samples, progress="features" if progress else None)
    finally:
        loader.close()
    meta = table_origin(cfg, dataset, epoch, checkpoint=str(checkpoint))
    has_labels = labels is not None and (labels >= 0).all()
    return mine_table(feats, clusters=clusters, k=k, engine=engine, seed=round_seed(cfg, epoch),
                      labels=labels if has_labels else None, meta=meta, device=device)
