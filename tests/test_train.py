import os
import signal

import numpy as np
import pytest
import torch

from clim_fast.training.checkpoint import load_checkpoint, model_from_checkpoint
from clim_fast.config import make_config
from clim_fast.training.metrics import read_log
from dali_pipelines.epochs import epoch_share
from shards.errors import UserError
from doubles import SyntheticData, SyntheticPretrainLoader
from clim_fast.mining.rounds import ROUND_PARTS, is_refresh_epoch
from clim_fast.training.loop import lr_at, run_training


def tiny(preset="clim", **over):
    values = dict(arch="resnet18", image_size=16, batch_size=8, queue_size=16, epochs=2, log_every=1,
                  checkpoint_every=1, mine_every=1, base_lr=0.5, workers=1, dali_threads=1)
    values.update(over)
    return make_config(preset, values)


class SigtermSource(SyntheticData):
    """Sends SIGTERM to this process after handing out batch `after` of epoch `epoch`."""

    def __init__(self, epoch, after, **kw):
        super().__init__(**kw)
        self.epoch, self.after = epoch, after

    def loader(self, cfg, rank, world_size, device, table_changes=None):
        return _KillingLoader(super().loader(cfg, rank, world_size, device), self.epoch, self.after)


class _KillingLoader:
    def __init__(self, inner, epoch, after):
        self.inner, self.epoch, self.after, self.current = inner, epoch, after, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, e, start_step=0):
        self.current = e
        self.inner.set_epoch(e, start_step)

    def set_table(self, t):
        self.inner.set_table(t)

    def close(self):
        self.inner.close()

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            yield batch
            if self.current == self.epoch and i == self.after:
                os.kill(os.getpid(), signal.SIGTERM)


