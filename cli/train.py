"""`clim-fast train` and `clim-fast export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clim_fast.config import PRESETS, make_config, parse_overrides


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        shards: Path = typer.Option(..., "--shards", help="shard folder from `clim-fast shard`"),
        out: Path = typer.Option(..., "--out", help="run folder (config, log.jsonl, checkpoints, tables)"),
        preset: Optional[str] = typer.Option(None, "--preset", help=" | ".join(PRESETS)),
        gpus: Optional[int] = typer.Option(
            None, "--gpus", help="GPUs on this node, one process each; 0: CPU; default: all visible GPUs"),
        cpu_procs: int = typer.Option(1, "--cpu-procs", help="CPU processes on gloo when --gpus 0"),
        epochs: Optional[int] = typer.Option(
            None, "--epochs", help="default: the config's 1200 (the paper's schedule; 200 for ablations)"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="global batch over all processes"),
        arch: Optional[str] = typer.Option(None, "--arch"),
        image_size: Optional[int] = typer.Option(None, "--image-size"),
        table: Optional[Path] = typer.Option(None, "--table", help="offline neighbour table to start from"),
        sets: list[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
        resume: Optional[str] = typer.Option(None, "--resume", help="'auto': the newest checkpoint in RUN that loads (refused when RUN has checkpoints and none "
                                   "loads); 'fresh': the same, but start over in that case; or a checkpoint path"),
        nnodes: int = typer.Option(1, "--nnodes"),
        node_rank: int = typer.Option(0, "--node-rank"),
        master_addr: Optional[str] = typer.Option(None, "--master-addr"),
        master_port: Optional[int] = typer.Option(None, "--master-port"),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the encoders"),
        share_gpu: bool = typer.Option(False, "--share-gpu", hidden=True,
                                       help="run the --gpus N ranks on GPU 0 over gloo (checks multi-rank code "
                                            "on a one-GPU machine)"),
    ):
        """Pretrain MoCo v2 / CLIM on shards."""
        import torch

        from clim_fast.training.checkpoint import resumed_config
        from clim_fast.training.loop import run_training

        if gpus is None:
            gpus = torch.cuda.device_count()

        overrides = dict(epochs=epochs, batch_size=batch_size, arch=arch, image_size=image_size,
                         init_table=str(table) if table else None, compile=True if compile else None)
        overrides.update(parse_overrides(sets))
        base = resumed_config(resume, out) if resume and preset is None else None
        cfg = make_config(preset or "moco_v2", overrides, base=base)
        final = run_training(cfg, shards, out, gpus=gpus, cpu_procs=cpu_procs, resume=resume, nnodes=nnodes,
                             node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                             share_gpu=share_gpu)
        print(json.dumps({"checkpoint": str(final), "run": str(out)}))

    @app.command()
    def export(
        checkpoint: Path = typer.Option(..., "--checkpoint", help="a training checkpoint (.pt)"),
        out: Path = typer.Option(..., "--out", help="output file: a torchvision ResNet state_dict"),
    ):
        """Write the query backbone as a torchvision ResNet state_dict."""
        from clim_fast.training.export import export_backbone

        print(json.dumps(export_backbone(checkpoint, out)))
