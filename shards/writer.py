"""`write_shards`: an image folder -> WebDataset tars, DALI indexes, per-sample index, manifest.

Ids follow a seeded permutation of the source files; a skipped file takes no id. Workers only
check/re-encode files and their results come back in order, so the output depends on the inputs
and the seed alone. A shard is complete once its tar is renamed into place; the record written
just before it (in .partial/) lets --resume continue after the last complete shard.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shards.errors import UserError, os_errors_as_user_errors
from shards.lock import folder_lock
from shards.processes import exit_with_parent
from shards.atomic import atomic_write_bytes, atomic_write_text
from shards.dali_index import index_line, index_text
from shards.dataset import ShardDataset
from shards.encode import SKIP, Checked, check_chunk, check_file
from shards.format import (DEFAULT_MAXCOUNT, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PARTIAL,
                           SAMPLE_DTYPE, SAMPLES, SOURCES, index_name, key_width, sample_key,
                           shard_name)
from shards.manifest import dataset_id, load_manifest, write_manifest
from shards.scan import SourceList, find_sources
from shards.tar_writer import TarWriter

RUN_RECORD = "run.json"
# Test hook: seconds to sleep after each completed shard, so a test can kill a run mid-way.
DELAY_ENV = "CLIM_FAST_SHARD_DELAY_S"


MAX_WORKERS_PER_CORE = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while shards were being written; the message says what is kept and how to finish."""


def write_shards(src, out, *, maxcount: int = DEFAULT_MAXCOUNT, workers: int = 1, seed: int = 0,
                 labels=None, max_side: int | None = None, resume: bool = False,
                 progress: bool = False, classes=None, follow_links: bool = False) -> dict:
    """Shard the images below `src` into `out`; returns a summary dict.

    `labels`: a labels file for a flat folder. `classes`: a class mapping (dict, or a shard folder /
    manifest whose mapping to reuse, e.g. the train shards' for validation). `follow_links`: also
    follow symbolic links that point outside `src` (shards.scan.SYMLINK_RULE).
    """
    if maxcount < 1:
        raise UserError(f"--maxcount: must be at least 1, got {maxcount}")
    if workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side: must be at least 1, got {max_side}")
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    src_path, out_path = _resolved(src), _resolved(out)
    if src_path in out_path.parents or src_path == out_path:
        raise UserError(f"{out}: inside the source folder {src}; choose an output folder outside it")
    started = time.perf_counter()
    sources = find_sources(src, labels, _class_mapping(classes), follow_links)
    # follow_links changes which links the manifest lists as ignored even where it selects the same
    # files; left out when off, so default runs keep their fingerprints (and can resume older runs).
    fingerprint = sources.fingerprint({"seed": seed, "maxcount": maxcount, "max_side": max_side,
                                       **({"follow_links": True} if follow_links else {})})
    out = Path(out)
    # One run per OUT: a second run is refused while this one lives (shards/lock.py), and any
    # file-system failure (permissions, a file in the way, a full disk) is a one-line error.
    with folder_lock(out, "`clim-fast shard` run"), os_errors_as_user_errors(out):
        return _write_locked(src, out, sources, fingerprint, maxcount=maxcount, workers=workers, seed=seed,
                             labels=labels, max_side=max_side, resume=resume, progress=progress, started=started,
                             follow_links=follow_links)


def _resolved(path) -> Path:
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise UserError(f"{path}: cannot be resolved ({e})") from None


