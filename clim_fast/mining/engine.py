"""Center-wise positives (docs/architecture.md, "Mining"): spherical K-means, exact kNN, selection.

`mine_table` turns features into a NeighbourTable plus stats; `refresh_table` is the online
round the train loop calls on every rank; `clim-fast mine` (cli/mine.py) runs the same code on a
saved checkpoint.

Sizes: `clusters` must be <= N and `k` < N (a UserError otherwise). Online, a default of 10000
clusters would not fit a small data set, so `refresh_table` clamps m to max(1, N // 4) (about 4
samples per cluster) and k to N - 1, with a printed warning, instead of failing mid-run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from shards.errors import UserError
from shards.neighbours import NeighbourTable

ENGINES = ("auto", "faiss", "torch")


def faiss_gpus() -> int:
    try:
        import faiss

        return faiss.get_num_gpus()
    except (ImportError, AttributeError):
        return 0


def resolve_engine(engine: str, device: torch.device | None = None) -> tuple[str, torch.device]:
    """auto: faiss when it has GPUs, else torch when a CUDA device is in reach, else faiss on CPU.
    Returns (engine, device for the torch engine)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose from {', '.join(ENGINES)}")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if engine == "auto":
        engine = "faiss" if faiss_gpus() > 0 else ("torch" if device.type == "cuda" else "faiss")
    return engine, device


def check_sizes(num_samples: int, clusters: int, k: int) -> None:
    if clusters < 1 or clusters > num_samples:
        raise UserError(f"--clusters {clusters}: must be between 1 and the number of samples ({num_samples})")
    if k < 1 or k >= num_samples:
        raise UserError(f"--k {k}: must be between 1 and the number of samples minus one ({num_samples - 1})")


