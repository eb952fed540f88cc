"""Torch side of the loaders: one built DALI pipeline read as an endless stream of batches.

`BatchStream` owns one built pipeline whose external source never ends (see `external.py`). It
feeds the pipeline with `schedule_run()` and takes batches with `outputs()`, handed over to torch
by DLPack, and never feeds past a step the loader has not allowed yet (a step of an epoch whose
neighbour table is not published), so the main thread never waits on a worker that waits on the
loop. Each loader (`pretrain.PretrainLoader`, `center.FeatureLoader`, `linear.LinearTrainLoader`)
builds its graph and source and holds one stream; it keeps the stream as long as the next batch
it wants is the stream's next batch, and builds a new one otherwise (a jump, a resume mid-epoch,
positives appearing or disappearing, a table that differs from the one already published).

The step never waits for the GPU, so the CPU may ask for the next batch while the GPU still reads
the last ones; DALI may reuse a buffer as soon as its last reference goes. A stream therefore
holds the DALI outputs of each batch it handed out until an event recorded on torch's stream
when the following batch is asked for (by then the caller has queued its work on the batch) has
passed.

Teardown: DALI 2.4 has no public close for a pipeline; dropping the last reference runs its
finaliser, which stops the worker processes (`BatchStream.close`).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import multiprocessing.process
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import nvidia.dali.types as types
import torch
from PIL import Image

from dali_pipelines.epochs import check_batch, steps_per_epoch
from dali_pipelines.external import NOT_A_JPEG, ShardReader
from shards import ShardDataset
from shards.errors import UserError

_DALI_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def dali_dtype(dtype: torch.dtype):
    """The DALI output type for a torch dtype (bfloat16 is produced as float32, cast on device)."""
    if dtype not in _DALI_DTYPES:
        raise UserError(f"dtype: {dtype} is not supported; use torch.float32, float16 or bfloat16")
    return getattr(types, _DALI_DTYPES[dtype])


def as_dataset(dataset):
    """The `shards.ShardDataset` a loader reads (a path is opened, as a convenience)."""
    return dataset if isinstance(dataset, ShardDataset) else ShardDataset(dataset)


def pipeline_device_id(device: torch.device) -> int | None:
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise UserError(f"device: {device} is not supported (cpu or cuda)")
    return device.index if device.index is not None else torch.cuda.current_device()


class Settings:
    """What every loader shares: device, output dtype, CPU workers, DALI threads, and in a GPU
    pipeline where each stage runs (`ops.decode`: the hardware decoder's share of the JPEGs, or
    decoding on DALI's CPU threads, or the views cut there too)."""

    def __init__(self, device, dtype: torch.dtype, workers: int, threads: int, hw_decoder_load: float = 0.65,
                 cpu_decode: bool = False, cpu_views: bool = False):
        self.device = torch.device(device)
        self.device_id = pipeline_device_id(self.device)
        self.gpu = self.device_id is not None
        self.dtype, self.dali_dtype = dtype, dali_dtype(dtype)
        self.workers, self.threads = max(0, int(workers)), max(1, int(threads))
        self.parallel = self.workers > 0
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise UserError(f"hw_decoder_load: must be in [0, 1], got {hw_decoder_load}")
        self.hw_decoder_load = float(hw_decoder_load)
        self.cpu_decode, self.cpu_views = bool(cpu_decode), bool(cpu_views)

    def pipeline_kwargs(self, local_batch: int, depth: int) -> dict:
        return dict(batch_size=local_batch, num_threads=self.threads, device_id=self.device_id,
                    py_num_workers=max(1, self.workers), py_start_method="spawn", prefetch_queue_depth=depth,
                    exec_dynamic=True,  # outputs stay valid while referenced: DLPack without copies
                    seed=12345)  # every random draw comes from the source; the seed is unused

    def finish(self, named: dict) -> dict:
        """Split `meta` into `id` / `label`, flatten `pos_id`, cast to bfloat16 on the device."""
        meta = named.pop("meta")
        named["id"], named["label"] = meta[:, 0].contiguous(), meta[:, 1].contiguous()
        if "pos_id" in named:
            named["pos_id"] = named["pos_id"].reshape(-1)
        if self.dtype == torch.bfloat16:
            for key, value in named.items():
                if value.is_floating_point():
                    named[key] = value.to(torch.bfloat16)
        return named


@contextlib.contextmanager
def terminate_is_kill():
    """DALI ends its source workers with terminate() (SIGTERM) when a pool fails to start, loses a
    worker or closes with one still busy; our workers ignore SIGTERM (they leave stopping to the
    training process: `shards.processes.leave_stops_to_parent`), so their ends are kills: here while
    a pipeline builds its pool, and per process for the pool's life (`BatchStream`)."""
    base = multiprocessing.process.BaseProcess
    terminate = base.terminate
    base.terminate = base.kill
    try:
        yield
    finally:
        base.terminate = terminate


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI batch as a torch tensor without a copy (DLPack). The graphs move every output of a GPU
    pipeline to the GPU themselves (`ops.output`), so no host buffer that the next run may reuse is
    ever copied asynchronously."""
    tensor = torch.from_dlpack(tensor_list.as_tensor())
    if tensor.device != device:  # not reached by our graphs; kept synchronous on purpose
        tensor = tensor.to(device)
    return tensor


class _NotAllowed(RuntimeError):
    pass


class BatchStream:
    """One built pipeline over an endless source, read batch by batch.

    `first_step` numbers the stream's first batch in the loader's own step count (epoch x steps +
    step for the epoch loaders); `next_step` is the number of the batch `next()` returns.
    `source.sample_ids(lo, hi)` lists the sample ids behind stream samples lo..hi-1 (for error messages).
    `built_for`: what the owner built it for (the pretrain loader: whether it reads positives).
    """

    def __init__(self, pipe, names, settings: Settings, *, first_step: int, depth: int, source, local_batch: int,
                 dataset, built_for=None):
        self.pipe, self.names, self.settings = pipe, tuple(names), settings
        self.first_step, self.depth, self.built_for = first_step, depth, built_for
        self.source, self.local_batch, self.dataset = source, local_batch, dataset
        self._fed = self._taken = 0
        self.broken = False
        self._last = None  # the DALI outputs behind the batch handed out last
        self._held = collections.deque()  # (event, outputs) the GPU may still be reading
        try:
            with terminate_is_kill():
                pipe.build()
        except Exception:
            self.close()
            raise
        pool = pipe._py_pool  # None without parallel source workers
        for process in (pool.pool._processes if pool is not None else ()):
            process.terminate = process.kill

    @property
    def next_step(self) -> int:
        return self.first_step + self._taken

    def next(self, limit: int | None = None) -> dict:
        """The next batch as {name: tensor}; feeds the pipeline up to `depth` batches ahead but never
        a step >= `limit`."""
        if self.broken:
            raise RuntimeError("this stream failed earlier; the loader builds a new one")
        try:
            while self._fed - self._taken < self.depth:
                ahead = self.depth if self._fed == 0 else 1  # the first schedule_run prefetches `depth`
                if limit is not None and self.first_step + self._fed + ahead > limit:
                    break
                self.pipe.schedule_run()
                self._fed += ahead
            if self._fed == self._taken:
                raise _NotAllowed(f"step {self.next_step} is not allowed yet (limit {limit})")
            outputs = self.pipe.outputs()
        except _NotAllowed:
            raise
        except Exception as error:
            self.broken = True
            lo, hi = self._taken * self.local_batch, max(self._fed, self._taken + 1) * self.local_batch
            try:
                message = failure_message(self.dataset, self.source.sample_ids(lo, hi), error)
            except Exception:  # describing the failure must not hide it
                self.close()
                raise error
            self.close()
            raise UserError(message) from None
        self._taken += 1
        self._hold(outputs)
        device = self.settings.device
        return {name: to_torch(out, device) for name, out in zip(self.names, outputs)}

    def _hold(self, outputs) -> None:
        """Keep DALI's buffers of the batches handed out until the GPU work queued on them has run."""
        if not self.settings.gpu:
            return
        if self._last is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.settings.device))
            self._held.append((event, self._last))
        while self._held and self._held[0][0].query():
            self._held.popleft()
        self._last = outputs

    def close(self) -> None:
        """Stop the pipeline and its worker processes (DALI's finaliser on the last reference)."""
        if self.settings.gpu and (self._held or self._last is not None):
            torch.cuda.current_stream(self.settings.device).synchronize()  # done with DALI's buffers
        self._held.clear()
        self._last = None
        if self.pipe is not None:
            # stop the source's worker processes now, not when the pipeline is collected: after a
            # failure the exception's traceback holds the pipeline, and a process exiting with
            # them alive waits for them (the other ranks then wait in their next collective)
            pool = getattr(self.pipe, "_py_pool", None)
            if pool is not None:
                pool.close()
            ref = weakref.ref(self.pipe)
            self.pipe = None
            if ref() is not None:  # held by a reference cycle
                gc.collect()


