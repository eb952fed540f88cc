"""Training checkpoints: atomic writes, safe loads (weights_only), and `--resume auto`.

A checkpoint is one dict: `model` (MoCo state_dict: both encoders, queue, queue_ptr), `optimizer`,
`config` (dict), `epoch` (completed epochs), `step` (steps done in epoch `epoch`, non-zero only
for a preemption checkpoint), `iteration`, `table_path` (str or ""), `rng` (one entry per rank),
`dataset_id`, `num_samples`, `world_size`, `format`.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import torch

from shards.errors import UserError
from shards.atomic import atomic_write_bytes

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("model", "config", "epoch")
EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


def epoch_checkpoint_name(completed_epochs: int) -> str:
    return f"epoch-{completed_epochs:04d}.pt"


def save_checkpoint(state: dict, *paths: str | Path) -> None:
    """Serialise once, write each path atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buf)
    data = buf.getvalue()
    for path in paths:
        atomic_write_bytes(path, data)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict; UserError naming the file when it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a clim-fast checkpoint (expected keys {', '.join(REQUIRED_KEYS)})")
    return ckpt


def model_from_checkpoint(path: str | Path, map_location="cpu"):
    """(MoCo in eval mode, Config, checkpoint dict)."""
    from clim_fast.config import Config
    from clim_fast.method.moco import MoCo

    ckpt = load_checkpoint(path, map_location)
    cfg = Config.from_dict(ckpt["config"])
    model = MoCo(cfg)
    load_model_state(model, ckpt["model"], path)
    return model.to(map_location).eval(), cfg, ckpt


def load_model_state(model: torch.nn.Module, state: dict, where) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{where}: checkpoint does not match the model ({first[:300]})") from None


def find_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint of a run (last.pt, then epoch-XXXX.pt newest first), or None."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    epochs = sorted((p for p in folder.iterdir() if EPOCH_FILE.match(p.name)),
                    key=lambda p: int(EPOCH_FILE.match(p.name).group(1)), reverse=True)
    candidates = [folder / "last.pt", *epochs]
    found = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except UserError:
            continue  # a torn or foreign file: fall back to an older one
        found.append((path, ckpt))
        break
    return found[0] if found else None


def prune_epoch_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest epoch-XXXX.pt files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    epochs = sorted((p for p in Path(folder).iterdir() if EPOCH_FILE.match(p.name)),
                    key=lambda p: int(EPOCH_FILE.match(p.name).group(1)))
    for old in epochs[:-keep]:
        old.unlink(missing_ok=True)


# RNG state as plain tensors / ints so weights_only loading accepts it.

def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