def clamp_sizes(num_samples: int, clusters: int, k: int) -> tuple[int, int, list[str]]:
    """Online refresh: shrink m to N // 4 and k to N - 1 when the data set is too small."""
    warnings = []
    if clusters > max(1, num_samples // 4):
        warnings.append(f"clusters={clusters} is too many for {num_samples} samples; using {max(1, num_samples // 4)}")
        clusters = max(1, num_samples // 4)
    if k > num_samples - 1:
        warnings.append(f"knn_k={k} is too many for {num_samples} samples; using {num_samples - 1}")
        k = num_samples - 1
    return clusters, k, warnings


def select_positives(neighbours, assignment, centre_sim):
    """Steps 4-5 of the center-wise selection (README, "The method"), vectorised: torch on CUDA inputs, numpy otherwise (faster on CPU).

    neighbours int [N, k] (kNN order, self excluded), assignment int [N], centre_sim float [N]
    (cos of each sample with its own cluster's centroid). Positives of i: neighbours j with
    a_j == a_i and centre_sim_j > centre_sim_i, in kNN order; when none remain, the nearest
    neighbour alone (the fallback). Returns numpy (positives int32 [N, k] padded -1, counts
    int32 [N], fallback bool [N]).
    """
    if isinstance(neighbours, torch.Tensor) and neighbours.is_cuda:
        return _select_torch(neighbours, assignment, centre_sim)
    nb, a, cs = (np.asarray(torch.as_tensor(v).cpu()) for v in (neighbours, assignment, centre_sim))
    safe = np.maximum(nb, 0)
    valid = (nb >= 0) & (a[safe] == a[:, None]) & (cs[safe] > cs[:, None])
    # compact each row's valid entries to its front, keeping kNN order (no sort needed)
    rows, cols = np.nonzero(valid)
    positives = np.full(nb.shape, -1, dtype=np.int32)
    positives[rows, np.cumsum(valid, axis=1, dtype=np.int32)[rows, cols] - 1] = nb[rows, cols]
    counts = valid.sum(1, dtype=np.int32)
    fallback = counts == 0
    positives[fallback, 0] = nb[fallback, 0]
    counts[fallback] = 1
    return positives, counts, fallback


def _select_torch(nb: torch.Tensor, assignment, centre_sim):
    nb = nb.long()
    a = torch.as_tensor(assignment, device=nb.device).long()
    cs = torch.as_tensor(centre_sim, device=nb.device)
    safe = nb.clamp_min(0)
    valid = (nb >= 0) & (a[safe] == a[:, None]) & (cs[safe] > cs[:, None])
    rows, cols = valid.nonzero(as_tuple=True)
    positives = torch.full(nb.shape, -1, dtype=torch.int32, device=nb.device)
    positives[rows, valid.cumsum(1)[rows, cols] - 1] = nb[rows, cols].int()
    counts = valid.sum(1).int()
    fallback = counts == 0
    positives[fallback, 0] = nb[fallback, 0].int()
    counts[fallback] = 1
    return positives.cpu().numpy(), counts.cpu().numpy(), fallback.cpu().numpy()


def table_stats(table: NeighbourTable, fallback: np.ndarray, clusters: int,
                labels: np.ndarray | None = None, neighbours: np.ndarray | None = None) -> dict:
    """Mean positives per anchor, share on the fallback, cluster size spread and, with labels,
    label purity of positives (per anchor, then averaged: the chance that a drawn positive has the
    anchor's class) against chance (two random samples share a class) and the top-1 kNN's purity."""
    sizes = np.bincount(table.assignment, minlength=clusters)
    stats = {
        "num_samples": table.num_samples,
        "clusters": int(clusters),
        "k": int(table.positives.shape[1]),
        "mean_positives": float(table.counts.mean()),
        "fallback_share": float(fallback.mean()),
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "empty_clusters": int((sizes == 0).sum()),
    }
    if labels is not None:
        labels = np.asarray(labels)
        pos = table.positives
        same = (labels[np.maximum(pos, 0)] == labels[:, None]) & (pos >= 0)
        stats["label_purity"] = float((same.sum(1) / table.counts).mean())
        stats["label_chance"] = float((np.bincount(labels) / labels.size) @ (np.bincount(labels) / labels.size))
        if neighbours is not None:
            stats["knn_top1_purity"] = float((labels[neighbours[:, 0]] == labels).mean())
    return stats


def mine_table(features, *, clusters: int, k: int, engine: str = "auto", seed: int = 0, labels=None,
               meta: dict | None = None, niter: int = 20, device: torch.device | None = None):
    """Features [N, d] (torch or numpy; L2-normalised here) -> (NeighbourTable, stats dict)."""
    from clim_fast.mining.kmeans import kmeans_faiss, kmeans_torch
    from clim_fast.mining.knn import knn_faiss, knn_torch

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
        gpu = faiss_gpus() > 0
        x = feats.cpu().numpy()
        centroids, assignment = kmeans_faiss(x, clusters, niter=niter, seed=seed, gpu=gpu)
        timings["kmeans_s"] = time.perf_counter() - t0
        _, neighbours = knn_faiss(x, k, gpu=gpu)
        centre_sim = np.einsum("nd,nd->n", x, centroids[assignment])
    else:
        x = feats.to(device)
        centroids_t, assignment_t = kmeans_torch(x, clusters, niter=niter, seed=seed)
        _sync(device)
        timings["kmeans_s"] = time.perf_counter() - t0
        _, neighbours_t = knn_torch(x, k)
        centre_sim = (x * centroids_t[assignment_t]).sum(1)
        neighbours, assignment = neighbours_t, assignment_t
    _sync(device)
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
    stats = table_stats(table, fallback, clusters, labels, neighbours)
    stats.update(engine=engine, **{key: round(v, 4) for key, v in timings.items()})
    table.meta["stats"] = stats
    return table, stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_stats(stats: dict) -> str:
    text = (f"{stats['num_samples']} anchors, {stats['clusters']} clusters (size {stats['cluster_size_min']}/"
            f"{stats['cluster_size_median']:g}/{stats['cluster_size_max']} min/median/max), "
            f"{stats['mean_positives']:.2f} positives per anchor, {100 * stats['fallback_share']:.1f}% on the fallback")
    if "label_purity" in stats:
        text += (f", label purity {100 * stats['label_purity']:.1f}% (chance {100 * stats['label_chance']:.1f}%, "
                 f"top-1 kNN {100 * stats.get('knn_top1_purity', float('nan')):.1f}%)")
    return text


def table_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / "tables" / f"table-epoch-{epoch:04d}.npz"


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def encode_fn(model, kind: str, device: torch.device, precision: str = "auto"):
    """The momentum encoder's L2-normalised features of a batch (eval mode, no grad; bf16 autocast
    on CUDA unless precision is fp32)."""
    moco = _unwrap(model)
    autocast = device.type == "cuda" and precision != "fp32"

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return moco.key_features(images, kind=kind).float()

    return encode


def mine_from_model(model, cfg, shards_dir, *, device: torch.device, clusters: int, k: int, engine: str,
                    batch_size: int, epoch: int, checkpoint: str = "", rank: int = 0, world_size: int = 1):
    """Features of every sample with the momentum encoder, then (rank 0 only) mine.

    Returns (table, stats) on rank 0 and (None, None) elsewhere."""
    from dali_pipelines import FeatureLoader
    from clim_fast.features import extract_features
    from shards import ShardDataset

    dataset = ShardDataset(shards_dir)
    loader = FeatureLoader(shards_dir, batch_size=batch_size, image_size=cfg.image_size, rank=rank,
                           world_size=world_size, device=device, workers=cfg.workers, threads=cfg.dali_threads)
    try:
        feats, labels = extract_features(encode_fn(model, cfg.mine_feature, device, cfg.precision), loader,
                                         dataset.num_samples)
    finally:
        loader.close()
    if rank != 0:
        return None, None
    meta = dict(dataset_id=dataset.dataset_id, epoch=int(epoch), feature=cfg.mine_feature, checkpoint=str(checkpoint),
                arch=cfg.arch, image_size=cfg.image_size)
    has_labels = labels is not None and (labels >= 0).all()
    return mine_table(feats, clusters=clusters, k=k, engine=engine, seed=cfg.seed + epoch,
                      labels=labels if has_labels else None, meta=meta, device=device)


def refresh_table(model, cfg, shards_dir, run_dir, epoch: int, device: torch.device):
    """Online mining round, called on every rank: all ranks extract features, rank 0 mines and
    saves `run_dir/tables/table-epoch-XXXX.npz` atomically, the table is broadcast.
    Returns (NeighbourTable, Path) on every rank; stats are in `table.meta["stats"]`."""
    from clim_fast import distributed as dd
    from shards import ShardDataset

    rank, world = dd.get_rank(), dd.get_world_size()
    n = ShardDataset(shards_dir).num_samples
    clusters, k, warnings = clamp_sizes(n, cfg.clusters, cfg.knn_k)
    was_training = _unwrap(model).training
    path = table_path(run_dir, epoch)
    failure = None
    try:
        table, stats = mine_from_model(model, cfg, shards_dir, device=device, clusters=clusters, k=k,
                                       engine=cfg.mine_engine, batch_size=cfg.batch_size, epoch=epoch,
                                       rank=rank, world_size=world)
        if rank == 0:
            table.meta["warnings"] = warnings
            table.save(path)
            for w in warnings:
                print(f"mining warning: {w}", flush=True)
            print(f"mined epoch {epoch}: {format_stats(stats)} -> {path}", flush=True)
            _append_log(run_dir, dict(kind="mine", epoch=int(epoch), table=str(path), **stats))
    except Exception as e:
        if world == 1:
            raise
        failure = e
    finally:
        _unwrap(model).train(was_training)
    # a rank that failed alone would leave the others waiting in the broadcasts below
    errors = dd.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        raise RuntimeError(f"mining failed on rank {failed[0][0]}: {failed[0][1]}")
    positives = dd.broadcast_numpy(table.positives if rank == 0 else None)
    counts = dd.broadcast_numpy(table.counts if rank == 0 else None)
    assignment = dd.broadcast_numpy(table.assignment if rank == 0 else None)
    meta = dd.broadcast_object(table.meta if rank == 0 else None)
    dd.barrier()
    return NeighbourTable(positives, counts, assignment, meta), path


def _append_log(run_dir, record: dict) -> None:
    with open(Path(run_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