def _step_losses(run):
    return {r["iteration"]: (r["loss"], r["loss_moco"], r["loss_mix"]) for r in read_log(run, "step")}


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny()
    full = run_training(cfg, SyntheticData(32), tmp_path / "full", progress=False)
    assert full.name == "last.pt"

    cut = tmp_path / "cut"
    stopped = run_training(cfg, SigtermSource(epoch=1, after=1, num_samples=32), cut, progress=False)
    ckpt = load_checkpoint(stopped)  # the preemption checkpoint is loadable and mid-epoch
    assert (ckpt["epoch"], ckpt["step"], ckpt["iteration"]) == (1, 3, 7)  # the signal lands while batch 2 is fetched; that step completes
    assert ckpt["table_path"].endswith("table-epoch-0001.npz")
    assert read_log(cut, "preempted")[0]["step"] == 3
    run_training(cfg, SyntheticData(32), cut, resume="auto", progress=False)

    a, b = _step_losses(tmp_path / "full"), _step_losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # bit-for-bit: same losses at every iteration
    m_full, _, _ = model_from_checkpoint(full)
    m_cut, _, _ = model_from_checkpoint(cut / "checkpoints" / "last.pt")
    for (name, x), (_, y) in zip(m_full.state_dict().items(), m_cut.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "full" / "config.json").is_file()
    epochs = read_log(tmp_path / "full", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    # the resumed epoch's record covers the whole epoch, not only the steps after the resume
    resumed = read_log(cut, "epoch")
    assert [r["epoch"] for r in resumed] == [0, 1] and resumed[1]["resumed_at_step"] == 3
    assert resumed[1]["loss"] == pytest.approx(epochs[1]["loss"], rel=1e-6)
    assert epochs[1]["first_batch_wait_s"] >= 0
    assert {"anchors_per_s", "data_wait", "lr", "gpu_mem_gb"} <= set(epochs[0])


def test_a_stop_on_an_epochs_last_step_still_writes_that_epochs_file(tmp_path):
    run = tmp_path / "run"
    stopped = run_training(tiny("moco_v2"), SigtermSource(epoch=0, after=2, num_samples=32), run, progress=False)
    assert (load_checkpoint(stopped)["epoch"], load_checkpoint(stopped)["step"]) == (1, 0)  # 4 steps an epoch
    assert load_checkpoint(run / "checkpoints" / "epoch-0001.pt")["epoch"] == 1
    run_training(tiny("moco_v2"), SyntheticData(32), run, resume="auto", progress=False)
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch-*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_tensorboard_logging_writes_events_or_names_the_missing_extra(tmp_path):
    from clim_fast.training.metrics import RunLog

    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # the optional extra
        with pytest.raises(UserError, match=r"pip install 'clim-fast\[tensorboard\]'"):
            RunLog(tmp_path, tensorboard=True)
        return
    log = RunLog(tmp_path, tensorboard=True)
    log.write({"kind": "step", "iteration": 1, "loss": 2.0})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _rank_main(rank, port, out, cfg, data):
    import clim_fast.training.loop as loop
    from clim_fast.training.launch import Launch

    torch.set_num_threads(1)
    save = loop.save

    def save_every_rank(out, model, *args, **kwargs):  # keep each rank's final state for comparison
        torch.save(model.state_dict(), out / f"rank{rank}.pt")
        return save(out, model, *args, **kwargs)

    loop.save = save_every_rank
    loop.train_worker(rank, Launch(0, 2, 2, 0, "127.0.0.1", port), cfg, data, out, None, False, None)


class RecordingSource(SyntheticData):
    def loader(self, cfg, rank, world_size, device, table_changes=None):
        return _RecordingLoader(super().loader(cfg, rank, world_size, device), self.record_dir, rank)


class _RecordingLoader(_KillingLoader):
    def __init__(self, inner, record_dir, rank):
        super().__init__(inner, -1, -1)
        self.record_dir, self.rank = record_dir, rank

    def __iter__(self):
        for batch in self.inner:
            with open(self.record_dir / f"ids-rank{self.rank}-epoch{self.current}.txt", "a") as f:
                f.write(" ".join(map(str, batch["id"].tolist())) + "\n")
            yield batch


def test_two_gloo_ranks_stay_identical_and_see_disjoint_samples(tmp_path):
    import torch.multiprocessing as mp

    from clim_fast.distributed import free_port

    cfg = tiny(epochs=1, multires=True)
    source = RecordingSource(32)
    source.record_dir = tmp_path
    mp.spawn(_rank_main, args=(free_port(), tmp_path, cfg, source), nprocs=2)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # parameters and the queue agree exactly; BN running stats are per rank (as in MoCo)
    checked = [n for n in s0 if "running_" not in n and "num_batches" not in n]
    assert len(checked) > 100
    for name in checked:
        assert torch.equal(s0[name], s1[name]), name
    assert int(s0["queue_ptr"]) == 0  # 4 steps x 8 keys through a queue of 16
    ids = [np.loadtxt(tmp_path / f"ids-rank{r}-epoch0.txt", dtype=np.int64).reshape(-1) for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 16
    assert not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids)) == sorted(epoch_share(32, 8, 0, 1, cfg.seed, 0))


def test_schedule_and_refresh_epochs():
    cfg = tiny(epochs=10, warmup_epochs=1, base_lr=0.256)  # lr = 0.008 at batch 8
    assert lr_at(cfg, 0, 100, 10) == pytest.approx(0.008 / 10)
    assert lr_at(cfg, 10, 100, 10) == pytest.approx(0.008)
    assert lr_at(cfg, 55, 100, 10) == pytest.approx(0.004)
    c = tiny(clim_start_epoch=2, mine_every=3)
    assert [e for e in range(10) if is_refresh_epoch(c, e)] == [2, 5, 8]
    c = tiny(clim_start_epoch=0, mine_every=3, init_table="t.npz")
    assert [e for e in range(10) if is_refresh_epoch(c, e)] == [3, 6, 9]
    assert not any(is_refresh_epoch(tiny("moco_v2"), e) for e in range(5))


