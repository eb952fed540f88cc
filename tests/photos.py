"""Small real image folders for tests, benchmarks and rehearsals (needs scikit-image).

Each class is one real photo from scikit-image's sample data; its images are random crops of
that photo (random position, size, aspect, flip), resized and JPEG-encoded. Classes are therefore
visually coherent, so kNN accuracy and the label purity of mined positives are meaningful.

`IMAGENET_LIKE` makes JPEGs of ImageNet's weight (about 110 KB mean, 350-500 px sides): the crops
are upscaled from small sample photos, so on their own they are smooth and compress to ~30 KB;
a uniform grain of +-10 levels and 4:4:4 chroma at quality 94 give them ImageNet's entropy, and
the decoder the same amount of work per pixel.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "camera", "coins")

# measured: 110 KB mean over 60 images (350-500 px)
IMAGENET_LIKE = dict(side_range=(350, 500), quality=94, grain=10, subsampling=0)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def random_crop_jpeg(photo: np.ndarray, rng: np.random.Generator, side_range=(48, 96),
                     quality: int = 90, grain: int = 0, subsampling: int | None = None) -> bytes:
    """One crop as JPEG bytes. `grain` > 0 adds uniform noise in [-grain, grain] (texture);
    `subsampling` is PIL's (0 = 4:4:4, 2 = 4:2:0; None = PIL's default)."""
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
    if grain:
        pixels = np.asarray(crop).astype(np.int16) + rng.integers(-grain, grain + 1, (crop.size[1], crop.size[0], 3),
                                                                  dtype=np.int16)
        crop = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    options = {} if subsampling is None else {"subsampling": subsampling}
    crop.save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def _write_class(args) -> None:
    root, c, per_class, rng_key, side_range, ext, jpeg_options = args
    rng = np.random.default_rng(rng_key)
    _write_class_with(Path(root), c, per_class, rng, side_range, ext, jpeg_options)


def _write_class_with(root: Path, c: int, per_class: int, rng, side_range, ext, jpeg_options) -> None:
    name = PHOTOS[c]
    photo = _photo(name)
    folder = root / f"n{c:08d}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        (folder / f"{name}_{i:05d}{ext}").write_bytes(random_crop_jpeg(photo, rng, side_range, **jpeg_options))


def make_photo_folder(root: str | Path, classes: int = 4, per_class: int = 12, seed: int = 0,
                      side_range=(48, 96), ext: str = ".jpg", quality: int = 90, grain: int = 0,
                      subsampling: int | None = None, workers: int = 1) -> Path:
    """ImageNet train layout: root/<class>/<name><ext>. Returns root.

    `workers` > 1 writes the classes in parallel processes, each class from its own generator
    (seed, class): a different, equally deterministic set from the one `workers=1` writes."""
    root = Path(root)
    if classes > len(PHOTOS):
        raise ValueError(f"at most {len(PHOTOS)} classes")
    jpeg_options = dict(quality=quality, grain=grain, subsampling=subsampling)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(str(root), c, per_class, [seed, c], side_range, ext, jpeg_options) for c in range(classes)]
        with ProcessPoolExecutor(min(workers, classes)) as pool:
            list(pool.map(_write_class, jobs))
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        _write_class_with(root, c, per_class, rng, side_range, ext, jpeg_options)
    return root
