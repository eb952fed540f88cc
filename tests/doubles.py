"""Synthetic training data shaped exactly like dali_pipelines.PretrainLoader's output.

Images are a per-class random pattern plus per-view noise, so contrastive training on them has
something to learn; everything is a pure function of (seed, epoch, rank, batch index), which makes
resumed runs reproducible. `label_table` (same-label positives) also stands in for a mined table
in bench/train_step.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dali_pipelines.epochs import epoch_share
from shards.neighbours import NeighbourTable


class SyntheticPretrainLoader:
    def __init__(self, num_samples: int, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), seed: int = 0, multires_sizes=(), table: NeighbourTable | None = None,
                 dtype=torch.float32, num_classes: int = 4, noise: float = 0.5):
        self.num_samples, self.batch_size, self.image_size = num_samples, batch_size, image_size
        self.rank, self.world_size, self.device, self.seed = rank, world_size, torch.device(device), seed
        self.multires_sizes, self.dtype, self.noise = tuple(multires_sizes), dtype, noise
        self.labels = np.arange(num_samples) % num_classes
        g = torch.Generator().manual_seed(seed + 12345)
        self.prototypes = torch.randn(num_classes, 3, image_size, image_size, generator=g)
        self._pending_table, self._table, self._epoch, self._start = table, table, 0, 0

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch, self._table, self._start = epoch, self._pending_table, start_step

    def set_table(self, table: NeighbourTable | None) -> None:
        self._pending_table = table

    def _views(self, ids: np.ndarray, g: torch.Generator) -> torch.Tensor:
        base = self.prototypes[torch.from_numpy(self.labels[ids])]
        return base + self.noise * torch.randn(base.shape, generator=g)

    def __iter__(self):
        ids = epoch_share(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, self._epoch)
        local = self.batch_size // self.world_size
        for b in range(self._start, len(self)):
            batch_ids = ids[b * local:(b + 1) * local]
            g = torch.Generator().manual_seed(hash((self.seed, self._epoch, self.rank, b)) % 2**62)
            out = {"q": self._views(batch_ids, g), "k": self._views(batch_ids, g),
                   "id": torch.from_numpy(batch_ids), "label": torch.from_numpy(self.labels[batch_ids])}
            if self._table is not None:
                t = self._table
                pick = torch.randint(0, 2**31, (len(batch_ids),), generator=g).numpy() % t.counts[batch_ids]
                pos_ids = t.positives[batch_ids, pick].astype(np.int64)
                out.update(pos=self._views(pos_ids, g), k_pos=self._views(pos_ids, g), pos_id=torch.from_numpy(pos_ids))
                for s in self.multires_sizes:
                    out[f"q_r{s}"] = F.interpolate(out["q"], size=(s, s), mode="bilinear", align_corners=False)
                    out[f"pos_r{s}"] = F.interpolate(out["pos"], size=(s, s), mode="bilinear", align_corners=False)
            yield {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                   for k, v in out.items()}

    def close(self) -> None:
        pass


def label_table(labels: np.ndarray, k: int = 4, seed: int = 0, dataset_id: str = "synthetic") -> NeighbourTable:
    """A neighbour table whose positives are random samples of the same label."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    positives = np.full((n, k), -1, dtype=np.int32)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        for i in members:
            others = members[members != i]
            positives[i, : min(k, len(others))] = rng.choice(others, size=min(k, len(others)), replace=False)
    counts = (positives >= 0).sum(1).astype(np.int32)
    return NeighbourTable(positives, counts, labels.astype(np.int32), {"dataset_id": dataset_id, "k": k})


class SyntheticData:
    """Stands in for a shard set in run_training (training.loop.ShardData): loaders, dataset
    identity, and mining rounds that hand out same-label tables."""

    def __init__(self, num_samples: int = 64, num_classes: int = 4, seed: int = 0):
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed
        self.dataset_id = f"synthetic-{num_samples}-{num_classes}-{seed}"

    def loader(self, cfg, rank: int, world_size: int, device, table_changes=None):
        return SyntheticPretrainLoader(self.num_samples, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                       rank=rank, world_size=world_size, device=device, seed=cfg.seed,
                                       multires_sizes=cfg.multires_sizes, num_classes=self.num_classes)

    def mining(self, cfg, run_dir, device):
        return _LabelMining(self, cfg, Path(run_dir))


class _LabelMining:
    def __init__(self, data: SyntheticData, cfg, run_dir: Path):
        self.data, self.cfg, self.run_dir = data, cfg, run_dir

    def __call__(self, model, epoch: int):
        import torch.distributed as tdist

        from clim_fast import distributed as dist
        from clim_fast.run_folder import table_path

        labels = np.arange(self.data.num_samples) % self.data.num_classes
        table = label_table(labels, seed=self.cfg.seed + epoch, dataset_id=self.data.dataset_id)
        path = table_path(self.run_dir, epoch)
        if dist.get_rank() == 0:
            table.save(path)
        if dist.is_distributed():
            tdist.barrier()
        return table, path, {"kind": "mine", "epoch": epoch, "table": str(path)}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FirstWorkerDies:
    """Wraps a batch source: the first DALI worker to unpickle it exits, as a worker killed while
    its pool starts (a marker file decides which one)."""

    def __init__(self, inner, marker: str):
        self.inner, self.marker, self.columns = inner, marker, inner.columns

    def __setstate__(self, state):
        import os

        self.__dict__.update(state)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(3)

    def __call__(self, batch_index):
        return self.inner(batch_index)