def test_bad_setups_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="queue_size"):
        run_training(tiny(queue_size=12), SyntheticData(32), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="batch-size"):
        run_training(tiny(batch_size=64, queue_size=64), SyntheticData(32), tmp_path / "b", progress=False)
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "x.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="x.pt"):
        run_training(tiny(), SyntheticData(32), tmp_path / "c", resume=tmp_path / "c" / "checkpoints" / "x.pt")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="not a folder"):
        run_training(tiny(), SyntheticData(32), tmp_path / "file", progress=False)
    with pytest.raises(UserError, match="resnet999"):
        run_training(tiny(arch="resnet999"), SyntheticData(32), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # a bad option leaves no run folder behind


def test_a_run_folder_holds_one_training_at_a_time(tmp_path):
    from shards.lock import folder_lock

    with folder_lock(tmp_path / "run", "another clim-fast train"):
        with pytest.raises(UserError, match="pid"):
            run_training(tiny(), SyntheticData(32), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_few_epochs_on_real_images_lower_the_loss(shard_dir, tmp_path):
    """The real path end to end: shards -> DALI PretrainLoader -> online mining -> CLIM steps."""
    pytest.importorskip("dali_pipelines")
    from typer.testing import CliRunner

    from cli.app import app

    run = tmp_path / "run"
    args = ["train", "--shards", str(shard_dir), "--out", str(run), "--preset", "clim", "--arch", "resnet18",
            "--image-size", "16", "--batch-size", "16", "--epochs", "5"]
    for pair in ("queue_size=16", "clusters=4", "knn_k=4", "mine_every=3", "log_every=1", "workers=1",
                 "dali_threads=1", "base_lr=2.0", "checkpoint_every=5"):
        args += ["--set", pair]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    steps = read_log(run, "step")
    assert len(steps) == 15 and all(np.isfinite(s["loss"]) for s in steps)
    # the queue (one batch) is full after step 1, so the InfoNCE terms start near log(17) = 2.83
    early = np.mean([s["loss_moco"] for s in steps[1:3]])
    late = np.mean([s["loss_moco"] for s in steps[-3:]])
    assert late < early - 0.1
    assert sorted(p.name for p in (run / "tables").iterdir()) == ["table-epoch-0000.npz", "table-epoch-0003.npz"]
    # each round's record holds its parts up to the first batch on its table (that epoch's first wait)
    rounds, epochs = read_log(run, "mine"), {r["epoch"]: r for r in read_log(run, "epoch")}
    assert [r["epoch"] for r in rounds] == [0, 3]
    for r in rounds:
        assert r["pickup_s"] == epochs[r["epoch"]]["first_batch_wait_s"]
        assert r["round_s"] == pytest.approx(sum(r[k] for k in ROUND_PARTS)) and r["round_s"] >= r["feature_s"] > 0
        assert 0 < r["feature_first_batch_s"] <= r["feature_s"]
    _, cfg, ckpt = model_from_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 5 and ckpt["table_path"].endswith("table-epoch-0003.npz") and cfg.mix == "cutmix"


@pytest.mark.parametrize("options,message", [
    (dict(nnodes=2, node_rank=5), "--node-rank 5: must be in 0..1 (--nnodes 2)"),  # waited 30 min in TCPStore
    (dict(nnodes=2, node_rank=-1), "--node-rank -1: must be in 0..1 (--nnodes 2)"),
    (dict(nnodes=0), "--nnodes 0: must be at least 1"),  # was a misleading batch-size error
    (dict(master_port=70000), "--master-port 70000: must be in 1..65535"),
    (dict(master_port=0), "--master-port 0: must be in 1..65535"),
], ids=["rank-high", "rank-neg", "nnodes-0", "port-high", "port-0"])
def test_bad_node_options_are_refused_before_anything_starts(tmp_path, monkeypatch, options, message):
    from clim_fast.training.launch import plan_launch

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError) as err:
        plan_launch(gpus=0, cpu_procs=1, **options)
    assert str(err.value) == message
    with pytest.raises(UserError, match="^--node-rank 2"):  # run_training plans the launch before it makes RUN
        run_training(tiny(), SyntheticData(32), tmp_path / "run", progress=False, nnodes=2, node_rank=2)
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_training_never_overwrites_an_earlier_run(tmp_path):
    """The Python API is protected like `clim-fast train` (which used to be the only one checking)."""

    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"kind": "epoch"}\n')
    with pytest.raises(UserError, match="holds an earlier run \\(log.jsonl\\)"):  # was: trained over it
        run_training(tiny(), SyntheticData(32), run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl"]
    assert (run / "log.jsonl").read_text() == '{"kind": "epoch"}\n'


def test_the_configs_loader_settings_reach_the_training_and_mining_loaders(shard_dir, tmp_path):
    """workers, dali_threads, hw_decoder_load, cpu_decode, cpu_views and the image dtype go from the config to
    the pretrain loader and the online round's feature loader (data.loader_options)."""
    from clim_fast.mining.rounds import OnlineMining
    from clim_fast.training.loop import ShardData

    cfg = tiny(workers=0, dali_threads=3, hw_decoder_load=0.4, cpu_decode=True, cpu_views=True, precision="fp32")
    data = ShardData(shard_dir)
    cpu = torch.device("cpu")
    for loader in (data.loader(cfg, 0, 1, cpu, None), OnlineMining(cfg, data.dataset, tmp_path, cpu).loader()):
        s = loader.settings
        assert (s.workers, s.threads, s.hw_decoder_load, s.cpu_decode, s.cpu_views, s.dtype) == \
            (0, 3, 0.4, True, True, torch.float32)
        loader.close()
    # the feature pass reads 256 a rank at the least, never past the data: the whole set here
    assert loader.local_batch == data.num_samples and data.num_samples > cfg.batch_size


def test_checkpoints_are_snapshots_written_in_the_background(tmp_path):
    """The loop waits for the snapshot only: `write` returns while the file is still being written,
    the file holds the state as it was at the snapshot (training goes on changing it); a failed
    write is handed back once, and never stops the next checkpoint from being written."""
    import threading

    from clim_fast.training.checkpoint import CheckpointWriter, snapshot

    weights = {"w": torch.ones(3)}
    state = snapshot({"model": weights, "config": {}, "epoch": 2, "nested": [torch.zeros(2)]})
    weights["w"].add_(5)  # training goes on
    release, writer = threading.Event(), CheckpointWriter()
    assert writer.write(state, tmp_path / "a.pt", tmp_path / "b.pt", then=release.wait) is None
    assert writer._thread.is_alive()  # the caller is back before the write has finished
    release.set()
    assert writer.wait() is None
    for name in ("a.pt", "b.pt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert torch.equal(ckpt["model"]["w"], torch.ones(3)) and ckpt["epoch"] == 2
    (tmp_path / "file").write_text("not a folder")
    assert writer.write(state, tmp_path / "file" / "c.pt") is None
    failed = writer.write(dict(state, epoch=3), tmp_path / "d.pt")  # the failure comes back here ...
    assert failed is not None and "file" in str(failed)
    assert writer.wait() is None and load_checkpoint(tmp_path / "d.pt")["epoch"] == 3  # ... and d.pt is written

    def failing_prune():
        raise PermissionError("cannot delete epoch-0001.pt")

    writer.write(dict(state, epoch=4), tmp_path / "e.pt", then=failing_prune)
    assert writer.wait() is None and load_checkpoint(tmp_path / "e.pt")["epoch"] == 4  # a prune only warns


def test_each_checkpoint_logs_what_it_cost_the_loop(tmp_path):
    run = tmp_path / "run"
    run_training(tiny("moco_v2", epochs=3, checkpoint_every=1), SyntheticData(32), run, progress=False)
    records = read_log(run, "checkpoint")
    assert [r["epoch"] for r in records] == [1, 2, 3] and all(r["blocking_s"] >= 0 for r in records)
    written = read_log(run, "checkpoint_written")  # once on disk: a log never names a file a kill cut short
    assert [(r["epoch"], r["path"]) for r in written] == [(r["epoch"], r["path"]) for r in records]
    assert all(r["write_s"] > 0 for r in written)
    # keep_checkpoints 2: the oldest epoch file goes once the newest is written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt", "last.pt"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3


def test_a_failed_checkpoint_write_stops_the_run_and_the_next_checkpoint_is_still_written(tmp_path, monkeypatch):
    import clim_fast.training.checkpoint as checkpoint

    calls, original = [], checkpoint.save_checkpoint

    def disk_full_once(state, *paths):
        calls.append(state["epoch"])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        original(state, *paths)

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full_once)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run_training(tiny("moco_v2", epochs=3, checkpoint_every=1), SyntheticData(32), run, progress=False)
    assert calls == [1, 2]  # epoch 1's write failed; epoch 2's checkpoint was written before the run stopped
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_two_ranks_stop_together_after_sigterm_and_resume_bit_for_bit(tmp_path):
    """SIGTERM reaches both ranks (as a scheduler sends it) during iteration 3: the flags summed at
    iteration 10 are acted on at 20, so both stop there, save, and `--resume auto` ends exactly
    where an uninterrupted 2-rank run does."""
    cfg = tiny("moco_v2", epochs=1)  # 192 samples, global batch 8: 24 steps
    full = tmp_path / "full"
    run_training(cfg, SyntheticData(192), full, cpu_procs=2, progress=False)
    cut = tmp_path / "cut"
    run_training(cfg, SigtermSource(epoch=0, after=1, num_samples=192), cut, cpu_procs=2, progress=False)
    stopped = read_log(cut, "preempted")
    assert [(r["epoch"], r["step"], r["iteration"]) for r in stopped] == [(0, 20, 20)]
    run_training(cfg, SyntheticData(192), cut, cpu_procs=2, resume="auto", progress=False)
    a, b = ({r["iteration"]: r["loss"] for r in read_log(run, "step")} for run in (full, cut))
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert a == b


def test_two_ranks_signalled_in_an_epochs_last_steps_stop_at_its_end_before_mining(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(epochs=3, clim_start_epoch=1)  # 4 steps an epoch; the first mining round at epoch 1
    run_training(cfg, SigtermSource(epoch=0, after=1, num_samples=32), run, cpu_procs=2, progress=False)
    assert [(r["epoch"], r["step"], r["iteration"]) for r in read_log(run, "preempted")] == [(1, 0, 4)]
    assert not read_log(run, "mine")  # before: the round at epoch 1 ran, then the stop 10-20 steps on


def test_torchrun_and_slurm_are_detected_from_their_environment(monkeypatch):
    from clim_fast.training.launch import LaunchEnv, detect_launcher

    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)
    assert detect_launcher() is None
    for name, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="29411").items():
        monkeypatch.setenv(name, value)
    assert detect_launcher() == LaunchEnv(3, 8, 1, "node7", 29411)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    slurm = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[003-005,007],cpu01")
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert detect_launcher() == LaunchEnv(5, 16, 1, "gpu003", 29500)  # the node list's first host leads
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cpu01,cpu02")
    assert detect_launcher().master_addr == "cpu01"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: not a distributed launch
    assert detect_launcher() is None


