"""One typed config for pretraining, with presets and `key=value` overrides.

Defaults are the seed's settings (README, "The method"): ResNet-50, queue 65536, momentum 0.999,
temperature 0.2, SGD 0.9 / 1e-4, global batch 512, lr = base_lr * batch / 256 = 0.06, cosine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import typing
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import atomic_write_text
from shards.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
         "resnext50_32x4d", "resnext101_32x8d")  # built by clim_fast/method/backbone.py
MIX_METHODS = ("none", "cutmix", "mixup")
MINE_FEATURES = ("head", "backbone")
MINE_ENGINES = ("auto", "faiss", "torch")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
# torch.compile modes; reduce-overhead (and max-autotune) replay each compiled encoder call as a CUDA graph
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
MULTIRES_AT_224 = (192, 160, 128, 96)


@dataclass
class Config:
    # data
    image_size: int = 224
    batch_size: int = 512  # global, across all ranks
    workers: int = 4  # DALI external-source worker processes per rank
    dali_threads: int = 4  # DALI's CPU threads (Huffman decoding of the JPEGs the hardware decoder leaves)
    hw_decoder_load: float = 0.65  # share of JPEGs for the GPU's hardware decoder (DALI's default)
    cpu_decode: bool = False  # GPU runs: decode on DALI's CPU threads instead (small images), views on the GPU
    cpu_views: bool = False  # GPU runs: decode and cut the views on DALI's CPU threads; only the views go to the GPU
    crop_min_scale: float = 0.2  # RandomResizedCrop lower scale bound (MoCo v2: 0.2)
    # model (MoCo v2)
    arch: str = "resnet50"
    width: int = 64  # channels of the first ResNet stage (torchvision: 64); stages are width x 1/2/4/8
    feat_dim: int = 128
    queue_size: int = 65536
    ema_momentum: float = 0.999
    temperature: float = 0.2
    shuffle_bn: bool = True
    shuffle_bn_groups: int = 4  # one process: BN groups of the shuffled key batch (= GPUs emulated)
    # optimisation
    epochs: int = 1200  # the paper's schedule; 200 for ablations
    base_lr: float = 0.03  # per 256 images: lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    cosine: bool = True
    # CLIM
    mix: str = "none"  # none | cutmix | mixup
    alpha: float = 2.0  # Beta(alpha, alpha) for the mixing ratio
    multires: bool = False
    mix_weight: float = 1.0  # weight of the mixing term next to InfoNCE(q_anchor, k_anchor)
    clim_start_epoch: int = 0  # first epoch that mines positives and mixes
    mine_every: int = 5
    clusters: int = 10000
    knn_k: int = 40
    mine_feature: str = "head"  # head | backbone
    mine_engine: str = "auto"  # auto | faiss | torch
    init_table: str = ""  # a table from `clim-fast mine` to start from (empty: mine online)
    # run
    seed: int = 0
    precision: str = "auto"  # auto (fp16 + loss scaling on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    channels_last: bool = True  # GPU only
    compile: bool = False
    compile_mode: str = "default"  # with compile: default | reduce-overhead (CUDA graphs: small images) | max-autotune...
    checkpoint_every: int = 10  # epochs; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 20  # steps
    tensorboard: bool = False
    preset: str = "moco_v2"

    def __post_init__(self) -> None:
        for name, kind in _field_types().items():  # 1 for a float field is 1.0; numpy scalars are plain
            value = getattr(self, name)
            if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, float(value))
            elif kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, name, int(value))
        self.validate()

    def validate(self) -> None:
        for name, kind in _field_types().items():  # first the types: the range checks below compare numbers
            value = getattr(self, name)
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise UserError(f"config: {name} must be {_TYPE_NAMES[kind]}, got {value!r}")
        if self.arch not in ARCHS:
            raise UserError(f"--arch {self.arch}: unknown architecture; choose from {', '.join(ARCHS)}")
        if self.mix not in MIX_METHODS:
            raise UserError(f"config: mix must be one of {', '.join(MIX_METHODS)}, got {self.mix!r}")
        for name, choices in (("mine_feature", MINE_FEATURES), ("mine_engine", MINE_ENGINES),
                              ("precision", PRECISIONS), ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in choices:
                raise UserError(f"config: {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("image_size", "batch_size", "epochs", "queue_size", "clusters", "knn_k", "mine_every", "width",
                     "feat_dim", "checkpoint_every", "log_every", "shuffle_bn_groups"):
            if getattr(self, name) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)}")
        # keep_checkpoints 0: keep every epoch file (checkpoint.prune_epoch_checkpoints); workers 0: DALI
        # reads in its own process
        for name in ("warmup_epochs", "clim_start_epoch", "keep_checkpoints", "workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        if self.dali_threads < 1:
            raise UserError(f"config: dali_threads must be at least 1, got {self.dali_threads}")
        for name in ("temperature", "alpha", "base_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"config: {name} must be positive and finite, got {value}")
        for name in ("weight_decay", "momentum", "mix_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"config: {name} must be finite and >= 0, got {value}")
        if not 0 <= self.ema_momentum <= 1:  # NaN fails every comparison
            raise UserError(f"config: ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise UserError(f"config: hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if not 0 < self.crop_min_scale <= 1:
            raise UserError(f"config: crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"config: compile_mode={self.compile_mode} needs compile=true (--compile)")
        if self.queue_size % self.batch_size:  # every step replaces one global batch of keys
            raise UserError(f"config: queue_size {self.queue_size} must be a multiple of the global batch_size "
                            f"{self.batch_size}")
        if self.multires and self.mix == "none":
            raise UserError("config: multires needs a mixing method (set mix=cutmix or mix=mixup)")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @property
    def uses_positives(self) -> bool:
        return self.mix != "none"

    @property
    def multires_sizes(self) -> tuple[int, ...]:
        """Extra query resolutions, 192/160/128/96 at 224 px, scaled with image_size."""
        if not self.multires:
            return ()
        return tuple(max(8, round(r * self.image_size / 224)) for r in MULTIRES_AT_224)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """A Config from a mapping of field names to values (a config.json, a checkpoint's config)."""
        if not isinstance(data, dict):
            raise UserError(f"config: expected a mapping of config fields, got a {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - names))
        if unknown:
            raise UserError(f"config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:  # validate checks the types first; this is the safety net
            raise UserError(f"config: not valid ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"{path}: cannot read config ({e})") from None
        try:
            return cls.from_dict(data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None


PRESETS: dict[str, dict] = {
    "moco_v2": dict(mix="none", multires=False),
    "clim": dict(mix="cutmix", alpha=2.0, multires=False),
    "clim_multires": dict(mix="cutmix", alpha=2.0, multires=True),
    "clim_mixup": dict(mix="mixup", alpha=0.2, multires=False),
}


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@functools.cache
def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def parse_value(key: str, text: str):
    """Parse `text` as the type of Config field `key`."""
    types = _field_types()
    if key not in types:
        raise UserError(f"--set {key}=...: unknown config field; known: {', '.join(sorted(types))}")
    kind = types[key]
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected a {kind.__name__}") from None


def parse_overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair}: expected key=value")
        key, text = pair.split("=", 1)
        out[key.strip()] = parse_value(key.strip(), text)
    return out


def make_config(preset: str = "moco_v2", overrides: dict | None = None, *, base: Config | None = None) -> Config:
    """A preset's config (or `base`: a resumed run's), then `overrides` (CLI options and --set
    pairs; a None value leaves its field as it is)."""
    if base is not None:
        values = base.to_dict()
    elif preset in PRESETS:
        values = dict(PRESETS[preset], preset=preset)
    else:
        raise UserError(f"--preset {preset}: unknown preset; choose from {', '.join(PRESETS)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config.from_dict(values)
