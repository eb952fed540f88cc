"""Walk SRC: class folders (ImageNet train layout) or a flat folder plus a labels file.

Class index = position of the folder (or label) name in sorted order, unless a class mapping is
given (e.g. the train shards' manifest, so validation shards share its indices).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.errors import UserError, os_error_message

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})


@dataclass
class SourceList:
    root: Path
    paths: list[str]  # relative to root, posix separators, sorted
    labels: np.ndarray  # int64, one per path
    sizes: np.ndarray  # int64 file sizes, part of the fingerprint (a changed file changes it)
    classes: dict[str, int]
    ignored: list[dict] = field(default_factory=list)  # symbolic links not followed (SYMLINK_RULE)

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


SYMLINK_RULE = (
    "Symbolic links below SRC are followed only to targets inside SRC that no other path already "
    "reaches: a link that points outside SRC, at a folder that contains it (a loop), at a folder or "
    "file already included, or at nothing is ignored, and each real file is included once. Ignored "
    "links are listed in manifest.json (ignored_links) and in the summary. SRC itself may be a link. "
    "With follow_links (--follow-links), links that point outside SRC are followed too, by the same rules.")

OUTSIDE_SRC = "outside SRC"  # ends the reason of a link ignored for pointing outside SRC


class _Scanner:
    """Walks SRC without loops: real folders first, then the symbolic links met on the way.

    Every real folder is walked at most once and every real file is taken at most once (real
    paths win over paths through links); links to targets outside SRC are followed only when
    `follow_outside`.
    """

    def __init__(self, root: Path, follow_outside: bool = False):
        self.root = root
        self.root_real = os.path.realpath(root)
        self._prefix = self.root_real.rstrip(os.sep) + os.sep
        self.follow_outside = follow_outside
        self.real_dirs: dict[str, str] = {}  # real path -> relative path, of the folders walked (and SRC)
        self.file_dirs: set[str] = set()  # real paths of the folders whose images were taken
        self.linked_files: dict[str, str] = {}  # real path -> relative path, for files taken via links
        self.found: list[tuple[str, int, str | None]] = []  # (relative posix path, size, group)
        self.links: list[tuple[str, str | None]] = []  # (relative path, group) still to follow
        self.ignored: list[dict] = []  # {"path", "reason"}

    def _inside(self, real: str) -> bool:
        return real == self.root_real or real.startswith(self._prefix)

    def _rel_of_real(self, real: str) -> str:
        return "." if real == self.root_real else real[len(self._prefix):].replace(os.sep, "/")

    def _shown(self, real: str) -> str:
        """A walked folder or a file in one, as messages name it: its path below SRC, or else
        (outside SRC) the path of the link that reached it."""
        if self._inside(real):
            return self._rel_of_real(real)
        if real in self.real_dirs:
            return self.real_dirs[real]
        folder, name = os.path.split(real)
        return f"{self.real_dirs[folder]}/{name}"

    def walk(self, rel_dir: str, real_dir: str, group: str | None) -> None:
        """Every image below a folder reached by its real path; links are queued for `follow_links`."""
        stack = [(rel_dir, real_dir)]
        while stack:
            rel, real = stack.pop()
            self.real_dirs[real] = rel
            self.file_dirs.add(real)
            try:
                with os.scandir(real) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                raise UserError(f"{self.root / rel if rel else self.root}: cannot list the folder "
                                f"({os_error_message(e).split(': ', 1)[-1]})") from None
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_symlink():
                        self.links.append((child, group))
                    elif entry.is_dir(follow_symlinks=False):
                        if os.path.join(real, entry.name) not in self.real_dirs:  # walked via a link already
                            subdirs.append((child, os.path.join(real, entry.name)))
                    elif is_image_name(entry.name) and entry.is_file(follow_symlinks=False):
                        path = os.path.join(real, entry.name)
                        if path in self.linked_files:  # an earlier link took it
                            self.ignored.append({"path": child, "reason": f"second path to {self.linked_files[path]}"})
                        else:
                            self._add_file(child, path, group)
                except OSError:  # cannot even stat it: the encoder reports why
                    if is_image_name(entry.name):
                        self._add_file(child, os.path.join(real, entry.name), group)
            stack.extend(reversed(subdirs))

    def _add_file(self, rel: str, real: str, group: str | None) -> None:
        try:
            size = os.stat(real).st_size
        except OSError:
            size = -1  # unreadable: the encoder skips it with the reason
        self.found.append((rel, size, group))

    def _add_linked_file(self, rel: str, target: str, group: str | None) -> None:
        """A file reached through a link: taken unless a real path or an earlier link took it."""
        folder, name = os.path.split(target)
        if folder in self.file_dirs and not name.startswith(".") and is_image_name(name):
            self.ignored.append({"path": rel, "reason": f"second path to {self._shown(target)}"})
        elif target in self.linked_files:
            self.ignored.append({"path": rel, "reason": f"second path to {self.linked_files[target]}"})
        else:
            self.linked_files[target] = rel
            self._add_file(rel, target, group)

    def dir_link_problem(self, rel: str, target: str) -> str | None:
        """Why a link to the folder `target` is not followed, or None when it is."""
        inside = self._inside(target)
        if not inside and not self.follow_outside:
            return f"link to {target}, {OUTSIDE_SRC}"
        walked = target in self.real_dirs or target == self.root_real
        if walked or not inside:  # outside SRC a folder not walked (an ancestor of SRC) can contain it too
            parent = os.path.realpath((self.root / rel).parent)
            if parent == target or parent.startswith(target.rstrip(os.sep) + os.sep):
                return "link loop (points at a folder that contains it)"
        if walked:
            return f"second path to the folder {self._shown(target)}"
        return None

    def follow_links(self) -> None:
        while self.links:
            pending, self.links = sorted(self.links, key=lambda x: x[0]), []
            for rel, group in pending:
                self._follow(rel, group)

    def _follow(self, rel: str, group: str | None) -> None:
        path = self.root / rel
        target = os.path.realpath(path)
        is_dir = os.path.isdir(target)
        if not is_dir and not is_image_name(path.name):
            return  # not an image name: ignored like any other such file
        if not os.path.exists(target):
            self.ignored.append({"path": rel, "reason": "broken link"})
            return
        if not self._inside(target) and not self.follow_outside:
            self.ignored.append({"path": rel, "reason": f"link to {target}, {OUTSIDE_SRC}"})
            return
        if is_dir:
            problem = self.dir_link_problem(rel, target)
            if problem:
                self.ignored.append({"path": rel, "reason": problem})
            else:
                self.walk(rel, target, group)
        elif os.path.isfile(target):
            self._add_linked_file(rel, target, group)


def find_sources(src: str | Path, labels: str | Path | None = None,
                 classes: dict[str, int] | None = None, follow_links: bool = False) -> SourceList:
    """The images below `src` by SYMLINK_RULE; `follow_links` also follows links out of SRC."""
    root = Path(src)
    if not root.exists():
        raise UserError(f"{src}: no such folder")
    if not root.is_dir():
        raise UserError(f"{src}: not a folder")
    if labels is not None:
        found = _flat_with_labels(root, Path(labels), classes, follow_links)
    else:
        found = _class_folders(root, classes, follow_links)
    check_storable_names(root, found.paths)
    return found


def check_storable_names(root: Path, paths: list[str]) -> None:
    """Refuse paths that sources.txt (one UTF-8 path per line) and manifest.json cannot hold as
    they are: a line break in a name would split it over two lines, and a name whose bytes are not
    UTF-8 cannot be written at all (and would end a long run with a traceback)."""
    text = "\0".join(paths)
    problems = []
    if "\n" in text or "\r" in text:
        problems += [(p, "a line break in its name") for p in paths if "\n" in p or "\r" in p]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        problems += [(p, "a name that is not UTF-8") for p in paths if not _utf8(p)]
    if problems:
        path, why = problems[0]
        shown = repr(path) if _utf8(path) else repr(os.fsencode(path))[1:]  # its bytes, e.g. 'a\\xff.jpg'
        raise UserError(f"{root}: {len(problems)} image path(s) cannot be stored in sources.txt, e.g. {shown} "
                        f"({why}); rename them or move them out of SRC")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ignored_note(ignored: list[dict]) -> str:
    if not ignored:
        return ""
    outside = any(e["reason"].endswith(OUTSIDE_SRC) for e in ignored)
    return (f"; {len(ignored)} symbolic link(s) ignored, e.g. {ignored[0]['path']}: {ignored[0]['reason']}"
            + (" (--follow-links follows links out of SRC)" if outside else ""))


def _class_folders(root: Path, classes: dict[str, int] | None, follow_links: bool) -> SourceList:
    scanner = _Scanner(root, follow_links)
    scanner.real_dirs[scanner.root_real] = "."
    try:
        with os.scandir(scanner.root_real) as it:
            top = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        real_folders = [e.name for e in top if not e.is_symlink() and e.is_dir(follow_symlinks=False)]
        linked = [e.name for e in top if e.is_symlink()]
    except OSError as e:
        raise UserError(f"{root}: cannot list the folder ({os_error_message(e).split(': ', 1)[-1]})") from None
    for name in real_folders:
        scanner.walk(name, os.path.join(scanner.root_real, name), name)
    folders = list(real_folders)
    for name in linked:  # a linked class folder counts when the rule lets the walk follow it
        target = os.path.realpath(root / name)
        if not os.path.exists(target):
            scanner.ignored.append({"path": name, "reason": "broken link"})  # as a broken link to a file is
            continue
        if not os.path.isdir(target):  # a file beside the class folders: not a class
            continue
        problem = scanner.dir_link_problem(name, target)
        if problem:
            scanner.ignored.append({"path": name, "reason": problem})
        else:
            folders.append(name)
            scanner.walk(name, target, name)
    scanner.follow_links()
    folders.sort()
    if not folders:
        if any(is_image_name(p.name) for p in root.iterdir() if p.is_file()):
            raise UserError(f"{root}: images but no class folders; for a flat folder pass --labels FILE")
        raise UserError(f"{root}: no images (expected one folder of images per class){_ignored_note(scanner.ignored)}")
    if classes is None:
        classes = {name: i for i, name in enumerate(folders)}
    else:
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise UserError(f"{root}: class folder {unknown[0]!r} is not in the given class mapping "
                            f"({len(unknown)} unknown folder(s))")
    by_group: dict[str, list[tuple[str, int]]] = {name: [] for name in folders}
    for rel, size, group in scanner.found:
        by_group[group].append((rel, size))
    paths, labels, sizes = [], [], []
    for name in folders:
        for rel, size in sorted(by_group[name]):
            paths.append(rel)
            labels.append(classes[name])
            sizes.append(size)
    if not paths:
        raise UserError(f"{root}: no images in its {len(folders)} class folder(s) "
                        f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}){_ignored_note(scanner.ignored)}")
    return SourceList(root, paths, np.asarray(labels, np.int64), np.asarray(sizes, np.int64), classes,
                      sorted(scanner.ignored, key=lambda x: x["path"]))


def _walk_images(root: Path, follow_links: bool) -> tuple[list[tuple[str, int]], list[dict]]:
    """(relative posix path, size) of every image below root by SYMLINK_RULE, and the ignored links."""
    scanner = _Scanner(root, follow_links)
    scanner.walk("", scanner.root_real, None)
    scanner.follow_links()
    return sorted((rel, size) for rel, size, _ in scanner.found), sorted(scanner.ignored, key=lambda x: x["path"])


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


def _flat_with_labels(root: Path, labels_path: Path, classes: dict[str, int] | None,
                      follow_links: bool) -> SourceList:
    found, ignored = _walk_images(root, follow_links)
    if not found:
        raise UserError(f"{root}: no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                        f"{_ignored_note(ignored)}")
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
                      np.asarray([size for _, size in found], np.int64), classes, ignored)
