"""Center-wise selection (steps 4-5 of the method, README "The method") and what is said about a table.

Positives of anchor i: its kNN neighbours j with a_j == a_i (same cluster) and
cos(f_j, c_{a_i}) > cos(f_i, c_{a_i}) (closer to the cluster's centre than the anchor), in kNN
order; when none remain, the nearest neighbour alone (the fallback).
"""

from __future__ import annotations

import numpy as np
import torch

from shards.errors import UserError
from shards.neighbours import NeighbourTable


def round_seed(cfg, epoch: int) -> int:
    """The K-means seed of the mining round at `epoch` (online rounds and `clim-fast mine` alike)."""
    return cfg.seed + int(epoch)


def table_origin(cfg, dataset, epoch: int, **more) -> dict:
    """What a mined table records of where it came from (its `meta`), online and offline alike."""
    return dict(dataset_id=dataset.dataset_id, num_samples=dataset.num_samples, epoch=int(epoch),
                feature=cfg.mine_feature, arch=cfg.arch, image_size=cfg.image_size, seed=round_seed(cfg, epoch),
                **more)


def check_minable(num_samples: int, where) -> None:
    """A positive is another image: mining needs two samples at the least."""
    if num_samples < 2:
        raise UserError(f"{where}: {num_samples} sample(s); mining positives needs at least 2")


def check_sizes(num_samples: int, clusters: int, k: int) -> None:
    check_minable(num_samples, "--shards")
    if clusters < 1 or clusters > num_samples:
        raise UserError(f"--clusters {clusters}: must be between 1 and the number of samples ({num_samples})")
    if k < 1 or k >= num_samples:
        raise UserError(f"--k {k}: must be between 1 and the number of samples minus one ({num_samples - 1})")


def clamp_sizes(num_samples: int, clusters: int, k: int) -> tuple[int, int, list[str]]:
    """Online rounds: shrink m to N // 4 and k to N - 1 when the data set is too small for them
    (a warning each), instead of failing mid-run."""
    warnings = []
    most_clusters = max(1, num_samples // 4)
    if clusters > most_clusters:
        warnings.append(f"clusters={clusters} is too many for {num_samples} samples; using {most_clusters}")
        clusters = most_clusters
    if k > num_samples - 1:
        warnings.append(f"knn_k={k} is too many for {num_samples} samples; using {num_samples - 1}")
        k = num_samples - 1
    return clusters, k, warnings


def select_positives(neighbours, assignment, centre_sim, anchor_ids=None):
    """Vectorised selection (torch, on the inputs' device; numpy inputs are converted).

    neighbours int [n, k] (global ids in kNN order, self excluded) of the anchors `anchor_ids`
    (int [n]; default 0..n-1); assignment int [N] and centre_sim float [N] (cos of each sample
    with its own cluster's centroid) over all samples. Returns numpy (positives int32 [n, k]
    padded -1, counts int32 [n], fallback bool [n]).
    """
    nb = torch.as_tensor(neighbours).long()
    device = nb.device
    a = torch.as_tensor(assignment, device=device).long()
    cs = torch.as_tensor(centre_sim, device=device)
    rows_of = torch.arange(nb.shape[0], device=device) if anchor_ids is None else \
        torch.as_tensor(anchor_ids, device=device).long()
    safe = nb.clamp_min(0)
    valid = (nb >= 0) & (a[safe] == a[rows_of][:, None]) & (cs[safe] > cs[rows_of][:, None])
    # compact each row's valid entries to its front, keeping kNN order (no sort needed)
    rows, cols = valid.nonzero(as_tuple=True)
    positives = torch.full(nb.shape, -1, dtype=torch.int32, device=device)
    positives[rows, valid.cumsum(1)[rows, cols] - 1] = nb[rows, cols].int()
    counts = valid.sum(1).int()
    fallback = counts == 0
    positives[fallback, 0] = nb[fallback, 0].int()
    counts[fallback] = 1
    return positives.cpu().numpy(), counts.cpu().numpy(), fallback.cpu().numpy()


def table_stats(table: NeighbourTable, fallback: np.ndarray, clusters: int,
                labels: np.ndarray | None = None, nearest: np.ndarray | None = None) -> dict:
    """Mean positives per anchor, share on the fallback, cluster size spread and, with labels,
    label purity of positives (per anchor, then averaged: the chance that a drawn positive has the
    anchor's class) against chance (two random samples share a class) and the top-1 kNN's purity
    (`nearest`: each sample's nearest neighbour, int [N])."""
    sizes = np.bincount(table.assignment, minlength=clusters)
    stats = {
        "num_samples": table.num_samples,
        "clusters": int(clusters),
        "k": int(table.positives.shape[1]),
        "mean_positives": float(table.counts.mean()),
        "fallback_share": float(np.asarray(fallback).mean()),
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
        share = np.bincount(labels) / labels.size
        stats["label_chance"] = float(share @ share)
        if nearest is not None:
            stats["knn_top1_purity"] = float((labels[np.asarray(nearest)] == labels).mean())
    return stats


def format_stats(stats: dict) -> str:
    text = (f"{stats['num_samples']} anchors, {stats['clusters']} clusters (size {stats['cluster_size_min']}/"
            f"{stats['cluster_size_median']:g}/{stats['cluster_size_max']} min/median/max), "
            f"{stats['mean_positives']:.2f} positives per anchor, {100 * stats['fallback_share']:.1f}% on the fallback")
    if "label_purity" in stats:
        text += (f", label purity {100 * stats['label_purity']:.1f}% (chance {100 * stats['label_chance']:.1f}%, "
                 f"top-1 kNN {100 * stats.get('knn_top1_purity', float('nan')):.1f}%)")
    return text