class Scratch:
    """A loader's private temporary folder (tables, per-epoch table pointers), removed on close."""

    def __init__(self):
        self._path = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(prefix="clim-fast-loader-"))
        return self._path

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


# --- errors ---------------------------------------------------------------------------------------

def undecodable(dataset, ids) -> list[int]:
    """The ids among `ids` whose JPEG does not decode (checked with PIL, on the error path only)."""
    bad = []
    for sid in sorted({int(i) for i in ids if int(i) >= 0}):
        try:
            with Image.open(io.BytesIO(dataset.jpeg(sid).tobytes())) as image:
                image.convert("RGB").load()
        except Exception:
            bad.append(sid)
    return bad


_WORKERS_GONE = ("Worker data receiving interrupted", "Sending tasks to worker")  # DALI's pool, its workers dead


def failure_message(dataset, ids, error: BaseException) -> str:
    """One line for a failed pipeline run, naming the shard file(s) of the sample(s) at fault: those
    the shard reader refused (possibly in a batch read ahead of `ids`), else the samples in flight
    that PIL cannot decode either, else all of them with DALI's own error line."""
    text = str(error)
    if any(sign in text for sign in _WORKERS_GONE):
        return ("DALI's source worker processes stopped (killed from outside, out of memory, or a shard file "
                "changed while in use?) before any sample was found damaged")
    bad = sorted({int(n) for n in re.findall(rf"sample (\d+): {re.escape(NOT_A_JPEG)}", text)})
    bad = bad or undecodable(dataset, ids)
    if bad:
        return f"could not decode {dataset.describe_samples(bad)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]  # not a quoted source line
    first = raised[-1] if raised else next((line for line in lines if "rror" in line and not line.endswith(":")),
                                           lines[0] if lines else "")
    first = (first[:200] + "...") if len(first) > 200 else first
    return f"DALI failed ({first or type(error).__name__}) on a batch holding {dataset.describe_samples(ids)}"


