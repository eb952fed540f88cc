"""Measuring a representation: weighted kNN, class similarity, t-SNE pictures, cached features.

All metrics work on L2-normalised features, so a dot product is a cosine similarity.
Accuracies are percentages (0-100), as the MoCo and CLIM papers report them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clim_fast.features import extract_features
from clim_fast.training.checkpoint import model_from_checkpoint
from dali_pipelines import FeatureLoader
from shards import ShardDataset
from shards.atomic import atomic_open
from shards.errors import UserError

FEATURE_CACHE_FORMAT = 1


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _labels(x) -> torch.Tensor:
    return _as_tensor(x, torch.int64)


# --- weighted kNN -------------------------------------------------------------------------------

@torch.no_grad()
def knn_scores(train_feats, train_labels, test_feats, *, k: int = 200, t: float = 0.07,
               num_classes: int | None = None, chunk: int | None = None, device=None) -> torch.Tensor:
    """Class scores [M, C] of the InstDisc/MoCo weighted kNN: sum of exp(cos/t) over the k nearest.

    Runs on `device` (default: the GPU when there is one) in query chunks whose similarity block
    stays near 64M entries, so an ImageNet-sized memory bank fits."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = F.normalize(_as_tensor(train_feats), dim=1).to(device)
    test = F.normalize(_as_tensor(test_feats), dim=1).to(device)
    labels = _labels(train_labels).to(device)
    if train.shape[0] == 0 or train.shape[0] != labels.shape[0]:
        raise UserError(f"knn: need one label per training feature, got {train.shape[0]} features "
                        f"and {labels.shape[0]} labels")
    if train.shape[1] != test.shape[1]:
        raise UserError(f"knn: train features have {train.shape[1]} dims, test features {test.shape[1]}")
    num_classes = int(num_classes or int(labels.max()) + 1)
    k = min(k, train.shape[0])
    chunk = chunk or max(1, (1 << 26) // train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes, device=device)
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        scores[start:start + chunk].scatter_add_(1, labels[top_idx], weights)
    return scores.cpu()


def knn_classify(train_feats, train_labels, test_feats, test_labels, k: int = 200, t: float = 0.07,
                 num_classes: int | None = None) -> dict:
    """Weighted kNN accuracy (k=200, t=0.07 as in InstDisc/MoCo): {"top1", "top5"} in percent."""
    test_labels = _labels(test_labels)
    if num_classes is None:
        num_classes = int(max(_labels(train_labels).max(), test_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, k=k, t=t, num_classes=num_classes)
    true_score = scores.gather(1, test_labels[:, None])
    # top-5: the true class has a vote and fewer than 5 classes outscore it (classes without votes
    # are never predictions, so ties among them cannot decide a hit)
    top5 = ((scores > true_score).sum(1) < 5) & (true_score[:, 0] > 0)
    top1 = scores.argmax(1) == test_labels
    n = max(1, test_labels.shape[0])
    return {"top1": 100.0 * top1.sum().item() / n, "top5": 100.0 * top5.sum().item() / n}


# --- class similarity ---------------------------------------------------------------------------

def class_similarity(feats, labels) -> dict:
    """Mean cosine similarity within classes and between classes (CLIM's Table 6).

    intra: for each class with at least two samples, the mean over its pairs (i != j), then the
    mean over classes. inter: for each pair of distinct classes, the mean over their cross pairs,
    then the mean over class pairs. Computed from per-class feature sums, so O(N d).
    """
    feats = _as_tensor(feats)
    classes, y = torch.unique(_labels(labels), return_inverse=True)
    c = classes.shape[0]
    counts = torch.bincount(y, minlength=c).double()
    sums = torch.zeros(c, feats.shape[1], dtype=torch.float64)
    self_sims = torch.zeros(c, dtype=torch.float64)
    for start in range(0, feats.shape[0], 65536):  # float64 in chunks: ImageNet-sized inputs fit
        f = F.normalize(feats[start:start + 65536].double(), dim=1)
        yc = y[start:start + 65536]
        sums.index_add_(0, yc, f)
        self_sims.index_add_(0, yc, (f * f).sum(1))
    gram = sums @ sums.T  # gram[a, b] = sum over i in a, j in b of cos(f_i, f_j)
    multi = counts >= 2
    intra_per_class = (gram.diagonal() - self_sims)[multi] / (counts * (counts - 1))[multi]
    pair_means = gram / (counts[:, None] * counts[None, :])
    off = ~torch.eye(c, dtype=torch.bool)
    return {
        "intra": float(intra_per_class.mean()) if multi.any() else float("nan"),
        "inter": float(pair_means[off].mean()) if c >= 2 else float("nan"),
        "classes": int(c),
    }


# --- t-SNE picture ------------------------------------------------------------------------------

def tsne_plot(feats, labels, path, classes: int = 10, seed: int = 0, per_class: int = 300,
              class_names: list[str] | None = None, title: str | None = None, iterations: int = 1000) -> dict:
    """A PNG of a 2-D t-SNE of `classes` random classes (at most `per_class` samples each),
    coloured by class, as CLIM's Figure 1. Returns what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    f = F.normalize(_as_tensor(feats), dim=1).numpy()
    y = _labels(labels).numpy()
    rng = np.random.default_rng(seed)
    present = np.unique(y)
    chosen = np.sort(rng.choice(present, size=min(classes, present.size), replace=False))
    picks = []
    for c in chosen:
        ids = np.flatnonzero(y == c)
        picks.append(rng.choice(ids, size=min(per_class, ids.size), replace=False))
    idx = np.sort(np.concatenate(picks))
    if idx.size < 3:
        raise UserError(f"tsne: need at least 3 samples, got {idx.size}")
    perplexity = float(min(30.0, (idx.size - 1) / 3))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
               learning_rate="auto", max_iter=max(250, iterations)).fit_transform(f[idx])

    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    cmap = plt.get_cmap("tab10" if chosen.size <= 10 else "tab20")
    for n, c in enumerate(chosen):
        sel = y[idx] == c
        name = class_names[c] if class_names is not None else str(c)
        ax.scatter(emb[sel, 0], emb[sel, 1], s=6, color=cmap(n % cmap.N), label=name, alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {chosen.size} classes")
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as out:
        fig.savefig(out, format="png")
    plt.close(fig)
    return {"path": str(path), "classes": [int(c) for c in chosen], "points": int(idx.size)}


# --- held-out split -----------------------------------------------------------------------------

def holdout_split(num_samples: int, every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, test_ids): ids divisible by `every` are held out. Shard ids come from a seeded
    shuffle, so this is a random 1/every split that is the same on every run."""
    ids = np.arange(num_samples)
    test = ids % every == 0
    return ids[~test], ids[test]


# --- features of a checkpoint, cached -----------------------------------------------------------

def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def feature_cache_path(cache_dir: str | Path, checkpoint_sha: str, dataset_id: str, image_size: int,
                       encoder: str) -> Path:
    return Path(cache_dir) / f"features-{checkpoint_sha[:16]}-{dataset_id[:16]}-{image_size}px-{encoder}.npz"


def _load_cached(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FEATURE_CACHE_FORMAT:
                return None
            feats, labels = z["features"], z["labels"]
            if (feats.ndim != 2 or labels.shape != (feats.shape[0],) or not np.issubdtype(labels.dtype, np.integer)
                    or not np.isfinite(feats).all()):
                return None
            return torch.from_numpy(feats.astype(np.float32)), labels.astype(np.int64)
    except Exception:  # a broken cache file is recomputed, never trusted
        return None


def _save_cached(path: Path, feats: torch.Tensor, labels: np.ndarray, meta: dict) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, features=feats.numpy().astype(np.float16), labels=labels.astype(np.int64),
                 meta=np.array(json.dumps(dict(meta, format=FEATURE_CACHE_FORMAT), sort_keys=True)))


def check_feature_options(image_size: int | None, batch_size: int) -> None:
    """--image-size (None: the checkpoint's) and --batch-size of every measurement, before any work."""
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size {image_size}: must be positive (leave it out for the checkpoint's size)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be positive")


def checkpoint_features(checkpoint: str | Path, shards_dir: str | Path, cache_dir: str | Path | None, *,
                        image_size: int | None = None, batch_size: int = 256, device=None,
                        workers: int = 2, threads: int = 2, encoder: str = "query",
                        model=None, log=print, progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """L2-normalised pooled backbone features of every sample in `shards_dir`, in id order.

    `encoder`: "query" (the backbone that linear evaluation and export use) or "key" (the momentum
    encoder). Features are extracted once per (checkpoint content, shards dataset id, image size,
    encoder) and cached under `cache_dir` as float16; fresh results go through the same float16
    round trip so a cached run reports exactly what the first run did. `progress`: show the pass.
    """

    check_feature_options(image_size, batch_size)
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise UserError(f"{checkpoint}: a folder, not a checkpoint file")
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: checkpoint not found")
    dataset = ShardDataset(shards_dir)
    sha = file_sha256(checkpoint)
    if model is None or image_size is None:
        model, cfg, _ = model_from_checkpoint(checkpoint, map_location="cpu")
        image_size = image_size or cfg.image_size
    path = feature_cache_path(cache_dir, sha, dataset.dataset_id, image_size, encoder) if cache_dir else None
    if path is not None and path.is_file():
        cached = _load_cached(path)
        if cached is not None and cached[0].shape[0] == dataset.num_samples:
            log(f"features: cached {path}")
            return cached
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    feats, labels = extract_backbone_features(model, dataset, image_size=image_size, batch_size=batch_size,
                                              device=device, workers=workers, threads=threads, encoder=encoder,
                                              progress=f"features of {dataset.root.name}" if progress else None)
    feats = feats.half().float()
    labels = np.asarray(labels, dtype=np.int64)
    if path is not None:
        _save_cached(path, feats, labels, dict(checkpoint=str(checkpoint), checkpoint_sha256=sha,
                                               shards=str(shards_dir), dataset_id=dataset.dataset_id,
                                               image_size=image_size, encoder=encoder))
        log(f"features: wrote {path}")
    return feats, labels


def eval_backbone(model, encoder: str = "query") -> torch.nn.Module:
    """The pooled-feature backbone of a MoCo model: the query encoder's (what linear evaluation and
    export use) or the momentum encoder's."""
    enc = model.encoder_q if encoder == "query" else model.encoder_k
    return enc.backbone


@torch.no_grad()
def extract_backbone_features(model, shards, *, image_size: int, batch_size: int, device,
                              workers: int = 2, threads: int = 2, encoder: str = "query",
                              progress: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled backbone features of every sample of `shards` (a ShardDataset or its folder), in id
    order; `progress` as in clim_fast.features.extract_features."""
    dataset = shards if isinstance(shards, ShardDataset) else ShardDataset(shards)
    backbone = eval_backbone(model, encoder).to(device)
    was_training = backbone.training
    backbone.eval()

    def encode(x):
        return F.normalize(backbone(x).float(), dim=1)

    loader = FeatureLoader(dataset, batch_size=batch_size, image_size=image_size, device=device,
                           workers=workers, threads=threads)
    try:
        feats, labels = extract_features(encode, loader, dataset.num_samples, progress)
    finally:
        loader.close()
        backbone.train(was_training)
    return _as_tensor(feats), np.asarray(labels, dtype=np.int64)


# --- the `clim-fast eval` measurements on a checkpoint ------------------------------------------

def _class_names(dataset) -> list[str]:
    names = [""] * dataset.num_classes
    for name, index in dataset.classes.items():
        names[index] = name
    return names


def check_same_classes(train, val, train_dir=None, val_dir=None) -> None:
    """Every eval's guard: the validation shards must use the training shards' class mapping
    (name -> index), else labels would silently mean different classes. `train`/`val`: ShardDatasets
    or shard folders. One-line UserError naming both folders and the first difference."""

    train = train if isinstance(train, ShardDataset) else ShardDataset(train)
    val = val if isinstance(val, ShardDataset) else ShardDataset(val)
    if train.classes == val.classes:
        return
    train_dir, val_dir = train_dir or train.root, val_dir or val.root
    only_val = sorted(set(val.classes) - set(train.classes))
    only_train = sorted(set(train.classes) - set(val.classes))
    moved = sorted(n for n in set(train.classes) & set(val.classes) if train.classes[n] != val.classes[n])
    if only_val:
        detail = f"class {only_val[0]!r} is not among its {len(train.classes)} classes"
    elif only_train:
        detail = f"class {only_train[0]!r} is missing ({len(val.classes)} of {len(train.classes)} classes)"
    else:
        detail = f"class {moved[0]!r} has index {val.classes[moved[0]]}, not {train.classes[moved[0]]}"
    raise UserError(f"{val_dir}: its class mapping differs from that of {train_dir} ({detail}); shard the "
                    f"validation images with `--classes {train_dir}`")


def check_held_out(train: ShardDataset, val: ShardDataset, train_dir, val_dir) -> None:
    """kNN and linear evaluation: --val-shards must be other images than --shards (the same set
    would score each query against itself), with the same class mapping."""
    if train.dataset_id == val.dataset_id:
        raise UserError(f"--val-shards {val_dir}: the same images as --shards {train_dir} (dataset "
                        f"{train.dataset_id}); every query would find itself. Leave out --val-shards to hold "
                        "out part of --shards, or shard the validation images")
    check_same_classes(train, val, train_dir, val_dir)


def knn_eval(checkpoint, shards_dir, val_shards_dir=None, cache_dir=None, *, k: int = 200, t: float = 0.07,
             holdout_every: int = 10, log=print, **feature_kw) -> dict:
    """kNN top-1/top-5 of a checkpoint: the training shards are the memory bank, --val-shards the
    queries; without --val-shards, every `holdout_every`-th sample id of the shards is held out as
    the queries and the rest are the memory bank."""

    train_set = ShardDataset(shards_dir)
    if val_shards_dir:  # before any feature pass: a mismatch is refused at once
        check_held_out(train_set, ShardDataset(val_shards_dir), shards_dir, val_shards_dir)
    feats, labels = checkpoint_features(checkpoint, shards_dir, cache_dir, log=log, **feature_kw)
    if val_shards_dir:
        test_feats, test_labels = checkpoint_features(checkpoint, val_shards_dir, cache_dir, log=log, **feature_kw)
        split = "val-shards"
    else:
        train_ids, test_ids = holdout_split(train_set.num_samples, holdout_every)
        if test_ids.size == 0 or train_ids.size == 0:
            raise UserError(f"{shards_dir}: too few samples ({train_set.num_samples}) for a held-out split")
        feats, labels, test_feats, test_labels = feats[train_ids], labels[train_ids], feats[test_ids], labels[test_ids]
        split = f"held-out 1/{holdout_every} of --shards"
    if k > len(labels):
        log(f"knn: --k {k} is more than the {len(labels)} samples of the memory bank; using k={len(labels)}")
        k = len(labels)
    metrics = knn_classify(feats, labels, test_feats, test_labels, k=k, t=t, num_classes=train_set.num_classes)
    return dict(metrics, k=k, t=t, train_samples=int(len(labels)), test_samples=int(len(test_labels)), split=split)


def similarity_eval(checkpoint, shards_dir, cache_dir=None, *, log=print, same_classes_as=None,
                    **feature_kw) -> dict:
    """Class similarity on `shards_dir`; `same_classes_as`: the training shards it must share its
    class mapping with (when `shards_dir` is a validation split)."""
    if same_classes_as is not None:
        check_same_classes(same_classes_as, shards_dir)
    labels = np.asarray(ShardDataset(shards_dir).labels)
    counts = np.bincount(labels[labels >= 0])
    if (counts > 0).sum() < 2 or counts.max() < 2:  # before the feature pass; else a NaN in the JSON
        raise UserError(f"{shards_dir}: {int((counts > 0).sum())} class(es), at most {int(counts.max(initial=0))} "
                        "sample(s) in one; the similarity within and between classes needs 2 classes and a "
                        "class with 2 samples at the least")
    feats, labels = checkpoint_features(checkpoint, shards_dir, cache_dir, log=log, **feature_kw)
    out = class_similarity(feats, labels)
    return dict(out, gap=out["intra"] - out["inter"], samples=int(len(labels)))


def tsne_eval(checkpoint, shards_dir, png, cache_dir=None, *, classes: int = 10, per_class: int = 300,
              seed: int = 0, title: str | None = None, log=print, same_classes_as=None, **feature_kw) -> dict:

    if same_classes_as is not None:
        check_same_classes(same_classes_as, shards_dir)
    names = _class_names(ShardDataset(shards_dir))
    feats, labels = checkpoint_features(checkpoint, shards_dir, cache_dir, log=log, **feature_kw)
    info = tsne_plot(feats, labels, png, classes=classes, seed=seed, per_class=per_class, class_names=names,
                     title=title or f"t-SNE: {Path(checkpoint).name}")
    info["class_names"] = [names[c] for c in info["classes"]]
    return info
