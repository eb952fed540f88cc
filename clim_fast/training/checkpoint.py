"""Training checkpoints: atomic writes, safe loads (weights_only), and `--resume auto`.

A checkpoint is one dict: `model` (MoCo state_dict: both encoders, queue, queue_ptr), `optimizer`,
`scaler` (the fp16 loss scale), `config` (dict), the fields of `training.loop.RunState` (`epoch`:
completed epochs, `step`: steps done in epoch `epoch`, non-zero only for a preemption checkpoint,
`iteration`, `table_path`, `loss_sum`, `loss_steps`), `rng` (one entry per rank), `dataset_id`,
`num_samples`, `world_size`, `format` (written for readers outside this package; loads check the
keys they need).
"""

from __future__ import annotations

import io
import random
import re
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from clim_fast import run_folder
from clim_fast.config import Config
from clim_fast.method.moco import MoCo
from shards.errors import UserError
from shards.format import MANIFEST
from shards.atomic import atomic_write_bytes, check_output_file

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("model", "config", "epoch")
RESUME_SEARCHES = ("auto", "fresh")  # --resume values that search RUN (any other value is a checkpoint path)


def save_checkpoint(state: dict, *paths: str | Path) -> None:
    """Serialise once, write each path atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buf)
    data = buf.getvalue()
    for path in paths:
        atomic_write_bytes(path, data)


def snapshot(state):
    """A copy of `state` (nested dicts, lists, tuples) with every tensor copied to the CPU: what a
    checkpoint holds at this moment, while training goes on changing the originals in place."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return state


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, so the loop waits only for the
    snapshot (`snapshot`: tensors copied to the CPU) and not for serialising and fsyncing a few
    hundred MB (0.9-2.1 s against 0.19-0.20 s for an RN50 clim_multires checkpoint on a 2-core CPU,
    `bench/checkpoint.py`).

        failed = writer.write(snapshot(state), path, ..., then=prune)  # the earlier write's error, or None
        failed = writer.wait()                                         # the last write's error, or None

    A write always starts, whatever became of the one before (a preemption checkpoint must not be
    lost to an earlier failure); the caller decides what an error means (the loop raises it on every
    rank). A failing `then` (pruning old files) only warns: the checkpoint itself is written.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, state: dict, *paths: str | Path, then=None) -> BaseException | None:
        failed = self.wait()
        self._thread = threading.Thread(target=self._write, args=(state, paths, then), name="checkpoint-write")
        self._thread.start()
        return failed

    def _write(self, state, paths, then) -> None:
        try:
            save_checkpoint(state, *paths)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e
            return
        if then is not None:
            try:
                then()
            except Exception as e:  # noqa: BLE001
                print(f"warning: checkpoint written, but {e}", file=sys.stderr, flush=True)

    def wait(self) -> BaseException | None:
        """Wait for the last write; its error (once), or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict; UserError naming the file when it is missing, corrupt or foreign."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says enough
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...
        raise UserError(f"{path}: {_load_failure(e)}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = "; it holds only weights, like the backbone `clim-fast export` writes: pass a training checkpoint"
        raise UserError(f"{path}: not a clim-fast checkpoint (expected keys {', '.join(REQUIRED_KEYS)}){hint}")
    problem = _shape_problem(ckpt)
    if problem:
        raise UserError(f"{path}: not a clim-fast checkpoint ({problem})")
    return ckpt


def _shape_problem(ckpt: dict) -> str | None:
    """What is wrong with the types of the entries every reader uses, or None."""
    model, config, epoch = ckpt["model"], ckpt["config"], ckpt["epoch"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return f"its model is a {type(model).__name__}, not a state_dict of named tensors"
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        return f"its config is a {type(config).__name__}, not a mapping of config fields"
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"its epoch is {epoch!r}, not a count of epochs"
    return None


_UNSAFE_GLOBAL = re.compile(r"(?:GLOBAL|global:?)\s+([A-Za-z_][\w.]*)")


def _load_failure(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. A refused pickle gets our own
    words: torch's message suggests weights_only=False, which would run whatever the file holds."""
    text = str(e)
    if "weights only load failed" in text.lower():
        found = _UNSAFE_GLOBAL.search(text)
        what = f" (it references {found.group(1)})" if found else ""
        return ("refused for safety: the file contains objects other than tensors and plain values"
                f"{what}, which could run code when loaded; clim-fast loads only checkpoints made of tensors")
    if "zip archive" in text or "central directory" in text:
        return "not a readable checkpoint (truncated or corrupt: not a complete zip archive)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a readable checkpoint ({type(e).__name__}{': ' + first[:200] if first else ''})"


