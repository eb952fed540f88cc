"""Small real image folders for tests, benchmarks and rehearsals (needs scikit-image).

Each class is one real photo from scikit-image's sample data; its images are random crops of
that photo (random position, size, aspect, flip), resized and JPEG-encoded. Classes are therefore
visually coherent, so kNN accuracy and the label purity of mined positives are meaningful.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "camera", "coins")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def random_crop_jpeg(photo: np.ndarray, rng: np.random.Generator, side_range=(48, 96),
                     quality: int = 90) -> bytes:
    h, w = photo.shape[:2]
    frac = rng.uniform(0.3, 0.9)
    ch, cw = int(h * frac), int(w * frac * rng.uniform(0.8, 1.25))
    cw = min(cw, w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    long_side = int(rng.integers(side_range[0], side_range[1] + 1))
    scale = long_side / max(crop.size)
    crop = crop.resize((max(8, round(crop.size[0] * scale)), max(8, round(crop.size[1] * scale))),
                       Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_photo_folder(root: str | Path, classes: int = 4, per_class: int = 12, seed: int = 0,
                      side_range=(48, 96), ext: str = ".jpg") -> Path:
    """ImageNet train layout: root/<class>/<name><ext>. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if classes > len(PHOTOS):
        raise ValueError(f"at most {len(PHOTOS)} classes")
    for c in range(classes):
        name = PHOTOS[c]
        photo = _photo(name)
        folder = root / f"n{c:08d}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{name}_{i:05d}{ext}").write_bytes(random_crop_jpeg(photo, rng, side_range))
    return root