def _write_locked(src, out: Path, sources: SourceList, fingerprint: str, *, maxcount: int, workers: int,
                  seed: int, labels, max_side: int | None, resume: bool, progress: bool, started: float,
                  follow_links: bool) -> dict:
    finished = _finished_manifest(out, fingerprint, resume)
    if finished is not None:
        try:
            ShardDataset(out)  # every file there, at its size (a full check of the bytes: `clim-fast verify`)
        except UserError as e:
            raise UserError(f"{out}: holds this dataset but is damaged: {e}. Move it away and shard again "
                            "(`clim-fast verify` lists every problem)") from None
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
        return _summary(out, finished, started, resumed_shards=len(finished["shards"]), already_complete=True,
                        checked_files=0)

    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    if not (partial / RUN_RECORD).exists():
        atomic_write_text(partial / RUN_RECORD, json.dumps({"fingerprint": fingerprint}) + "\n")
    records = _complete_shards(out) if resume else []
    _remove_leftovers(out, len(records))

    order = np.random.default_rng(seed).permutation(len(sources))
    start = records[-1]["next_candidate"] if records else 0
    next_id = sum(r["count"] for r in records)
    width = key_width(len(sources))  # from the file count: N (after skips) is known only at the end
    resumed = len(records)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    skipped: list[dict] = []
    builder = None
    try:
        with _progress_bar(progress, len(sources), start) as advance:
            for position, checked in _checked_stream(sources, order, start, workers, max_side):
                advance()
                i = int(order[position])
                if checked.action == SKIP:
                    skipped.append({"path": sources.paths[i], "reason": checked.reason})
                    continue
                if builder is None:
                    builder = _ShardBuilder(out, len(records), next_id, width)
                builder.add(next_id, sources.paths[i], int(sources.labels[i]), checked)
                next_id += 1
                if builder.count == maxcount:
                    records.append(builder.finish(position + 1, skipped))
                    builder, skipped = None, []
                    if delay:
                        time.sleep(delay)
            if builder is not None:
                records.append(builder.finish(len(order), skipped))
                skipped = []
        if next_id == 0:
            shutil.rmtree(partial, ignore_errors=True)
            reasons = Counter(s["reason"] for s in skipped).most_common(1)
            raise UserError(f"{src}: none of its {len(sources)} image files could be read "
                            f"(most common problem: {reasons[0][0]})")
        manifest = _finalize(out, sources, records, skipped, fingerprint, width,
                             {"src": str(Path(src).resolve()),
                              "labels": str(Path(labels).resolve()) if labels else None,
                              "seed": seed, "maxcount": maxcount, "max_side": max_side,
                              "follow_links": follow_links})
        shutil.rmtree(partial, ignore_errors=True)
    except KeyboardInterrupt:
        if builder is not None:
            builder.discard()
        raise Interrupted(f"{sum(r['count'] for r in records):,} of {len(sources):,} images written to {out} in "
                          f"{len(records)} complete shard(s); run the same command with --resume to finish") from None
    return _summary(out, manifest, started, resumed_shards=resumed, already_complete=False,
                    checked_files=len(sources) - start)


def _class_mapping(classes) -> dict[str, int] | None:
    if classes is None or isinstance(classes, dict):
        return classes
    path = Path(classes)
    return dict(load_manifest(path.parent if path.is_file() else path)["classes"])


