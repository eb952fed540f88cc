"""Features of every sample, in id order, gathered across ranks (step 1 of the center-wise selection, docs/architecture.md)."""

from __future__ import annotations

import numpy as np
import torch

from clim_fast import distributed as dd


@torch.no_grad()
def extract_features(encode_fn, loader, num_samples: int) -> tuple[torch.Tensor, np.ndarray]:
    """Run `encode_fn(images) -> [B, d]` over a FeatureLoader (this rank's share, each sample once).

    Returns (features float32 [N, d] CPU tensor, L2-normalised, row i = sample id i; labels int64
    [N]) on every rank: the ranks' shares are all-gathered and placed by sample id.
    """
    feats, ids, labels = [], [], []
    for batch in loader:
        out = encode_fn(batch["image"])
        feats.append(torch.nn.functional.normalize(out.float(), dim=1).cpu())
        ids.append(batch["id"].reshape(-1).long().cpu())
        labels.append(batch["label"].reshape(-1).long().cpu())
    if feats:
        local_feats, local_ids, local_labels = torch.cat(feats), torch.cat(ids), torch.cat(labels)
    else:
        dim = _feature_dim(encode_fn)
        local_feats = torch.empty(0, dim)
        local_ids = local_labels = torch.empty(0, dtype=torch.int64)
    all_feats = dd.all_gather_varlen(local_feats)
    all_ids = dd.all_gather_varlen(local_ids)
    all_labels = dd.all_gather_varlen(local_labels)
    in_range = all_ids.numel() == 0 or (all_ids.min() >= 0 and all_ids.max() < num_samples)
    if all_ids.numel() != num_samples or not in_range or (torch.bincount(all_ids, minlength=num_samples) != 1).any():
        raise RuntimeError(f"feature extraction did not see every sample exactly once "
                           f"({all_ids.numel()} features for {num_samples} samples)")
    out_feats = torch.empty(num_samples, all_feats.shape[1])
    out_feats[all_ids] = all_feats
    out_labels = np.empty(num_samples, dtype=np.int64)
    out_labels[all_ids.numpy()] = all_labels.numpy()
    return out_feats, out_labels


def _feature_dim(encode_fn) -> int:
    # A rank with an empty share still has to join the gathers with the right width.
    return int(getattr(encode_fn, "feature_dim", 0))
