"""Issue 14: symlink loops, concurrent runs, broken resumes, manifest paths, file-system errors,
orphaned workers, class mappings across evals, the unsafe-checkpoint message, neighbour rows,
Ctrl-C while sharding."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from photos import make_photo_folder
from shards import ShardDataset, verify_shards, write_shards
from shards.errors import UserError
from shards.lock import folder_lock
from shards.neighbours import NeighbourTable

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args):
    """(exit code, output) of `clim-fast ARGS` in this process; a traceback fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _main(*args) -> subprocess.CompletedProcess:
    """The real console entry (one-line `error:` and exit 2 for a UserError)."""
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _wait_for(condition, proc=None, what="condition", limit=120.0):
    """Poll; a generous limit only guards against a hung test (no timing is asserted)."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc is not None:
            assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    """4 classes x 10 real JPEGs."""
    return make_photo_folder(tmp_path_factory.mktemp("src"), classes=4, per_class=10, seed=3)


# ------------------------------------------------------------------------------ 1. symbolic links

def test_symlink_loop_at_the_top_does_not_multiply_the_dataset(small_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    (src / "loop").symlink_to(".")
    summary = write_shards(src, tmp_path / "out", maxcount=16)
    assert summary["num_samples"] == 40 and summary["num_classes"] == 4
    manifest = ShardDataset(tmp_path / "out").manifest
    assert "loop" not in manifest["classes"]
    assert manifest["ignored_links"] == [{"path": "loop", "reason": "link loop (points at a folder that contains it)"}]
    assert verify_shards(tmp_path / "out")["ok"]


def test_symlinks_inside_a_class_each_real_file_once_never_outside_src(small_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    cls = sorted(p for p in src.iterdir())[0]
    first = sorted(cls.iterdir())[0]
    (cls / "loop").symlink_to(".")  # 10 images became 410
    (cls / "again.jpg").symlink_to(first.name)  # a second path to a real file
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(first, outside / "elsewhere.jpg")
    (cls / "elsewhere.jpg").symlink_to(outside / "elsewhere.jpg")
    (src / "zz_outside_class").symlink_to(outside)
    (cls / "broken.jpg").symlink_to("missing.jpg")
    (src / "broken_class").symlink_to(tmp_path / "nowhere")
    summary = write_shards(src, tmp_path / "out", maxcount=16)
    assert summary["num_samples"] == 40 and summary["num_classes"] == 4
    sources = (tmp_path / "out" / "sources.txt").read_text().splitlines()
    assert len(sources) == len(set(sources)) == 40 and not any("loop" in s or "again" in s for s in sources)
    reasons = {e["path"]: e["reason"] for e in summary["ignored_links"]}
    assert reasons[f"{cls.name}/loop"].startswith("link loop")
    assert reasons[f"{cls.name}/again.jpg"] == f"second path to {cls.name}/{first.name}"
    assert "outside SRC" in reasons[f"{cls.name}/elsewhere.jpg"] and "outside SRC" in reasons["zz_outside_class"]
    assert reasons[f"{cls.name}/broken.jpg"] == reasons["broken_class"] == "broken link"
    # the CLI says so
    code, output = _cli("shard", src, tmp_path / "out2", "--workers", "1", "--maxcount", "16")
    assert code == 0 and "ignored 6 symbolic link(s)" in output


def test_a_link_to_a_hidden_folder_inside_src_is_followed(small_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    hidden = src / ".extra"
    hidden.mkdir()
    cls = sorted(src.glob("n*"))[1]
    shutil.copy(sorted(cls.iterdir())[0], hidden / "extra.jpg")
    (cls / "more").symlink_to("../.extra")
    (cls / "alpha.jpg").symlink_to("../.extra/extra.jpg")  # taken first (sorted), so the folder link skips it
    summary = write_shards(src, tmp_path / "out", maxcount=16)
    assert summary["num_samples"] == 41
    assert summary["ignored_links"] == [{"path": f"{cls.name}/more/extra.jpg", "reason": f"second path to {cls.name}/alpha.jpg"}]
    assert f"{cls.name}/alpha.jpg" in (tmp_path / "out" / "sources.txt").read_text().splitlines()


# ------------------------------------------------------------------------------ 2. one run per folder

def test_folder_lock_refuses_a_second_holder_and_is_released(tmp_path):
    folder = tmp_path / "run"
    with folder_lock(folder, "training run") as path:
        assert path == folder / ".lock" and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"another training run is using this folder \(pid {os.getpid()} "):
            with folder_lock(folder, "training run"):
                pass
    assert not (folder / ".lock").exists()
    with folder_lock(folder, "training run"):  # free again
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with folder_lock(tmp_path / "file", "training run"):
            pass


def test_second_shard_run_into_a_live_out_is_refused_then_resume_finishes(small_src, tmp_path):
    reference = tmp_path / "reference"
    write_shards(small_src, reference, maxcount=4, seed=0)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CLIM_FAST_SHARD_DELAY_S="600")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "shard", str(small_src), str(out), "--maxcount", "4",
                             "--workers", "1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "shard-000000.tar").exists(), proc, "the first shard")
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
        with pytest.raises(UserError, match=rf"another `clim-fast shard` run is using this folder \(pid {proc.pid} "):
            write_shards(small_src, out, maxcount=4, seed=0)
        with pytest.raises(UserError, match=f"pid {proc.pid}"):  # --resume too: the run is alive
            write_shards(small_src, out, maxcount=4, seed=0, resume=True)
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
        assert after == before  # the live run's output is untouched
    finally:
        proc.kill()
        proc.wait()
    summary = write_shards(small_src, out, maxcount=4, seed=0, resume=True)  # the kernel released the lock
    assert summary["resumed_shards"] >= 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert verify_shards(out)["ok"]


# ------------------------------------------------------------------------------ 3. --resume auto

def _ckpt(path: Path, epoch: int) -> None:
    from clim_fast.training.checkpoint import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}, "epoch": epoch}, path)


def _evil(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    buf = io.BytesIO()
    torch.save({"model": Payload(), "config": {}, "epoch": 9}, buf)
    path.write_bytes(buf.getvalue())


def test_resume_auto_refuses_when_no_checkpoint_loads(tmp_path, capsys):
    from clim_fast.training.checkpoint import find_resume_checkpoint

    assert find_resume_checkpoint(tmp_path) is None  # no checkpoints: a fresh start
    folder = tmp_path / "checkpoints"
    _ckpt(folder / "epoch-0001.pt", 1)
    data = (folder / "epoch-0001.pt").read_bytes()
    (folder / "epoch-0001.pt").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "last.pt").write_bytes(data[:100])
    _evil(folder / "epoch-0002.pt")  # a pickle payload
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UserError) as err:
        find_resume_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "nothing was overwritten" in message and "--resume fresh" in message
    assert all(name in message for name in ("last.pt", "epoch-0002.pt", "epoch-0001.pt"))
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: --resume auto: skipping ") for w in warnings)
    assert "epoch-0002.pt: refused for safety" in warnings[1]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    assert find_resume_checkpoint(tmp_path, allow_broken=True) is None  # the explicit start-over


def test_resume_auto_says_which_newer_checkpoint_it_skipped(tmp_path, capsys):
    from clim_fast.training.checkpoint import find_resume_checkpoint

    folder = tmp_path / "checkpoints"
    _ckpt(folder / "epoch-0001.pt", 1)
    _ckpt(folder / "epoch-0002.pt", 2)
    (folder / "last.pt").write_bytes(b"torn")
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "epoch-0002.pt" and ckpt["epoch"] == 2
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: --resume auto: skipping {folder / 'last.pt'}: ")


# ------------------------------------------------------------------------------ 4. manifest paths

@pytest.mark.parametrize("entry,value", [("name", "../outside.tar"), ("name", "ABS"), ("index", "sub/x.idx"),
                                         ("name", ".."), ("samples", "../samples.npy")])
def test_manifest_names_are_confined_to_the_shard_folder(shard_dir, tmp_path, entry, value):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    shutil.copy(copy / "shard-000000.tar", tmp_path / "outside.tar")  # same size: read without complaint before
    if value == "ABS":
        value = str(tmp_path / "outside.tar")
    manifest = json.loads((copy / "manifest.json").read_text())
    if entry == "samples":
        manifest["samples"]["file"] = value
    else:
        manifest["shards"][0][entry] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        ShardDataset(copy)
    message = str(err.value)
    assert message.startswith(str(copy / "manifest.json")) and repr(value) in message and "\n" not in message
    _one_line_error(_main("verify", copy), "manifest.json", "plain file name")


def test_describe_samples_names_the_shard_files_and_verify(shard_dir):
    ds = ShardDataset(shard_dir)
    first, last = 3, ds.num_samples - 1
    message = ds.describe_samples([last, first, first])
    names = {ds.tar_paths[int(ds.index[i]["shard"])].name for i in (first, last)}
    assert all(name in message for name in names) and f"clim-fast verify {shard_dir}" in message
    assert "\n" not in message and message.startswith("samples ")
    assert ds.shards_of([first]) == {ds.tar_paths[int(ds.index[first]["shard"])].name: [first]}
    assert "not sample ids of this folder" in ds.describe_samples([10 ** 6])


# ------------------------------------------------------------------------------ 5. file-system mistakes

def test_shard_into_out_under_a_regular_file_is_a_one_line_error(small_src, tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(_main("shard", small_src, tmp_path / "file" / "out", "--workers", "1"), str(tmp_path / "file"))
    _one_line_error(_main("shard", small_src, tmp_path / "file", "--workers", "1"), "not a folder")


def test_shard_into_an_unwritable_out_is_a_one_line_error(small_src, tmp_path, monkeypatch):
    # the tests run as root, which permissions do not stop: refuse the way the kernel would
    real_mkdir = os.mkdir
    target = str(tmp_path / "locked")

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'locked'}.*: permission denied$"):
        _cli("shard", small_src, tmp_path / "locked" / "out", "--workers", "1")


def test_unreadable_source_folder_and_shard_file_are_one_line_errors(small_src, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    cls = sorted(src.iterdir())[0]
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith(cls.name):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=rf"{cls.name}: cannot list the folder \(permission denied\)"):
        write_shards(src, tmp_path / "out")


def test_verify_with_a_folder_in_place_of_a_file_is_a_one_line_error(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "sources.txt").unlink()
    (copy / "sources.txt").mkdir()
    _one_line_error(_main("verify", copy), "sources.txt: is a folder, not a file")


# ------------------------------------------------------------------------------ 6. workers die with the parent

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    """A test's clean-up: the process and whatever of `pids` is still alive."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_pool_workers_die_with_the_shard_process(small_src, tmp_path, sig):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CLIM_FAST_SHARD_DELAY_S="600")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "shard", str(small_src), str(out), "--maxcount", "4",
                             "--workers", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        _wait_for(lambda: (out / "shard-000000.tar").exists() and len(_children(proc.pid)) >= 2, proc,
                  "the pool workers")
        workers = _children(proc.pid)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        _wait_for(lambda: not any(_alive(w) for w in workers), what="the workers to exit")
    finally:
        _kill_all(proc, workers)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "--resume" in stderr
    summary = write_shards(small_src, out, maxcount=4, seed=0, resume=True)  # nothing written is lost
    assert summary["resumed_shards"] >= 1 and verify_shards(out)["ok"]


