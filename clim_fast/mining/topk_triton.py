"""Triton kernels for the exact kNN candidate search (clim_fast.mining.knn uses them on CUDA).

Two fused passes over fp16 scores (fp32 accumulation); neither writes the [q, N] score matrix:

1. `tile_maxima`: for each query and each tile of `BN` database rows, the largest score of the
   tile ([q, ceil(N / BN)] floats). The (k+1)-th largest tile maximum t_i of query i is a lower
   bound on its (k+1)-th best score: k+1 distinct columns reach it.
2. `threshold_candidates`: every (query, column) pair whose score is >= thr_i is appended to the
   query's row of a fixed-capacity candidate buffer through a per-row atomic counter. With
   thr_i = t_i - 2 eps (eps bounds the fp16 error), the exact top-(k+1), and every column tied
   with it, are among the candidates; rows whose count exceeds the capacity are reported and
   searched exactly by the caller.

The kernels also run on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which
is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_max_kernel(q_ptr, x_ptr, out_ptr, M, N, n_tiles, tiles_per_prog, stride_q, stride_x, stride_o,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + rm[:, None] * stride_q + rd[None, :], mask=rm[:, None] < M, other=0.0)
    first = pid_s * tiles_per_prog
    last = tl.minimum(first + tiles_per_prog, n_tiles)
    for t in range(first, last):
        rn = t * BN + tl.arange(0, BN).to(tl.int64)
        x = tl.load(x_ptr + rn[:, None] * stride_x + rd[None, :], mask=rn[:, None] < N, other=0.0)
        s = tl.dot(q, tl.trans(x))
        s = tl.where(rn[None, :] < N, s, float("-inf"))
        best = tl.max(s, axis=1)
        tl.store(out_ptr + rm * stride_o + t, best, mask=rm < M)


@triton.jit
def _threshold_kernel(q_ptr, x_ptr, thr_ptr, max_ptr, count_ptr, cand_ptr, M, N, n_tiles, tiles_per_prog,
                      stride_q, stride_x, stride_mx, cap, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      SKIP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rd = tl.arange(0, D)
    row_ok = rm < M
    q = tl.load(q_ptr + rm[:, None] * stride_q + rd[None, :], mask=row_ok[:, None], other=0.0)
    thr = tl.load(thr_ptr + rm, mask=row_ok, other=float("inf"))
    first = pid_s * tiles_per_prog
    last = tl.minimum(first + tiles_per_prog, n_tiles)
    for t in range(first, last):
        if SKIP:
            # pass 1's tile maxima: a tile where no row reaches its threshold holds no candidate
            mx = tl.load(max_ptr + rm * stride_mx + t, mask=row_ok, other=float("-inf"))
            go = tl.max(mx - thr, axis=0) >= 0
        else:
            go = True
        if go:
            rn = t * BN + tl.arange(0, BN).to(tl.int64)
            x = tl.load(x_ptr + rn[:, None] * stride_x + rd[None, :], mask=rn[:, None] < N, other=0.0)
            s = tl.dot(q, tl.trans(x))
            s = tl.where(rn[None, :] < N, s, float("-inf"))
            hit = s >= thr[:, None]
            per_row = tl.sum(hit.to(tl.int32), axis=1)
            most = tl.max(per_row, axis=0)
            if most == 1:
                # the common case (about k hits per row over the whole database): at most one
                # per row in this tile, and it is the row's maximum; one atomic per row
                col = tl.argmax(s, axis=1).to(tl.int64)
                one = per_row == 1
                slot = tl.atomic_add(count_ptr + rm, 1, mask=one & row_ok, sem="relaxed")
                tl.store(cand_ptr + rm * cap + slot, (t * BN + col).to(tl.int32), mask=one & (slot < cap))
            elif most > 1:
                slot = tl.atomic_add(count_ptr + rm[:, None] + 0 * rn[None, :], 1, mask=hit, sem="relaxed")
                tl.store(cand_ptr + rm[:, None] * cap + slot, rn[None, :].to(tl.int32), mask=hit & (slot < cap))


def _grid_split(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Split the database tiles between enough programs to fill the GPU a few times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = 4 * sms
    else:
        target = 1
    return max(1, min(n_tiles, -(-target // m_blocks)))


def _warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 128 * 128 else 4


def pad_features(x: torch.Tensor, dtype=torch.float16) -> torch.Tensor:
    """[n, d] -> contiguous [n, D] in `dtype`, D the next power of two >= max(16, d), zero-padded."""
    d = x.shape[1]
    width = max(16, 1 << (d - 1).bit_length())
    out = torch.zeros(x.shape[0], width, device=x.device, dtype=dtype)
    out[:, :d] = x
    return out


def tile_maxima(q: torch.Tensor, x: torch.Tensor, *, block_m: int = 128, block_n: int = 128,
                num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """q [m, D], x [N, D] from pad_features. Returns float32 [m, ceil(N / block_n)]: the largest
    score of each query in each tile of block_n database rows (-inf past N)."""
    m, n = q.shape[0], x.shape[0]
    num_warps = num_warps or _warps(block_m, block_n)
    n_tiles = -(-n // block_n)
    out = torch.empty(m, n_tiles, device=q.device, dtype=torch.float32)
    m_blocks = -(-m // block_m)
    split = _grid_split(m_blocks, n_tiles, q.device)
    per = -(-n_tiles // split)
    _tile_max_kernel[(m_blocks, split)](q, x, out, m, n, n_tiles, per, q.stride(0), x.stride(0), out.stride(0),
                                        D=q.shape[1], BM=block_m, BN=block_n, num_warps=num_warps,
                                        num_stages=num_stages)
    return out


def threshold_candidates(q: torch.Tensor, x: torch.Tensor, thr: torch.Tensor, cap: int, *, maxima=None,
                         block_m: int = 128, block_n: int = 128, num_warps: int | None = None, num_stages: int = 3):
    """Columns j with fp16 score(q_i, x_j) >= thr_i, per query. Returns (cand int32 [m, cap], -1
    past each row's count, in no particular order; counts int32 [m], which may exceed cap: those
    rows' lists are incomplete). maxima: tile_maxima(q, x) with the same block_n (optional):
    tiles where no row's maximum reaches its threshold are skipped without computing scores
    (exact whatever the rounding of either pass, as long as both are within the caller's eps)."""
    m, n = q.shape[0], x.shape[0]
    num_warps = num_warps or _warps(block_m, block_n)
    n_tiles = -(-n // block_n)
    counts = torch.zeros(m, device=q.device, dtype=torch.int32)
    cand = torch.full((m, cap), -1, device=q.device, dtype=torch.int32)
    m_blocks = -(-m // block_m)
    split = _grid_split(m_blocks, n_tiles, q.device)
    per = -(-n_tiles // split)
    skip = maxima is not None
    if skip and maxima.shape != (m, n_tiles):
        raise ValueError(f"maxima: expected shape {(m, n_tiles)}, got {tuple(maxima.shape)}")
    mx = maxima if skip else thr
    _threshold_kernel[(m_blocks, split)](q, x, thr.float().contiguous(), mx, counts, cand, m, n, n_tiles, per,
                                         q.stride(0), x.stride(0), mx.stride(0), cap, D=q.shape[1], BM=block_m,
                                         BN=block_n, SKIP=skip, num_warps=num_warps, num_stages=num_stages)
    return cand, counts
