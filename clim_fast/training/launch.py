"""Where each training process comes from: torchrun / SLURM ranks, `--gpus N` (or `--cpu-procs P`)
workers spawned here, or this process alone.

A spawned worker that fails with a UserError sends its one-line message back through a queue, and
the launching process raises the same UserError; any other failure stops every worker.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from clim_fast import distributed as dist
from shards.errors import UserError


@dataclass
class LaunchEnv:
    """Where this process sits in the job, as torchrun or SLURM describe it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def detect_launcher() -> LaunchEnv | None:
    """A LaunchEnv when torchrun or `srun` started this process, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", dist.DEFAULT_PORT)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         addr or "127.0.0.1", int(env.get("MASTER_PORT", dist.DEFAULT_PORT)))
    return None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as `gpu[003-005,007],cpu01` (no scontrol needed)."""
    if not nodelist:
        return ""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


@dataclass(frozen=True)
class Launch:
    """The job's shape as seen by this process."""

    gpus: int  # --gpus: GPUs on this node, one process each (0: CPU processes, gloo)
    local_procs: int  # processes this launch starts here (1 when torchrun / SLURM started us)
    world_size: int
    first_rank: int  # rank of local process 0
    master_addr: str
    master_port: int
    launched_by: LaunchEnv | None = None
    share_gpu: bool = False  # every local rank on GPU 0, over gloo (to exercise multi-rank code on one GPU)

    def device(self, local_rank: int) -> torch.device:
        if self.gpus == 0:
            return torch.device("cpu")
        if self.share_gpu:
            return torch.device("cuda", 0)
        return torch.device("cuda", self.launched_by.local_rank if self.launched_by else local_rank)

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus > 0 and not self.share_gpu else "gloo"


def plan_launch(*, gpus: int, cpu_procs: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                master_port: int | None = None, share_gpu: bool = False) -> Launch:
    if gpus < 0 or cpu_procs < 1:
        raise UserError("--gpus must be >= 0 and --cpu-procs >= 1")
    if nnodes < 1:
        raise UserError(f"--nnodes {nnodes}: must be at least 1")
    if not 0 <= node_rank < nnodes:  # a rank no node group has: the rendezvous would wait for it (30 min)
        raise UserError(f"--node-rank {node_rank}: must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise UserError(f"--master-port {master_port}: must be in 1..65535")
    launched = detect_launcher()
    if launched is not None:
        launch = Launch(gpus, 1, launched.world_size, launched.rank, launched.master_addr, launched.master_port,
                        launched, share_gpu)
    else:
        procs = gpus if gpus > 0 else cpu_procs
        launch = Launch(gpus, procs, procs * nnodes, node_rank * procs, master_addr or "127.0.0.1",
                        master_port or (dist.free_port() if nnodes == 1 else dist.DEFAULT_PORT), None, share_gpu)
    if gpus > 0:
        want = 1 if share_gpu else launched.local_rank + 1 if launched else gpus
        if torch.cuda.device_count() < want:
            raise UserError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return launch


def spawn(launch: Launch, worker, *args) -> None:
    """Start `worker(local_rank, *args, errors)` in `launch.local_procs` processes and wait. The
    worker reports a UserError through `errors` (see `user_errors_to`); it is raised here."""
    errors = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(worker, args=(*args, errors), nprocs=launch.local_procs, join=False,
                             start_method="spawn")

    def forward(signum, frame):  # let every worker save and stop
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not ctx.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if not errors.empty():
            raise UserError(errors.get()) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def user_errors_to(errors):
    """In a spawned worker: pass a UserError's message to the launching process, then fail."""
    try:
        yield
    except UserError as e:
        if errors is not None:
            errors.put(str(e))
        raise
