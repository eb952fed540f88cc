"""The pretraining loop, in torchvision's references/classification shape.

    run_training(cfg, shards, out, gpus=N)      # checks, then one worker per process
      train_worker(...)                         # build_model, loader, ...; for epoch: table_for_epoch, ...
        train_one_epoch(...)                    # training.step.train_step: model(batch); backward; SGD; enqueue; log

The step itself is `CLIM.forward` (clim_fast/method/clim.py). Mining rounds come from
clim_fast/mining/rounds.py at the epochs its schedule names. SIGTERM/SIGINT: finish the step (with
several ranks: the step at which they next agree, within 20), save, return (`--resume auto`
continues bit for bit).
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, closing, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from clim_fast import distributed as dist
from clim_fast import run_folder
from clim_fast.run_folder import last_checkpoint
from clim_fast.config import Config
from clim_fast.data import loader_options
from clim_fast.method.clim import CLIM
from clim_fast.progress import PassProgress
from clim_fast.mining.rounds import ROUND_PARTS, OnlineMining, is_refresh_epoch, positives_active
from clim_fast.mining.select import check_minable
from clim_fast.training.checkpoint import (CheckpointWriter, capture_rng, check_fresh_run_folder,
                                           RESUME_SEARCHES, find_resume_checkpoint, load_checkpoint,
                                           load_model_state, prune_epoch_checkpoints, restore_rng, snapshot)
from clim_fast.training.launch import Launch, plan_launch, spawn, user_errors_to
from clim_fast.training.metrics import RunLog, ThroughputMeter, gpu_memory_gb
from clim_fast.transfer import HostCopy, to_device
from clim_fast.training.step import grad_scaler, train_step
from dali_pipelines import PretrainLoader
from dali_pipelines.epochs import check_batch
from shards import ShardDataset
from shards.errors import UserError, os_errors_as_user_errors
from shards.lock import folder_lock
from shards.neighbours import NeighbourTable

# DDP must not broadcast buffers before every forward: the queue is kept identical by the enqueue, and
# each rank's batch-norm statistics are its own. torch 2.14 renamed the option (the old name warns).
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})

# Config fields a resumed run must share with its checkpoint (the rest, e.g. epochs, may change).
RESUME_FIXED_FIELDS = ("arch", "image_size", "feat_dim", "queue_size", "batch_size", "mix", "multires", "seed")


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch to run next (= completed epochs)
    step: int = 0  # steps already done in `epoch` (non-zero only after a preemption)
    iteration: int = 0
    table_path: str = ""  # the neighbour table in use ("" before the first): relative to RUN when inside it
    loss_sum: float = 0.0  # over the steps already done in `epoch`, so its record covers all of it
    loss_steps: int = 0


class ShardData:
    """What training reads from a shard set: pretraining batches and online mining rounds."""

    def __init__(self, shards):
        self.dataset = shards if isinstance(shards, ShardDataset) else ShardDataset(shards)
        self.num_samples, self.dataset_id = self.dataset.num_samples, self.dataset.dataset_id

    def loader(self, cfg: Config, rank: int, world_size: int, device, table_changes):
        return PretrainLoader(self.dataset, batch_size=cfg.batch_size, image_size=cfg.image_size, rank=rank,
                              world_size=world_size, seed=cfg.seed, multires_sizes=cfg.multires_sizes,
                              crop_min_scale=cfg.crop_min_scale, table_changes=table_changes,
                              **loader_options(cfg, device))

    def mining(self, cfg: Config, run_dir: Path, device):
        return OnlineMining(cfg, self.dataset, run_dir, device)


def load_table(path, data) -> NeighbourTable:
    """The neighbour table at `path`; UserError unless it was mined on these shards."""
    table = NeighbourTable.load(path)
    table.check_matches(data.dataset_id, data.num_samples, path)
    return table


def lr_at(cfg: Config, iteration: int, total_iters: int, steps_per_epoch: int) -> float:
    """Linear warmup over warmup_epochs, then cosine to 0 per iteration (or constant)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if iteration < warm:
        return cfg.lr * (iteration + 1) / warm
    if not cfg.cosine:
        return cfg.lr
    progress = (iteration - warm) / max(1, total_iters - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# launching

def run_training(cfg: Config, shards, out: str | Path, *, gpus: int = 0, cpu_procs: int = 1,
                 resume: str | Path | None = None, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str | None = None, master_port: int | None = None,
                 progress: bool | None = None, share_gpu: bool = False) -> Path:
    """Train; returns the final checkpoint path (RUN/checkpoints/last.pt).

    `shards` is a shard folder, a ShardDataset, or an object shaped like ShardData (tests). A fresh
    start (no `resume`) refuses an `out` that holds an earlier run or is a shard folder, first."""
    out = Path(out)
    if is_fresh_start(resume):  # before any other check, and before anything is written
        check_fresh_run_folder(out)
    data = shards if hasattr(shards, "loader") else ShardData(shards)
    launch = plan_launch(gpus=gpus, cpu_procs=cpu_procs, nnodes=nnodes, node_rank=node_rank,
                         master_addr=master_addr, master_port=master_port, share_gpu=share_gpu)
    check_batch(data.num_samples, cfg.batch_size, launch.world_size)
    if cfg.uses_positives:
        check_minable(data.num_samples, f"--shards (mix={cfg.mix} mines positives)")
    if cfg.init_table:
        load_table(cfg.init_table, data)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    with os_errors_as_user_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "clim-fast train") if launch.first_rank == 0 else nullcontext():
        if is_fresh_start(resume) and launch.first_rank == 0:  # again, under the lock: a run may have ended since
            check_fresh_run_folder(out)
        resume_path, done_epochs = resolve_resume(resume, out, cfg, data)
        if done_epochs >= cfg.epochs:  # resumed a finished run in its own folder (a requeued job): leave it as it is
            print(f"--epochs {cfg.epochs}: nothing to do, {resume_path} is at epoch {done_epochs}", file=sys.stderr)
            return resume_path
        if launch.local_procs == 1:
            return train_worker(0, launch, cfg, data, out, resume_path, progress, None)
        spawn(launch, train_worker, launch, cfg, data, out, resume_path, progress)
    return last_checkpoint(out)


