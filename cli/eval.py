"""`clim-fast eval knn|linear|similarity|tsne`: measure a checkpoint's representation.

Progress goes to stderr; the last line on stdout is one JSON object with the metrics, which is
also written to OUT/<command>-<checkpoint name>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from clim_fast import run_folder
from clim_fast.machine import resolve_device
from shards.atomic import atomic_write_text
from shards.errors import UserError, os_errors_as_user_errors

eval_app = typer.Typer(help="Measure a checkpoint: kNN, linear probe, class similarity, t-SNE.",
                       no_args_is_help=True)

CHECKPOINT = typer.Option(..., "--checkpoint", help="Training checkpoint (.pt).", show_default=False)
SHARDS = typer.Option(..., "--shards", help="Shard folder (training split).", show_default=False)
VAL_SHARDS = typer.Option(None, "--val-shards", help="Shard folder of the validation split.")
OUT = typer.Option(None, "--out", help="Folder for cached features, metrics and pictures "
                   "(default: RUN/eval next to the checkpoint's run).")
LINEAR_OUT = typer.Option(None, "--out", help="Folder for the metrics JSON (default: RUN/eval next to the "
                          "checkpoint's run).")
IMAGE_SIZE = typer.Option(None, "--image-size", help="Input size (default: the checkpoint's).")
BATCH_SIZE = typer.Option(256, "--batch-size", help="Images per batch.")
DEVICE = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda.")
WORKERS = typer.Option(2, "--workers", help="DALI reader worker processes.")
THREADS = typer.Option(2, "--threads", help="DALI CPU threads.")
ENCODER = typer.Option("query", "--encoder", help="Backbone to measure: query (what linear eval "
                       "and export use) or key (the momentum encoder).")


def _fs_errors(command):
    """File-system mistakes (an unwritable or misplaced --out, a folder given as a file, ...) end as
    one-line errors naming the path, like every other user error."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):

        with os_errors_as_user_errors():
            return command(*args, **kwargs)

    return wrapper


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out(checkpoint: Path) -> Path:
    """RUN/eval for RUN/checkpoints/x.pt, else an `eval` folder beside the checkpoint."""
    parent = checkpoint.resolve().parent
    return (parent.parent if parent.name == run_folder.CHECKPOINTS else parent) / "eval"


def _out_folder(out: Optional[Path], checkpoint: Path) -> Path:
    """--out (default RUN/eval), created now: an unwritable or misplaced folder fails before any work."""
    out = out or default_out(checkpoint)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finish(command: str, checkpoint: Path, out: Path, metrics: dict) -> None:

    metrics = dict(metrics, command=command, checkpoint=str(checkpoint))
    line = json.dumps(metrics, sort_keys=True)
    atomic_write_text(out / f"{command}-{checkpoint.stem}.json", line + "\n")
    print(line, flush=True)


def _feature_kw(image_size, batch_size, device, workers, threads, encoder) -> dict:
    if encoder not in ("query", "key"):
        raise UserError(f"--encoder {encoder}: choose query or key")
    return dict(image_size=image_size, batch_size=batch_size, device=resolve_device(device), workers=workers,
                threads=threads, encoder=encoder, progress=True)


@eval_app.command("knn")
@_fs_errors
def knn_command(checkpoint: Path = CHECKPOINT, shards: Path = SHARDS, val_shards: Optional[Path] = VAL_SHARDS,
                out: Optional[Path] = OUT,
                k: int = typer.Option(200, "--k", help="Neighbours that vote."),
                temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(cos / T)."),
                holdout_every: int = typer.Option(10, "--holdout-every", help="Without --val-shards: hold out "
                                                  "every N-th sample id of --shards as the queries."),
                image_size: Optional[int] = IMAGE_SIZE, batch_size: int = BATCH_SIZE, device: str = DEVICE,
                workers: int = WORKERS, threads: int = THREADS, encoder: str = ENCODER) -> None:
    """Weighted kNN (InstDisc/MoCo style) top-1/top-5 on frozen L2-normalised backbone features."""
    from clim_fast.evaluation.measures import knn_eval

    if k <= 0:
        raise UserError(f"--k {k}: must be positive")
    if not 0 < temperature < float("inf"):  # (a NaN temperature fails too)
        raise UserError(f"--temperature {temperature}: must be positive and finite")
    if holdout_every < 2:
        raise UserError(f"--holdout-every {holdout_every}: must be at least 2")
    out = _out_folder(out, checkpoint)
    metrics = knn_eval(checkpoint, shards, val_shards, out, k=k, t=temperature, holdout_every=holdout_every,
                       log=_log, **_feature_kw(image_size, batch_size, device, workers, threads, encoder))
    _finish("knn", checkpoint, out, metrics)


