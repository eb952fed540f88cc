import json

import pytest

from clim_fast.config import PRESETS, Config, make_config, parse_overrides
from shards.errors import UserError


def test_defaults_are_the_seed_settings():
    cfg = make_config("moco_v2")
    assert (cfg.arch, cfg.queue_size, cfg.ema_momentum, cfg.temperature) == ("resnet50", 65536, 0.999, 0.2)
    assert (cfg.batch_size, cfg.weight_decay, cfg.momentum) == (512, 1e-4, 0.9)
    assert cfg.lr == pytest.approx(0.06)
    assert (cfg.clusters, cfg.knn_k, cfg.mine_every, cfg.alpha) == (10000, 40, 5, 2.0)


def test_presets():
    assert set(PRESETS) == {"moco_v2", "clim", "clim_multires", "clim_mixup"}
    assert make_config("moco_v2").mix == "none"
    assert make_config("clim").mix == "cutmix"
    multires = make_config("clim_multires", {"image_size": 64})
    assert multires.multires_sizes == (55, 46, 37, 27)
    assert make_config("clim_multires").multires_sizes == (192, 160, 128, 96)
    mixup = make_config("clim_mixup")
    assert (mixup.mix, mixup.alpha) == ("mixup", 0.2)


def test_overrides_are_typed():
    over = parse_overrides(["epochs=3", "alpha=0.5", "multires=true", "mix=mixup", "arch=resnet18"])
    assert over == {"epochs": 3, "alpha": 0.5, "multires": True, "mix": "mixup", "arch": "resnet18"}
    cfg = make_config("clim", over)
    assert cfg.epochs == 3 and cfg.mix == "mixup" and cfg.multires


@pytest.mark.parametrize("bad", ["nokey=1", "epochs=three", "multires=maybe", "epochs"])
def test_bad_overrides_name_the_option(bad):
    with pytest.raises(UserError, match=bad.split("=")[0]):
        parse_overrides([bad])


def test_bad_values_and_presets():
    with pytest.raises(UserError, match="mix"):
        make_config("clim", {"mix": "blend"})
    with pytest.raises(UserError, match="--preset"):
        make_config("simclr")
    with pytest.raises(UserError, match="hw_decoder_load"):
        make_config("clim", {"hw_decoder_load": 1.5})
    with pytest.raises(UserError, match="precision"):
        make_config("clim", {"precision": "fp8"})


def test_save_load_round_trip(tmp_path):
    cfg = make_config("clim_multires", {"epochs": 7, "seed": 3})
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "clim_multires"