def is_fresh_start(resume) -> bool:
    """No --resume: a new run in RUN (run_training checks RUN holds no earlier one)."""
    return resume is None or str(resume) == ""


def resolve_resume(resume, out: Path, cfg: Config, data) -> tuple[Path | None, int]:
    """(None, 0) for a fresh start, or (a checkpoint that matches this run, its completed epochs);
    UserError otherwise, and for a finished checkpoint resumed into another folder than its own."""
    if is_fresh_start(resume):
        return None, 0
    if str(resume) in RESUME_SEARCHES:
        found = find_resume_checkpoint(out, allow_broken=str(resume) == "fresh")
        if found is None:
            print(f"--resume {resume}: no checkpoint in {out}, starting fresh", file=sys.stderr)
            return None, 0
        path, ckpt = found
    else:
        path = Path(resume)
        ckpt = load_checkpoint(path)
    if ckpt.get("dataset_id") not in (None, data.dataset_id) or ckpt.get("num_samples") not in (None, data.num_samples):
        raise UserError(f"{path}: checkpoint was trained on dataset {ckpt.get('dataset_id')} "
                        f"({ckpt.get('num_samples')} samples), not on these shards ({data.dataset_id})")
    saved = ckpt["config"]
    differ = [f"{k} ({saved.get(k)!r} vs {getattr(cfg, k)!r})" for k in RESUME_FIXED_FIELDS if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"{path}: checkpoint config differs from this run in {', '.join(differ)}")
    own = run_folder.checkpoint_folder(out)
    if ckpt["epoch"] >= cfg.epochs and not (own.is_dir() and os.path.samefile(path.parent, own)):
        raise UserError(f"--epochs {cfg.epochs}: nothing to do, {path} is already at epoch {ckpt['epoch']}")
    if ckpt["epoch"] < cfg.epochs:
        print(f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt.get('step', 0)})", file=sys.stderr)
    return path, int(ckpt["epoch"])


# ---------------------------------------------------------------------------------------------
# one process