# ------------------------------------------------------------------------------ 7. class mappings in every eval

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from clim_fast.config import make_config
    from clim_fast.method.moco import MoCo
    from clim_fast.training.checkpoint import save_checkpoint

    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=32, queue_size=64, batch_size=16))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint({"model": MoCo(cfg).state_dict(), "config": cfg.to_dict(), "epoch": 1, "table_path": ""}, path)
    return path


@pytest.fixture(scope="module")
def other_val(tmp_path_factory):
    """Shards whose class mapping differs from the session's shard_dir (3 classes, not 4)."""
    src = make_photo_folder(tmp_path_factory.mktemp("valsrc"), classes=3, per_class=4, seed=5)
    out = tmp_path_factory.mktemp("valshards")
    write_shards(src, out, maxcount=16)
    return out


@pytest.mark.parametrize("command", ["knn", "linear", "similarity", "tsne"])
def test_every_eval_refuses_a_val_set_with_another_class_mapping(command, checkpoint, shard_dir, other_val,
                                                                 tmp_path):
    with pytest.raises(UserError) as err:
        _cli("eval", command, "--checkpoint", checkpoint, "--shards", shard_dir, "--val-shards", other_val,
             "--out", tmp_path / "eval", "--device", "cpu", "--workers", "0", "--threads", "1")
    message = str(err.value)
    assert message.startswith(f"{other_val}: its class mapping differs from that of {shard_dir} (")
    assert f"--classes {shard_dir}" in message and "\n" not in message
    assert not list((tmp_path / "eval").glob("features-*"))  # refused before any feature pass


