"""`clim-fast demo --budget tiny`: embedded data -> shards -> MoCo v2 and CLIM -> eval -> report."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from clim_fast.demo.digits import split_per_class, write_demo_folders


def test_demo_folders_are_rgb_jpeg_class_folders(tmp_path):
    info = write_demo_folders(tmp_path, source="digits", image_size=24, val_fraction=0.25, per_class=8)
    assert info["train"] == 60 and info["val"] == 20 and info["classes"] == 10
    files = sorted((tmp_path / "train").glob("digit-*/*.jpg"))
    assert len(files) == 60 and len(list((tmp_path / "val").glob("digit-*/*.jpg"))) == 20
    img = Image.open(files[0])
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 24)
    assert np.asarray(img).std() > 10  # a digit, not a blank


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, val = split_per_class(labels, 0.2, None, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == 40
    assert np.bincount(labels[val]).tolist() == [2, 2, 2, 2]


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--budget", "tiny", "--device", "cpu",
                                      "--no-reference"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"report: {(out / 'report.md').resolve()}"

    report = (out / "report.md").read_text()
    assert "| moco_v2 |" in report and "| clim |" in report
    assert "What this run shows, and what it cannot" in report
    for png in ("loss.png", "knn_top1.png", "intra_similarity.png", "tsne_moco_v2.png", "tsne_clim.png"):
        assert Image.open(out / png).format == "PNG", png

    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"] == 90 and summary["data"]["val"] == 30
    for preset in ("moco_v2", "clim"):
        run = summary["runs"][preset]
        assert 0 <= run["knn"]["top1"] <= run["knn"]["top5"] <= 100
        assert -1 <= run["similarity"]["inter"] <= 1 and -1 <= run["similarity"]["intra"] <= 1
        ckpt = torch.load(out / "runs" / preset / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["config"]["preset"] == preset
        assert ckpt["config"]["image_size"] == 16 and ckpt["config"]["arch"] == "resnet18"
    # only CLIM mined (once, at epoch 1), and its positives were measured against the labels
    assert not (out / "runs" / "moco_v2" / "tables").exists() or \
        not list((out / "runs" / "moco_v2" / "tables").glob("*.npz"))
    assert [p.name for p in (out / "runs" / "clim" / "tables").glob("*.npz")] == ["table-epoch-0001.npz"]
    assert 0.0 <= summary["mining"]["positive_label_purity"] <= 1.0
