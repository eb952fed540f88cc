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
    assert cfg.epochs == 1200


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
    with pytest.raises(UserError, match="compile_mode must be one of default, reduce-overhead"):
        make_config("clim", {"compile_mode": "cudagraphs"})
    with pytest.raises(UserError, match="compile_mode=reduce-overhead needs compile=true"):
        make_config("clim", {"compile_mode": "reduce-overhead"})  # it would do nothing, silently
    assert make_config("clim", {"compile_mode": "reduce-overhead", "compile": True}).compile


def test_save_load_round_trip(tmp_path):
    cfg = make_config("clim_multires", {"epochs": 7, "seed": 3})
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "clim_multires"


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,needle", [
    ("checkpoint_every", 0, "checkpoint_every must be positive, got 0"),  # a ZeroDivisionError after an epoch
    ("feat_dim", 0, "feat_dim must be positive, got 0"),  # a ZeroDivisionError
    ("log_every", 0, "log_every must be positive, got 0"),
    ("shuffle_bn_groups", 0, "shuffle_bn_groups must be positive, got 0"),  # trained as 1 group
    ("alpha", 0.0, "alpha must be positive and finite, got 0.0"),  # refused only after the first mining round
    ("temperature", 0.0, "temperature must be positive and finite, got 0.0"),  # trained on inf logits
    ("temperature", NAN, "temperature must be positive and finite, got nan"),
    ("base_lr", INF, "base_lr must be positive and finite, got inf"),
    ("base_lr", -0.1, "base_lr must be positive and finite, got -0.1"),
    ("ema_momentum", 2.0, "ema_momentum must be in [0, 1], got 2.0"),  # trained without complaint
    ("ema_momentum", NAN, "ema_momentum must be in [0, 1], got nan"),
    ("mix_weight", -1.0, "mix_weight must be finite and >= 0, got -1.0"),
    ("mix_weight", NAN, "mix_weight must be finite and >= 0, got nan"),
    ("weight_decay", INF, "weight_decay must be finite and >= 0, got inf"),
    ("momentum", -0.9, "momentum must be finite and >= 0, got -0.9"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0, got -1"),
    ("clim_start_epoch", -1, "clim_start_epoch must be >= 0, got -1"),
    ("keep_checkpoints", -1, "keep_checkpoints must be >= 0, got -1"),
    ("workers", -1, "workers must be >= 0, got -1"),
    ("seed", -1, "seed must be >= 0, got -1"),  # a numpy ValueError traceback when the first epoch is drawn
    ("dali_threads", 0, "dali_threads must be at least 1, got 0"),
    ("epochs", "3", "epochs must be an integer, got '3'"),
    ("epochs", 2.5, "epochs must be an integer, got 2.5"),
    ("cosine", 1, "cosine must be true or false, got 1"),
])
def test_out_of_range_and_wrong_typed_values_are_refused(field, value, needle):
    with pytest.raises(UserError) as err:
        make_config("clim", {field: value})
    assert str(err.value) == f"config: {needle}"


def test_edge_values_that_mean_something_are_accepted():
    cfg = make_config("clim", dict(keep_checkpoints=0, workers=0, warmup_epochs=0, clim_start_epoch=0, mix_weight=0,
                                   weight_decay=0, momentum=0, ema_momentum=1, dali_threads=1, base_lr=1))
    assert (cfg.keep_checkpoints, cfg.workers, cfg.ema_momentum) == (0, 0, 1.0)
    assert isinstance(cfg.base_lr, float) and isinstance(cfg.mix_weight, float)  # JSON 1 for a float field is 1.0
    make_config("clim", dict(ema_momentum=0.0))


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "config: expected a mapping of config fields, got a list"),  # a TypeError traceback
    ('{"epochs": "3"}', "config: epochs must be an integer, got '3'"),  # a TypeError traceback
    ('{"alpha": null}', "config: alpha must be a number, got None"),
    ('{"temperature": NaN}', "config: temperature must be positive and finite, got nan"),
    ('{"nope": 1}', "config: unknown field(s) nope"),
])
def test_a_bad_config_json_is_one_line_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        Config.load(path)
    assert str(err.value) == f"{path}: {needle}"
