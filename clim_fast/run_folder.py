"""The files a training run writes in its folder RUN, named once.

    RUN/config.json                      the resolved config (written at every start)
    RUN/log.jsonl                        one JSON record a line (training/metrics.py)
    RUN/checkpoints/last.pt              and epoch-XXXX.pt (training/checkpoint.py)
    RUN/tables/table-epoch-XXXX.npz      the online mining rounds' neighbour tables
    RUN/tensorboard/                     with tensorboard=true

log.jsonl's records: `start` (each process start), `step`, `epoch`, `mine`, `checkpoint` (a snapshot
taken), `checkpoint_written` (on disk), `preempted`.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG, LOG, CHECKPOINTS, TABLES, TENSORBOARD = "config.json", "log.jsonl", "checkpoints", "tables", "tensorboard"
ENTRIES = (CONFIG, LOG, CHECKPOINTS, TABLES, TENSORBOARD)


def config_path(run: str | Path) -> Path:
    return Path(run) / CONFIG


def log_path(run: str | Path) -> Path:
    return Path(run) / LOG


def checkpoint_folder(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS


def last_checkpoint(run: str | Path) -> Path:
    return checkpoint_folder(run) / "last.pt"


def epoch_checkpoint(run: str | Path, completed_epochs: int) -> Path:
    return checkpoint_folder(run) / f"epoch-{completed_epochs:04d}.pt"


_EPOCH_CHECKPOINT = re.compile(r"^epoch-(\d+)\.pt$")


def epoch_checkpoints(run: str | Path) -> list[Path]:
    """The run's epoch-XXXX.pt files, oldest first."""
    folder = checkpoint_folder(run)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def table_path(run: str | Path, epoch: int) -> Path:
    return Path(run) / TABLES / f"table-epoch-{epoch:04d}.npz"


def tensorboard_folder(run: str | Path) -> Path:
    return Path(run) / TENSORBOARD


def is_checkpoint_folder(folder: str | Path) -> bool:
    """Whether `folder` is a training run's checkpoints/ (its run beside it)."""
    folder = Path(folder)
    return folder.name == CHECKPOINTS and any((folder.parent / name).exists() for name in (CONFIG, LOG))


def remove_temp_files(run: str | Path) -> list[Path]:
    """Remove the temp files of the run's own atomic writes that never finished (`.NAME.XXXX.tmp`
    of a checkpoint or a table: a process killed mid-write leaves them, up to a checkpoint's size).
    Only while the run folder is locked; other commands' temp files there are left alone."""
    removed = []
    for pattern in (f"{CHECKPOINTS}/.last.pt.*.tmp", f"{CHECKPOINTS}/.epoch-*.pt.*.tmp",
                    f"{TABLES}/.table-epoch-*.npz.*.tmp"):
        for path in Path(run).glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