def test_eval_out_under_a_regular_file_is_a_one_line_error(checkpoint, shard_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=rf"{tmp_path / 'file'}.*a part of the path is a file"):
        _cli("eval", "similarity", "--checkpoint", checkpoint, "--shards", shard_dir, "--out",
             tmp_path / "file" / "eval", "--device", "cpu")
    with pytest.raises(UserError, match="a folder, not a checkpoint file"):
        _cli("eval", "similarity", "--checkpoint", tmp_path, "--shards", shard_dir, "--out", tmp_path / "e",
             "--device", "cpu")


# ------------------------------------------------------------------------------ 8. unsafe checkpoints

def test_unsafe_checkpoint_refusal_does_not_advise_the_unsafe_option(tmp_path):
    from clim_fast.training.checkpoint import load_checkpoint

    _evil(tmp_path / "evil.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"model": {}, "config": {}, "epoch": 1, "f": print}))
    for name in ("evil.pt", "plain.pt"):
        with pytest.raises(UserError) as err:
            load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: refused for safety")
        assert "objects other than tensors" in message and "\n" not in message
        assert "weights_only" not in message and "False" not in message and "trusted" not in message
    assert "posix.getcwd" in str(pytest.raises(UserError, load_checkpoint, tmp_path / "evil.pt").value)


# ------------------------------------------------------------------------------ 9. neighbour rows

def _table(positives, counts):
    positives = np.asarray(positives, np.int32)
    return NeighbourTable(positives, np.asarray(counts, np.int32), np.zeros(len(positives), np.int32),
                          {"dataset_id": "x"})


@pytest.mark.parametrize("positives,counts,expected", [
    ([[1, -1, -1], [0, 2, -1], [1, 0, -1]], [1, 3, 2], r"row 1, entry 2: -1, expected a sample id"),  # -1 inside
    ([[1, 5, -1], [0, -1, -1], [1, -1, -1]], [2, 1, 1], r"row 0, entry 1: 5, expected a sample id in 0\.\.2"),
    ([[1, 2, -1], [0, -1, -1], [1, -1, -1]], [1, 1, 1], r"row 0, entry 1: 2, expected -1 padding"),
    ([[1, -1, -1], [0, -7, -1], [1, -1, -1]], [1, 1, 1], r"row 1, entry 1: -7, expected -1 padding"),
])
def test_neighbour_table_checks_every_entry_of_every_row(tmp_path, positives, counts, expected):
    path = tmp_path / "table.npz"
    _table(positives, counts).save(path)
    with pytest.raises(UserError, match=rf"^{path}: malformed neighbour table \({expected}"):
        NeighbourTable.load(path)


def test_a_well_formed_neighbour_table_loads(tmp_path):
    path = tmp_path / "table.npz"
    _table([[1, 2, -1], [0, -1, -1], [1, 0, 2]], [2, 1, 2]).save(path)
    with pytest.raises(UserError, match="row 2, entry 2: 2, expected -1 padding"):
        NeighbourTable.load(path)
    _table([[1, 2, -1], [0, -1, -1], [1, 0, -1]], [2, 1, 2]).save(path)
    assert NeighbourTable.load(path).num_samples == 3


# ------------------------------------------------------------------------------ 10. Ctrl-C

def test_ctrl_c_during_shard_is_one_line_exit_130_and_resume_finishes(small_src, tmp_path):
    import re

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CLIM_FAST_SHARD_DELAY_S="600")
    args = [sys.executable, "-m", "cli", "shard", str(small_src), str(out), "--maxcount", "4", "--workers", "2"]
    # SIG_DFL: a test run in the background has SIGINT ignored, and the child would inherit that
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: (out / "shard-000000.tar").exists(), proc, "the first shard")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"interrupted: (\d+) of 40 images written to {re.escape(str(out))} in (\d+) complete "
                         r"shard\(s\); run the same command with --resume to finish", last)
    assert match and int(match[1]) == 4 * int(match[2]), stderr
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    again = _main(*args[3:], "--resume")
    assert again.returncode == 0 and "shards kept from the interrupted run" in again.stdout, again.stderr
    assert ShardDataset(out).num_samples == 40 and verify_shards(out)["ok"]


# ------------------------------------------------------------------------------ 11. --follow-links

def test_a_symlink_farm_is_ignored_by_default_and_sharded_with_follow_links(small_src, tmp_path):
    """ImageNet-100 style: class folders of links into the full tree, and a class folder that is a link."""
    full = sorted(small_src.iterdir())  # 4 classes x 10 JPEGs, outside the farm
    farm = tmp_path / "farm"
    for cls in full[:2]:
        (farm / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:5]:
            (farm / cls.name / image.name).symlink_to(image)
    (farm / full[2].name).symlink_to(full[2])
    expected = sorted([f"{cls.name}/{image.name}" for cls in full[:2] for image in sorted(cls.iterdir())[:5]]
                      + [f"{full[2].name}/{image.name}" for image in full[2].iterdir()])
    with pytest.raises(UserError, match=r"no images in its 2 class folder\(s\).*; 11 symbolic link\(s\) ignored, "
                                        r"e\.g\. .*outside SRC \(--follow-links follows links out of SRC\)$"):
        write_shards(farm, tmp_path / "default")
    args = ("shard", farm, tmp_path / "out", "--follow-links", "--workers", "1", "--maxcount", "8")
    code, output = _cli(*args)
    assert code == 0 and "done: 20 samples in 3 shards" in output and "ignored" not in output, output
    shards = ShardDataset(tmp_path / "out")
    classes = shards.manifest["classes"]
    assert classes == {cls.name: label for label, cls in enumerate(full[:3])}
    assert shards.manifest["args"]["follow_links"] is True and shards.manifest["ignored_links"] == []
    sources = (tmp_path / "out" / "sources.txt").read_text().splitlines()
    assert sorted(sources) == expected
    for sample_id, path in enumerate(sources):
        jpeg, label = shards.read(sample_id)
        assert label == classes[path.split("/")[0]] and jpeg == (farm / path).read_bytes()
    assert verify_shards(tmp_path / "out")["ok"]
    code, output = _cli(*args)
    assert code == 0 and "nothing to do" in output, output


