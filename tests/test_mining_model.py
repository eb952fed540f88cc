"""Mining with the real pieces: features from FeatureLoader + MoCo, online rounds, `clim-fast mine`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clim_fast.training.checkpoint import save_checkpoint
from clim_fast.config import make_config
from shards.errors import UserError
from clim_fast.features import extract_features, momentum_features
from clim_fast.mining.engine import mine_table
from clim_fast.mining.rounds import OnlineMining
from clim_fast.method.moco import MoCo
from shards import ShardDataset
from shards.neighbours import NeighbourTable

CPU = torch.device("cpu")


def tiny_config(**kw):
    values = dict(arch="resnet18", image_size=32, queue_size=256, batch_size=16, workers=0, dali_threads=1,
                  clusters=8, knn_k=5, seed=0)
    values.update(kw)
    return make_config("clim", values)


def tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    return MoCo(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint({"model": tiny_model(cfg).state_dict(), "config": cfg.to_dict(), "epoch": 3}, path)
    return path


def _loader(shard_dir, cfg, batch_size=16):
    from dali_pipelines import FeatureLoader

    return FeatureLoader(ShardDataset(shard_dir), batch_size=batch_size, image_size=cfg.image_size, workers=0, threads=1)


def features(shard_dir, cfg, model, batch_size=16, kind="backbone"):
    loader = _loader(shard_dir, cfg, batch_size)
    try:
        return extract_features(momentum_features(model, kind), loader, loader.num_samples)
    finally:
        loader.close()


@pytest.fixture(scope="module")
def photo_features(shard_dir):
    cfg = tiny_config()
    model = tiny_model(cfg)
    return cfg, model, features(shard_dir, cfg, model, batch_size=16)


def test_extract_features_id_order_and_labels(shard_dir, photo_features):
    from shards import ShardDataset

    cfg, model, (feats, labels) = photo_features
    assert feats.shape == (48, 512) and feats.dtype == torch.float32
    np.testing.assert_array_equal(labels, ShardDataset(shard_dir).labels)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(48))
    # row i is sample i: encode a few samples directly and compare
    loader_batch = next(iter(_loader(shard_dir, cfg)))
    direct = momentum_features(model, "backbone")(loader_batch["image"][:4])
    torch.testing.assert_close(feats[loader_batch["id"][:4]], direct, atol=1e-4, rtol=0)


class ShuffledLoader:
    """A rank share delivered out of order: placement must go by `id`."""

    def __init__(self, n, ids):
        self.n, self.ids = n, ids

    def __iter__(self):
        for chunk in np.array_split(self.ids, 3):
            ids = torch.from_numpy(chunk)
            yield {"image": ids[:, None].float().repeat(1, 4), "id": ids, "label": ids % 3}


def test_extract_features_places_rows_by_id_and_checks_coverage():
    ids = np.random.default_rng(0).permutation(20)
    feats, labels = extract_features(lambda x: x + 1, ShuffledLoader(20, ids), 20)
    np.testing.assert_array_equal(labels, np.arange(20) % 3)
    torch.testing.assert_close(feats, torch.full((20, 4), 0.5))  # (id+1) repeated, normalised
    with pytest.raises(RuntimeError, match="exactly once"):
        extract_features(lambda x: x, ShuffledLoader(20, ids[:-1]), 20)


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        share = np.arange(rank, 21, world)[::-1].copy()  # unequal shares (11 and 10), out of order
        feats, labels = extract_features(lambda x: x + 1, ShuffledLoader(21, share), 21)
        torch.save({"feats": feats, "labels": torch.from_numpy(labels)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_extract_features_gathers_rank_shares(tmp_path):
    from clim_fast.distributed import free_port

    torch.multiprocessing.start_processes(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                          start_method="fork")  # fork: no re-import, a second not ten
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["feats"], torch.full((21, 4), 0.5))
        np.testing.assert_array_equal(got["labels"].numpy(), np.arange(21) % 3)


def test_label_purity_above_chance_on_photos(photo_features):
    _, _, (feats, labels) = photo_features
    _, stats = mine_table(feats, clusters=6, k=5, labels=labels)
    assert stats["label_chance"] == pytest.approx(0.25)
    assert stats["label_purity"] > 0.5, stats


ORIGIN = ("dataset_id", "num_samples", "epoch", "feature", "arch", "image_size", "seed")  # a mined table's meta


def test_refresh_changes_the_positives_the_pipeline_serves(shard_dir, tmp_path):
    from dali_pipelines import PretrainLoader
    from shards import ShardDataset

    cfg = tiny_config(clusters=10000, knn_k=40)  # clamped to 12 clusters
    run = tmp_path / "run"
    run.mkdir()
    mining = OnlineMining(cfg, ShardDataset(shard_dir), run, CPU)
    table1, path1, record1 = mining(tiny_model(cfg, seed=1), 1)
    table2, path2, record2 = mining(tiny_model(cfg, seed=2), 2)  # the same feature loader, reused
    mining.close()
    assert path1.name == "table-epoch-0001.npz" and path2.name == "table-epoch-0002.npz"
    for table, path in ((table1, path1), (table2, path2)):
        saved = NeighbourTable.load(path)
        np.testing.assert_array_equal(saved.positives, table.positives)
        saved.check_matches(ShardDataset(shard_dir).dataset_id, 48)
        assert saved.meta["clusters"] == 12 and saved.meta["k"] == 40 and saved.meta["warnings"]
        assert {key: saved.meta[key] for key in ORIGIN} == dict(
            dataset_id=ShardDataset(shard_dir).dataset_id, num_samples=48, epoch=saved.meta["epoch"],
            feature=cfg.mine_feature, arch=cfg.arch, image_size=cfg.image_size, seed=cfg.seed + saved.meta["epoch"])
    assert not np.array_equal(table1.positives, table2.positives)
    assert [(r["kind"], r["epoch"]) for r in (record1, record2)] == [("mine", 1), ("mine", 2)]
    for part in ("feature_s", "kmeans_s", "knn_s", "select_s", "exchange_s"):
        assert record2[part] >= 0, part

    loader = PretrainLoader(ShardDataset(shard_dir), batch_size=16, image_size=32, workers=0, threads=1, table=table1)
    try:
        served = {}
        for epoch, table in ((1, table1), (2, table2)):
            loader.set_table(table)
            loader.set_epoch(epoch)
            for batch in loader:
                for a, p in zip(batch["id"].tolist(), batch["pos_id"].tolist()):
                    row = table.positives[a, :table.counts[a]]
                    assert p in row, (epoch, a, p, row)
                    served[(epoch, a)] = p
        moved = [a for (e, a), p in served.items() if e == 2 and p not in table1.positives[a]]
        assert moved  # some anchors now get positives the old table could not have served
    finally:
        loader.close()


def test_mine_command_writes_a_matching_table(shard_dir, checkpoint, tmp_path):
    from cli.app import app
    from shards import ShardDataset

    out = tmp_path / "table.npz"
    result = CliRunner().invoke(app, ["mine", "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                                      "--out", str(out), "--clusters", "6", "--k", "5", "--engine", "torch",
                                      "--feature", "backbone", "--batch-size", "16", "--workers", "0"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    table = NeighbourTable.load(out)
    table.check_matches(ShardDataset(shard_dir).dataset_id, 48)
    assert table.meta["epoch"] == 3 and table.meta["feature"] == "backbone" and table.meta["checkpoint"] == str(checkpoint)
    assert set(ORIGIN) <= set(table.meta) and table.meta["seed"] == 3 + tiny_config().seed  # as an online round's
    assert stats["clusters"] == 6 and stats["k"] == 5 and stats["engine"] == "torch"
    assert table.positives.shape == (48, 5)
    assert "features: 48/48 (" in result.stderr and "ETA" in result.stderr  # the feature pass's progress line


def test_mine_command_takes_clusters_and_k_from_the_checkpoint(shard_dir, checkpoint, tmp_path):
    from cli.app import app

    out = tmp_path / "table.npz"
    result = CliRunner().invoke(app, ["mine", "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                                      "--out", str(out), "--engine", "torch", "--batch-size", "16", "--workers", "0"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert (stats["clusters"], stats["k"]) == (8, 5)  # the checkpoint's config (tiny_config), not 10000 / 40


def _invoke_error(args) -> str:
    from cli.app import app

    result = CliRunner().invoke(app, ["mine", *args])
    assert isinstance(result.exception, UserError), result.output
    return str(result.exception)


def test_mine_command_errors(shard_dir, checkpoint, tmp_path):
    base = ["--shards", str(shard_dir), "--out", str(tmp_path / "t.npz"), "--workers", "0"]
    assert "--clusters 49" in _invoke_error(["--checkpoint", str(checkpoint), "--clusters", "49", *base])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert "bad.pt" in _invoke_error(["--checkpoint", str(bad), *base])
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["arch"] = "resnet34"  # resnet18 weights under a resnet34 config
    other = tmp_path / "other.pt"
    save_checkpoint(ckpt, other)
    assert "does not match" in _invoke_error(["--checkpoint", str(other), *base])
    assert "--engine" in _invoke_error(["--checkpoint", str(checkpoint), "--engine", "gpu", *base])
    assert not (tmp_path / "t.npz").exists()


def _refresh_worker(rank, world, port, shard_dir, out, fail_on_rank0):
    import torch.distributed as dist

    import clim_fast.mining.rounds as rounds

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if fail_on_rank0 and rank == 0:
            def broken(*args, **kwargs):
                raise ValueError("injected failure")
            rounds.encode_share = broken  # rank 0's feature pass fails
        cfg = tiny_config()
        try:
            table, _, _ = OnlineMining(cfg, ShardDataset(shard_dir), out, CPU)(tiny_model(cfg), 0)
            np.save(f"{out}/rank{rank}.npy", table.positives)
        except Exception as e:
            (out / f"rank{rank}.err").write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_on_rank0", [False, True])
def test_two_ranks_mine_the_single_process_table_or_fail_on_both(shard_dir, tmp_path, fail_on_rank0):
    from clim_fast.distributed import free_port

    # spawn, not fork: a child forked from a process that already ran DALI pipelines can deadlock
    torch.multiprocessing.start_processes(_refresh_worker, args=(2, free_port(), shard_dir, tmp_path, fail_on_rank0),
                                          nprocs=2, start_method="spawn")
    if fail_on_rank0:  # rank 1 must not be left waiting for a table that never comes
        assert "injected failure" in (tmp_path / "rank0.err").read_text()
        assert "rank 0" in (tmp_path / "rank1.err").read_text()
        return
    cfg = tiny_config()
    single, _, _ = OnlineMining(cfg, ShardDataset(shard_dir), tmp_path / "single", CPU)(tiny_model(cfg), 0)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), single.positives)


def test_a_table_that_cannot_be_written_fails_at_the_next_flush(shard_dir, tmp_path):
    """Rank 0 writes the table in the background; a failure there is not lost: flush() raises it."""
    cfg = tiny_config()
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run folder should be")
    mining = OnlineMining(cfg, ShardDataset(shard_dir), blocked, CPU)
    table, path, _ = mining(tiny_model(cfg), 0)
    assert table.num_samples == 48
    with pytest.raises(OSError):
        mining.flush()
    mining.flush()  # raised once, then clear
    mining.close()