def train_worker(local_rank: int, launch: Launch, cfg: Config, data, out: Path, resume_path: Path | None,
                 progress: bool | None, errors) -> Path:
    with user_errors_to(errors), ExitStack() as cleanup:  # whatever was set up is undone, in reverse order
        rank, device = launch.first_rank + local_rank, launch.device(local_rank)
        if launch.local_procs > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // launch.local_procs))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # fixed view sizes: pick the fastest conv kernels once (about 20 s of autotuning in a
            # process's first clim_multires steps on an H200; the steps after are what counts)
            torch.backends.cudnn.benchmark = True
        dist.init_distributed(rank, launch.world_size, backend=launch.backend,
                              master_addr=launch.master_addr, master_port=launch.master_port)
        cleanup.callback(dist.cleanup)
        model, step_fn, optimizer, scaler = build_model(cfg, rank, device)
        state = restore(resume_path, model, optimizer, scaler) if resume_path else RunState()
        if rank == 0:
            cfg.save(run_folder.config_path(out))
            run_folder.remove_temp_files(out)  # of writes a kill -9 cut short (they never replaced a file)
        log = cleanup.enter_context(closing(RunLog(out, enabled=rank == 0, tensorboard=cfg.tensorboard)))
        # where this process starts: a log holding several starts (a resume, a fresh start after a
        # run killed before its first checkpoint) reads as the runs it holds
        log.write({"kind": "start", "epoch": state.epoch, "step": state.step, "iteration": state.iteration,
                   "resumed_from": str(resume_path) if resume_path else None,
                   "world_size": dist.get_world_size(), "time": time.time()})
        mining = cleanup.enter_context(closing(data.mining(cfg, out, device))) if cfg.uses_positives else None
        loader = cleanup.enter_context(closing(
            data.loader(cfg, rank, dist.get_world_size(), device, lambda e: is_refresh_epoch(cfg, e))))
        stop = StopFlag(device)
        cleanup.callback(stop.restore)
        bar = None
        if rank == 0 and progress is not False:  # None: a live bar in a terminal, else a line every 30 s
            bar = cleanup.enter_context(PassProgress("training", cfg.epochs * len(loader), state.iteration,
                                                     live=progress))
        writer = CheckpointWriter()
        cleanup.callback(writer.wait)  # on an error: finish what was handed over; the error is on its way
        saving = dict(out=out, model=model, optimizer=optimizer, scaler=scaler, state=state, cfg=cfg, data=data,
                      writer=writer, log=log)
        last, table = last_checkpoint(out), None
        for epoch in range(state.epoch, cfg.epochs):
            table, round_record = table_for_epoch(cfg, epoch, state, data, mining, step_fn, loader, table, out)
            loader.set_epoch(epoch, start_step=state.step)
            stopped = train_one_epoch(step_fn, model, optimizer, scaler, loader, epoch, state, cfg, log, stop, bar,
                                      round_record) or stop.agreed_now()  # not after the next mining round
            if mining is not None:
                mining.flush()  # the checkpoint names the table: it must be on disk first
            epoch_file = state.epoch > epoch and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs)
            if stopped:  # (a stop on the epoch's last step still writes its epoch file)
                last = save(**saving, epoch_file=epoch_file)
                finish_writes(writer)
                log.write({"kind": "preempted", "epoch": state.epoch, "step": state.step,
                           "iteration": state.iteration, "signal": stop.signum, "checkpoint": str(last)})
                if rank == 0:
                    print(f"stopped by signal {stop.signum}: saved {last}; continue with --resume auto",
                          file=sys.stderr)
                return last
            if epoch_file:
                last = save(**saving, epoch_file=True)
        finish_writes(writer)
        return last


def build_model(cfg: Config, rank: int, device: torch.device):
    """(CLIM model, the step function: the model or its DDP wrapper, SGD, loss scaler)."""
    torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank
    model = CLIM(cfg, rank).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_encoders(mode=cfg.compile_mode)
    step_fn = model
    if dist.is_distributed():
        step_fn = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **NO_BUFFER_SYNC)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scaler = grad_scaler(model, device)
    torch.manual_seed(cfg.seed + rank)
    return model, step_fn, optimizer, scaler


def table_for_epoch(cfg: Config, epoch: int, state: RunState, data, mining, step_fn, loader, table, out: Path):
    """(the neighbour table `epoch` trains with, or None; its mining round's log record, or None).
    A refresh epoch mines a new table (unless resumed mid-epoch: the checkpoint names the table);
    the first epoch with positives in this process loads the run's table (or the initial one).
    A resumed run whose positives now start earlier than when it was saved has no table to load: it
    mines one. A new table goes to the loader, which uses it from `set_epoch(epoch)` on."""
    record = None
    active, stored = positives_active(cfg, epoch), state.table_path or cfg.init_table
    if (is_refresh_epoch(cfg, epoch) and state.step == 0) or (active and table is None and not stored):
        table, path, record = mining(step_fn, epoch)
    elif active and table is None:
        path = run_path(state.table_path, out) if state.table_path else cfg.init_table
        table = load_table(path, data)
    else:
        return table, None
    state.table_path = stored_path(path, out)
    loader.set_table(table)
    return table, record


