"""Torch side of the loaders: one DALI pipeline at a time, batches handed over via DLPack.

A loader owns at most one built pipeline, positioned at the epoch it will produce next. Asking
for another epoch (a jump, a resume) or another configuration (a new neighbour table) rebuilds
it; reading epochs in order reuses it with `pipe.reset()`. A partly read epoch leaves the
pipeline in an unknown position, so the next iteration rebuilds it too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from shards.errors import UserError

_DALI_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def dali_dtype(dtype: torch.dtype):
    """The DALI output type for a torch dtype (bfloat16 is produced as float32, cast on device)."""
    import nvidia.dali.types as types

    if dtype not in _DALI_DTYPES:
        raise UserError(f"dtype: {dtype} is not supported; use torch.float32, float16 or bfloat16")
    return getattr(types, _DALI_DTYPES[dtype])


def open_dataset(shards_dir):
    from shards import ShardDataset

    return ShardDataset(shards_dir)


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI batch as a torch tensor without a copy (DLPack); CPU outputs (ids, labels) of a GPU
    pipeline are moved to `device`."""
    tensor = torch.from_dlpack(tensor_list.as_tensor())
    if tensor.device != device:
        tensor = tensor.to(device, non_blocking=True)
    return tensor


def pipeline_device_id(device: torch.device) -> int | None:
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise UserError(f"device: {device} is not supported (cpu or cuda)")
    return device.index if device.index is not None else torch.cuda.current_device()


def shutdown_pipeline(pipe) -> None:
    """Stop DALI's worker processes now rather than whenever the garbage collector runs."""
    pool = getattr(pipe, "_py_pool", None)
    if pool is not None:
        try:
            pool.close()
        except Exception:
            pass
    try:
        pipe._shutdown()
    except Exception:
        pass


class DaliLoader:
    """Base class: subclasses implement `_config_key`, `_build(start_epoch) -> (pipe, names)`,
    `_steps()` and `_batch(named_tensors) -> dict`."""

    epoch_dependent = True

    def __init__(self, shards_dir, *, batch_size: int, rank: int, world_size: int, device, workers: int,
                 threads: int, dtype: torch.dtype = torch.float32):
        self.shards_dir = Path(shards_dir)
        self.dataset = open_dataset(shards_dir)
        self.num_samples = self.dataset.num_samples
        self.global_batch, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {rank}: outside 0..{world_size - 1}")
        self.device = torch.device(device)
        self.device_id = pipeline_device_id(self.device)
        self.workers, self.threads, self.dtype = int(workers), max(1, int(threads)), dtype
        self.dali_dtype = dali_dtype(dtype)
        self.epoch = 0
        self._pipe, self._names, self._pipe_epoch, self._pipe_key = None, (), None, None
        self._tmp = None

    # -- subclass hooks -------------------------------------------------------------------------
    def _config_key(self):
        return None

    def _build(self, start_epoch: int):
        raise NotImplementedError

    def _steps(self) -> int:
        raise NotImplementedError

    def _batch(self, named: dict) -> dict:
        return named

    # -- lifecycle --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._steps()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def pipeline_kwargs(self, local_batch: int) -> dict:
        return dict(batch_size=local_batch, num_threads=self.threads, device_id=self.device_id,
                    py_num_workers=max(1, self.workers), py_start_method="spawn", prefetch_queue_depth=2,
                    exec_dynamic=True,  # outputs stay valid while referenced: DLPack without copies
                    seed=12345)  # every random draw comes from the source; the seed is unused

    def scratch_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="clim-fast-loader-"))
        return self._tmp

    def _ensure_pipeline(self, epoch: int):
        key = self._config_key()
        if self._pipe is None or self._pipe_epoch != epoch or self._pipe_key != key:
            self._drop_pipeline()
            pipe, names = self._build(epoch)
            pipe.build()
            self._pipe, self._names, self._pipe_epoch, self._pipe_key = pipe, tuple(names), epoch, key
        return self._pipe

    def _drop_pipeline(self) -> None:
        if self._pipe is not None:
            shutdown_pipeline(self._pipe)
        self._pipe, self._pipe_epoch = None, None

    def __iter__(self):
        epoch = self.epoch if self.epoch_dependent else 0
        pipe = self._ensure_pipeline(epoch)
        finished = False
        try:
            for _ in range(self._steps()):
                outputs = pipe.run()
                yield self._batch({name: to_torch(out, self.device) for name, out in zip(self._names, outputs)})
            try:
                pipe.run()
            except StopIteration:
                pipe.reset()
            else:
                raise RuntimeError("DALI source produced more batches than the epoch holds")
            self._pipe_epoch = epoch + 1 if self.epoch_dependent else epoch
            finished = True
        finally:
            if not finished:
                self._pipe_epoch = None  # abandoned mid-epoch: rebuild on the next iteration

    def close(self) -> None:
        self._drop_pipeline()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_meta(named: dict, key: str = "meta") -> dict:
    """Replace the int64[B, 2] meta output by `id` and `label` columns."""
    meta = named.pop(key)
    named["id"], named["label"] = meta[:, 0].contiguous(), meta[:, 1].contiguous()
    return named
