"""`clim-fast demo --budget tiny`: embedded data -> shards -> MoCo v2 and CLIM (2 seeds) -> eval -> report."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from clim_fast.config import Config
from clim_fast.demo.digits import split_per_class, write_demo_folders
from clim_fast.demo.progress import DemoProgress
from clim_fast.demo.run import BUDGETS, compare, epoch_losses, mean_std, train_config
from clim_fast.method.backbone import build_backbone, resnet
from shards.errors import UserError


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


def test_budgets_are_config_overrides():
    names = {f.name for f in dataclasses.fields(Config)}
    for name, budget in BUDGETS.items():
        assert set(budget.config) <= names, name
        cfg = train_config("clim", budget, seed=3, overrides={"width": 24})
        assert cfg.seed == 3 and cfg.width == 24 and cfg.mix == "cutmix"
        assert all(getattr(cfg, k) == v for k, v in budget.config.items() if k != "width")
    assert BUDGETS["gpu"].seeds == 3
    with pytest.raises(UserError, match="unknown"):
        train_config("moco_v2", BUDGETS["tiny"], 0, {"no_such_field": 1})
    # epochs cut below the first mining epoch still mine once
    assert train_config("clim", BUDGETS["cpu"], 0, {"epochs": 2}).clim_start_epoch == 1


def test_width_scales_the_resnet_and_keeps_torchvision_names():
    torch.manual_seed(0)
    standard, dim = build_backbone("resnet18", 224)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    assert dim == 512 and all(torch.equal(a, b) for a, b in zip(standard.state_dict().values(),
                                                                 reference.state_dict().values()))
    narrow, dim = build_backbone("resnet18", 32, width=16)
    assert dim == 128 and narrow(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert set(narrow.state_dict()) == set(reference.state_dict()) - {"fc.weight", "fc.bias"}
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in standard.parameters()) / 10
    wide, dim = build_backbone("resnet50", 128, width=32)
    assert dim == 1024
    missing = resnet("resnet50", width=32).load_state_dict(wide.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    with pytest.raises(UserError, match="positive"):
        Config(width=0)


def test_seed_statistics_and_the_spread_verdict():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, 0.0)
    a = [{"m": 80.0}, {"m": 81.0}, {"m": 79.0}]
    clear = compare(a, [{"m": 85.0}, {"m": 86.2}, {"m": 84.1}], "m")
    assert clear["difference"] == pytest.approx(5.1) and clear["exceeds_spread"] is True
    lo, hi = clear["ci95"]
    assert 0 < lo < 5.1 < hi
    noisy = compare(a, [{"m": 84.0}, {"m": 78.0}, {"m": 80.0}], "m")
    assert noisy["exceeds_spread"] is False and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    one = compare(a[:1], [{"m": 90.0}], "m")
    assert one["difference"] == 10.0 and one["exceeds_spread"] is None


def test_epoch_losses_average_the_anchor_term_per_epoch():
    rows = [{"kind": "step", "epoch": 0, "loss": 9.0, "loss_moco": 5.0}, {"kind": "step", "epoch": 0, "loss_moco": 4.0},
            {"kind": "epoch", "epoch": 0, "loss": 7.0}, {"kind": "step", "epoch": 1, "loss_moco": 3.0},
            {"kind": "mine", "epoch": 1, "label_purity": 0.5}]
    assert epoch_losses(rows) == [4.5, 3.0]
    assert epoch_losses([{"kind": "epoch", "epoch": 0, "loss": 7.0}]) == [7.0]


def test_plain_progress_lines_have_an_eta():
    stream = io.StringIO()
    progress = DemoProgress(live=False, stream=stream, every_s=0)
    with progress.phase("train moco_v2 (seed 0)", total=10) as ph:
        ph.advance_to(5, "epoch 1/2")
        ph.advance_to(10, "epoch 2/2")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "demo: train moco_v2 (seed 0) ..."
    assert lines[1].startswith("demo: train moco_v2 (seed 0): epoch 1/2 [5/10, ") and "ETA" in lines[1]
    assert lines[-1].startswith("demo: train moco_v2 (seed 0): done in ")


def test_in_a_terminal_a_live_line_per_phase_shows_progress_and_an_eta_with_messages_above():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = DemoProgress(stream=stream)
    assert progress.live
    with progress.phase("train moco_v2 (seed 0)", total=10) as ph:
        progress.log("a message")
        ph.advance_to(10, "epoch 2/2")
    progress.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())  # without the terminal's control codes
    assert "a message\n" in text
    final = [line for line in text.replace("\r", "\n").splitlines() if "(0s)" in line]
    assert final and "train moco_v2 (seed 0) (0s)" in final[-1] and "10/10" in final[-1] and "ETA" in final[-1]
    assert "demo:" not in text  # not the piped form


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--budget", "tiny", "--device", "cpu",
                                      "--seeds", "2", "--set", "width=8"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"report: {(out / 'report.md').resolve()}"
    # piped (not a terminal): plain progress lines per phase, training ones with an ETA
    assert "demo: train clim (seed 1) ..." in result.stderr and "ETA" in result.stderr

    report = (out / "report.md").read_text()
    assert "| moco_v2 |" in report and "| clim |" in report and "| untrained |" in report
    assert "±" in report and "CLIM minus MoCo v2" in report and "seed-to-seed spread" in report
    assert "What this run shows, and what it cannot" in report and "width=8" in report
    for png in ("loss.png", "knn_top1.png", "intra_similarity.png", "tsne_moco_v2.png", "tsne_clim.png"):
        assert Image.open(out / png).format == "PNG", png

    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"] == 90 and summary["data"]["val"] == 30 and summary["seeds"] == 2
    assert summary["config"]["width"] == 8 and summary["knn_k"] == 20
    for name in ("moco_v2", "clim", "random_init"):
        run = summary["runs"].get(name) or summary[name]
        assert [r["seed"] for r in run["per_seed"]] == [0, 1]
        top1 = [r["knn_top1"] for r in run["per_seed"]]
        assert run["knn_top1"]["mean"] == pytest.approx(np.mean(top1))
        assert run["knn_top1"]["std"] == pytest.approx(np.std(top1, ddof=1))
        assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in run["per_seed"])
    for preset in ("moco_v2", "clim"):
        for s, r in enumerate(summary["runs"][preset]["per_seed"]):
            assert len(r["epoch_loss"]) == 2 and r["first_loss"] == r["epoch_loss"][0]
            ckpt = torch.load(out / "runs" / preset / f"seed-{s}" / "checkpoints" / "last.pt", weights_only=True)
            assert ckpt["epoch"] == 2 and ckpt["config"]["preset"] == preset and ckpt["config"]["seed"] == s
            assert ckpt["config"]["image_size"] == 16 and ckpt["config"]["width"] == 8
    diff = summary["clim_minus_moco"]["knn_top1"]
    assert diff["seeds"] == 2 and diff["exceeds_spread"] in (True, False)
    assert diff["difference"] == pytest.approx(summary["runs"]["clim"]["knn_top1"]["mean"]
                                               - summary["runs"]["moco_v2"]["knn_top1"]["mean"])
    # only CLIM mined (once per seed, at epoch 1), each round's purity read from the run's log
    assert not list((out / "runs" / "moco_v2").glob("seed-*/tables/*.npz"))
    for s in (0, 1):
        assert [p.name for p in (out / "runs" / "clim" / f"seed-{s}" / "tables").glob("*.npz")] == \
            ["table-epoch-0001.npz"]
        rounds = summary["runs"]["clim"]["per_seed"][s]["mining"]
        assert [m["epoch"] for m in rounds] == [1] and 0.0 <= rounds[0]["label_purity"] <= 1.0
    assert [m["epoch"] for m in summary["mining"]] == [1]
    assert "| 1 |" in report  # the purity table's row for the round at epoch 1


def test_demo_never_clears_a_folder_that_is_not_a_demos(tmp_path):
    """The demo deletes and rewrites data/, shards/ and runs/ under --out: a folder of other files
    (here someone's data/) is refused before anything is touched; a file as --out is one line."""
    from clim_fast.demo.run import DEMO_MARKER, check_demo_folder, run_demo
    from shards.errors import UserError

    out = tmp_path / "project"
    (out / "data" / "mine").mkdir(parents=True)
    (out / "data" / "mine" / "precious.txt").write_text("keep")
    for fresh in (False, True):
        with pytest.raises(UserError, match=r"holds files that are not an earlier demo's \(data\)"):
            run_demo(out, budget="tiny", device="cpu", fresh=fresh)
    assert (out / "data" / "mine" / "precious.txt").read_text() == "keep"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        run_demo(tmp_path / "afile", budget="tiny", device="cpu")
    with pytest.raises(UserError, match="--data bogus: unknown dataset"):
        run_demo(tmp_path / "new", budget="tiny", device="cpu", data="bogus")
    assert not (tmp_path / "new").exists()  # refused before the folder was made
    (out / DEMO_MARKER).touch()  # an earlier demo's folder: the demo may rewrite it
    check_demo_folder(out)
