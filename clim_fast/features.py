"""Features of every sample with a centre-crop loader (step 1 of the center-wise selection and the
input of every evaluation).

`encode_share` keeps what this rank computed (its share of the ids); `extract_features` places
every rank's share by sample id on every rank, for evaluations, which run on small sets.
"""

from __future__ import annotations

import numpy as np
import torch

from clim_fast import distributed as dd
from clim_fast.progress import PassProgress


@torch.no_grad()
def encode_share(encode_fn, loader, progress: PassProgress | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Run `encode_fn(images) -> [B, d]` over a FeatureLoader (this rank's share, each sample once),
    advancing `progress` by each batch's samples.

    Returns (features float32 [n, d] L2-normalised, on the encoder's device; ids int64 [n];
    labels int64 [n]) for this rank's share. Local only (no collective): a rank with an empty share
    returns [0, 0] features; `agree_width` fixes that once every rank is known to have succeeded."""
    feats, ids, labels = [], [], []
    for batch in loader:  # nothing here waits for the GPU: ids and labels come to the CPU once, at the end
        feats.append(torch.nn.functional.normalize(encode_fn(batch["image"]).float(), dim=1))
        ids.append(batch["id"].reshape(-1).long())
        labels.append(batch["label"].reshape(-1).long())
        if progress is not None:
            progress.advance(batch["image"].shape[0])
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(ids).cpu(), torch.cat(labels).cpu()


def agree_width(feats: torch.Tensor) -> torch.Tensor:
    """Collective: an empty share's [0, 0] features become [0, d] with the other ranks' d."""
    dim = max(dd.all_gather_object(feats.shape[1]))
    return feats if feats.shape[1] == dim else feats.new_empty(0, dim)


def check_coverage(ids: torch.Tensor, num_samples: int) -> None:
    """Every sample id exactly once over all ranks (collective)."""
    in_range = (ids >= 0) & (ids < num_samples)
    counts = dd.all_reduce_sum(torch.bincount(ids[in_range], minlength=num_samples))
    total, outside = dd.all_reduce_sum(torch.tensor([ids.numel(), int((~in_range).sum())])).tolist()
    if total != num_samples or outside or (counts != 1).any():
        raise RuntimeError(f"feature extraction did not see every sample exactly once "
                           f"({total} features for {num_samples} samples)")


@torch.no_grad()
def extract_features(encode_fn, loader, num_samples: int, progress: str | None = None) -> tuple[torch.Tensor,
                                                                                              np.ndarray]:
    """(features float32 [N, d] CPU tensor, L2-normalised, row i = sample id i; labels int64 [N]) on
    every rank: the ranks' shares are all-gathered and placed by sample id. `progress`: a
    description to show rank 0's pass under (clim_fast.progress), or None for none."""
    shown = PassProgress(progress, -(-num_samples // dd.get_world_size())) if progress and dd.get_rank() == 0 else None
    try:
        feats, ids, labels = encode_share(encode_fn, loader, shown)
    finally:
        if shown is not None:
            shown.close()
    feats = agree_width(feats)
    check_coverage(ids, num_samples)
    out_feats, out_labels = dd.gather_by_id(num_samples, ids, feats, labels)
    return out_feats, out_labels.numpy()


def momentum_features(model, kind: str):
    """encode_fn for mining: the momentum encoder's L2-normalised features of a batch (eval-mode BN,
    no grad, the model's autocast). `model` may be DDP-wrapped."""
    moco = getattr(model, "module", model)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with moco.autocast(images):
            return moco.key_features(moco.layout(images), kind=kind).float()

    return encode
