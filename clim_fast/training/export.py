"""`clim-fast export`: the query backbone as a plain torchvision ResNet state_dict (no fc)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from clim_fast.method.backbone import STANDARD_WIDTH, uses_cifar_stem
from clim_fast.training.checkpoint import check_result_file, model_from_checkpoint
from shards.atomic import atomic_write_bytes


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the query encoder's backbone state_dict to `out`. It loads into
    torchvision.models.<arch>(num_classes=...) with strict=False, missing only fc.weight/fc.bias.
    Returns a summary (arch, keys, note on a CIFAR stem)."""
    check_result_file(out, "--out", checkpoint)
    model, cfg, ckpt = model_from_checkpoint(checkpoint)
    state = {k: v.detach().clone().contiguous() for k, v in model.encoder_q.backbone.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out, buf.getvalue())
    summary = {"arch": cfg.arch, "width": cfg.width, "keys": len(state), "epoch": int(ckpt["epoch"]), "out": str(out)}
    notes = []
    if uses_cifar_stem(cfg.image_size):
        notes.append(f"trained at {cfg.image_size} px with a CIFAR stem: conv1 is 3x3 stride 1 and there is no "
                     "maxpool; build the torchvision model the same way before loading")
    if cfg.width != STANDARD_WIDTH:
        notes.append(f"width {cfg.width}: the stages have {cfg.width} x 1/2/4/8 channels; build the model with "
                     f"clim_fast.method.backbone.resnet('{cfg.arch}', width={cfg.width}) (torchvision's ResNet "
                     f"class), not torchvision.models.{cfg.arch}()")
    if notes:
        summary["note"] = "; ".join(notes)
    return summary
