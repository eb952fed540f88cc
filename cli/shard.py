"""`clim-fast shard SRC OUT` and `clim-fast verify OUT`: thin wrappers over the `shards` package."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from shards import verify_shards, write_shards
from shards.format import DEFAULT_MAXCOUNT
from shards.writer import Interrupted
from shards.errors import os_errors_as_user_errors

_SHOWN = 10  # skipped files listed in the summary; the manifest lists them all


def _default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def print_summary(summary: dict, console: Console) -> None:
    if summary["already_complete"]:
        console.print(f"{summary['out']}: already complete, nothing to do", markup=False)
    console.print(f"[bold green]done:[/] {summary['num_samples']:,} samples in {summary['num_shards']} shards "
                  f"({_mb(summary['bytes'])}), {summary['num_classes']} classes, dataset id {summary['dataset_id']}",
                  highlight=False)
    if not summary["already_complete"]:
        resumed = f", {summary['resumed_shards']} shards kept from the interrupted run" if summary["resumed_shards"] else ""
        console.print(f"checked {summary['checked_files']:,} files in {summary['seconds']:.1f} s "
                      f"({summary['images_per_s']:,.0f} images/s){resumed}", highlight=False)
    if summary["reencoded"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary["reencoded_by_reason"].items())
        console.print(f"re-encoded to RGB JPEG: {summary['reencoded']} ({reasons})", highlight=False)
    if summary["skipped"]:
        console.print(f"[yellow]skipped {summary['skipped']} unreadable file(s)[/] (listed in manifest.json):")
        for entry in summary["skipped_files"][:_SHOWN]:
            console.print(f"  {entry['path']}: {entry['reason']}", highlight=False, markup=False)
        if summary["skipped"] > _SHOWN:
            console.print(f"  ... and {summary['skipped'] - _SHOWN} more")
    ignored = summary.get("ignored_links") or []
    if ignored:
        console.print(f"[yellow]ignored {len(ignored)} symbolic link(s)[/] (listed in manifest.json; links are "
                      "followed without loops, each file once, and out of SRC only with --follow-links):")
        for entry in ignored[:_SHOWN]:
            console.print(f"  {entry['path']}: {entry['reason']}", highlight=False, markup=False)
        if len(ignored) > _SHOWN:
            console.print(f"  ... and {len(ignored) - _SHOWN} more")


def print_verify(report: dict, console: Console) -> None:
    if report["ok"]:
        console.print(f"[bold green]ok:[/] {escape(report['root'])}: {report['num_samples']:,} samples, "
                      f"{report['num_shards']} shards ({_mb(report['bytes'])}), checksums and indexes match",
                      highlight=False)
        return
    console.print(f"[bold red]{len(report['problems'])} problem(s)[/] in {escape(report['root'])}:", highlight=False)
    for problem in report["problems"]:
        console.print(f"  {problem}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    @app.command("shard")
    def shard(
        src: Path = typer.Argument(..., help="Image folder: one sub-folder per class, or flat with --labels."),
        out: Path = typer.Argument(..., help="Output folder for the shards (created if missing)."),
        maxcount: int = typer.Option(DEFAULT_MAXCOUNT, "--maxcount", help="Samples per shard (6000 ~ 0.66 GB of ImageNet)."),
        workers: int = typer.Option(_default_workers(), "--workers", help="Processes checking/re-encoding images (at most 2 a CPU core start); the output does not depend on it."),
        seed: int = typer.Option(0, "--seed", help="Seed of the id shuffle."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file for a flat folder: lines 'FILE LABEL' (or ImageNet's LOC_val_solution.csv)."),
        classes: Optional[Path] = typer.Option(None, "--classes", help="Reuse the class mapping of another shard folder (e.g. train shards, for validation)."),
        max_side: Optional[int] = typer.Option(None, "--max-side", help="Re-encode images whose longer side exceeds PX down to PX (faster decoding; off by default)."),
        follow_links: bool = typer.Option(False, "--follow-links", help="Also follow symbolic links that point outside SRC (e.g. a folder of links into the full ImageNet), still without loops, each file once."),
        resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run, keeping its complete shards."),
        verify: bool = typer.Option(False, "--verify", help="Re-check counts and checksums afterwards."),
    ) -> None:
        """Pack an image folder into WebDataset shards with DALI index files and a manifest."""

        console = Console()
        try:
            summary = write_shards(src, out, maxcount=maxcount, workers=workers, seed=seed, labels=labels,
                                   max_side=max_side, resume=resume, progress=True, classes=classes,
                                   follow_links=follow_links)
        except KeyboardInterrupt as e:  # a plain one: still listing SRC, before any shard is written
            message = str(e) if isinstance(e, Interrupted) else (
                f"before any new shard was written to {out}; run the same command with --resume to finish")
            Console(stderr=True, soft_wrap=True).print(f"[bold yellow]interrupted:[/] {escape(message)}",
                                                       highlight=False)
            raise typer.Exit(130) from None
        print_summary(summary, console)
        if verify:
            with os_errors_as_user_errors(out):
                report = verify_shards(out, progress=True)
            print_verify(report, console)
            if not report["ok"]:
                raise typer.Exit(1)

    @app.command("verify")
    def verify_command(out: Path = typer.Argument(..., help="A shard folder made by `clim-fast shard`.")) -> None:
        """Re-check a shard folder: counts, checksums, tar members and DALI index files."""

        with os_errors_as_user_errors(out):
            report = verify_shards(out, progress=True)
        print_verify(report, Console())
        if not report["ok"]:
            raise typer.Exit(1)
