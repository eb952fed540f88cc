"""The demo report: PNG plots (loss curves, metric bars) and a markdown page with the tables."""

from __future__ import annotations

import math
from pathlib import Path

from shards.atomic import atomic_open, atomic_write_text

COLOURS = {"moco_v2": "#4c72b0", "clim": "#dd8452", "untrained": "#999999"}


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


def plot_training(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Three panels: the anchor InfoNCE per epoch (the term both presets share), its change from
    the first epoch, and the label purity of CLIM's mined positives per mining round against
    chance. One thin line per seed, the mean over seeds bold."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    for name, per_seed in runs.items():
        colour = COLOURS.get(name)
        curves = [r["epoch_loss"] for r in per_seed if r.get("epoch_loss")]
        for c in curves:
            xs = list(range(len(c)))
            if len(curves) > 1:
                axes[0].plot(xs, c, color=colour, alpha=0.3, lw=1)
                axes[1].plot(xs, [v - c[0] for v in c], color=colour, alpha=0.3, lw=1)
        if curves:
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            xs = list(range(n))
            axes[0].plot(xs, mean, color=colour, lw=2, marker="o", ms=3, label=name)
            axes[1].plot(xs, [v - mean[0] for v in mean], color=colour, lw=2, marker="o", ms=3, label=name)
        rounds = [r["mining"] for r in per_seed if r.get("mining")]
        for i, rs in enumerate(rounds):
            xs = [m["epoch"] for m in rs if "label_purity" in m]
            ys = [100 * m["label_purity"] for m in rs if "label_purity" in m]
            if xs:
                axes[2].plot(xs, ys, color=colour, marker="o", ms=4, lw=1.5, alpha=1 if len(rounds) == 1 else 0.6,
                             label=f"{name} mined positives" if i == 0 else None)
            chance = [100 * m["label_chance"] for m in rs if "label_chance" in m]
            if chance and i == 0:
                axes[2].axhline(chance[0], color="#888888", ls="--", lw=1, label="chance (random pair)")
    axes[0].set_title("anchor InfoNCE per epoch (shared term)", fontsize=10)
    axes[1].set_title("change since the first epoch (below 0: it fell)", fontsize=10)
    axes[2].set_title("mined positives with the anchor's class", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("epoch (0 = the first, as in log.jsonl)")
    axes[1].axhline(0, color="#888888", lw=0.8)
    axes[2].set_xlabel("mining round (at the start of epoch)")
    axes[2].set_ylabel("label purity (%)")
    axes[2].set_ylim(0, 100)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(values: dict[str, tuple[float, float]], path: str | Path, title: str, ylabel: str,
              ylim: tuple[float, float] | None = None) -> Path:
    """Bars of (mean, spread) per name; the spread (std over seeds) as an error bar when > 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    names = list(values)
    means = [values[n][0] for n in names]
    stds = [values[n][1] for n in names]
    bars = ax.bar(names, means, yerr=[s if s and s > 0 else 0 for s in stds], capsize=4,
                  color=[COLOURS.get(n, "#888888") for n in names])
    for bar, name in zip(bars, names):
        v, sd = values[name]
        text = (f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}") + (f" ± {sd:.2g}" if sd else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
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


def _ms(stat: dict | None, digits: int = 2, seeds: int = 1) -> str:
    """'mean ± std' (just the mean for one seed)."""
    if not stat:
        return "n/a"
    if seeds > 1:
        return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"
    return _fmt(stat["mean"], digits)


def _verdict(c: dict, unit: str, digits: int = 2) -> str:
    d = f"{c['difference']:+.{digits}f}{unit}"
    if c.get("exceeds_spread") is None:
        return f"{d} (one seed: no spread measured, so this cannot tell; use `--seeds 3`)"
    lo, hi = c["ci95"]
    where = ("**exceeds the seed-to-seed spread**" if c["exceeds_spread"] else
             "is **within the seed-to-seed spread** (this run cannot tell the presets apart)")
    return (f"{d}, per-seed differences {', '.join(f'{x:+.{digits}f}' for x in c['per_seed'])} "
            f"(std {c['std']:.{digits}f}, 95 % interval {lo:+.{digits}f} to {hi:+.{digits}f}): the difference {where}")


def write_report(out: str | Path, summary: dict) -> Path:
    """report.md in `out` from the demo summary (see clim_fast.demo.run.run_demo)."""
    out = Path(out)
    runs, data, cfg, n = summary["runs"], summary["data"], summary["config"], summary["seeds"]
    sets = " ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
    lines = [
        "# clim-fast demo: MoCo v2 vs CLIM on a small real dataset",
        "",
        f"Data: {data['source']} ({data['classes']} classes), {data['train']} training and {data['val']} "
        f"validation images as {data['image_size']} px RGB JPEGs, sharded with `clim-fast shard`.",
        f"Budget `{summary['budget']}`, the same for both presets, as Config fields (each a `--set key=value` "
        f"of `clim-fast train` and `clim-fast demo`): `{sets}`. CLIM mines center-wise positives online "
        f"(K-means {cfg.get('clusters')} clusters, k={cfg.get('knn_k')}) from epoch {cfg.get('clim_start_epoch')}, "
        f"every {cfg.get('mine_every')} epoch(s), and mixes them in with CutMix.",
        f"Seeds: {n} per preset ({'mean ± standard deviation over seeds' if n > 1 else 'one run each'}). "
        f"Device: {summary['device']}. Wall time: {summary['seconds']:.0f} s.",
        "",
        "## Results",
        "",
        "| network | kNN top-1 (%) | kNN top-5 (%) | kNN top-1, k=20 (%) | intra-class sim. | inter-class sim. | "
        "gap | anchor loss, first epoch | anchor loss, last epoch | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = ([("untrained", summary["random_init"])] if "random_init" in summary else []) + list(runs.items())
    for name, r in rows:
        lines.append(f"| {name} | {_ms(r.get('knn_top1'), 2, n)} | {_ms(r.get('knn_top5'), 2, n)} | "
                     f"{_ms(r.get('knn_top1_k20'), 2, n)} | "
                     f"{_ms(r.get('intra'), 3, n)} | {_ms(r.get('inter'), 3, n)} | {_ms(r.get('gap'), 3, n)} | "
                     f"{_ms(r.get('first_loss'), 3, n)} | {_ms(r.get('final_loss'), 3, n)} | "
                     f"{_ms(r.get('train_seconds'), 0, n)} |")
    lines += ["", "**Did pretraining help?**"]
    for name, r in runs.items():
        fell = r.get("final_loss", {}).get("mean", math.nan) < r.get("first_loss", {}).get("mean", math.nan)
        text = (f"- {name}: the anchor InfoNCE {'fell' if fell else '**did not fall**'} over the run "
                f"({_fmt(r.get('first_loss', {}).get('mean'), 3)} -> {_fmt(r.get('final_loss', {}).get('mean'), 3)})")
        if "gain_over_untrained" in summary:
            g = summary["gain_over_untrained"][name]
            text += ("; kNN top-1 against the untrained network: " + _verdict(g, " points")
                     .replace("the difference", "the gain").replace("presets", "trained and untrained networks"))
            g20 = summary.get("gain_over_untrained_k20", {}).get(name)
            if g20:
                text += f" (with k=20: {g20['difference']:+.2f} points)"
        lines.append(text + ".")
    lines += ["", "**CLIM minus MoCo v2** (same seeds, paired):"]
    for metric, label, unit, digits in (("knn_top1", "kNN top-1", " points", 2),
                                        ("knn_top5", "kNN top-5", " points", 2),
                                        ("knn_top1_k20", "kNN top-1 with k=20", " points", 2),
                                        ("intra", "intra-class similarity", "", 3),
                                        ("gap", "intra - inter gap", "", 3)):
        c = summary["clim_minus_moco"].get(metric)
        if c:
            lines.append(f"- {label}: {_verdict(c, unit, digits)}.")
    if summary.get("mining"):
        lines += ["", "**Mining.** Label purity of CLIM's mined positives (the share of positives that have the "
                  "anchor's class; labels are never seen by training) per mining round, against chance (two random "
                  "images share a class):", "", "| round (epoch) | label purity (%) | chance (%) |", "|---|---|---|"]
        for m in summary["mining"]:
            pur = {"mean": 100 * m["label_purity_mean"], "std": 100 * m["label_purity_std"]}
            lines.append(f"| {m['epoch']} | {_ms(pur, 1, n)} | {_fmt(100 * m['label_chance_mean'], 1)} |")
        first, last = summary["mining"][0]["label_purity_mean"], summary["mining"][-1]["label_purity_mean"]
        if len(summary["mining"]) > 1:
            trend = "rose" if last > first else "fell" if last < first else "stayed level"
            meaning = ("mining finds more same-class neighbours as the features improve" if last > first else
                       "the features did not make mining find more same-class neighbours")
            lines += ["", f"Purity {trend} from {100 * first:.1f} % to {100 * last:.1f} % as training went on "
                      f"({meaning})."]
    lines += [
        "",
        "kNN: weighted kNN (k=%d, t=%.2f, the MoCo protocol of `clim-fast eval knn`) on L2-normalised pooled "
        "backbone features of the query encoder, training images as the memory bank, validation images as "
        "queries; the k=20 column asks only the nearest neighbours, where an untrained network keeps much of the "
        "pixel similarity and does well. Similarity: mean cosine "
        "similarity of validation features within a class (averaged over classes) and between classes "
        "(CLIM's Table 6). Anchor loss: InfoNCE(q_anchor, k_anchor), the term both presets share, averaged "
        "over each epoch's logged steps." % (min(summary["knn_k"], data["train"]), summary["knn_t"]),
        "",
        "![loss and mining purity](loss.png)",
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
        "measures both runs the same way, against the untrained network they start from.",
        "",
        "It cannot reproduce or refute the paper. The data is tiny (a few thousand %d px digits, not "
        "1.28M ImageNet photos), training lasts minutes instead of 200-1200 epochs, the backbone is a "
        "small ResNet-18 instead of a ResNet-50, and the queue and cluster counts are scaled down. A "
        "difference between the presets means something only where it exceeds the seed-to-seed spread "
        "above. Judge CLIM's claims (e.g. +~1.5 %% linear top-1 over MoCo v2 at 200 epochs on ImageNet) "
        "only with full-size runs." % data["image_size"],
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