def stored_path(path, out: Path) -> str:
    """A path as a checkpoint keeps it: relative to RUN when inside it (the run folder may move, or
    be resumed from another working directory), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(os.path.abspath(out)))
    except ValueError:
        return str(path)


def run_path(stored: str, out: Path) -> Path:
    """The path a checkpoint's `stored_path` names: RUN's own tables/..., or an absolute path.
    (Checkpoints before stored_path kept other paths as typed, relative to the working directory:
    those are read from there where RUN has no such file.)"""
    path = Path(stored)
    if path.is_absolute() or path.parts[:1] == (run_folder.TABLES,) or (out / path).exists() or not path.exists():
        return out / path
    return path


def train_one_epoch(step_fn, model: CLIM, optimizer, scaler, loader, epoch: int, state: RunState, cfg: Config,
                    log: RunLog, stop: "StopFlag", bar, round_record: dict | None) -> bool:
    """Train the rest of `epoch` (from state.step). True when a stop signal ended it early."""
    steps, gb = len(loader), cfg.batch_size
    total = cfg.epochs * steps
    window, whole = ThroughputMeter(), ThroughputMeter()
    loss_sum, loss_steps, first_wait = torch.zeros((), device=model.queue.device), 0, None
    stopped, t_ready, pending = False, time.perf_counter(), None

    def write_pending():  # the last step record, its values on the host by now
        record, values = pending
        record = {**record, **values.values()}
        log.write(record)
        if bar is not None:
            bar.describe(f"epoch {epoch} loss {record['loss']:.3f}")

    for batch in loader:
        wait = time.perf_counter() - t_ready
        if first_wait is None:
            first_wait = wait
            if round_record is not None:  # the round's whole cost, up to the first batch on its table
                round_record["pickup_s"] = wait
                round_record["round_s"] = sum(round_record[k] for k in ROUND_PARTS if k in round_record)
                log.write(round_record)
        lr = lr_at(cfg, state.iteration, total, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, terms = train_step(step_fn, model, optimizer, scaler, batch)
        state.iteration += 1
        state.step += 1
        loss_sum += terms["loss"]
        loss_steps += 1
        window.add(wait)
        whole.add(wait)
        if state.step % max(1, cfg.log_every) == 0 or state.step == steps:
            if pending is not None:
                write_pending()
            names = sorted(terms)
            means = dist.all_reduce_mean(torch.stack([terms[n].float() for n in names]))
            pending = ({"kind": "step", "epoch": epoch, "step": state.step, "iteration": state.iteration, "lr": lr,
                        **window.summary(gb), "gpu_mem_gb": gpu_memory_gb(loss.device), "time": time.time()},
                       HostCopy(dict(zip(names, means))))  # written a log interval later: no wait for the GPU
            window.reset()
        if bar is not None:
            bar.advance_to(state.iteration)
        if stop.agreed(state.iteration):
            stopped = True
            break
        t_ready = time.perf_counter()
    if pending is not None:
        write_pending()
    state.loss_sum += float(dist.all_reduce_mean(loss_sum))
    state.loss_steps += loss_steps
    if state.step < steps:
        return stopped
    log.write({"kind": "epoch", "epoch": epoch, "iteration": state.iteration, "loss": state.loss_sum / state.loss_steps,
               "steps": steps, "resumed_at_step": steps - loss_steps,
               "lr": lr_at(cfg, max(state.iteration - 1, 0), total, steps), "table": state.table_path,
               "first_batch_wait_s": first_wait or 0.0, **whole.summary(gb),
               "gpu_mem_gb": gpu_memory_gb(model.queue.device), "time": time.time()})
    state.epoch, state.step, state.loss_sum, state.loss_steps = epoch + 1, 0, 0.0, 0
    return stopped


# ---------------------------------------------------------------------------------------------
# state and signals

def save(out: Path, model: CLIM, optimizer, scaler, state: RunState, cfg: Config, data, writer: CheckpointWriter,
         log: RunLog, *, epoch_file: bool) -> Path:
    """Checkpoint the run (rank 0): a snapshot now, written in the background by `writer`. The log's
    `checkpoint` record has the loop's wait for the snapshot (`blocking_s`); a `checkpoint_written`
    record follows once the file is on disk (`write_s`), so a log never claims a file a kill cut short."""
    rngs = dist.all_gather_object(capture_rng(model.generators()))
    last = last_checkpoint(out)
    if dist.get_rank() == 0:
        t0 = time.perf_counter()
        failed = writer.wait()  # the previous write (long done, unless checkpoints come faster than writes)
        ckpt = snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "config": cfg.to_dict(), **asdict(state), "rng": rngs,
                         "dataset_id": data.dataset_id, "num_samples": data.num_samples,
                         "world_size": dist.get_world_size()})
        paths = [run_folder.epoch_checkpoint(out, state.epoch), last] if epoch_file else [last]
        record = {"epoch": state.epoch, "step": state.step, "path": str(paths[0])}
        log.write({"kind": "checkpoint", **record, "blocking_s": time.perf_counter() - t0})
        started = time.perf_counter()

        def written():  # in the writer's thread, once every path is on disk
            try:
                log.write({"kind": "checkpoint_written", **record, "write_s": time.perf_counter() - started})
            finally:
                if epoch_file:
                    prune_epoch_checkpoints(out, cfg.keep_checkpoints)

        writer.write(ckpt, *paths, then=written)  # (nothing to wait for: returns None)
    else:
        failed = None
    dist.raise_if_any_failed(failed, "writing the previous checkpoint")  # every rank stops together
    return last


def finish_writes(writer: CheckpointWriter) -> None:
    """Collective: rank 0's checkpoint writes are on disk; every rank raises if one failed."""
    dist.raise_if_any_failed(writer.wait() if dist.get_rank() == 0 else None, "writing the checkpoint")


