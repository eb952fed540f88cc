"""Online mining during training: which epochs mine, and one round on every rank.

Schedule: positives are used from `clim_start_epoch` on; a round runs at clim_start_epoch +
j * mine_every (with an `init_table`, that table stands in for j = 0).

A round: each rank encodes its share of the samples with the momentum encoder (centre crops,
eval-mode BN), then `sharded.mine_round` (K-means, kNN, selection, table exchange). Rank 0 writes
RUN/tables/table-epoch-XXXX.npz atomically in a background thread while training goes on;
`flush()` waits for it and raises on every rank if it failed (the loop calls it after every epoch:
a checkpoint names the table). The feature loader is built once and reused by every round of the run.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

from clim_fast import distributed as dd
from clim_fast import run_folder
from clim_fast.data import loader_options
from clim_fast.features import agree_width, check_coverage, encode_share, momentum_features
from clim_fast.machine import synchronize
from clim_fast.mining.select import clamp_sizes, format_stats, round_seed, table_origin, table_stats
from clim_fast.mining.sharded import block_search, mine_round
from dali_pipelines import FeatureLoader


# The parts of a round's cost in its log record, up to the first training batch on its table
# (`pickup_s`, added by the loop); `feature_first_batch_s` is inside `feature_s`.
ROUND_PARTS = ("feature_s", "kmeans_s", "knn_s", "select_s", "exchange_s", "pickup_s")
FEATURE_BATCH_PER_RANK = 256  # the feature pass's batch a rank at the least (`clim-fast mine`'s default is 256 in all)


def positives_active(cfg, epoch: int) -> bool:
    return cfg.uses_positives and epoch >= cfg.clim_start_epoch


def is_refresh_epoch(cfg, epoch: int) -> bool:
    """Mining epochs: clim_start_epoch + j * mine_every; with an init table, it replaces j = 0."""
    if not positives_active(cfg, epoch):
        return False
    since = epoch - cfg.clim_start_epoch
    return since % cfg.mine_every == 0 and not (cfg.init_table and since == 0)


def feature_batch_size(cfg, num_samples: int, world_size: int) -> int:
    """The feature pass's global batch: the training batch, or 256 a rank where that is more, but
    not past the data. Eval-mode features do not depend on the batch; a small one only adds cost
    per batch (the default 512 on 16 GPUs is 32 a rank)."""
    return max(cfg.batch_size, min(FEATURE_BATCH_PER_RANK * world_size, num_samples))


class OnlineMining:
    """The mining rounds of one training run (every rank constructs one and calls it together)."""

    def __init__(self, cfg, dataset, run_dir: str | Path, device: torch.device):
        self.cfg, self.dataset, self.run_dir, self.device = cfg, dataset, Path(run_dir), device
        self.rank, self.world = dd.get_rank(), dd.get_world_size()
        self._loader = None
        self._saving: threading.Thread | None = None
        self._save_error: BaseException | None = None

    def loader(self) -> FeatureLoader:
        if self._loader is None:
            batch = feature_batch_size(self.cfg, self.dataset.num_samples, self.world)
            self._loader = FeatureLoader(self.dataset, batch_size=batch, image_size=self.cfg.image_size,
                                         rank=self.rank, world_size=self.world, **loader_options(self.cfg, self.device))
        return self._loader

    def __call__(self, model, epoch: int):
        """One round. Returns (NeighbourTable, its path, the round's log record) on every rank."""
        cfg, n = self.cfg, self.dataset.num_samples
        clusters, k, warnings = clamp_sizes(n, cfg.clusters, cfg.knn_k)
        engine = "faiss" if cfg.mine_engine == "faiss" else "torch"  # auto: torch on any device (unlike offline mining)
        feats, ids, labels, feature_timings = self._features(model)
        table, fallback, nearest, all_labels, timings = mine_round(
            feats.to(self.device), ids, labels, n, clusters=clusters, k=k,
            seed=round_seed(cfg, epoch), search=block_search(engine))
        del feats
        if self.device.type == "cuda":  # hand the search blocks' cache back to training
            torch.cuda.empty_cache()
        table.meta = table_origin(cfg, self.dataset, epoch, checkpoint="", clusters=int(clusters), k=int(k),
                                  engine=engine, world_size=self.world, warnings=warnings)
        stats = table_stats(table, fallback, clusters, all_labels, nearest)
        table.meta["stats"] = stats
        path = run_folder.table_path(self.run_dir, epoch)
        if self.rank == 0:
            self._join()  # the last round's table (its error, if any, waits for the collective flush)
            self._saving = threading.Thread(target=self._save, args=(table, path), name="table-save")
            self._saving.start()
            for w in warnings:
                print(f"mining warning: {w}", file=sys.stderr, flush=True)
            print(f"mined epoch {epoch}: {format_stats(stats)} -> {path}", file=sys.stderr, flush=True)
        record = dict(kind="mine", epoch=int(epoch), table=str(path), engine=engine, **feature_timings, **timings,
                      **stats)
        return table, path, record

    def _features(self, model):
        """The feature pass: this rank's (features, ids, labels or None unless every sample has one,
        timings). A failure on one rank raises on every rank."""
        t0 = time.perf_counter()
        failure, first_batch_s = None, []

        def timed(loader):  # the first batch's wait holds a pipeline build (once per process)
            for batch in loader:
                if not first_batch_s:
                    first_batch_s.append(time.perf_counter() - t0)
                yield batch

        try:
            feats, ids, labels = encode_share(momentum_features(model, self.cfg.mine_feature), timed(self.loader()))
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
        dd.raise_if_any_failed(failure, "mining (feature pass)")
        feats = agree_width(feats)
        check_coverage(ids, self.dataset.num_samples)
        synchronize(self.device)
        timings = dict(feature_s=time.perf_counter() - t0,
                       feature_first_batch_s=first_batch_s[0] if first_batch_s else 0.0)
        has_labels = bool(dd.all_reduce_sum(torch.tensor([int((labels < 0).sum())])).item() == 0)
        return feats, ids, labels if has_labels else None, timings

    def _save(self, table, path: Path) -> None:
        try:
            table.save(path)
        except BaseException as e:  # noqa: BLE001 - raised by flush() in the training thread
            self._save_error = e

    def _join(self) -> None:
        if self._saving is not None:
            self._saving.join()
            self._saving = None

    def flush(self) -> None:
        """Collective: the last round's table is on disk (rank 0); every rank raises if writing it failed."""
        self._join()
        error, self._save_error = self._save_error, None
        dd.raise_if_any_failed(error, "writing the neighbour table")

    def close(self) -> None:
        """Release the feature loader (every rank, also after an error: no collective, nothing raised)."""
        self._join()
        if self._loader is not None:
            self._loader.close()
            self._loader = None
