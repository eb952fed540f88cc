"""Run logging: RUN/log.jsonl (one JSON object a record: `start`, `step`, `epoch`, `mine`,
`checkpoint`, `checkpoint_written`, `preempted`), optional TensorBoard, and the timers behind anchors/s and the data-wait share."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from clim_fast import run_folder
from shards.errors import UserError


class RunLog:
    """Appends records to RUN/log.jsonl on rank 0; other ranks get a no-op instance. Thread-safe
    (the checkpoint writer's thread logs its writes)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self._lock = threading.Lock()
        self.path = run_folder.log_path(run_dir)
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--set tensorboard=true: the tensorboard package is not installed "
                                "(pip install 'clim-fast[tensorboard]')") from None
            self._tb = SummaryWriter(str(run_folder.tensorboard_folder(run_dir)))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()
            if self._tb is not None:
                step = record.get("iteration", record.get("epoch", 0))
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key not in ("iteration", "epoch", "step"):
                        self._tb.add_scalar(f"{record.get('kind', 'step')}/{key}", value, step)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None


class ThroughputMeter:
    """Wall time split into waiting for data and the rest, over a window of steps. The step does not
    wait for the GPU, so the CPU may wait for data while the GPU still works on a queued step: the
    wait share is an upper bound of the GPU's idle share."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.steps = 0

    def add(self, wait_s: float) -> None:
        self.wait += wait_s
        self.steps += 1

    def summary(self, global_batch: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"anchors_per_s": self.steps * global_batch / elapsed,
                "step_time_s": elapsed / max(self.steps, 1),
                "data_wait": self.wait / elapsed}


def gpu_memory_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def read_log(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """Records of RUN/log.jsonl, optionally only one kind ("step", "epoch", ...)."""
    path = run_folder.log_path(run_dir)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