def test_sigint_stops_like_sigterm_and_resume_says_where_it_continues(tmp_path, monkeypatch, capsys):
    class SigintLoader(_KillingLoader):
        def __iter__(self):
            for i, batch in enumerate(self.inner):
                yield batch
                if self.current == 1 and i == 0:
                    os.kill(os.getpid(), signal.SIGINT)

    class SigintSource(SyntheticData):
        def loader(self, cfg, rank, world_size, device, table_changes=None):
            return SigintLoader(super().loader(cfg, rank, world_size, device), -1, -1)

    run = tmp_path / "run"
    cfg = tiny("moco_v2")
    stopped = run_training(cfg, SigintSource(32), run, progress=False)
    assert read_log(run, "preempted")[0]["signal"] == signal.SIGINT
    assert load_checkpoint(stopped)["epoch"] == 1 and load_checkpoint(stopped)["step"] > 0
    capsys.readouterr()
    run_training(cfg, SyntheticData(32), run, resume="auto", progress=False)
    ckpt = load_checkpoint(stopped)
    assert f"resuming from {stopped} (epoch 1, step" in capsys.readouterr().err
    assert ckpt["epoch"] == 2
    fresh = tmp_path / "fresh"
    run_training(cfg, SyntheticData(32), fresh, resume="auto", progress=False)  # nothing there yet
    assert f"--resume auto: no checkpoint in {fresh}, starting fresh" in capsys.readouterr().err


