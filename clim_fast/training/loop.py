"""The pretraining loop: MoCo v2 / CLIM on DALI batches, one process per GPU (or gloo on CPU).

    run_training(cfg, shards, out, gpus=N)   # spawns N workers, or joins torchrun / SLURM ranks

Per step: mix anchor and positive views (batched CutMix/Mixup), one query-encoder call on all
query views (DDP), momentum update, keys with shuffle BN (no grad), the CLIM loss, SGD, enqueue
k_anchor. Per epoch: table refresh at refresh epochs, a log record, checkpoints every
`checkpoint_every` epochs and at the end. SIGTERM/SIGINT: finish the step, save, return.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clim_fast import distributed as dist
from clim_fast.training.checkpoint import (capture_rng, epoch_checkpoint_name, find_resume_checkpoint, load_checkpoint,
                                  load_model_state, prune_epoch_checkpoints, restore_rng, save_checkpoint)
from clim_fast.config import Config
from shards.errors import UserError
from clim_fast.method.losses import clim_loss
from clim_fast.training.metrics import RunLog, ThroughputMeter, gpu_memory_gb
from clim_fast.method.mixing import mix_images
from clim_fast.method.moco import MoCo
from shards.neighbours import NeighbourTable

# Config fields a resumed run must share with its checkpoint (the rest, e.g. epochs, may change).
RESUME_FIXED_FIELDS = ("arch", "image_size", "feat_dim", "queue_size", "batch_size", "mix", "multires", "seed")


class ShardSource:
    """The real data: a shard folder read by dali_pipelines, tables mined by clim_fast.mining.engine."""

    def __init__(self, shards_dir: str | Path):
        from shards import open_shards

        self.root = Path(shards_dir)
        dataset = open_shards(self.root)
        self.num_samples, self.dataset_id = dataset.num_samples, dataset.dataset_id

    def loader(self, cfg: Config, rank: int, world_size: int, device):
        from dali_pipelines import PretrainLoader

        return PretrainLoader(self.root, batch_size=cfg.batch_size, image_size=cfg.image_size, rank=rank,
                              world_size=world_size, device=device, seed=cfg.seed, workers=cfg.workers,
                              threads=cfg.dali_threads, multires_sizes=cfg.multires_sizes,
                              crop_min_scale=cfg.crop_min_scale)

    def refresh(self, model, cfg: Config, run_dir, epoch: int, device):
        from clim_fast.mining.engine import refresh_table

        return refresh_table(model, cfg, self.root, run_dir, epoch, device)


# ---------------------------------------------------------------------------------------------
# schedule and CLIM epochs

def lr_at(cfg: Config, iteration: int, total_iters: int, steps_per_epoch: int) -> float:
    """Linear warmup over warmup_epochs, then cosine to 0 per iteration (or constant)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if iteration < warm:
        return cfg.lr * (iteration + 1) / warm
    if not cfg.cosine:
        return cfg.lr
    progress = (iteration - warm) / max(1, total_iters - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def positives_active(cfg: Config, epoch: int) -> bool:
    return cfg.uses_positives and epoch >= cfg.clim_start_epoch


def is_refresh_epoch(cfg: Config, epoch: int) -> bool:
    """Mining epochs: clim_start_epoch + j * mine_every; with an init table, it replaces j = 0."""
    if not positives_active(cfg, epoch):
        return False
    since = epoch - cfg.clim_start_epoch
    return since % cfg.mine_every == 0 and not (cfg.init_table and since == 0)


# ---------------------------------------------------------------------------------------------
# one step

def train_step(model: MoCo, query_fn, optimizer, batch: dict, cfg: Config, gens: dict, *,
               autocast, channels_last: bool) -> dict:
    """Forward, backward, SGD step, enqueue. Returns detached loss terms (device tensors)."""
    def prep(x):
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    mixing = cfg.uses_positives and "pos" in batch
    with autocast():
        views, lams = [prep(batch["q"])], []
        if mixing:
            pairs = [("q", "pos")] + [(f"q_r{s}", f"pos_r{s}") for s in cfg.multires_sizes if f"q_r{s}" in batch]
            for anchor_key, pos_key in pairs:
                mixed, lam = mix_images(cfg.mix, batch[anchor_key], batch[pos_key], cfg.alpha, gens["mix"])
                views.append(prep(mixed))
                lams.append(lam)
        outs = query_fn(views)
        qs = [F.normalize(o.float(), dim=1) for o in outs]
        model.momentum_update()
        k = model.keys(prep(batch["k"]), gens["shuffle"])
        k_pos = model.keys(prep(batch["k_pos"]), gens["shuffle"]) if mixing else None
    loss, terms = clim_loss(qs[0], k, model.queue, model.T, list(zip(qs[1:], lams)), k_pos, cfg.mix_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.dequeue_and_enqueue(k)
    return terms


# ---------------------------------------------------------------------------------------------
# launching

@dataclass
class Launch:
    gpus: int
    nprocs: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nprocs * self.nnodes


def run_training(cfg: Config, shards, out: str | Path, *, gpus: int = 0, cpu_procs: int = 1,
                 resume: str | Path | None = None, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str | None = None, master_port: int | None = None,
                 progress: bool | None = None) -> Path:
    """Train; returns the final checkpoint path (RUN/checkpoints/last.pt).

    `shards` is a shard folder or any object with `num_samples`, `dataset_id`, `loader(...)` and
    `refresh(...)` (see doubles.SyntheticSource)."""
    source = shards if hasattr(shards, "loader") else ShardSource(shards)
    out = Path(out)
    launched = dist.detect_launcher()
    if launched is not None:
        world = launched.world_size
        launch = Launch(gpus, 1, world, launched.rank, launched.master_addr, launched.master_port)
    else:
        if gpus < 0 or cpu_procs < 1:
            raise UserError("--gpus must be >= 0 and --cpu-procs >= 1")
        nprocs = gpus if gpus > 0 else cpu_procs
        launch = Launch(gpus, nprocs, nnodes, node_rank, master_addr or "127.0.0.1",
                        master_port or (dist.free_port() if nnodes == 1 else 29500))
        world = launch.world_size
    if gpus > 0:
        available = torch.cuda.device_count()
        want = launched.local_rank + 1 if launched else gpus
        if available < want:
            raise UserError(f"--gpus {gpus}: only {available} CUDA device(s) visible")
    check_setup(cfg, source, world)
    resume_path = resolve_resume(resume, out, cfg, source)
    out.mkdir(parents=True, exist_ok=True)
    if launched is not None:
        device = torch.device("cuda", launched.local_rank) if gpus > 0 else torch.device("cpu")
        return _worker_body(launched.rank, world, device, launch, cfg, source, out, resume_path, progress)
    if world == 1:
        device = torch.device("cuda", 0) if gpus > 0 else torch.device("cpu")
        return _worker_body(0, 1, device, launch, cfg, source, out, resume_path, progress)
    _spawn(launch, cfg, source, out, resume_path, progress)
    return out / "checkpoints" / "last.pt"


def check_setup(cfg: Config, source, world: int) -> None:
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: the global batch must divide evenly over {world} processes")
    if cfg.queue_size % cfg.batch_size:
        raise UserError(f"--set queue_size={cfg.queue_size}: the queue must be a multiple of the global batch "
                        f"{cfg.batch_size}")
    if source.num_samples < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the dataset ({source.num_samples} samples)")
    if cfg.init_table:
        NeighbourTable.load(cfg.init_table).check_matches(source.dataset_id, source.num_samples, cfg.init_table)


def resolve_resume(resume, out: Path, cfg: Config, source) -> Path | None:
    """None (fresh start) or a checkpoint path that matches this run; UserError otherwise."""
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        found = find_resume_checkpoint(out)
        if found is None:
            return None
        path, ckpt = found
    else:
        path = Path(resume)
        ckpt = load_checkpoint(path)
    if ckpt.get("dataset_id") not in (None, source.dataset_id) or ckpt.get("num_samples") not in (None, source.num_samples):
        raise UserError(f"{path}: checkpoint was trained on dataset {ckpt.get('dataset_id')} "
                        f"({ckpt.get('num_samples')} samples), not on these shards ({source.dataset_id})")
    saved = ckpt["config"]
    differ = [f"{k} ({saved.get(k)!r} vs {getattr(cfg, k)!r})" for k in RESUME_FIXED_FIELDS if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"{path}: checkpoint config differs from this run in {', '.join(differ)}")
    return path


def _spawn(launch: Launch, cfg, source, out, resume_path, progress) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_spawned_worker, args=(launch, cfg, source, out, resume_path, progress),
                             nprocs=launch.nprocs, join=False, start_method="spawn")

    def forward(signum, frame):  # let every worker save and stop
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        if "UserError: " in last:
            raise UserError(last.split("UserError: ", 1)[1]) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _spawned_worker(local_rank: int, launch: Launch, cfg, source, out, resume_path, progress) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // launch.nprocs))
    rank = launch.node_rank * launch.nprocs + local_rank
    device = torch.device("cuda", local_rank) if launch.gpus > 0 else torch.device("cpu")
    _worker_body(rank, launch.world_size, device, launch, cfg, source, out, resume_path, progress)


def _worker_body(rank, world, device, launch: Launch, cfg, source, out, resume_path, progress) -> Path:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_distributed(rank, world, backend="nccl" if device.type == "cuda" else "gloo",
                          master_addr=launch.master_addr, master_port=launch.master_port)
    try:
        return Trainer(cfg, source, out, device, progress).fit(resume_path)
    finally:
        dist.cleanup()


# ---------------------------------------------------------------------------------------------
# the loop

class Trainer:
    def __init__(self, cfg: Config, source, out: Path, device: torch.device, progress: bool | None):
        self.cfg, self.source, self.out, self.device = cfg, source, Path(out), device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.show_progress = self.main and (sys.stderr.isatty() if progress is None else progress)
        cuda = device.type == "cuda"
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.channels_last = cuda and cfg.channels_last

        torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank
        self.model = MoCo(cfg).to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        query = self.model.encoder_q
        if dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            query = DDP(query, device_ids=[device.index] if cuda else None)
        self.query_fn = torch.compile(query) if cfg.compile else query
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.gens = {"mix": torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank),
                     "shuffle": torch.Generator().manual_seed(cfg.seed * 7919)}
        torch.manual_seed(cfg.seed + self.rank)
        self.epoch, self.step, self.iteration, self.table_path = 0, 0, 0, ""
        self.table: NeighbourTable | None = None
        self.stop_signal = None

    # -- state ------------------------------------------------------------------------------
    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: optimizer state does not match ({e})") from None
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
        self.iteration, self.table_path = int(ckpt.get("iteration", 0)), ckpt.get("table_path", "")
        rngs = ckpt.get("rng", [])
        if len(rngs) == self.world:
            restore_rng(rngs[self.rank], self.gens)
        elif self.main:
            print(f"warning: {path} was saved by {len(rngs)} process(es), this run has {self.world}: "
                  "random streams restart, so the run is not bit-for-bit", file=sys.stderr)

    def save(self, epoch: int, step: int, *, epoch_file: bool) -> Path:
        rngs = dist.all_gather_object(capture_rng(self.gens))
        folder = self.out / "checkpoints"
        last = folder / "last.pt"
        if self.main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "config": self.cfg.to_dict(), "epoch": epoch, "step": step, "iteration": self.iteration,
                     "table_path": self.table_path, "rng": rngs, "dataset_id": self.source.dataset_id,
                     "num_samples": self.source.num_samples, "world_size": self.world, "scaler": {}}
            paths = [folder / epoch_checkpoint_name(epoch), last] if epoch_file else [last]
            save_checkpoint(state, *paths)
            if epoch_file:
                prune_epoch_checkpoints(folder, self.cfg.keep_checkpoints)
        dist.barrier()
        return last

    # -- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _should_stop(self, step: int) -> bool:
        if not dist.is_distributed():
            return self.stop_signal is not None
        if step % 10:  # agree across ranks every 10 steps, so no rank leaves a collective behind
            return False
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0],
                            device=self.device if self.device.type == "cuda" else "cpu")
        return bool(dist.all_reduce_mean(flag).item() > 0)

    # -- tables -----------------------------------------------------------------------------
    def _prepare_table(self, loader, epoch: int, resumed_mid_epoch: bool) -> None:
        if not positives_active(self.cfg, epoch):
            return
        if is_refresh_epoch(self.cfg, epoch) and not resumed_mid_epoch:
            self.table, path = self.source.refresh(self.model, self.cfg, self.out, epoch, self.device)
            self.model.train()
            self.table_path = str(path)
        elif self.table is None:
            path = self.table_path or self.cfg.init_table
            self.table = NeighbourTable.load(path)
            self.table.check_matches(self.source.dataset_id, self.source.num_samples, path)
            self.table_path = str(path)
        else:
            return
        loader.set_table(self.table)

    # -- main loop --------------------------------------------------------------------------
    def fit(self, resume_path: Path | None) -> Path:
        cfg = self.cfg
        if resume_path is not None:
            self.restore(resume_path)
        if self.main:
            cfg.save(self.out / "config.json")
        log = RunLog(self.out, enabled=self.main, tensorboard=cfg.tensorboard)
        loader = self.source.loader(cfg, self.rank, self.world, self.device)
        steps_per_epoch = len(loader)
        total = cfg.epochs * steps_per_epoch
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress_bar(total, self.iteration) if self.show_progress else None
        last = self.out / "checkpoints" / "last.pt"
        self.model.train()
        try:
            start_step = self.step
            for epoch in range(self.epoch, cfg.epochs):
                resumed_mid = epoch == self.epoch and start_step > 0
                self._prepare_table(loader, epoch, resumed_mid)
                loader.set_epoch(epoch)
                stopped = self._run_epoch(loader, epoch, start_step if resumed_mid else 0, steps_per_epoch,
                                          total, log, bar)
                if stopped is not None:
                    done_epoch = stopped == steps_per_epoch
                    last = self.save(epoch + 1 if done_epoch else epoch, 0 if done_epoch else stopped,
                                     epoch_file=False)
                    log.write({"kind": "preempted", "epoch": epoch, "step": stopped, "iteration": self.iteration,
                               "signal": int(self.stop_signal or 0), "checkpoint": str(last)})
                    if self.main:
                        print(f"stopped by signal {self.stop_signal}: saved {last}; continue with --resume auto",
                              file=sys.stderr)
                    return last
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    last = self.save(epoch + 1, 0, epoch_file=True)
            if self.epoch >= cfg.epochs and not last.exists() and self.main:
                raise UserError(f"--epochs {cfg.epochs}: nothing to do, the checkpoint is already at that epoch")
            return last
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if bar is not None:
                bar.stop()
            log.close()
            loader.close()

    def _run_epoch(self, loader, epoch, skip, steps_per_epoch, total, log: RunLog, bar) -> int | None:
        """Train one epoch (skipping `skip` batches already done). Returns the number of steps done
        when a stop signal arrived, else None."""
        cfg, gb = self.cfg, self.cfg.batch_size
        window, whole = ThroughputMeter(), ThroughputMeter()
        epoch_loss, epoch_steps = torch.zeros((), device=self.device), 0
        it = iter(loader)
        step = 0
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait = time.perf_counter() - t0
            if step < skip:
                step += 1
                continue
            lr = lr_at(cfg, self.iteration, total, steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            terms = train_step(self.model, self.query_fn, self.optimizer, batch, cfg, self.gens,
                               autocast=self.autocast, channels_last=self.channels_last)
            self.iteration += 1
            step += 1
            window.add(wait)
            whole.add(wait)
            epoch_loss += terms["loss"]
            epoch_steps += 1
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1, description=f"epoch {epoch} loss {float(terms['loss']):.3f}"
                           if step % max(1, cfg.log_every) == 0 else None)
            if step % max(1, cfg.log_every) == 0 or step == steps_per_epoch:
                names = sorted(terms)
                values = dist.all_reduce_mean(torch.stack([terms[n].float() for n in names])).tolist()
                log.write({"kind": "step", "epoch": epoch, "step": step, "iteration": self.iteration, "lr": lr,
                           **dict(zip(names, values)), **window.summary(gb),
                           "gpu_mem_gb": gpu_memory_gb(self.device), "time": time.time()})
                window.reset()
            if self._should_stop(step):
                return step
        if epoch_steps:
            mean = dist.all_reduce_mean(epoch_loss / epoch_steps).item()
            log.write({"kind": "epoch", "epoch": epoch, "iteration": self.iteration, "loss": mean,
                       "lr": lr_at(cfg, max(self.iteration - 1, 0), total, steps_per_epoch),
                       "table": self.table_path, **whole.summary(gb), "gpu_mem_gb": gpu_memory_gb(self.device),
                       "time": time.time()})
        return None


def _progress_bar(total: int, done: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    bar.add_task("training", total=total, completed=done)
    bar.start()
    return bar
