"""One optimisation step, as the loop runs it and the benchmarks time it (torchvision's
train_one_epoch body): the model's forward is the whole CLIM step; then loss scaling (fp16 only),
backward, SGD, and the keys into the queue."""

from __future__ import annotations

import torch


def grad_scaler(model, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast; disabled (a pass-through) for bf16 and fp32. With fused SGD
    the scaler's inf check and skipped steps stay on the device (no synchronisation)."""
    model = getattr(model, "module", model)
    return torch.amp.GradScaler(device.type, enabled=model.autocast_dtype(device) == torch.float16)


def train_step(step_fn, model, optimizer, scaler: torch.amp.GradScaler, batch: dict):
    """forward (`step_fn`: the model or its DDP wrapper), backward, SGD, enqueue. Returns (loss, terms)."""
    optimizer.zero_grad(set_to_none=True)  # first: no gradient of the last step outlives its CUDA graphs
    if model.uses_cuda_graphs:  # the graphs' outputs of the last step may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    loss, terms = step_fn(batch)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.enqueue_keys()
    return loss, terms