def _finished_manifest(out: Path, fingerprint: str, resume: bool) -> dict | None:
    """The manifest when OUT already holds exactly this run; a UserError when it holds another."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.exists():
        return None
    if (out / MANIFEST).exists():
        manifest = load_manifest(out)
        if manifest.get("source_fingerprint") == fingerprint:
            return manifest
        raise UserError(f"{out}: already holds a different dataset (id {manifest['dataset_id']}, "
                        f"{manifest['num_samples']} samples); choose an empty folder")
    run_record = out / PARTIAL / RUN_RECORD
    if run_record.exists():
        try:
            previous = json.loads(run_record.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != fingerprint:
            raise UserError(f"{out}: holds an interrupted run of other inputs or arguments; "
                            "choose an empty folder")
        if not resume:
            raise UserError(f"{out}: holds an interrupted run of these inputs; pass --resume to finish it")
        return None
    if any(out.glob("shard-*.tar")):
        raise UserError(f"{out}: holds shard files without a manifest; choose an empty folder")
    return None


def _record_path(out: Path, number: int) -> Path:
    return out / PARTIAL / f"shard-{number:06d}.json"


def _complete_shards(out: Path) -> list[dict]:
    """Records of the shards an interrupted run completed, in order, up to the first gap."""
    records = []
    for number in itertools.count():
        try:
            record = json.loads(_record_path(out, number).read_text())
        except (OSError, ValueError):
            break
        tar = out / shard_name(number)
        first_id = sum(r["count"] for r in records)
        if (record.get("first_id") != first_id or not tar.is_file()
                or tar.stat().st_size != record["bytes"] or not (out / index_name(number)).is_file()):
            break
        records.append(record)
    return records


def _remove_leftovers(out: Path, keep: int) -> None:
    """Temporary files and anything from shard `keep` on: the run rewrites them."""
    for path in itertools.chain(out.glob(".*.tmp"), (out / PARTIAL).glob(".*.tmp")):
        path.unlink(missing_ok=True)
    for pattern, folder in (("shard-*.tar", out), ("shard-*.idx", out), ("shard-*.json", out / PARTIAL)):
        for path in folder.glob(pattern):
            number = path.stem.split("-", 1)[1]
            if not number.isdigit() or int(number) >= keep:
                path.unlink(missing_ok=True)


def _checked_stream(sources: SourceList, order: np.ndarray, start: int, workers: int,
                    max_side: int | None):
    """(position in `order`, Checked) for every file from `start` on, in order."""
    paths = [str(sources.root / sources.paths[i]) for i in order[start:]]
    if workers == 1 or len(paths) < 2:
        for k, path in enumerate(paths):
            yield start + k, check_file(path, max_side)
        return
    # Checking is CPU-bound: processes beyond MAX_WORKERS_PER_CORE a core only add start-up (a
    # mistyped --workers 100000 would start that many).
    workers = min(workers, MAX_WORKERS_PER_CORE * (os.cpu_count() or 1), len(paths))
    # Chunks amortise the round trip; a bounded window keeps memory flat at ImageNet scale.
    chunk = max(1, min(32, len(paths) // (workers * 8)))
    chunks = (paths[k:k + chunk] for k in range(0, len(paths), chunk))
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_worker_init,
                               initargs=(os.getpid(),))
    finished = False
    with _kill_pool_on_sigterm(pool):
        try:
            window = deque(pool.submit(check_chunk, c, max_side) for c in itertools.islice(chunks, workers * 4))
            position = start
            while window:
                results = window.popleft().result()
                following = next(chunks, None)
                if following is not None:
                    window.append(pool.submit(check_chunk, following, max_side))
                for checked in results:
                    yield position, checked
                    position += 1
            finished = True
        finally:
            if not finished:  # an error or an interrupt: do not wait for the queued chunks
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)


def _pool_context():
    # fork: workers run only PIL on their own files, so locks held by the parent's threads do not
    # matter, and unlike spawn/forkserver it works from a script without a __main__ guard.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _worker_init(parent_pid: int) -> None:
    """Pool worker set-up: die with the parent (even on kill -9), leave SIGINT/SIGTERM to it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent(parent_pid)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):
            pass
    # A worker killed while sending a result leaves half a message in the pipe, and the pool's
    # reader thread would wait for the rest forever (so would shutdown): without our write end
    # open too, it reads end-of-file and the pool breaks instead.
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    if writer is not None:
        writer.close()