@eval_app.command("linear")
@_fs_errors
def linear_command(checkpoint: Path = CHECKPOINT, shards: Path = SHARDS, val_shards: Optional[Path] = VAL_SHARDS,
                   out: Optional[Path] = LINEAR_OUT,
                   epochs: int = typer.Option(100, "--epochs", help="Training epochs of the linear classifier."),
                   lr: float = typer.Option(30.0, "--lr", help="SGD learning rate."),
                   momentum: float = typer.Option(0.9, "--momentum"),
                   weight_decay: float = typer.Option(0.0, "--weight-decay"),
                   milestones: Optional[str] = typer.Option(None, "--milestones", help="Epochs where lr drops "
                                                            "x0.1, e.g. 60,80 (default: 60% and 80% of --epochs)."),
                   seed: int = typer.Option(0, "--seed"),
                   image_size: Optional[int] = IMAGE_SIZE, batch_size: int = BATCH_SIZE, device: str = DEVICE,
                   workers: int = WORKERS, threads: int = THREADS) -> None:
    """MoCo linear protocol: frozen backbone (BN in eval mode), linear classifier, SGD lr 30."""
    from clim_fast.evaluation.linear import linear_eval_checkpoint

    if val_shards is None:
        raise UserError("--val-shards: linear evaluation needs a separate validation shard folder "
                        "(shard the validation images with `clim-fast shard`)")
    try:
        steps = tuple(int(s) for s in milestones.split(",") if s.strip()) if milestones else None
    except ValueError:
        raise UserError(f"--milestones {milestones}: expected comma-separated epochs, e.g. 60,80") from None
    out = _out_folder(out, checkpoint)
    metrics = linear_eval_checkpoint(checkpoint, shards, val_shards, image_size=image_size, batch_size=batch_size,
                                     epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                     milestones=steps, device=resolve_device(device), workers=workers, threads=threads,
                                     seed=seed, log=_log)
    _finish("linear", checkpoint, out, metrics)


@eval_app.command("similarity")
@_fs_errors
def similarity_command(checkpoint: Path = CHECKPOINT, shards: Path = SHARDS,
                       val_shards: Optional[Path] = VAL_SHARDS, out: Optional[Path] = OUT,
                       image_size: Optional[int] = IMAGE_SIZE, batch_size: int = BATCH_SIZE,
                       device: str = DEVICE, workers: int = WORKERS, threads: int = THREADS,
                       encoder: str = ENCODER) -> None:
    """Mean cosine similarity within classes and between classes (CLIM Table 6), on --val-shards
    when given, else on --shards."""
    from clim_fast.evaluation.measures import similarity_eval

    out = _out_folder(out, checkpoint)
    target = val_shards or shards
    metrics = similarity_eval(checkpoint, target, out, log=_log, same_classes_as=shards if val_shards else None,
                              **_feature_kw(image_size, batch_size, device, workers, threads, encoder))
    _finish("similarity", checkpoint, out, dict(metrics, shards=str(target)))


@eval_app.command("tsne")
@_fs_errors
def tsne_command(checkpoint: Path = CHECKPOINT, shards: Path = SHARDS, val_shards: Optional[Path] = VAL_SHARDS,
                 out: Optional[Path] = OUT,
                 classes: int = typer.Option(10, "--classes", help="Random classes to draw."),
                 per_class: int = typer.Option(300, "--per-class", help="At most this many samples per class."),
                 seed: int = typer.Option(0, "--seed", help="Picks the classes and seeds t-SNE."),
                 png: Optional[Path] = typer.Option(None, "--png", help="PNG path (default: OUT/tsne-<checkpoint>.png)."),
                 image_size: Optional[int] = IMAGE_SIZE, batch_size: int = BATCH_SIZE, device: str = DEVICE,
                 workers: int = WORKERS, threads: int = THREADS, encoder: str = ENCODER) -> None:
    """A PNG of a t-SNE embedding of random classes, coloured by class (CLIM Figure 1), on
    --val-shards when given, else on --shards."""
    from clim_fast.evaluation.measures import tsne_eval
    from clim_fast.training.checkpoint import check_result_file

    if classes < 1 or per_class < 1:
        raise UserError("--classes and --per-class must be positive")
    out = _out_folder(out, checkpoint)
    png = png or out / f"tsne-{checkpoint.stem}.png"
    check_result_file(png, "--png", checkpoint)  # before the feature pass, not after it
    target = val_shards or shards
    metrics = tsne_eval(checkpoint, target, png, out, classes=classes, per_class=per_class, seed=seed, log=_log,
                        same_classes_as=shards if val_shards else None,
                        **_feature_kw(image_size, batch_size, device, workers, threads, encoder))
    _finish("tsne", checkpoint, out, dict(metrics, shards=str(target)))


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