class ClosedOnExit:
    """`with loader:` and garbage collection both end in `close()` (every loader's shared bit)."""

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EpochLoader(ClosedOnExit):
    """A loader over one rank's drop-last epoch share (`epochs.epoch_share`), `batch_size` global: what
    `pretrain.PretrainLoader` and `linear.LinearTrainLoader` share (the batch and rank checks, the
    settings, the steps of an epoch, `set_epoch`)."""

    def __init__(self, dataset, *, batch_size: int, image_size: int, rank: int, world_size: int, device, seed: int,
                 workers: int, threads: int, dtype: torch.dtype, hw_decoder_load: float = 0.65,
                 cpu_decode: bool = False, cpu_views: bool = False):
        self.dataset = as_dataset(dataset)
        self.num_samples = self.dataset.num_samples
        self.global_batch, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.local_batch = check_batch(self.num_samples, self.global_batch, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {rank}: outside 0..{world_size - 1}")
        self.settings = Settings(device, dtype, workers, threads, hw_decoder_load, cpu_decode, cpu_views)
        self.image_size, self.seed = int(image_size), int(seed)
        self.steps = steps_per_epoch(self.num_samples, self.global_batch)
        self.epoch, self.start_step = 0, 0
        self._reader = ShardReader(self.dataset)
        self._stream: BatchStream | None = None

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step}: outside 0..{self.steps}")
        self.epoch, self.start_step = int(epoch), int(start_step)