@contextmanager
def _kill_pool_on_sigterm(pool: ProcessPoolExecutor):
    """In the main thread: SIGTERM kills the workers and ends the process at once (exit 143). What
    is on disk is crash-safe by design, so `--resume` finishes the run."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        _kill_workers(pool)
        print("shard: stopped by SIGTERM; complete shards are kept, run the same command with --resume "
              "to finish", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ShardBuilder:
    """One tar being written under a temporary name, with its index lines and sample rows."""

    def __init__(self, out: Path, number: int, first_id: int, width: int):
        self.out, self.number, self.first_id, self.width = out, number, first_id, width
        self.tmp = out / f".{shard_name(number)}.tmp"
        self.file = open(self.tmp, "wb", buffering=1 << 20)
        self.tar = TarWriter(self.file)
        self.index_lines: list[str] = []
        self.columns: dict[str, list[int]] = {name: [] for name in ("offset", "size", "label", "width", "height")}
        self.sources: list[str] = []
        self.reencoded: list[list[str]] = []

    @property
    def count(self) -> int:
        return len(self.sources)

    def add(self, sample_id: int, source: str, label: int, checked: Checked) -> None:
        key = sample_key(sample_id, self.width)
        cls = str(label).encode()
        jpg_offset = self.tar.add(f"{key}.jpg", checked.data)
        cls_offset = self.tar.add(f"{key}.cls", cls)
        self.index_lines.append(index_line([("jpg", jpg_offset, len(checked.data), f"{key}.jpg"),
                                            ("cls", cls_offset, len(cls), f"{key}.cls")]))
        for name, value in (("offset", jpg_offset), ("size", len(checked.data)), ("label", label),
                            ("width", checked.width), ("height", checked.height)):
            self.columns[name].append(value)
        self.sources.append(source)
        if checked.reason:
            self.reencoded.append([source, checked.reason])

    def finish(self, next_candidate: int, skipped: list[dict]) -> dict:
        size, sha = self.tar.finish()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        index = index_text(self.index_lines)
        atomic_write_text(self.out / index_name(self.number), index)
        record = {"number": self.number, "first_id": self.first_id, "count": self.count,
                  "bytes": size, "sha256": sha, "index_sha256": hashlib.sha256(index.encode()).hexdigest(),
                  "next_candidate": next_candidate, "skipped": skipped, "reencoded": self.reencoded,
                  "sources": self.sources, "columns": self.columns}
        atomic_write_text(_record_path(self.out, self.number), json.dumps(record))
        os.replace(self.tmp, self.out / shard_name(self.number))  # the shard is complete from here on
        return record

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _finalize(out: Path, sources: SourceList, records: list[dict], tail_skipped: list[dict],
              fingerprint: str, width: int, args: dict) -> dict:
    rows = np.zeros(sum(r["count"] for r in records), SAMPLE_DTYPE)
    for record in records:
        part = rows[record["first_id"]:record["first_id"] + record["count"]]
        part["shard"] = record["number"]
        for name, values in record["columns"].items():
            part[name] = values
    paths = [p for r in records for p in r["sources"]]
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    atomic_write_bytes(out / SAMPLES, buf.getvalue())
    sources_text = "".join(p + "\n" for p in paths)
    atomic_write_text(out / SOURCES, sources_text)

    skipped = [s for r in records for s in r["skipped"]] + tail_skipped
    reencoded = [e for r in records for e in r["reencoded"]]
    classes = sources.classes
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset_id": dataset_id(paths, rows["label"].tolist(), rows["size"].tolist()),
        "num_samples": int(len(rows)),
        "num_classes": int(max(classes.values()) + 1),
        "classes": classes,
        "key_width": width,
        "source_files": len(sources),
        "source_fingerprint": fingerprint,
        "shards": [{"name": shard_name(r["number"]), "index": index_name(r["number"]),
                    "first_id": r["first_id"], "count": r["count"], "bytes": r["bytes"],
                    "sha256": r["sha256"], "index_sha256": r["index_sha256"]} for r in records],
        "samples": {"file": SAMPLES, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
        "sources": {"file": SOURCES, "sha256": hashlib.sha256(sources_text.encode()).hexdigest()},
        "args": args,
        "skipped": skipped,
        "ignored_links": sources.ignored,
        "reencoded": {
            "count": len(reencoded),
            "by_reason": dict(sorted(Counter(reason for _, reason in reencoded).items())),
            # Resizing alone (--max-side) can touch most files: those are counted, not listed.
            "files": [{"path": p, "reason": reason} for p, reason in reencoded if reason != "resized"],
        },
    }
    write_manifest(out, manifest)  # last: its presence marks the folder complete
    return manifest


def _summary(out: Path, manifest: dict, started: float, *, resumed_shards: int, already_complete: bool,
             checked_files: int) -> dict:
    seconds = time.perf_counter() - started
    return {
        "out": str(out),
        "dataset_id": manifest["dataset_id"],
        "num_samples": manifest["num_samples"],
        "num_classes": manifest["num_classes"],
        "num_shards": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "source_files": manifest["source_files"],
        "skipped": len(manifest["skipped"]),
        "skipped_files": manifest["skipped"],
        "ignored_links": manifest.get("ignored_links", []),
        "reencoded": manifest["reencoded"]["count"],
        "reencoded_by_reason": manifest["reencoded"]["by_reason"],
        "resumed_shards": resumed_shards,
        "already_complete": already_complete,
        "seconds": round(seconds, 3),
        "checked_files": checked_files,
        "images_per_s": round(checked_files / seconds, 1) if seconds > 0 else 0.0,
    }


@contextmanager
def _progress_bar(enabled: bool, total: int, completed: int):
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "… img/s")

    columns = (TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("shard", total=total, completed=completed)
        yield lambda: bar.advance(task)
