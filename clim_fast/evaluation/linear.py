"""The MoCo linear protocol: a linear classifier on the pooled features of a frozen backbone.

Frozen means no gradient and BatchNorm in eval mode (running statistics untouched); a checksum of
the backbone's parameters and buffers before and after proves it. SGD lr 30, momentum 0.9, no
weight decay, 100 epochs, lr x0.1 at 60 and 80 (scaled with --epochs unless given), as in
facebookresearch/moco main_lincls.py. Training views: RandomResizedCrop + flip; validation:
resize + center crop (the DALI LinearTrainLoader and FeatureLoader graphs).
"""

from __future__ import annotations

import hashlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from clim_fast.evaluation.measures import check_feature_options, check_held_out, eval_backbone
from clim_fast.training.checkpoint import model_from_checkpoint
from dali_pipelines import FeatureLoader, LinearTrainLoader
from shards import ShardDataset
from shards.errors import UserError


def module_checksum(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (BN running stats included), in state_dict order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_milestones(epochs: int) -> tuple[int, ...]:
    """60 and 80 of 100 epochs, scaled to `epochs`."""
    return tuple(sorted({max(1, round(epochs * 0.6)), max(1, round(epochs * 0.8))}))


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


@torch.no_grad()
def evaluate_linear(backbone: nn.Module, classifier: nn.Module, loader, device) -> dict:
    correct1 = correct5 = total = 0
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device).long()
        logits = classifier(backbone(x).float())
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.shape[0]
    if total == 0:
        raise UserError("linear: the validation loader yielded no samples")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "val_samples": total}


def check_linear_options(epochs: int, lr: float, momentum: float, weight_decay: float,
                         milestones: tuple[int, ...] | None) -> tuple[int, ...]:
    """The classifier's schedule, checked before any work; returns the milestones (default: 60% and
    80% of --epochs)."""
    if epochs <= 0:
        raise UserError(f"--epochs {epochs}: must be positive")
    for option, value in (("--lr", lr), ("--momentum", momentum), ("--weight-decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0) or (option == "--lr" and value == 0):
            raise UserError(f"{option} {value}: must be {'positive' if option == '--lr' else 'zero or more'}")
    milestones = tuple(milestones) if milestones is not None else default_milestones(epochs)
    if any(not 1 <= m <= epochs for m in milestones):
        raise UserError(f"--milestones {','.join(map(str, milestones))}: epochs where the lr drops must lie in "
                        f"1..{epochs} (--epochs {epochs})")
    return milestones


def linear_eval(backbone: nn.Module, feature_dim: int, num_classes: int, train_loader, val_loader, *,
                epochs: int = 100, lr: float = 30.0, momentum: float = 0.9, weight_decay: float = 0.0,
                milestones: tuple[int, ...] | None = None, device=None, seed: int = 0, log=print) -> dict:
    """Train a linear classifier on the frozen backbone; {"top1", "top5", ..., "backbone_unchanged"}.

    Loaders yield dicts with `image` (NCHW) and `label`; `set_epoch(e)` is called when present.
    """
    milestones = check_linear_options(epochs, lr, momentum, weight_decay, milestones)
    device = torch.device(device or "cpu")
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = module_checksum(backbone)

    torch.manual_seed(seed)
    classifier = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)

    start = time.time()
    train_loss = float("nan")
    for epoch in range(epochs):
        _set_epoch(train_loader, epoch)
        backbone.eval()  # BN stays in eval mode: the frozen backbone is a fixed feature map
        loss_sum, seen = 0.0, 0
        for batch in train_loader:
            x, y = batch["image"].to(device), batch["label"].to(device).long()
            with torch.no_grad():
                feats = backbone(x).float()
            loss = F.cross_entropy(classifier(feats), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
        scheduler.step()
        if seen == 0:
            raise UserError("linear: the training loader yielded no samples (fewer samples than one batch?)")
        train_loss = loss_sum / seen
        if log and (epoch == 0 or (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs):
            log(f"linear: epoch {epoch + 1}/{epochs} loss {train_loss:.4f} lr {optimizer.param_groups[0]['lr']:.4g}")

    metrics = evaluate_linear(backbone, classifier, val_loader, device)
    after = module_checksum(backbone)
    if after != before:
        raise RuntimeError("linear: the backbone changed during linear evaluation (checksum mismatch)")
    metrics.update(train_loss=train_loss, epochs=epochs, lr=lr, milestones=list(milestones),
                   backbone_unchanged=True, backbone_sha256=before[:16], seconds=round(time.time() - start, 1))
    return metrics


def linear_eval_checkpoint(checkpoint, shards_dir, val_shards_dir, *, image_size: int | None = None,
                           batch_size: int = 256, epochs: int = 100, lr: float = 30.0, momentum: float = 0.9,
                           weight_decay: float = 0.0, milestones: tuple[int, ...] | None = None,
                           device=None, workers: int = 2, threads: int = 2, seed: int = 0, log=print) -> dict:
    """The linear protocol on the query encoder's backbone of a training checkpoint, fed by the DALI
    LinearTrainLoader and FeatureLoader graphs (train: RandomResizedCrop + flip, val: resize + center crop)."""

    check_feature_options(image_size, batch_size)
    check_linear_options(epochs, lr, momentum, weight_decay, milestones)
    train_set, val_set = ShardDataset(shards_dir), ShardDataset(val_shards_dir)
    check_held_out(train_set, val_set, shards_dir, val_shards_dir)

    model, cfg, _ = model_from_checkpoint(checkpoint, map_location="cpu")
    image_size = image_size or cfg.image_size
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = min(batch_size, train_set.num_samples)
    backbone = eval_backbone(model, "query")
    common = dict(batch_size=batch_size, image_size=image_size, device=device, workers=workers, threads=threads)
    train_loader = LinearTrainLoader(train_set, seed=seed, **common)
    val_loader = FeatureLoader(val_set, **common)  # resize + center crop, every sample once
    try:
        metrics = linear_eval(backbone, model.encoder_q.feature_dim, train_set.num_classes, train_loader,
                              val_loader, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              milestones=milestones, device=device, seed=seed, log=log)
    finally:
        train_loader.close()
        val_loader.close()
    metrics.update(image_size=image_size, batch_size=batch_size)
    return metrics