@pytest.mark.timeout(60)
def test_follow_links_through_a_link_cycle_outside_src_takes_each_real_file_once(small_src, tmp_path):
    images = sorted(sorted(small_src.iterdir())[0].iterdir())
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    (outside / "d").mkdir(parents=True)
    (outside / "e").mkdir()
    for k, path in enumerate([src / "a" / "0.jpg", src / "a" / "1.jpg", outside / "d" / "x0.jpg",
                              outside / "d" / "x1.jpg", outside / "d" / "x2.jpg", outside / "e" / "y.jpg"]):
        shutil.copy(images[k], path)
    (src / "a" / "ext").symlink_to(outside / "d")
    (src / "a" / "dup.jpg").symlink_to(outside / "d" / "x0.jpg")  # sorted before ext: this path takes x0
    (outside / "d" / "back").symlink_to(src)
    (outside / "d" / "self").symlink_to(".")
    (outside / "d" / "up").symlink_to(tmp_path)  # contains SRC and d
    (outside / "d" / "e").symlink_to("../e")
    (outside / "e" / "d").symlink_to("../d")  # d -> e -> d
    summary = write_shards(src, tmp_path / "out", maxcount=4, follow_links=True)
    sources = (tmp_path / "out" / "sources.txt").read_text().splitlines()
    assert sorted(sources) == ["a/0.jpg", "a/1.jpg", "a/dup.jpg", "a/ext/e/y.jpg", "a/ext/x1.jpg", "a/ext/x2.jpg"]
    assert len({os.path.realpath(src / path) for path in sources}) == 6
    loop = "link loop (points at a folder that contains it)"
    assert {e["path"]: e["reason"] for e in summary["ignored_links"]} == {
        "a/ext/back": "second path to the folder .", "a/ext/self": loop, "a/ext/up": loop,
        "a/ext/x0.jpg": "second path to a/dup.jpg", "a/ext/e/d": "second path to the folder a/ext"}


# ------------------------------------------------------------------------------ 12. edited manifests

def _edited_copy(shard_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(num_samples="48"), "num_samples is '48', not a count"),
    (lambda m: m.update(num_samples=49), "the shards hold 48 samples, but num_samples is 49"),
    (lambda m: m.update(classes=["a", "b"]), "classes is ['a', 'b'], not a mapping of class names to indices"),
    (lambda m: m["classes"].update(dict.fromkeys(m["classes"], 0)), "classes gives two class names the same index"),
    (lambda m: m.update(num_classes=2), "num_classes is 2, but the class indices go up to 3"),
    (lambda m: m.update(dataset_id=None), "dataset_id is None"),
    (lambda m: m["shards"][1].update(first_id=17), "shards[1].first_id is 17, expected 16"),
    (lambda m: m["shards"][0].pop("sha256"), "shards[0].sha256 is None, not a checksum"),
    (lambda m: m["samples"].pop("sha256"), "samples.sha256 is None, not a checksum"),
    (lambda m: m.update(key_width="9"), "key_width is '9'"),
], ids=["n-str", "n-sum", "classes-list", "classes-dup", "num-classes", "dataset-id", "first-id", "tar-sha",
        "samples-sha", "key-width"])
def test_a_manifest_with_wrong_types_or_counts_is_a_one_line_error(shard_dir, tmp_path, edit, needle):
    """Each edit was a TypeError/KeyError deep in a reader or verify, or read on silently."""
    copy = _edited_copy(shard_dir, tmp_path, edit)
    for action in (ShardDataset, verify_shards):
        with pytest.raises(UserError) as err:
            action(copy)
        message = str(err.value)
        assert message.startswith(f"{copy / 'manifest.json'}: ") and needle in message and "\n" not in message


