"""`clim-fast mine`: a neighbour table from a saved checkpoint (the online refresh, offline)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from shards.errors import UserError
from clim_fast.config import MINE_ENGINES, MINE_FEATURES
from clim_fast.machine import resolve_device


def mine_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A clim-fast checkpoint (RUN/checkpoints/last.pt)."),
    shards: Path = typer.Option(..., "--shards", help="Shard folder (from `clim-fast shard`)."),
    out: Path = typer.Option(..., "--out", help="Neighbour table to write (.npz)."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="K-means clusters m (default: the checkpoint's config)."),
    k: Optional[int] = typer.Option(None, "--k", help="Neighbours searched per anchor (default: the checkpoint's config)."),
    engine: str = typer.Option("auto", "--engine", help="auto | faiss | torch."),
    feature: Optional[str] = typer.Option(None, "--feature", help="head | backbone (default: the checkpoint's config)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Feature-extraction batch."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Centre-crop size (default: the checkpoint's config)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    workers: int = typer.Option(2, "--workers", help="DALI reader worker processes."),
    threads: int = typer.Option(2, "--threads", help="DALI threads."),
) -> None:
    """Mine center-wise positives with a checkpoint's momentum encoder and write a table for
    `clim-fast train --table TABLE`."""
    from clim_fast.training.checkpoint import check_result_file, model_from_checkpoint
    from clim_fast.mining.engine import mine_from_model
    from clim_fast.mining.select import check_sizes, format_stats
    from shards import ShardDataset

    if engine not in MINE_ENGINES:
        raise UserError(f"--engine {engine}: choose from {', '.join(MINE_ENGINES)}")
    if feature not in (None, *MINE_FEATURES):
        raise UserError(f"--feature {feature}: choose from {', '.join(MINE_FEATURES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    check_result_file(out, "--out", checkpoint)  # before the feature pass, not after it
    dev = resolve_device(device)
    dataset = ShardDataset(shards)  # a bad shard folder fails here, before the model loads
    model, cfg, ckpt = model_from_checkpoint(checkpoint, map_location=dev)
    overrides = dict(mine_feature=feature, image_size=image_size, workers=workers, dali_threads=threads)
    cfg = dataclasses.replace(cfg, **{key: v for key, v in overrides.items() if v is not None})
    clusters = cfg.clusters if clusters is None else clusters
    k = cfg.knn_k if k is None else k
    check_sizes(dataset.num_samples, clusters, k)
    table, stats = mine_from_model(model, cfg, dataset, device=dev, clusters=clusters, k=k, engine=engine,
                                   batch_size=batch_size, epoch=int(ckpt.get("epoch", 0)),
                                   checkpoint=str(checkpoint), progress=True)
    table.save(out)
    typer.echo(f"{format_stats(stats)} -> {out}", err=True)
    typer.echo(json.dumps(dict(command="mine", table=str(out), **stats), sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("mine")(mine_command)