def test_resume_fresh_starts_over_where_no_checkpoint_loads(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(UserError, match="--resume fresh"):
        run_training(tiny("moco_v2", epochs=1), SyntheticData(32), run, resume="auto", progress=False)
    last = run_training(tiny("moco_v2", epochs=1), SyntheticData(32), run, resume="fresh", progress=False)
    assert load_checkpoint(last)["epoch"] == 1  # trained from scratch over the broken file


def test_a_resume_takes_new_options_but_refuses_a_change_to_what_the_checkpoint_fixes(tmp_path):
    run = tmp_path / "run"
    run_training(tiny("moco_v2", epochs=1), SyntheticData(32), run, progress=False)
    with pytest.raises(UserError, match=r"batch_size \(8 vs 16\)"):
        run_training(tiny("moco_v2", epochs=2, batch_size=16), SyntheticData(32), run, resume="auto", progress=False)
    last = run_training(tiny("moco_v2", epochs=2, base_lr=0.25), SyntheticData(32), run, resume="auto",
                        progress=False)
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 2 and ckpt["config"]["base_lr"] == 0.25


def test_a_resume_whose_positives_now_start_earlier_mines_its_first_table(tmp_path):
    run = tmp_path / "run"
    run_training(tiny(epochs=2, clim_start_epoch=5), SyntheticData(32), run, progress=False)
    assert not read_log(run, "mine")
    run_training(tiny(epochs=3, clim_start_epoch=1, mine_every=3), SyntheticData(32), run, resume="auto",
                 progress=False)  # epoch 2 is not a refresh epoch, and the checkpoint names no table
    assert [r["epoch"] for r in read_log(run, "mine")] == [2]
    assert read_log(run, "epoch")[-1]["table"].endswith("table-epoch-0002.npz")


def test_training_from_an_offline_table_uses_it_from_epoch_0_and_refuses_a_foreign_one(tmp_path):
    """--table (config init_table): epoch 0 trains on that table with no mining round; the next
    round comes mine_every epochs later; a table mined on other shards is refused before training."""
    from doubles import label_table

    data = SyntheticData(32)
    labels = np.arange(32) % data.num_classes
    table = tmp_path / "offline.npz"
    label_table(labels, dataset_id=data.dataset_id).save(table)
    run = tmp_path / "run"
    run_training(tiny(epochs=3, mine_every=2, init_table=str(table)), data, run, progress=False)
    epochs = read_log(run, "epoch")
    assert [r["table"] for r in epochs[:2]] == [str(table)] * 2
    assert [r["epoch"] for r in read_log(run, "mine")] == [2] and epochs[2]["table"].endswith("table-epoch-0002.npz")
    foreign = tmp_path / "foreign.npz"
    label_table(labels, dataset_id="other-shards").save(foreign)
    with pytest.raises(UserError, match="foreign.npz"):
        run_training(tiny(init_table=str(foreign)), data, tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2").exists()  # refused before anything was written


def test_a_finished_checkpoint_resumed_into_a_new_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    last = run_training(tiny("moco_v2", epochs=2), SyntheticData(32), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match=r"--epochs 2: nothing to do, .*last.pt is already at epoch 2"):
        run_training(tiny("moco_v2", epochs=2), SyntheticData(32), tmp_path / "b", resume=last, progress=False)
    assert list((tmp_path / "b").iterdir()) == []  # no config.json or log.jsonl: `b` still takes a fresh run
    saved = (tmp_path / "a" / "config.json").read_text()
    for epochs in (2, 1):  # the run's own folder (a requeued job): nothing to do, and nothing rewritten
        again = run_training(tiny("moco_v2", epochs=epochs), SyntheticData(32), tmp_path / "a", resume="auto",
                             progress=False)
        assert again == last and (tmp_path / "a" / "config.json").read_text() == saved
        assert f"--epochs {epochs}: nothing to do, {last} is at epoch 2" in capsys.readouterr().err


class _UnmeasurableLoader(SyntheticPretrainLoader):
    def __init__(self, closed, **kw):
        super().__init__(**kw)
        self.closed = closed

    def __len__(self):
        raise UserError("the loader cannot start")

    def close(self):
        self.closed.append("loader")


class _BrokenLoaderData(SyntheticData):
    """Its loader fails when built, or when asked its length (after the signal handlers are set)."""

    def __init__(self, n, fail_at):
        super().__init__(n)
        self.fail_at, self.closed = fail_at, []

    def mining(self, cfg, run_dir, device):
        mining = super().mining(cfg, run_dir, device)
        mining.close = lambda: self.closed.append("mining")
        return mining

    def loader(self, cfg, rank, world_size, device, table_changes=None):
        if self.fail_at == "build":
            raise UserError("the loader cannot start")
        return _UnmeasurableLoader(self.closed, num_samples=self.num_samples, batch_size=cfg.batch_size,
                                   image_size=cfg.image_size, rank=rank, world_size=world_size, device=device)


@pytest.mark.parametrize("fail_at,closed", [("build", ["mining"]), ("len", ["loader", "mining"])])
def test_a_failed_setup_undoes_what_was_set_up_before_it(tmp_path, fail_at, closed):
    """What was made before the failure is closed, and the signal handlers are the caller's again
    (a process that trains twice, like the demo, keeps its own Ctrl-C)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    data = _BrokenLoaderData(32, fail_at)
    with pytest.raises(UserError, match="the loader cannot start"):
        run_training(tiny(), data, tmp_path / "run", progress=True)
    assert data.closed == closed
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_run_folder_resumes_after_a_move_and_from_another_directory_on_its_own_table(tmp_path, monkeypatch):
    """The checkpoint names its table relative to RUN: neither the working directory nor a moved
    or copied run folder makes a resume read another run's table."""
    import shutil

    monkeypatch.chdir(tmp_path)
    run_training(tiny(epochs=1, clim_start_epoch=0, mine_every=5), SyntheticData(32), "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["table_path"] == \
        os.path.join("tables", "table-epoch-0000.npz")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    last = run_training(tiny(epochs=2, clim_start_epoch=0, mine_every=5), SyntheticData(32), tmp_path / "moved",
                        resume="auto", progress=False)
    assert load_checkpoint(last)["epoch"] == 2
    assert read_log(tmp_path / "moved", "epoch")[-1]["table"] == os.path.join("tables", "table-epoch-0000.npz")
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    (tmp_path / "copy" / "tables" / "table-epoch-0000.npz").write_bytes(b"not a table")
    with pytest.raises(UserError, match=r"copy/tables/table-epoch-0000\.npz"):  # its own table, not the original's
        run_training(tiny(epochs=3, clim_start_epoch=0, mine_every=5), SyntheticData(32), tmp_path / "copy",
                     resume="auto", progress=False)


def test_each_start_is_logged_and_temp_files_of_cut_writes_are_removed(tmp_path):
    run = tmp_path / "run"
    run_training(tiny("moco_v2", epochs=1), SyntheticData(32), run, progress=False)
    cut = run / "checkpoints" / ".epoch-0002.pt.k3j9x_2a.tmp"  # a write a kill -9 cut short
    cut.write_bytes(b"half a checkpoint")
    kept = run / "checkpoints" / "notes.txt"
    kept.write_text("mine")
    (run / "tables").mkdir()
    other = run / "tables" / ".offline.npz.x81kq0.tmp"  # `clim-fast mine --out RUN/tables/offline.npz` writing
    other.write_bytes(b"in progress")
    run_training(tiny("moco_v2", epochs=2), SyntheticData(32), run, resume="auto", progress=False)
    assert not cut.exists() and kept.read_text() == "mine" and other.exists()
    starts = read_log(run, "start")
    assert [(s["epoch"], s["resumed_from"]) for s in starts] == [(0, None), (1, str(run / "checkpoints" / "last.pt"))]