@pytest.mark.parametrize("column,value,needle", [
    ("offset", 10 ** 7, "its JPEG offset and size lie outside its shard file"),
    ("size", -1, "its JPEG offset and size lie outside its shard file"),
    ("label", 4, "its label is outside 0..3"),
    ("width", 0, "its image width or height is not positive"),
    ("shard", 2, "its shard number disagrees with the id ranges of manifest.json"),
])
def test_a_damaged_samples_index_is_refused_when_the_folder_opens(shard_dir, tmp_path, column, value, needle):
    """Was read on: a numpy error mid-epoch, the wrong bytes, or a label outside the classifier."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    rows = np.load(copy / "samples.npy")
    rows[column][5] = value
    np.save(copy / "samples.npy", rows)
    with pytest.raises(UserError) as err:
        ShardDataset(copy)
    message = str(err.value)
    assert message.startswith(f"{copy / 'samples.npy'}: damaged per-sample index (row 5: {needle}; 1 bad row(s))")
    assert f"clim-fast verify {copy}" in message and "\n" not in message
    (copy / "samples.npy").write_bytes(b"")  # an empty file was an EOFError traceback
    with pytest.raises(UserError, match=r"samples\.npy: unreadable per-sample index"):
        ShardDataset(copy)


def test_verify_reports_a_missing_or_binary_sources_txt(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "sources.txt").write_bytes(b"\xff\xfe\n" * 48)  # was a UnicodeDecodeError traceback
    report = verify_shards(copy)
    assert not report["ok"] and f"{copy / 'sources.txt'}: not UTF-8 text" in report["problems"]
    (copy / "sources.txt").unlink()  # was a FileNotFoundError traceback
    assert verify_shards(copy)["problems"] == [f"{copy / 'sources.txt'}: missing"]


# ------------------------------------------------------------------------------ 13. odd names in SRC

def test_unicode_names_with_line_separators_verify_and_line_breaks_are_refused(small_src, tmp_path):
    src = tmp_path / "src"
    classes = sorted(small_src.iterdir())
    for cls, name in zip(classes, ["with space", "ünï cødé", "line\u2028sep\x85x"]):
        shutil.copytree(cls, src / name)
    summary = write_shards(src, tmp_path / "out", maxcount=16)
    assert summary["num_samples"] == 30
    assert verify_shards(tmp_path / "out")["ok"]  # sources.txt was split on U+2028 too: 40 lines for 30
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    for name, shown in (("new\nline", r"'new\nline/"), (os.fsdecode(b"bad\xff"), r"'bad\xff/")):
        shutil.copytree(classes[3], src / name)
        with pytest.raises(UserError) as err:  # was a broken sources.txt, or a traceback
            write_shards(src, tmp_path / "out2", maxcount=16)
        message = str(err.value)
        assert message.startswith(f"{src}: 10 image path(s) cannot be stored in sources.txt, e.g. {shown}")
        assert "\n" not in message and not (tmp_path / "out2").exists()
        shutil.rmtree(src / name)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == kept


# ------------------------------------------------------------------------------ 14. output files

def test_written_files_get_the_umask_permissions_not_0600(shard_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("manifest.json", "samples.npy", "sources.txt", "shard-000000.idx", "shard-000000.tar"):
        assert (shard_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_an_output_path_that_is_a_folder_or_under_a_file_is_a_one_line_error(checkpoint, shard_dir, tmp_path):
    from shards.atomic import atomic_write_bytes

    (tmp_path / "file").write_text("x")
    for path, reason in ((tmp_path, "is a folder, not a file"),
                         (tmp_path / "file" / "x.pt", "a part of the path is a file, not a folder")):
        with pytest.raises(UserError) as err:  # was an OSError naming the temp file, or FileExistsError
            atomic_write_bytes(path, b"data")
        assert str(err.value) == f"{path}: {reason}" and isinstance(err.value, OSError)
        with pytest.raises(UserError, match=reason):
            _cli("export", "--checkpoint", checkpoint, "--out", path)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(UserError, match=rf"^--out {tmp_path}: is a folder, not a file$"):  # before the feature pass
        _cli("mine", "--checkpoint", checkpoint, "--shards", shard_dir, "--out", tmp_path, "--device", "cpu")
    with pytest.raises(UserError, match=rf"^--png {tmp_path}: is a folder, not a file$"):
        _cli("eval", "tsne", "--checkpoint", checkpoint, "--shards", shard_dir, "--png", tmp_path, "--out",
             tmp_path / "e", "--device", "cpu")


# ------------------------------------------------------------------------------ 15. foreign tables

@pytest.mark.parametrize("arrays,needle", [
    (dict(positives=np.array(5, np.int32)), r"malformed neighbour table \(positives of shape \(\), expected \[N, k\]\)"),
    (dict(meta=np.array("[1, 2]")), r"not a readable neighbour table \(its meta is not a JSON object\)"),
    (dict(assignment=np.array([0.5, 1.0, 0.0])), r"malformed neighbour table \(positives int32, counts int32, "
                                                 r"assignment float64; expected integers\)"),
    (dict(assignment=np.array([-3, 0, 0], np.int32)), r"malformed neighbour table \(negative cluster numbers in assignment\)"),
    (dict(meta=np.array("{}")), r"neighbour table is for no dataset id .* with 3 samples, but the shards are "
                                r"dataset x with 3 samples"),
], ids=["0d", "meta-list", "assignment-float", "assignment-negative", "no-dataset-id"])
def test_a_foreign_neighbour_table_is_a_one_line_error(tmp_path, arrays, needle):
    table = dict(positives=np.array([[1, -1], [0, 2], [1, -1]], np.int32), counts=np.array([1, 2, 1], np.int32),
                 assignment=np.zeros(3, np.int32), meta=np.array(json.dumps({"dataset_id": "x"})))
    path = tmp_path / "table.npz"
    np.savez(path, **dict(table, **arrays))
    with pytest.raises(UserError, match=rf"^{path}: {needle}"):  # IndexError/AttributeError, or accepted
        NeighbourTable.load(path).check_matches("x", 3, path)


# ------------------------------------------------------------------------------ 16. checkpoints from elsewhere

@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(config=[1]), "not a clim-fast checkpoint (its config is a list, not a mapping of config fields)"),
    (lambda c: c["config"].update(image_size="x"), "the checkpoint's config: image_size must be an integer, got 'x'"),
    (lambda c: c["config"].update(colour="red"), "the checkpoint's config: unknown field(s) colour"),
    (lambda c: c.update(model=torch.zeros(3)), "its model is a Tensor, not a state_dict of named tensors"),
    (lambda c: c.update(epoch="x"), "its epoch is 'x', not a count of epochs"),
    (lambda c: c["config"].update(arch="resnet34"), "does not match the model its config describes (Missing key(s)"),
    (lambda c: c.clear() or c.update(c_w=torch.zeros(1)), "it holds only weights, like the backbone `clim-fast export`"),
], ids=["config-list", "config-type", "config-field", "model-tensor", "epoch-str", "other-arch", "exported"])
def test_a_checkpoint_with_wrong_entries_is_a_one_line_error_in_eval_and_export(checkpoint, tmp_path, edit, needle):
    from clim_fast.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    edit(ckpt)
    path = tmp_path / "other.pt"
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(UserError) as err:  # TypeError/ValueError tracebacks, or a mismatch that said nothing
        _cli("export", "--checkpoint", path, "--out", tmp_path / "backbone.pt")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message
    assert not (tmp_path / "backbone.pt").exists()


def test_a_fresh_train_never_overwrites_an_earlier_run_or_a_shard_folder(shard_dir, tmp_path):
    run = tmp_path / "run"
    _ckpt(run / "checkpoints" / "last.pt", 3)
    (run / "log.jsonl").write_text('{"kind": "epoch"}\n')
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as err:  # was: trained from scratch and overwrote last.pt
        _cli("train", "--shards", shard_dir, "--out", run, "--gpus", "0", "--arch", "resnet18")
    assert str(err.value) == (f"--out {run}: holds an earlier run (log.jsonl, checkpoints); pass --resume auto "
                              "to continue it, or choose another folder (nothing was changed)")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    with pytest.raises(UserError, match=f"^--out {shard_dir}: is a shard folder"):
        _cli("train", "--shards", shard_dir, "--out", shard_dir, "--gpus", "0", "--arch", "resnet18")


# ------------------------------------------------------------------------------ 17. eval options

@pytest.mark.parametrize("args,needle", [
    (["knn", "--image-size", "-5"], "--image-size -5: must be positive"),  # ran, with a meaningless result
    (["similarity", "--image-size", "0"], "--image-size 0: must be positive"),  # fell back silently
    (["knn", "--batch-size", "0"], "--batch-size 0: must be positive"),
    (["knn", "--temperature", "nan"], "--temperature nan: must be positive and finite"),
    (["knn", "--k", "0"], "--k 0: must be positive"),  # named --k, --temperature and --holdout-every at once
    (["knn", "--val-shards", "SHARDS"], "the same images as --shards"),  # each query found itself: 94% top-1
    (["linear", "--lr", "-1"], "--lr -1.0: must be positive"),  # a torch ValueError traceback
    (["linear", "--epochs", "10", "--milestones", "60,80"], "--milestones 60,80: epochs where the lr drops must lie "
                                                           "in 1..10"),
], ids=["img-neg", "img-0", "batch-0", "temp-nan", "k-0", "val-is-train", "lr-neg", "milestones"])
def test_eval_options_out_of_range_are_refused_before_any_work(checkpoint, shard_dir, tmp_path, args, needle):
    command, *options = args
    options = [shard_dir if o == "SHARDS" else o for o in options]
    val = ["--val-shards", shard_dir] if command == "linear" else []
    with pytest.raises(UserError) as err:
        _cli("eval", command, "--checkpoint", checkpoint, "--shards", shard_dir, *val, "--out", tmp_path, "--device",
             "cpu", "--workers", "0", "--threads", "1", *options)
    assert needle in str(err.value)
    assert not list(tmp_path.glob("features-*"))


# ------------------------------------------------------------------------------ 18. config values and node options

@pytest.mark.parametrize("saved,args,needle", [
    ("[1, 2]", [], "{saved}: config: expected a mapping of config fields, got a list"),  # a TypeError traceback
    ('{"epochs": "3"}', [], "{saved}: config: epochs must be an integer, got '3'"),  # a TypeError traceback
    ('{"epochs": 3}', ["--set", "checkpoint_every=0"], "config: checkpoint_every must be positive, got 0"),
    ('{"epochs": 3}', ["--nnodes", "2", "--node-rank", "5"], "--node-rank 5: must be in 0..1 (--nnodes 2)"),
], ids=["list", "wrong-type", "set-zero", "node-rank"])
def test_train_resume_with_a_bad_config_or_option_is_a_one_line_error(shard_dir, tmp_path, saved, args, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(saved)
    with pytest.raises(UserError) as err:
        _cli("train", "--shards", shard_dir, "--out", run, "--gpus", "0", "--resume", "auto", *args)
    assert str(err.value) == needle.format(saved=run / "config.json")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and (run / "config.json").read_text() == saved


# --- a JPEG whose header claims far more pixels than its data can hold ----------------------------

def _claimed_size(data: bytes, width: int, height: int) -> bytes:
    """`data` with its baseline frame header (SOF0) saying width x height."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9:]