def model_from_checkpoint(path: str | Path, map_location="cpu"):
    """(MoCo in eval mode, Config, checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    cfg = config_of(ckpt, path)
    model = MoCo(cfg)
    load_model_state(model, ckpt["model"], path)
    return model.to(map_location).eval(), cfg, ckpt


def config_of(ckpt: dict, where) -> Config:
    """The Config a loaded checkpoint was trained with; a config this clim-fast cannot use (an
    unknown field, a value of the wrong type or range) is a one-line error naming the file."""
    try:
        return Config.from_dict(ckpt["config"])
    except UserError as e:
        raise UserError(f"{where}: the checkpoint's {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: the checkpoint's config is not valid ({type(e).__name__}: {e})") from None


def load_model_state(model: torch.nn.Module, state: dict, where) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # torch's first line is only "Error(s) in loading state_dict for MoCo:"; the next one says which
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) or (lines[0] if lines else type(e).__name__)
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise UserError(f"{where}: checkpoint does not match the model its config describes ({detail})") from None


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run, newest first: last.pt, then epoch-XXXX.pt by epoch, descending."""
    return [p for p in (run_folder.last_checkpoint(run_dir), *reversed(run_folder.epoch_checkpoints(run_dir)))
            if p.exists()]


def find_resume_checkpoint(run_dir: str | Path, *, allow_broken: bool = False,
                           warn=None) -> tuple[Path, dict] | None:
    """`--resume auto`: (path, checkpoint) of the newest loadable checkpoint of RUN.

    Each newer file that does not load is skipped with a one-line warning (`warn`, default: stderr)
    naming it and why. None when RUN has no checkpoint files at all (a fresh start). When there are
    checkpoint files but none loads, a UserError naming them (nothing is overwritten), unless
    `allow_broken` (the user asked to start over: warnings, then None).
    """
    if warn is None:
        def warn(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    files = checkpoint_files(run_dir)
    if not files:
        return None
    problems = []
    for path in files:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            reason = str(e)
            reason = reason[len(f"{path}: "):] if reason.startswith(f"{path}: ") else reason
            problems.append((path, reason))
            warn(f"warning: --resume auto: skipping {path}: {reason}")
    if allow_broken:
        return None
    names = ", ".join(p.name for p, _ in problems)
    raise UserError(f"{run_folder.checkpoint_folder(run_dir)}: none of its {len(problems)} checkpoint file(s) loads "
                    f"({names}); nothing was overwritten. To start over, move them away or pass --resume fresh")


def resumed_config(resume, run_dir: str | Path) -> Config | None:
    """The config a resumed run starts from (explicit options then apply): RUN/config.json, the
    run's latest; where RUN has none, the checkpoint's own. None where nothing loads (a fresh start,
    or an error that the resume itself reports)."""
    saved = run_folder.config_path(run_dir)
    if saved.is_file():
        return Config.load(saved)
    if str(resume) in RESUME_SEARCHES:
        found = find_resume_checkpoint(run_dir, allow_broken=True, warn=lambda message: None)
    else:
        found = (Path(resume), load_checkpoint(resume))
    return None if found is None else config_of(found[1], found[0])


def check_result_file(path: str | Path, option: str, *inputs) -> None:
    """Before a command computes a result file (a table, an exported backbone, a figure): refuse
    what `shards.atomic.check_output_file` refuses, with `inputs` (e.g. the --checkpoint), and a
    file in a run's checkpoints/ folder (`--resume auto` reads every .pt there)."""
    check_output_file(path, option, inputs=inputs)
    folder = Path(path).parent
    if run_folder.is_checkpoint_folder(folder):
        raise UserError(f"{option} {path}: inside the training run's checkpoint folder {folder}; choose another place")


def check_fresh_run_folder(run_dir: str | Path) -> None:
    """A fresh start (no --resume) writes run_folder.ENTRIES into RUN.
    Refuse a RUN that already holds any of them (an earlier run: its checkpoints would be overwritten
    and its log mixed with the new one) or a shard folder, before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    if (run_dir / MANIFEST).exists():
        raise UserError(f"--out {run_dir}: is a shard folder; choose another folder for the run")
    found = [name for name in run_folder.ENTRIES if (run_dir / name).exists()
             and not ((run_dir / name).is_dir() and not any((run_dir / name).iterdir()))]
    if found:
        raise UserError(f"--out {run_dir}: holds an earlier run ({', '.join(found)}); pass --resume auto to continue "
                        "it, or choose another folder (nothing was changed)")


def prune_epoch_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest epoch-XXXX.pt files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for old in run_folder.epoch_checkpoints(run_dir)[:-keep]:
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
