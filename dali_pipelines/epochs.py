"""Which sample ids a rank reads in an epoch (pure numpy: imported by the DALI worker processes).

Pretraining and linear training follow the DistributedSampler contract with drop-last: one seeded
permutation per (seed, epoch), the same on every rank, truncated to whole global batches; rank r
takes every world_size-th id starting at r. Global batch t is then exactly
perm[t * global_batch:(t + 1) * global_batch], split across ranks.

Evaluation-style loaders (features, linear val) visit every id once: rank r takes r, r + W, ...,
padded at the end to a whole number of local batches so every rank runs the same number of steps.
"""

from __future__ import annotations

import numpy as np

from shards.errors import UserError

PAD_ID = -1  # an id slot that only exists to fill the last batch; removed before the batch is handed out


def check_batch(num_samples: int, global_batch: int, world_size: int, where: str = "--batch-size") -> int:
    """The per-rank batch size; UserError when the global batch cannot be split or is too large."""
    if global_batch <= 0 or world_size <= 0:
        raise UserError(f"{where}: batch size {global_batch} and world size {world_size} must be positive")
    if global_batch % world_size:
        raise UserError(f"{where}: global batch {global_batch} is not divisible by {world_size} ranks")
    if num_samples < global_batch:
        raise UserError(f"{where}: global batch {global_batch} is larger than the {num_samples} samples "
                        "in the shards (every epoch would be empty)")
    return global_batch // world_size


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(num_samples).astype(np.int64)


def epoch_share(num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                epoch: int) -> np.ndarray:
    """This rank's sample ids for `epoch`, in reading order (len = steps * global_batch / world_size)."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank}: outside 0..{world_size - 1}")
    check_batch(num_samples, global_batch, world_size)
    kept = steps_per_epoch(num_samples, global_batch) * global_batch
    return epoch_permutation(num_samples, seed, epoch)[:kept][rank::world_size]


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Whole global batches only (drop-last): every rank takes the same number of steps."""
    return num_samples // global_batch


def eval_share(num_samples: int, local_batch: int, rank: int, world_size: int) -> np.ndarray:
    """Ids r, r + W, ... in increasing order, padded with PAD_ID to the same whole number of local
    batches on every rank."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank}: outside 0..{world_size - 1}")
    longest = -(-num_samples // world_size)
    padded = max(1, -(-longest // local_batch)) * local_batch
    ids = np.full(padded, PAD_ID, np.int64)
    mine = np.arange(rank, num_samples, world_size, dtype=np.int64)
    ids[:len(mine)] = mine
    return ids
