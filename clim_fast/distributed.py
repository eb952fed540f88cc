"""Process-group set-up and the few collectives the rest of the code needs.

Every helper works unchanged in a single process (no process group): gathers return the local
value, broadcasts return it as is.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from clim_fast.transfer import to_device
from shards.errors import UserError


DEFAULT_PORT = 29500  # torch.distributed's own default (torchrun, SLURM jobs without MASTER_PORT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world_size: int, *, backend: str, master_addr: str = "127.0.0.1",
                     master_port: int = DEFAULT_PORT, timeout_s: float = 1800) -> None:
    """Join the process group (no-op for world_size 1). NCCL on GPUs, gloo on CPU."""
    if world_size <= 1 or dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = str(master_addr)
    os.environ["MASTER_PORT"] = str(master_port)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--master-addr {master_addr}:{master_port}: cannot join the process group ({e})") from None


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (rank order). No gradient."""
    if not is_distributed():
        return t
    dev = _comm_device()
    # keep a channels_last batch channels_last: .contiguous() alone would copy it back to NCHW
    fmt = torch.channels_last if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) else \
        torch.contiguous_format
    local = t.contiguous(memory_format=fmt).to(dev)
    out = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(out, local)
    return torch.cat(out).to(t.device)


@torch.no_grad()
def all_to_all_rows(t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of `t`, grouped by destination in rank order (`send_counts[r]` rows for rank r), sent
    to their ranks; returns the rows received, grouped by source in rank order (`recv_counts[r]`
    from rank r). Each rank receives only its own rows, not the whole batch. No gradient."""
    if not is_distributed():
        return t
    dev = _comm_device()
    channels_last = t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)
    # a channels_last batch travels as its NHWC memory (a plain contiguous view: no copy)
    local = (t.permute(0, 2, 3, 1) if channels_last else t.contiguous()).to(dev)
    out = local.new_empty((sum(recv_counts), *local.shape[1:]))
    dist.all_to_all_single(out, local, recv_counts, send_counts)
    return (out.permute(0, 3, 1, 2) if channels_last else out).to(t.device)


@torch.no_grad()
def shuffled_share(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """This rank's share of a shuffled global batch: rows perm[r*B:(r+1)*B] of the rank-major
    concatenation of every rank's `t` (B rows each) on rank r. `perm` (on the CPU) must be the same
    on every rank. Each rank receives only the rows it gets (`all_to_all_rows`); nothing else
    moves, and nothing waits for the GPU."""
    world, rank, b = get_world_size(), get_rank(), t.shape[0]
    owner, dest = perm // b, torch.arange(world).repeat_interleave(b)  # who holds / who gets each position
    mine = owner == rank
    ours = owner[rank * b:(rank + 1) * b]  # the holders of the positions this rank gets
    received = all_to_all_rows(t[to_device(perm[mine] - rank * b, t.device)],
                               torch.bincount(dest[mine], minlength=world).tolist(),
                               torch.bincount(ours, minlength=world).tolist())
    arrival = torch.argsort(ours, stable=True)  # rows arrive grouped by holder, in position order
    return received[to_device(torch.argsort(arrival), t.device)]


@torch.no_grad()
def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Like all_gather_cat, but rows per rank may differ."""
    if not is_distributed():
        return t
    sizes = all_gather_cat(torch.tensor([t.shape[0]], dtype=torch.int64))
    longest = int(sizes.max())
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    gathered = all_gather_cat(padded)
    parts = [gathered[r * longest: r * longest + int(n)] for r, n in enumerate(sizes.tolist())]
    return torch.cat(parts)


@torch.no_grad()
def gather_by_id(num_samples: int, ids: torch.Tensor, *parts: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of each part placed by sample id: [N, ...] per part, on every rank (for
    per-sample data; rows of `ids` and of each part correspond). The ids travel once."""
    all_ids = all_gather_varlen(ids.cpu())
    placed = []
    for rows in parts:
        gathered = all_gather_varlen(rows.cpu())
        out = torch.empty((num_samples, *gathered.shape[1:]), dtype=gathered.dtype)
        out[all_ids] = gathered
        placed.append(out)
    return placed


@torch.no_grad()
def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (same shape and dtype expected everywhere)."""
    if not is_distributed():
        return t
    dev = _comm_device()
    buf = t.contiguous().to(dev)
    dist.broadcast(buf, src)
    return buf.to(t.device)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    dev = _comm_device()
    buf = t.detach().clone().to(dev)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / get_world_size() if is_distributed() else t


@torch.no_grad()
def broadcast_varlen(t: torch.Tensor, src: int) -> torch.Tensor:
    """Rank `src`'s tensor on every rank; rows may differ per rank, trailing dims and dtype not."""
    if not is_distributed():
        return t
    rows = int(broadcast_tensor(torch.tensor([t.shape[0]], dtype=torch.int64), src))
    buf = t if get_rank() == src else torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return broadcast_tensor(buf, src)


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: every rank says whether it failed; all raise if one did. Call it where a rank
    that failed alone would otherwise leave the others waiting in the next collective."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