def restore(path: Path, model: CLIM, optimizer, scaler) -> RunState:
    ckpt = load_checkpoint(path, map_location="cpu")
    load_model_state(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: optimizer state does not match ({e})") from None
    if ckpt.get("scaler"):  # fp16 runs: the loss scale goes on where it was
        scaler.load_state_dict(ckpt["scaler"])
    state = RunState(**{k: ckpt[k] for k in asdict(RunState()) if k in ckpt})
    rngs, world, rank = ckpt.get("rng", []), dist.get_world_size(), dist.get_rank()
    if len(rngs) == world:
        restore_rng(rngs[rank], model.generators())
    elif rank == 0:
        print(f"warning: {path} was saved by {len(rngs)} process(es), this run has {world}: "
              "random streams restart, so the run is not bit-for-bit", file=sys.stderr)
    return state


class StopFlag:
    """SIGTERM / SIGINT set a flag. Ranks agree on it every 10 steps, so none leaves a collective:
    at iteration i they add up their flags and act on the sum made at i - 10, which has long reached
    the host by then (a pinned copy and its event: the loop never waits for the GPU's queue)."""

    EVERY = 10

    def __init__(self, device: torch.device):
        self.signum, self.device = 0, device
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._sum: HostCopy | None = None  # the flags summed at the last agreement step

    def _on_signal(self, signum, frame):
        self.signum = signum

    def agreed(self, iteration: int) -> bool:
        """Whether to stop after this step; `iteration` counts the run's steps (every epoch length)."""
        if not dist.is_distributed():
            return self.signum != 0
        if iteration % self.EVERY:
            return False
        decided = self._sum is not None and self._sum.values()["stop"] > 0  # summed EVERY steps ago: long done
        total = dist.all_reduce_sum(to_device(torch.tensor([float(self.signum != 0)]), self.device))  # not a blocking copy
        self._sum = HostCopy({"stop": total[0]})
        return decided

    def agreed_now(self) -> bool:
        """Whether any rank got a signal, at an epoch's end (where the ranks meet anyway): a signal in
        an epoch's last steps stops the run there, before the next epoch's mining round."""
        if not dist.is_distributed():
            return self.signum != 0
        return dist.all_reduce_sum(to_device(torch.tensor([float(self.signum != 0)]), self.device))[0].item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
