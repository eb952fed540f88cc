"""Walk SRC: class folders (ImageNet train layout) or a flat folder plus a labels file.

Class index = position of the folder (or label) name in sorted order, unless a class mapping is
given (e.g. the train shards' manifest, so validation shards share its indices).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})


@dataclass
class SourceList:
    root: Path
    paths: list[str]  # relative to root, posix separators, sorted
    labels: np.ndarray  # int64, one per path
    sizes: np.ndarray  # int64 file sizes, part of the fingerprint (a changed file changes it)
    classes: dict[str, int]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self, args: dict) -> str:
        """Hash of everything that determines the output: the file list, labels, classes, args."""
        h = hashlib.sha256()
        h.update(json.dumps({"classes": self.classes, "args": args}, sort_keys=True).encode())
        for path, label, size in zip(self.paths, self.labels.tolist(), self.sizes.tolist()):
            h.update(f"{path}\t{label}\t{size}\n".encode())
        return h.hexdigest()


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path, root: Path) -> list[tuple[str, int]]:
    """(relative posix path, file size) of every image-named file below folder, hidden ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_image_name(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                size = -1  # unreadable: the encoder skips it with the reason
            found.append((Path(full).relative_to(root).as_posix(), size))
    return found


def find_sources(src: str | Path, labels: str | Path | None = None,
                 classes: dict[str, int] | None = None) -> SourceList:
    root = Path(src)
    if not root.exists():
        raise UserError(f"{src}: no such folder")
    if not root.is_dir():
        raise UserError(f"{src}: not a folder")
    if labels is not None:
        return _flat_with_labels(root, Path(labels), classes)
    return _class_folders(root, classes)


def _class_folders(root: Path, classes: dict[str, int] | None) -> SourceList:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if any(is_image_name(p.name) for p in root.iterdir() if p.is_file()):
            raise UserError(f"{root}: images but no class folders; for a flat folder pass --labels FILE")
        raise UserError(f"{root}: no images (expected one folder of images per class)")
    if classes is None:
        classes = {name: i for i, name in enumerate(folders)}
    else:
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise UserError(f"{root}: class folder {unknown[0]!r} is not in the given class mapping "
                            f"({len(unknown)} unknown folder(s))")
    paths, labels, sizes = [], [], []
    for name in folders:
        for rel, size in sorted(_walk_images(root / name, root)):
            paths.append(rel)
            labels.append(classes[name])
            sizes.append(size)
    if not paths:
        raise UserError(f"{root}: no images in its {len(folders)} class folder(s) "
                        f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return SourceList(root, paths, np.asarray(labels, np.int64), np.asarray(sizes, np.int64), classes)


_HEADER = re.compile(r"^\s*(imageid|image_id|file|filename|path|name)\s*[,\s]", re.IGNORECASE)


def read_labels_file(path: Path) -> list[tuple[int, str, str]]:
    """(line number, file name, label) per entry. Lines are `NAME LABEL` or `NAME,LABEL ...`
    (the ImageNet LOC_val_solution.csv form works: its first PredictionString token is the synset)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read labels file ({e})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#") or (number == 1 and _HEADER.match(line)):
            continue
        fields = line.split(",", 1) if "," in line else line.split(None, 1)
        label = fields[1].split()[0] if len(fields) == 2 and fields[1].split() else ""
        if not label:
            raise UserError(f"{path} line {number}: expected 'FILE LABEL', got {line!r}")
        entries.append((number, fields[0].strip(), label))
    if not entries:
        raise UserError(f"{path}: labels file has no entries")
    return entries


def _flat_with_labels(root: Path, labels_path: Path, classes: dict[str, int] | None) -> SourceList:
    found = sorted(_walk_images(root, root))
    if not found:
        raise UserError(f"{root}: no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    entries = read_labels_file(labels_path)
    # An entry names a file by its path below SRC, with or without the extension.
    lookup: dict[str, int] = {}
    for i, (rel, _) in enumerate(found):
        lookup[rel] = i
        lookup.setdefault(os.path.splitext(rel)[0], i)
    label_of: dict[int, str] = {}
    for number, name, label in entries:
        i = lookup.get(name.replace(os.sep, "/"))
        if i is None:
            raise UserError(f"{labels_path} line {number}: unknown file {name!r} (not an image in {root})")
        if i in label_of:
            raise UserError(f"{labels_path} line {number}: second label for {found[i][0]!r}")
        label_of[i] = label
    missing = [found[i][0] for i in range(len(found)) if i not in label_of]
    if missing:
        raise UserError(f"{labels_path}: no label for {len(missing)} image(s) in {root}, e.g. {missing[0]!r}")
    names = sorted(set(label_of.values()))
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise UserError(f"{labels_path}: unknown label {unknown[0]!r} (not in the given class mapping)")
    elif all(n.isdigit() for n in names):
        # Numeric labels are class indices already.
        classes = {str(k): k for k in sorted({int(n) for n in names})}
        label_of = {i: str(int(n)) for i, n in label_of.items()}
    else:
        classes = {name: k for k, name in enumerate(names)}
    labels = np.asarray([classes[label_of[i]] for i in range(len(found))], np.int64)
    return SourceList(root, [rel for rel, _ in found], labels,
                      np.asarray([size for _, size in found], np.int64), classes)
