"""The demo report: PNG plots (loss curves, metric bars) and a markdown page with the tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from shards.atomic import atomic_open, atomic_write_text

COLOURS = {"moco_v2": "#4c72b0", "clim": "#dd8452"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    _plt().close(fig)
    return path


def read_log(path: str | Path) -> list[dict]:
    """The JSON objects of a run's log.jsonl (unreadable lines are skipped)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_curve(rows: list[dict], key: str = "loss") -> tuple[list[float], list[float]]:
    """(x in epochs, the logged `key`) from a run log: step rows when there are any, else epoch rows."""
    steps = [r for r in rows if r.get("kind") == "step" and key in r and "iteration" in r]
    if steps:
        per_epoch = max(int(r.get("step", 0)) for r in steps) or 1  # each epoch logs its last step
        return [float(r["iteration"]) / per_epoch for r in steps], [float(r[key]) for r in steps]
    epochs = [r for r in rows if r.get("kind") == "epoch" and key in r]
    return [float(r["epoch"]) + 1 for r in epochs], [float(r[key]) for r in epochs]


def plot_loss_curves(logs: dict[str, list[dict]], path: str | Path) -> Path:
    """Left: InfoNCE(q_anchor, k_anchor), the term both methods share; right: the total loss
    (CLIM adds its mixing term from its first mining epoch on)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, title in ((axes[0], "loss_moco", "anchor InfoNCE (shared term, comparable)"),
                           (axes[1], "loss", "total training loss")):
        for name, rows in logs.items():
            xs, ys = loss_curve(rows, key)
            if xs:
                ax.plot(xs, ys, label=name, color=COLOURS.get(name), marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(values: dict[str, float], path: str | Path, title: str, ylabel: str,
              ylim: tuple[float, float] | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=[COLOURS.get(n, "#888888") for n in names])
    for bar, name in zip(bars, names):
        v = values[name]
        ax.annotate(f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=9)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_report(out: str | Path, summary: dict) -> Path:
    """report.md in `out` from the demo summary (see clim_fast.demo.run.run_demo)."""
    out = Path(out)
    runs = summary["runs"]
    data = summary["data"]
    budget = summary["budget"]
    lines = [
        "# clim-fast demo: MoCo v2 vs CLIM on a small real dataset",
        "",
        f"Data: {data['source']} ({data['classes']} classes), {data['train']} training and {data['val']} "
        f"validation images as {data['image_size']} px RGB JPEGs, sharded with `clim-fast shard`.",
        f"Budget (the same for both): {budget['arch']}, {budget['image_size']} px, {budget['epochs']} epochs, "
        f"global batch {budget['batch_size']}, queue {budget['queue_size']}, "
        f"temperature {budget.get('temperature', 0.2)}, base lr {budget['base_lr']} per 256, "
        f"crops of {budget.get('crop_min_scale', 0.2):g}-1 of the image; "
        f"CLIM mines positives online (K-means {budget['clusters']} clusters, k={budget['knn_k']}) "
        f"from epoch {budget['clim_start_epoch']}, "
        f"every {budget['mine_every']} epoch(s), CutMix alpha {budget['alpha']}.",
        f"Device: {summary['device']}. Wall time: {summary['seconds']:.0f} s.",
        "",
        "## Results",
        "",
        "| preset | kNN top-1 (%) | kNN top-5 (%) | intra-class sim. | inter-class sim. | gap | final loss | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        gap = r["similarity"]["intra"] - r["similarity"]["inter"]
        lines.append(f"| {name} | {_fmt(r['knn']['top1'])} | {_fmt(r['knn']['top5'])} | "
                     f"{_fmt(r['similarity']['intra'], 3)} | {_fmt(r['similarity']['inter'], 3)} | {_fmt(gap, 3)} | "
                     f"{_fmt(r.get('final_loss'), 3)} | {_fmt(r.get('train_seconds'), 0)} |")
    if "random_init" in summary:
        ri = summary["random_init"]
        lines += ["", f"For scale, an untrained (randomly initialised) {budget['arch']} gives kNN top-1 "
                  f"{_fmt(ri['knn']['top1'])} % and intra-class similarity {_fmt(ri['similarity']['intra'], 3)} "
                  f"(inter {_fmt(ri['similarity']['inter'], 3)})."]
    if summary.get("mining"):
        lines += ["", "CLIM's last mined neighbour table: " + ", ".join(
            f"{k} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in summary["mining"].items()) + "."]
    lines += [
        "",
        "kNN: weighted kNN (k=%d, t=%.2f) on L2-normalised pooled backbone features of the query encoder, "
        "training images as the memory bank, validation images as queries. Similarity: mean cosine "
        "similarity of validation features within a class (averaged over classes) and between classes "
        "(CLIM's Table 6)." % (min(summary["knn_k"], data["train"]), summary["knn_t"]),
        "",
        "![loss curves](loss.png)",
        "",
        "![kNN top-1](knn_top1.png) ![intra-class similarity](intra_similarity.png)",
        "",
        "| MoCo v2 | CLIM |",
        "|---|---|",
        "| ![t-SNE MoCo v2](tsne_moco_v2.png) | ![t-SNE CLIM](tsne_clim.png) |",
        "",
        "## What this run shows, and what it cannot",
        "",
        "It shows the whole system working end to end on real images: shards are written and read "
        "back by DALI, both presets train with the same budget, CLIM mines center-wise positives "
        "with K-means + kNN while training and mixes them in with CutMix, and the evaluation "
        "measures both runs the same way. The numbers above are what this one small run produced.",
        "",
        "It cannot reproduce or refute the paper. The data is tiny (a few thousand %d px digits, not "
        "1.28M ImageNet photos), training lasts a few epochs instead of 200-1200, the backbone is a "
        "ResNet-18 instead of a ResNet-50, and the queue and cluster counts are scaled down. On digits "
        "even a random network separates classes fairly well, differences of a point or two between "
        "the presets are within run-to-run noise at this size, and one seed is reported. Judge "
        "CLIM's claims (e.g. +~1.5 %% linear top-1 over MoCo v2 at 200 epochs on ImageNet) only with "
        "full-size runs." % data["image_size"],
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
