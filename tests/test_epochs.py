"""The epoch contract (DistributedSampler, drop-last) and the every-id-once evaluation shares."""

import numpy as np
import pytest

from shards.errors import UserError
from dali_pipelines.epochs import PAD_ID, epoch_permutation, epoch_share, eval_share


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_shares_are_disjoint_equal_and_whole_batches(world):
    n, batch = 103, 12
    shares = [epoch_share(n, batch, r, world, seed=3, epoch=5) for r in range(world)]
    assert all(len(s) == (n // batch) * batch // world for s in shares)
    union = np.concatenate(shares)
    assert len(np.unique(union)) == len(union) == (n // batch) * batch
    perm = epoch_permutation(n, 3, 5)
    local = batch // world
    for t in range(n // batch):  # global batch t is one slice of the permutation, split over ranks
        step = np.concatenate([s[t * local:(t + 1) * local] for s in shares])
        assert sorted(step) == sorted(perm[t * batch:(t + 1) * batch])


def test_epoch_share_is_deterministic_and_changes_with_epoch_and_seed():
    a = epoch_share(50, 10, 1, 2, seed=0, epoch=7)
    assert np.array_equal(a, epoch_share(50, 10, 1, 2, seed=0, epoch=7))
    assert not np.array_equal(a, epoch_share(50, 10, 1, 2, seed=0, epoch=8))
    assert not np.array_equal(a, epoch_share(50, 10, 1, 2, seed=1, epoch=7))


def test_epoch_share_rejects_bad_batches():
    with pytest.raises(UserError, match="not divisible"):
        epoch_share(50, 10, 0, 3, seed=0, epoch=0)
    with pytest.raises(UserError, match="larger than"):
        epoch_share(5, 8, 0, 1, seed=0, epoch=0)
    with pytest.raises(UserError, match="rank"):
        epoch_share(50, 10, 2, 2, seed=0, epoch=0)


@pytest.mark.parametrize("n,batch,world", [(48, 8, 1), (47, 8, 2), (10, 4, 3), (2, 8, 4)])
def test_eval_share_visits_every_id_once(n, batch, world):
    shares = [eval_share(n, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % batch == 0
    real = [s[s != PAD_ID] for s in shares]
    for s, r in zip(shares, real):
        assert np.all(np.diff(r) > 0) and np.all(s[len(r):] == PAD_ID)  # ascending, padding trails
    assert sorted(np.concatenate(real)) == list(range(n))
