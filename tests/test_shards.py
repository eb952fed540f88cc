"""shards/: round trip, readers (webdataset, DALI, mmap), odd inputs, determinism, errors, verify."""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.errors import UserError
from photos import make_photo_folder
from shards import SAMPLE_DTYPE, ShardDataset, open_shards, verify_shards, write_shards

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def source_files(src: Path) -> dict[str, tuple[bytes, int]]:
    """relative path -> (bytes, class index) for a class-folder tree."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    return {p.relative_to(src).as_posix(): (p.read_bytes(), classes.index(p.parent.name))
            for p in sorted(src.rglob("*")) if p.is_file()}


def jpeg_bytes(img: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save_args)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- round trip

def test_round_trip_every_image_once_with_label_and_bytes(photo_folder, shard_dir):
    ds = ShardDataset(shard_dir)
    expected = source_files(photo_folder)
    sources = (shard_dir / "sources.txt").read_text().splitlines()
    assert ds.num_samples == len(expected) == 48
    assert sorted(sources) == sorted(expected)  # every source exactly once
    assert ds.classes == {name: i for i, name in enumerate(sorted(p.name for p in photo_folder.iterdir()))}
    assert ds.num_classes == 4
    assert [t.name for t in ds.tar_paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(p.is_file() for p in ds.idx_paths)
    assert ds.index.dtype == SAMPLE_DTYPE and ds.labels.dtype == np.int64
    for i, rel in enumerate(sources):
        data, label = ds.read(i)
        assert data == expected[rel][0]  # RGB JPEGs are kept byte for byte
        assert label == expected[rel][1] == ds.labels[i]
        with Image.open(io.BytesIO(data)) as img:
            assert (int(ds.index[i]["width"]), int(ds.index[i]["height"])) == img.size
    # ids follow a shuffle, so shards mix classes
    assert len(set(ds.labels[:16].tolist())) > 1
    assert [s["count"] for s in ds.manifest["shards"]] == [16, 16, 16]
    assert ds.manifest["skipped"] == [] and ds.manifest["reencoded"]["count"] == 0


def test_tar_members_keys_and_fixed_headers(shard_dir):
    ds = open_shards(shard_dir)
    names = []
    for path in ds.tar_paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                names.append(m.name)
    assert names == [f"{i:09d}.{ext}" for i in range(48) for ext in ("jpg", "cls")]


def test_dali_index_identical_to_wds2idx(shard_dir, tmp_path):
    import wds2idx

    for k, (tar, idx) in enumerate(zip(ShardDataset(shard_dir).tar_paths, ShardDataset(shard_dir).idx_paths)):
        ref = tmp_path / f"ref-{k}.idx"
        subprocess.run([sys.executable, wds2idx.__file__, str(tar), str(ref)], check=True, capture_output=True)
        assert idx.read_bytes() == ref.read_bytes()


def test_webdataset_library_reads_the_shards(shard_dir):
    import webdataset as wds

    ds = ShardDataset(shard_dir)
    urls = [str(p) for p in ds.tar_paths]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        i = int(sample["__key__"])
        assert sample["__key__"] == f"{i:09d}"
        assert (sample["jpg"], int(sample["cls"])) == ds.read(i)
        seen.append(i)
    assert seen == list(range(48))


def test_dali_webdataset_reader_with_our_index_files(shard_dir):
    from nvidia.dali import fn, pipeline_def

    ds = ShardDataset(shard_dir)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def reader():
        jpg, cls = fn.readers.webdataset(paths=[str(p) for p in ds.tar_paths],
                                         index_paths=[str(p) for p in ds.idx_paths],
                                         ext=["jpg", "cls"], name="r")
        return jpg, cls, fn.decoders.image(jpg, device="cpu")

    pipe = reader()
    pipe.build()
    assert pipe.reader_meta("r")["epoch_size"] == 48
    i = 0
    for _ in range(48 // 8):
        jpgs, clss, images = pipe.run()
        for k in range(8):
            data, label = ds.read(i)
            assert np.array(jpgs.at(k)).tobytes() == data
            assert np.array(clss.at(k)).tobytes() == str(label).encode()
            h, w = np.array(images.at(k)).shape[:2]
            assert (w, h) == (ds.index[i]["width"], ds.index[i]["height"])
            i += 1
    assert i == 48


def test_random_access_equals_sequential_read_and_survives_pickle(shard_dir):
    ds = ShardDataset(shard_dir)
    sequential = {}
    for path in ds.tar_paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    sequential[int(m.name.split(".")[0])] = tar.extractfile(m).read()
    ids = list(range(48))
    random.Random(0).shuffle(ids)
    for i in ids:
        view = ds.jpeg(i)
        assert view.dtype == np.uint8 and not view.flags.owndata  # a view into the mmap
        assert view.tobytes() == sequential[i]
    clone = pickle.loads(pickle.dumps(ds))  # mmaps are dropped and reopened lazily
    assert clone._maps.opened() == 0  # the copy maps its own tars, lazily
    assert [clone.read(i) for i in ids[:10]] == [ds.read(i) for i in ids[:10]]
    with pytest.raises(IndexError):
        ds.jpeg(48)


# ---------------------------------------------------------------------------------------- odd inputs

@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """2 classes x 6 good .JPEG files plus every kind of oddity ImageNet has, and some it lacks."""
    root = make_photo_folder(tmp_path_factory.mktemp("odd"), classes=2, per_class=6, ext=".JPEG")
    a, b = sorted(p for p in root.iterdir())
    good = (a / "astronaut_00000.JPEG").read_bytes()  # the oddities below are made from it
    rgb = Image.open(io.BytesIO(good)).convert("RGB")
    (a / "cmyk.JPEG").write_bytes(jpeg_bytes(rgb.convert("CMYK"), quality=90))
    (a / "gray.JPEG").write_bytes(jpeg_bytes(rgb.convert("L"), quality=90))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    (b / "png_named.JPEG").write_bytes(png.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    (b / "rotated.jpg").write_bytes(jpeg_bytes(rgb, exif=exif))
    (b / "empty.jpg").write_bytes(b"")
    (b / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (a / "notes.jpg").write_text("this is not an image\n")
    (a / "README.txt").write_text("ignored: not an image name\n")
    return root


def test_png_bmp_and_webp_files_are_reencoded_and_counted_by_reason(tmp_path):
    root = make_photo_folder(tmp_path / "src", classes=1, per_class=2, ext=".JPEG")
    folder = next(p for p in root.iterdir() if p.is_dir())
    rgb = Image.open(next(folder.iterdir())).convert("RGB")
    for ext, fmt in ((".png", "PNG"), (".bmp", "BMP"), (".webp", "WEBP")):
        rgb.save(folder / f"other{ext}", format=fmt)
    summary = write_shards(root, tmp_path / "out", seed=0)
    assert summary["num_samples"] == 5 and summary["reencoded"] == 3 and summary["skipped_files"] == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["reencoded"]["by_reason"] == {"png image": 1, "bmp image": 1, "webp image": 1}
    ds = ShardDataset(tmp_path / "out")
    assert all(Image.open(io.BytesIO(ds.read(i)[0])).format == "JPEG" for i in range(5))


def test_odd_files_reencoded_or_skipped_and_run_succeeds(odd_folder, tmp_path):
    summary = write_shards(odd_folder, tmp_path / "out", maxcount=5, seed=3)
    assert summary["source_files"] == 12 + 7
    assert summary["num_samples"] == 12 + 4
    assert {s["path"]: s["reason"] for s in summary["skipped_files"]} == {
        "n00000001_coffee/empty.jpg": "empty file",
        "n00000001_coffee/truncated.jpg": "truncated",
        "n00000000_astronaut/notes.jpg": "not an image",
    }
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == summary["skipped_files"]
    assert manifest["reencoded"]["by_reason"] == {"cmyk jpeg": 1, "exif orientation": 1, "grayscale jpeg": 1,
                                                  "png image": 1}
    assert summary["reencoded"] == 4

    ds = ShardDataset(tmp_path / "out")
    sources = (tmp_path / "out" / "sources.txt").read_text().splitlines()
    original = Image.open(odd_folder / "n00000000_astronaut" / "astronaut_00000.JPEG")
    for i, rel in enumerate(sources):
        data, label = ds.read(i)
        assert label == (0 if rel.startswith("n00000000") else 1)
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (ds.index[i]["width"], ds.index[i]["height"])
        name = rel.split("/")[1]
        if name in ("cmyk.JPEG", "gray.JPEG", "png_named.JPEG"):
            assert img.size == original.size
            diff = np.abs(np.asarray(img, np.float32) - np.asarray(original.convert("RGB"), np.float32))
            tolerance = 60 if name == "gray.JPEG" else 12  # gray lost its colour; the others are close
            assert diff.mean() < tolerance
        elif name == "rotated.jpg":
            assert img.size == original.size[::-1]  # rotation baked in
        else:
            assert data == (odd_folder / rel).read_bytes()


def test_max_side_reencodes_large_images(tmp_path):
    src = make_photo_folder(tmp_path / "src", classes=2, per_class=4, side_range=(60, 90))
    summary = write_shards(src, tmp_path / "out", maxcount=8, max_side=64)
    ds = ShardDataset(tmp_path / "out")
    sides = np.maximum(ds.index["width"], ds.index["height"])
    assert sides.max() == 64
    assert summary["reencoded"] == summary["reencoded_by_reason"]["resized"] == int((sides == 64).sum()) > 0
    assert ds.manifest["reencoded"]["files"] == []  # resizing alone is counted, not listed


def test_same_output_whatever_the_worker_count(odd_folder, tmp_path):
    write_shards(odd_folder, tmp_path / "w1", maxcount=5, workers=1, seed=7)
    write_shards(odd_folder, tmp_path / "w2", maxcount=5, workers=2, seed=7)
    one, two = folder_bytes(tmp_path / "w1"), folder_bytes(tmp_path / "w2")
    assert sorted(one) == sorted(two) and len(one) == 4 * 2 + 3
    assert one == two
    write_shards(odd_folder, tmp_path / "s8", maxcount=5, workers=1, seed=8)
    other = ShardDataset(tmp_path / "s8")
    assert other.dataset_id != ShardDataset(tmp_path / "w1").dataset_id  # the seed changes the ids
    assert sorted((tmp_path / "s8" / "sources.txt").read_text().split()) == \
        sorted((tmp_path / "w1" / "sources.txt").read_text().split())


def test_rerun_on_complete_folder_is_a_no_op(shard_dir, photo_folder):
    before = folder_bytes(shard_dir)
    summary = write_shards(photo_folder, shard_dir, maxcount=16, workers=1, seed=0)
    assert summary["already_complete"] and summary["num_samples"] == 48
    assert folder_bytes(shard_dir) == before


# ---------------------------------------------------------------------------------------- labels file

@pytest.fixture()
def flat_folder(photo_folder, tmp_path):
    """ImageNet validation layout: one flat folder, labels in a file."""
    flat = tmp_path / "val"
    flat.mkdir()
    lines = []
    for rel, (data, _) in source_files(photo_folder).items():
        cls, name = rel.split("/")
        (flat / name).write_bytes(data)
        lines.append(f"{Path(name).stem} {cls}")  # names without extension are accepted
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    return flat


def test_flat_folder_with_labels_file(flat_folder, photo_folder, shard_dir, tmp_path):
    write_shards(flat_folder, tmp_path / "out", maxcount=20, labels=tmp_path / "labels.txt",
                 classes=shard_dir)
    ds = ShardDataset(tmp_path / "out")
    train = ShardDataset(shard_dir)
    assert ds.classes == train.classes and ds.num_samples == 48
    by_name = {rel.split("/")[1]: label for rel, (_, label) in source_files(photo_folder).items()}
    for i, rel in enumerate((tmp_path / "out" / "sources.txt").read_text().splitlines()):
        assert ds.read(i) == ((flat_folder / rel).read_bytes(), by_name[rel])


def test_imagenet_loc_val_solution_csv_gives_the_same_shards(flat_folder, shard_dir, tmp_path):
    """ImageNet's LOC_val_solution.csv (header; `ImageId,PredictionString` whose first token is the
    synset, then boxes and more synsets) labels the same as the plain `NAME LABEL` file."""
    rows = [line.split() for line in (tmp_path / "labels.txt").read_text().splitlines()]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{name},{label} 10 20 30 40 {label} 1 2 3 4 \n" for name, label in rows))
    write_shards(flat_folder, tmp_path / "plain", labels=tmp_path / "labels.txt", classes=shard_dir, seed=1)
    write_shards(flat_folder, tmp_path / "loc", labels=csv, classes=shard_dir, seed=1)
    plain, loc = ShardDataset(tmp_path / "plain"), ShardDataset(tmp_path / "loc")
    assert loc.num_samples == plain.num_samples == 48
    assert [loc.read(i) for i in range(48)] == [plain.read(i) for i in range(48)]


def test_src_itself_may_be_a_symlink(photo_folder, tmp_path):
    link = tmp_path / "link-to-src"
    link.symlink_to(photo_folder, target_is_directory=True)
    write_shards(photo_folder, tmp_path / "real", seed=2)
    write_shards(link, tmp_path / "linked", seed=2)
    real, linked = ShardDataset(tmp_path / "real"), ShardDataset(tmp_path / "linked")
    assert linked.num_samples == real.num_samples > 0
    assert [linked.read(i) for i in range(real.num_samples)] == [real.read(i) for i in range(real.num_samples)]


def test_labels_file_problems_are_user_errors(flat_folder, tmp_path):
    labels = tmp_path / "labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines + ["no_such_file.JPEG n00000001_coffee"]) + "\n")
    with pytest.raises(UserError, match=r"labels\.txt line 49: unknown file 'no_such_file\.JPEG'"):
        write_shards(flat_folder, tmp_path / "a", labels=labels)
    labels.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"labels\.txt: no label for 1 image"):
        write_shards(flat_folder, tmp_path / "b", labels=labels)
    labels.write_text("\n".join(lines[:-1] + [lines[-1].split()[0] + " someclass"]) + "\n")
    with pytest.raises(UserError, match="unknown label 'someclass'"):
        known = sorted({line.split()[1] for line in lines})
        write_shards(flat_folder, tmp_path / "c", labels=labels, classes={name: k for k, name in enumerate(known)})
    with pytest.raises(UserError, match="for a flat folder pass --labels FILE"):
        write_shards(flat_folder, tmp_path / "d")


# ---------------------------------------------------------------------------------------- bad invocations

def test_bad_invocations_are_user_errors(photo_folder, shard_dir, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        write_shards(tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        write_shards(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(UserError, match="already holds a different dataset"):
        write_shards(photo_folder, shard_dir, maxcount=16, seed=1)
    with pytest.raises(UserError, match="inside the source folder"):
        write_shards(photo_folder, photo_folder / "shards")
    with pytest.raises(UserError, match="--maxcount"):
        write_shards(photo_folder, tmp_path / "o3", maxcount=0)
    with pytest.raises(UserError, match="no such shard folder"):
        ShardDataset(tmp_path / "nothing")
    with pytest.raises(UserError, match="no manifest.json"):
        ShardDataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="shard-000001.tar: shard file missing"):
        ShardDataset(broken)


def run_cli(*args, env=None, **kwargs):
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, **kwargs)


def test_cli_errors_are_one_line_exit_2(photo_folder, shard_dir, tmp_path, monkeypatch, capsys):
    result = run_cli("shard", tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder"]
    assert "Traceback" not in result.stderr

    from cli.app import main  # the console script's entry point, in-process for speed

    monkeypatch.setenv("COLUMNS", "40")  # narrow: a wrapped message would fail the one-line check
    for args, message in (
        (["shard", photo_folder, shard_dir, "--maxcount", "16", "--seed", "5"], "already holds a different dataset"),
        (["shard", photo_folder, tmp_path / "o", "--labels", tmp_path / "none.txt"], "none.txt: cannot read labels file"),
        (["shard", photo_folder, tmp_path / "o", "--workers", "0"], "--workers: must be at least 1"),
        (["verify", tmp_path], "no manifest.json"),
    ):
        monkeypatch.setattr(sys, "argv", ["clim-fast", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_shard_prints_summary_and_verifies(odd_folder, tmp_path):
    result = run_cli("shard", odd_folder, tmp_path / "out", "--maxcount", "5", "--workers", "2", "--verify")
    assert result.returncode == 0, result.stderr
    assert "16 samples in 4 shards" in result.stdout
    assert "skipped 3 unreadable file(s)" in result.stdout and "truncated.jpg: truncated" in result.stdout
    assert "re-encoded to RGB JPEG: 4" in result.stdout
    assert "checksums and indexes match" in result.stdout


# ---------------------------------------------------------------------------------------- crash safety

def test_resume_after_kill_gives_the_uninterrupted_output(photo_folder, tmp_path):
    import os
    import signal
    import time

    reference = tmp_path / "reference"
    write_shards(photo_folder, reference, maxcount=6, workers=1, seed=0)

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CLIM_FAST_SHARD_DELAY_S="0.4")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "shard", str(photo_folder), str(out),
                             "--maxcount", "6", "--workers", "1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-000001.tar").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    assert 2 <= len(kept) < 8

    with pytest.raises(UserError, match="pass --resume"):
        write_shards(photo_folder, out, maxcount=6, workers=1, seed=0)
    summary = write_shards(photo_folder, out, maxcount=6, workers=2, seed=0, resume=True)
    assert summary["resumed_shards"] >= 2 and summary["num_shards"] == 8
    assert folder_bytes(out) == folder_bytes(reference)
    assert not (out / ".partial").exists()
    # complete shards were kept, not rewritten
    assert all((out / name).stat().st_ino == ino for name, ino in kept.items()
               if int(name[6:12]) < summary["resumed_shards"])


# ---------------------------------------------------------------------------------------- verify

def test_verify_passes_then_catches_corruption(shard_dir, tmp_path):
    assert verify_shards(shard_dir)["ok"]
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    ds = ShardDataset(copy)
    tar = ds.tar_paths[1]
    offset = int(ds.index[ds.index["shard"] == 1][0]["offset"]) + 100  # inside a JPEG payload
    data = bytearray(tar.read_bytes())
    data[offset] ^= 0xFF
    tar.write_bytes(bytes(data))
    report = verify_shards(copy)
    assert not report["ok"]
    assert report["problems"] == [f"{tar}: sha256 differs from the manifest"]
    result = run_cli("verify", copy)
    assert result.returncode == 1 and "sha256 differs" in result.stdout
    # the DALI index files are checked too
    shutil.rmtree(copy)
    shutil.copytree(shard_dir, copy)
    idx = sorted(copy.glob("*.idx"))[0]
    idx.write_text(idx.read_text().replace(" ", "  ", 1))
    assert verify_shards(copy)["problems"] == [f"{idx}: sha256 differs from the manifest"]