def test_a_jpeg_too_short_for_its_claimed_size_is_skipped_not_decoded_as_grey():
    from shards.encode import KEEP, REENCODE, SKIP, _frame_header, check_bytes

    small = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(small, "JPEG", quality=90)
    hostile = _claimed_size(small.getvalue(), 12000, 9000)  # a few hundred bytes claiming 108 MP
    checked = check_bytes(hostile)
    assert checked.action == SKIP and "too short for 12000 x 9000" in checked.reason
    # the floor is half of what the most compressible image needs: a solid grey 4000 x 3000 stays
    grey = io.BytesIO()
    Image.new("L", (4000, 3000), 128).save(grey, "JPEG", quality=1, optimize=True)
    assert check_bytes(grey.getvalue()).action in (KEEP, REENCODE)  # (a grey JPEG is re-encoded as RGB)
    # metadata is not image data: a big comment segment does not hide the short scan
    comment = b"\xff\xfe" + (65000).to_bytes(2, "big") + bytes(64998)
    padded = hostile[:2] + comment * 5 + hostile[2:]
    assert len(padded) * 8 > 12000 * 9000 / 64 and check_bytes(padded).action == SKIP
    # arithmetic coding can go below the floor: only the frame header's marker counts, not APP bytes
    sof9 = hostile.replace(b"\xff\xc0", b"\xff\xc9", 1)
    assert _frame_header(sof9)[1] and not _frame_header(hostile)[1]
    assert not _frame_header(hostile[:2] + b"\xff\xe1\x00\x06\xff\xc9\xff\xc9" + hostile[2:])[1]


# --- careless input found by an audit (session 13) ------------------------------------------------

