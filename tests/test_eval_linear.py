"""The linear protocol on separable features, with a frozen backbone that has BatchNorm."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from clim_fast.evaluation.linear import default_milestones, linear_eval, module_checksum


class ListLoader:
    """A re-iterable list of batches, reshuffled per epoch like the DALI train graph."""

    def __init__(self, x, y, batch_size, shuffle):
        self.x, self.y, self.batch_size, self.shuffle, self.epoch = x, y, batch_size, shuffle, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch)) \
            if self.shuffle else torch.arange(len(self.y))
        for s in range(0, len(order), self.batch_size):
            i = order[s:s + self.batch_size]
            yield {"image": self.x[i], "label": self.y[i]}


def _separable(n_per_class, classes, dim, seed):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + 0.5 * rng.normal(size=(y.size, dim))
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 1, dim), torch.tensor(y)


def _frozen_backbone(dim):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
    with torch.no_grad():  # non-trivial running stats: train mode would visibly move them
        net[2].running_mean.normal_()
        net[2].running_var.uniform_(0.5, 2.0)
    return net


def test_linear_eval_separable_features_high_accuracy_backbone_unchanged():
    dim, classes = 16, 5
    x_train, y_train = _separable(40, classes, dim, seed=0)
    x_val, y_val = _separable(20, classes, dim, seed=0)  # same centres, fresh noise below
    x_val = x_val + 0.3 * torch.randn(x_val.shape, generator=torch.Generator().manual_seed(1))
    backbone = _frozen_backbone(dim)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()  # linear_eval must put it in eval mode itself

    metrics = linear_eval(backbone, dim, classes, ListLoader(x_train, y_train, 32, True),
                          ListLoader(x_val, y_val, 64, False), epochs=10, device="cpu", log=None)

    assert metrics["top1"] >= 95.0
    assert metrics["top5"] == 100.0
    assert metrics["val_samples"] == 100
    assert metrics["backbone_unchanged"] is True
    assert metrics["milestones"] == [6, 8]
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_checksum_sees_batchnorm_statistics():
    backbone = _frozen_backbone(8)
    before = module_checksum(backbone)
    backbone.train()
    backbone(torch.randn(4, 1, 1, 8))  # a train-mode forward updates BN running stats
    assert module_checksum(backbone) != before


def test_default_milestones_scale_with_epochs():
    assert default_milestones(100) == (60, 80)
    assert default_milestones(10) == (6, 8)
    assert default_milestones(1) == (1,)
