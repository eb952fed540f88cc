"""`clim-fast eval ...` on real shards and a real (untrained) checkpoint: JSON lines, caching, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from shards.errors import UserError

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from clim_fast.training.checkpoint import save_checkpoint
    from clim_fast.config import make_config
    from clim_fast.method.moco import MoCo

    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=32, queue_size=64, batch_size=16))
    torch.manual_seed(0)
    model = MoCo(cfg)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "table_path": ""}, path)
    return path


def _run(args):
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    return json.loads(last), result


COMMON = ["--batch-size", "16", "--workers", "0", "--threads", "1", "--device", "cpu"]


def test_knn_held_out_split_then_cached(checkpoint, shard_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "knn", "--checkpoint", str(checkpoint), "--shards", str(shard_dir), "--out", str(out),
            "--k", "5", *COMMON]
    first, res1 = _run(args)
    assert first["split"] == "held-out 1/10 of --shards"
    assert first["test_samples"] == 5 and first["train_samples"] == 43  # ids 0, 10, ..., 40 held out
    assert 0 <= first["top1"] <= first["top5"] <= 100
    cached = list(out.glob("features-*-32px-query.npz"))
    assert len(cached) == 1
    second, res2 = _run(args)
    assert second == first
    assert "features: cached" in res2.stderr
    assert json.loads((out / "knn-last.json").read_text()) == first
    wide, res3 = _run([*args[:-len(COMMON) - 2], "--k", "1000", *COMMON])  # more than the memory bank
    assert wide["k"] == 43 and "using k=43" in res3.stderr
    key, _ = _run([*args, "--encoder", "key"])  # the momentum encoder: its own cached features
    assert len(list(out.glob("features-*-32px-key.npz"))) == 1 and key["k"] == 5


def test_knn_on_itself_with_k1_is_exact(checkpoint, shard_dir, tmp_path):
    """Query = memory bank: each sample's nearest neighbour is itself, so ids and labels stayed aligned
    through DALI, the gather and the cache (`eval knn` refuses --val-shards equal to --shards: a
    user's mistake, this test's tool)."""
    from clim_fast.evaluation.measures import checkpoint_features, knn_classify

    for _ in range(2):  # computed, then from the cache
        feats, labels = checkpoint_features(checkpoint, shard_dir, tmp_path, batch_size=16, workers=0, threads=1,
                                            device="cpu", log=lambda m: None)
        assert knn_classify(feats, labels, feats, labels, k=1)["top1"] == 100.0 and len(labels) == 48
    for command in (["knn", "--k", "1"], ["linear", "--epochs", "1"]):
        with pytest.raises(UserError, match="the same images as --shards"):
            _run(["eval", command[0], "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                  "--val-shards", str(shard_dir), "--out", str(tmp_path), *command[1:], *COMMON])


def test_similarity_and_tsne(checkpoint, shard_dir, tmp_path):
    from shards import ShardDataset

    from clim_fast.evaluation.measures import checkpoint_features, class_similarity

    sim, _ = _run(["eval", "similarity", "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                   "--out", str(tmp_path), *COMMON])
    feats, labels = checkpoint_features(checkpoint, shard_dir, tmp_path, log=lambda m: None)
    np.testing.assert_array_equal(labels, ShardDataset(shard_dir).labels)
    ref = class_similarity(feats, labels)
    assert sim["intra"] == pytest.approx(ref["intra"]) and sim["inter"] == pytest.approx(ref["inter"])
    assert sim["samples"] == 48 and sim["classes"] == 4

    tsne, _ = _run(["eval", "tsne", "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                    "--out", str(tmp_path), "--classes", "3", *COMMON])
    assert (tmp_path / "tsne-last.png").stat().st_size > 1000
    assert len(tsne["classes"]) == 3 and tsne["points"] == 36


def test_linear_protocol_on_shards(checkpoint, shard_dir, val_shard_dir, tmp_path):
    metrics, res = _run(["eval", "linear", "--checkpoint", str(checkpoint), "--shards", str(shard_dir),
                         "--val-shards", str(val_shard_dir), "--out", str(tmp_path), "--epochs", "2", *COMMON])
    assert metrics["backbone_unchanged"] is True
    assert metrics["val_samples"] == 16 and metrics["epochs"] == 2 and metrics["lr"] == 30.0
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert "linear: epoch 2/2" in res.stderr


def test_user_errors(checkpoint, shard_dir, tmp_path):
    with pytest.raises(UserError, match="--val-shards"):
        _run(["eval", "linear", "--checkpoint", str(checkpoint), "--shards", str(shard_dir), *COMMON])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        _run(["eval", "knn", "--checkpoint", str(bad), "--shards", str(shard_dir), "--out", str(tmp_path), *COMMON])
    with pytest.raises(UserError, match="missing.pt"):
        _run(["eval", "similarity", "--checkpoint", str(tmp_path / "missing.pt"), "--shards", str(shard_dir),
              *COMMON])