def test_shard_refuses_a_negative_seed_and_a_symlink_loop_before_writing(small_src, tmp_path):
    with pytest.raises(UserError, match=r"^--seed: must be >= 0, got -1$"):  # was numpy's traceback and a .partial
        write_shards(small_src, tmp_path / "out", seed=-1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for src, out in ((tmp_path / "a", tmp_path / "out"), (small_src, tmp_path / "a")):
        with pytest.raises(UserError, match=r"/a: cannot be resolved"):  # was RuntimeError: Symlink loop
            write_shards(src, out)


def test_shard_starts_no_more_worker_processes_than_it_can_use(small_src, tmp_path):
    summary = write_shards(small_src, tmp_path / "out", workers=100_000, maxcount=16)  # started 100,000 and hung
    assert summary["num_samples"] == 40 and verify_shards(tmp_path / "out")["ok"]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_shard_rerun_over_a_damaged_complete_folder_says_so_instead_of_already_complete(small_src, tmp_path, damage):
    out = tmp_path / "out"
    write_shards(small_src, out, maxcount=16)
    tar = out / "shard-000001.tar"
    if damage == "delete":
        tar.unlink()
    else:
        tar.write_bytes(tar.read_bytes()[:1000])
    for resume in (False, True):
        with pytest.raises(UserError, match=rf"^{out}: holds this dataset but is damaged: .*shard-000001\.tar.*"
                                            r"`clim-fast verify`"):
            write_shards(small_src, out, maxcount=16, resume=resume)


def test_mine_export_and_tsne_never_write_over_their_inputs_a_shard_folder_or_a_runs_checkpoints(
        checkpoint, shard_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    other = run / "checkpoints" / "epoch-0002.pt"
    shutil.copy(checkpoint, other)
    before = checkpoint.read_bytes()
    cases = [(("mine", "--checkpoint", checkpoint, "--shards", shard_dir, "--device", "cpu", "--out", checkpoint),
              f"--out {checkpoint}: is this command's input"),
             (("mine", "--checkpoint", checkpoint, "--shards", shard_dir, "--device", "cpu",
               "--out", shard_dir / "manifest.json"), f"inside the shard folder {shard_dir}"),
             (("export", "--checkpoint", checkpoint, "--out", checkpoint), "is this command's input"),
             (("export", "--checkpoint", checkpoint, "--out", other), "inside the training run's checkpoint folder"),
             (("eval", "tsne", "--checkpoint", checkpoint, "--shards", shard_dir, "--device", "cpu",
               "--out", tmp_path / "e", "--png", shard_dir / "x.png"), "inside the shard folder")]
    for args, needle in cases:
        with pytest.raises(UserError, match=re.escape(needle)):
            _cli(*args)
    assert checkpoint.read_bytes() == before and other.read_bytes() == before and verify_shards(shard_dir)["ok"]


def test_eval_out_that_is_a_file_is_named_as_not_a_folder(checkpoint, shard_dir, tmp_path):
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(UserError, match=rf"^--out {tmp_path / 'afile.txt'}: exists and is not a folder$"):
        _cli("eval", "knn", "--checkpoint", checkpoint, "--shards", shard_dir, "--out", tmp_path / "afile.txt")


def test_train_resume_without_config_json_starts_from_the_checkpoints_config(shard_dir, tmp_path):
    """A run folder without config.json (or a checkpoint resumed into a new folder) resumes with the
    checkpoint's config, not with the default preset's."""
    from clim_fast.training.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = ("train", "--shards", shard_dir, "--out", run, "--gpus", "0", "--preset", "moco_v2", "--arch", "resnet18",
            "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--set", "queue_size=16", "--set",
            "base_lr=0.1", "--set", "workers=1", "--set", "dali_threads=1")
    code, output = _cli(*args)
    assert code == 0, output
    (run / "config.json").unlink()
    code, output = _cli("train", "--shards", shard_dir, "--out", run, "--gpus", "0", "--resume", "auto",
                        "--epochs", "2")
    assert code == 0, output
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["base_lr"] == 0.1 and ckpt["config"]["batch_size"] == 8


def _zeroed_copy(shard_dir: Path, tmp_path: Path, sample_id: int) -> tuple[Path, Path]:
    """A copy of the shards with one sample's JPEG bytes zeroed in place (sizes still match): (folder, its tar)."""
    damaged = tmp_path / "shards"
    shutil.copytree(shard_dir, damaged)
    row = ShardDataset(damaged).index[sample_id]
    tar = damaged / ShardDataset(damaged).manifest["shards"][int(row["shard"])]["name"]
    with open(tar, "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(bytes(int(row["size"])))
    return damaged, tar


def test_a_jpeg_zeroed_in_its_shard_is_named_not_a_crash(shard_dir, tmp_path):
    """Bytes damaged in place (sizes still match) must end in the one-line error naming the sample;
    all-zero data reaching DALI's CPU decoder in a batch of 64 or more crashed the process (SIGSEGV)."""
    damaged, tar = _zeroed_copy(shard_dir, tmp_path, 5)
    script = ("import sys, torch\n"
              "from dali_pipelines import FeatureLoader\n"
              "from shards import ShardDataset\n"
              "from shards.errors import UserError\n"
              "if __name__ == '__main__':\n"
              "    loader = FeatureLoader(ShardDataset(sys.argv[1]), batch_size=64, image_size=16,\n"
              "                           device=torch.device('cpu'), workers=0, threads=1)\n"
              "    try:\n"
              "        for _ in loader: pass\n"
              "    except UserError as e:\n"
              "        print(e)\n"
              "    loader.close()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(damaged)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"could not decode sample 5 (in {tar.name})") and "clim-fast verify" in proc.stdout


def test_long_output_names_are_written_or_refused_in_one_line(checkpoint, tmp_path):
    fits = tmp_path / ("b" * 246 + ".pth")  # a legal name: its temp file's name must fit as well
    code, output = _cli("export", "--checkpoint", checkpoint, "--out", fits)
    assert code == 0 and fits.is_file(), output
    from shards.atomic import atomic_write_bytes

    wide = tmp_path / ("名" * 83 + ".pt")  # 252 bytes in 86 characters: the temp name is cut on bytes
    atomic_write_bytes(wide, b"x")
    assert wide.read_bytes() == b"x" and not list(tmp_path.glob(".*.tmp"))
    too_long = tmp_path / ("a" * 300 + ".pth")
    with pytest.raises(UserError, match=r"^--out .*a{300}\.pth: File name too long$"):
        _cli("export", "--checkpoint", checkpoint, "--out", too_long)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_dali_source_workers_die_with_a_killed_loader_process(shard_dir):
    script = ("import sys, time, torch\n"
              "from dali_pipelines import FeatureLoader\n"
              "from shards import ShardDataset\n"
              "if __name__ == '__main__':\n"
              "    loader = FeatureLoader(ShardDataset(sys.argv[1]), batch_size=8, image_size=16,\n"
              "                           device=torch.device('cpu'), workers=2, threads=1)\n"
              "    next(iter(loader))\n"
              "    print('ready', flush=True)\n"
              "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(shard_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    children: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = _children(proc.pid)
        workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        proc.kill()  # kill -9: nothing of ours runs in that process any more
        proc.wait()
        _wait_for(lambda: not any(_alive(c) for c in children), what="the workers to exit")  # stayed for minutes
    finally:
        _kill_all(proc, children)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_dali_source_workers_keep_serving_after_a_stop_signal_to_the_whole_process_group(shard_dir, sig):
    """Ctrl-C reaches every process of the terminal's group and a scheduler's SIGTERM every process of
    the job; training then runs more steps before it stops (several ranks agree first). The workers
    died of it and the next batch failed as "damaged data"."""
    script = ("import os, signal, sys, time, torch\n"
              "from dali_pipelines import PretrainLoader\n"
              "if __name__ == '__main__':\n"
              "    got = []\n"
              "    signal.signal(int(sys.argv[2]), lambda s, f: got.append(s))\n"
              "    loader = PretrainLoader(sys.argv[1], batch_size=8, image_size=16, workers=2, threads=1)\n"
              "    served = 0\n"
              "    for epoch in range(20):\n"
              "        loader.set_epoch(epoch)\n"
              "        for batch in loader:\n"
              "            served += 1\n"
              "            if served == 3:\n"
              "                os.killpg(os.getpgrp(), int(sys.argv[2]))\n"
              "                time.sleep(0.5)\n"
              "        if served >= 15:\n"
              "            break\n"
              "    loader.close()\n"
              "    print('served', served, 'signals', len(got), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(shard_dir), str(int(sig))], cwd=REPO,
                          capture_output=True, text=True, timeout=240, start_new_session=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    served, signals = (int(n) for n in re.findall(r"served (\d+) signals (\d+)", proc.stdout)[0])
    assert served >= 15 and signals == 1


def _run_script(script: str, *args, timeout: int = 120) -> str:
    """stdout of `script` in a fresh Python (tests/ importable: the DALI workers import its doubles);
    a hang is a failure after `timeout` seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    try:
        proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, env=env, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_loader_whose_worker_was_killed_still_closes(shard_dir):
    """The workers ignore SIGTERM, which DALI's own shutdown of a pool that lost a worker sends."""
    out = _run_script("import os, signal, sys, time\n"
                      "from dali_pipelines import PretrainLoader\n"
                      "if __name__ == '__main__':\n"
                      "    loader = PretrainLoader(sys.argv[1], batch_size=8, image_size=16, workers=2, threads=1)\n"
                      "    loader.set_epoch(0)\n"
                      "    next(iter(loader))\n"
                      "    workers = loader._stream.pipe._py_pool.pool._processes\n"
                      "    os.kill(workers[0].pid, signal.SIGKILL)\n"
                      "    time.sleep(1)\n"
                      "    loader.close()\n"
                      "    print('closed', len(workers), flush=True)\n", shard_dir)
    assert out.split() == ["closed", "2"]


def test_a_pool_that_fails_to_start_ends_in_an_error_not_a_hang(shard_dir, tmp_path):
    out = _run_script("import sys, torch\n"
                      "from doubles import FirstWorkerDies\n"
                      "from dali_pipelines.augment import moco_views\n"
                      "from dali_pipelines.external import AugmentSource, ShardReader\n"
                      "from dali_pipelines.loader import BatchStream, Settings\n"
                      "from dali_pipelines.pretrain import augment_graph\n"
                      "from shards import ShardDataset\n"
                      "if __name__ == '__main__':\n"
                      "    ds = ShardDataset(sys.argv[1])\n"
                      "    source = AugmentSource(ShardReader(ds), num_samples=ds.num_samples, global_batch=8, rank=0,\n"
                      "                           world_size=1, seed=0, start=0, anchor_views=moco_views(16))\n"
                      "    s = Settings('cpu', torch.float32, 2, 1)\n"
                      "    pipe = augment_graph(FirstWorkerDies(source, sys.argv[2]), moco_views(16), (), s,\n"
                      "                         **s.pipeline_kwargs(8, 2))\n"
                      "    try:\n"
                      "        BatchStream(pipe, ['q', 'k', 'meta'], s, first_step=0, depth=2, source=source,\n"
                      "                    local_batch=8, dataset=ds)\n"
                      "    except Exception as e:\n"
                      "        print('failed:', e, flush=True)\n", shard_dir, tmp_path / "marker")
    assert out.startswith("failed: Workers initialization failed")


def test_a_source_worker_stopped_from_outside_is_not_blamed_on_the_data(shard_dir):
    """What DALI raises when a worker of its pool is gone (before the workers left stops to the
    loader's process, Ctrl-C ended them this way): no sample is named, `verify` is not suggested."""
    from dali_pipelines.loader import failure_message

    for text in ("Worker data receiving interrupted", "Sending tasks to workers failed"):
        message = failure_message(ShardDataset(shard_dir), [3, 4], RuntimeError(text))
        assert "source worker processes stopped" in message and "verify" not in message


def test_python_m_cli_works_from_a_folder_holding_a_shards_folder(tmp_path):
    """The README's layout puts shards/ in the working directory; `python -m cli` put that folder
    ahead of the installed package (ImportError: cannot import name ... from 'shards')."""
    (tmp_path / "shards" / "train").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "cli", "verify", "shards/train"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: shards/train: not a complete shard folder")


@pytest.mark.timeout(180)
def test_a_damaged_sample_stops_every_rank_of_a_two_process_run_naming_it(shard_dir, tmp_path):
    """The failing rank exited only once its DALI source workers did, which they never did while its
    exception held the pipeline: the other rank waited in shuffle BN's exchange (30 min on gloo).
    And the sample, read ahead of the batch in flight, was not named (DALI's quoted source line was)."""
    damaged, tar = _zeroed_copy(shard_dir, tmp_path, 5)
    proc = _main("train", "--shards", damaged, "--out", tmp_path / "run", "--gpus", "0", "--cpu-procs", "2",
                 "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
                 "--set", "queue_size=16", "--set", "workers=1", "--set", "dali_threads=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: could not decode sample 5 (in {tar.name}) of {damaged}" in proc.stderr


def test_too_little_data_for_mining_or_class_similarity_is_one_line(checkpoint, tmp_path):
    """One image: CLIM training ended in an IndexError deep in the selection (k cut to 0); one class
    (or one image a class): `eval similarity` wrote NaN into its JSON."""
    src = make_photo_folder(tmp_path / "one-class", classes=1, per_class=3, seed=3)
    write_shards(src, tmp_path / "one-class-shards", maxcount=16)
    with pytest.raises(UserError, match=r"1 class\(es\), at most 3 sample\(s\) in one; the similarity"):
        _cli("eval", "similarity", "--checkpoint", checkpoint, "--shards", tmp_path / "one-class-shards",
             "--out", tmp_path / "e", "--device", "cpu")
    single = make_photo_folder(tmp_path / "single", classes=1, per_class=1, seed=4)
    write_shards(single, tmp_path / "single-shards", maxcount=16)
    with pytest.raises(UserError, match=r"^--shards \(mix=cutmix mines positives\): 1 sample\(s\); mining positives needs at least 2$"):
        _cli("train", "--shards", tmp_path / "single-shards", "--out", tmp_path / "run", "--gpus", "0", "--preset",
             "clim", "--batch-size", "1", "--set", "queue_size=2")
    assert not (tmp_path / "run" / "config.json").exists()


def test_every_option_help_reaches_the_help_screen_intact():
    """The CLI renders help as rich markup: a "[word]" in a help text would vanish from --help."""
    import typer.main

    group = typer.main.get_command(app)

    def commands(command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from commands(sub)

    texts = [(command.name, param.name, param.help) for command in commands(group)
             for param in command.params if getattr(param, "help", None)]
    assert len(texts) > 40
    eaten = [t for t in texts if re.search(r"(?<!\\)\[[a-z/]", t[2])]
    assert not eaten
    code, out = _cli("mine", "--help")
    assert code == 0 and "checkpoint's config" in out
