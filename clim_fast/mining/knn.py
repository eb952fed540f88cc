"""Exact k-nearest neighbours by inner product (cosine on unit rows), self excluded.

`knn_search(queries, database, k, query_ids=..., engine=...)` is the one entry point (each rank
of a distributed mining round searches its own rows against all features); `knn_torch`,
`knn_faiss` (all rows against all) and `knn_naive_torch` (the baseline) are thin wrappers.

**One answer for every engine.** The final score of a pair is its dot product summed in float64
and rounded once to float32 (the "canonical" score: the same on CPU and GPU whatever the
summation order, up to a float64 rounding landing on a float32 boundary), and rows are ordered by
(-score, id): equal scores go to the smaller id. Every engine only proposes candidates, with a
bound on the score of everything it left out; `_finish` re-scores the candidates canonically,
keeps the top k+1, and rows whose bound does not clear their (k+1)-th score are searched again
exhaustively (fp32 scores, every column within the fp32 error of the (k+1)-th kept). So faiss,
the torch engine and the Triton kernels return identical neighbours (ids and sims), ties by id.

**Engines.**
- `torch` on CUDA: the Triton kernels of `topk_triton` when triton imports and compiles (a
  failure falls back to the torch candidate path below, with a warning, never an error):
  pass 1 writes only the largest fp16 score of each 128-column tile per query; the (k+1)-th
  largest tile maximum t_i is a lower bound on the (k+1)-th score; pass 2 recomputes the scores
  and appends the columns scoring >= t_i - 2 eps to a per-row candidate buffer (eps bounds the
  fp16 error), which provably holds the exact top k+1 and its ties; rows that overflow the
  buffer are searched exhaustively.
- `torch_matmul` (the torch candidate path; CPU or CUDA): score blocks [rows, N] by matmul (fp16
  on CUDA with fp16 reduced-precision reductions switched off inside the search, fp32 on the
  CPU), a block-max over groups of `group` columns and a top-c over those maxima, then the
  canonical re-rank and certificate.
- `faiss`: `IndexFlatIP` (on the calling process's GPU only when the installed faiss has GPUs),
  k+1+extra candidates, then the same re-rank and certificate.
- `triton`: the Triton path, raising instead of falling back (benchmarks, tests).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch

ENGINES = ("torch", "triton", "torch_matmul", "faiss")
_INT64_MAX = torch.iinfo(torch.int64).max
_triton_broken: str | None = None  # the first Triton failure in this process, if any


def search_dtype(device: torch.device) -> torch.dtype:
    """Candidate-search precision: fp16 on CUDA (unit vectors, so no range issue), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@contextmanager
def exact_fp32_matmul():
    """Plain fp32 matmuls even if someone allowed TF32 (its 10-bit mantissa breaks exactness), and
    fp16 matmuls that accumulate in fp32 (no reduced-precision reductions); restored after."""
    previous = torch.get_float32_matmul_precision()
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced


# --------------------------------------------------------------------------- shared pieces


def drop_self(sims, ids, query_ids=None):
    """[q, k+1] results including each query itself -> [q, k] without it.

    query_ids: the global id of each query (default: row i is id i). Self is removed wherever it
    sits (a duplicate vector may rank first); a row where it is absent (duplicates pushed it out,
    or its id is -1) loses its last entry instead. numpy in, numpy out; tensors in, tensors out.
    """
    if not isinstance(ids, torch.Tensor):
        s, i = drop_self(torch.as_tensor(np.asarray(sims)), torch.as_tensor(np.asarray(ids)),
                         None if query_ids is None else torch.as_tensor(np.asarray(query_ids)))
        return s.numpy(), i.numpy()
    if query_ids is None:
        query_ids = torch.arange(ids.shape[0], device=ids.device)
    is_self = ids == query_ids.to(ids.device, ids.dtype)[:, None]
    is_self[~is_self.any(1), -1] = True
    keep = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :-1]
    return sims.gather(1, keep), ids.gather(1, keep)


def fp32_error(d: int, q_norm: float, x_norm: float) -> float:
    """Bound on |fp32 dot - exact dot| for d-dim vectors of these norms (any summation order),
    plus the canonical score's own rounding."""
    return (d + 4) * 2.0 ** -24 * q_norm * x_norm * 1.01 + 1e-30


def canonical_scores(queries: torch.Tensor, database: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """float32 [R, C]: dot(queries[r], database[cand[r, c]]) summed in float64, rounded once;
    -inf where cand < 0."""
    r, c = cand.shape
    out = torch.empty(r, c, device=cand.device, dtype=torch.float32)
    if r == 0 or c == 0:
        return out
    d = database.shape[1]
    step = max(1, ((1024 if cand.is_cuda else 16) << 20) // (c * d * 8))
    safe = cand.clamp_min(0)
    for s in range(0, r, step):
        rows = database[safe[s:s + step]].double()
        out[s:s + step] = torch.bmm(rows, queries[s:s + step, :, None].double())[:, :, 0].float()
    return out.masked_fill_(cand < 0, float("-inf"))


def _select(scores: torch.Tensor, cand: torch.Tensor, kk: int):
    """Top-kk of each row by (-score, id) in one top-k over an int64 key (the float32 score's
    order-preserving integer in the high half, 2^32 - 1 - id in the low half); cand -1 marks
    padding (sorts last)."""
    bits = scores.contiguous().view(torch.int32)
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # signed order == float order
    low = torch.where(cand < 0, torch.zeros_like(cand), 0xFFFFFFFF - cand)
    key = (order << 32) | low
    top = key.topk(min(kk, key.shape[1]), dim=1)
    ids = 0xFFFFFFFF - (top.values & 0xFFFFFFFF)
    ids = ids.masked_fill_(ids == 0xFFFFFFFF, -1)
    return scores.gather(1, top.indices), ids


def _mask_to_cand(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [R, N] -> int64 [R, max count] of the True columns of each row, -1 padded."""
    counts = mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    rows, cols = mask.nonzero(as_tuple=True)
    start = torch.cumsum(counts, 0) - counts
    out = torch.full((mask.shape[0], width), -1, device=mask.device, dtype=torch.int64)
    out[rows, torch.arange(rows.numel(), device=mask.device) - start[rows]] = cols
    return out


def _block_rows(n_cols: int, itemsize: int, device: torch.device) -> int:
    """Query rows per block: a [rows, n_cols] score block of about a quarter of free GPU memory
    (capped at 16 GiB), or 64 MiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 16 << 30)
    else:
        budget = 64 << 20
    return int(max(64, min(65536, budget // max(1, n_cols * itemsize))))


def _grouped_topk(scores: torch.Tensor, c: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-c (values, column ids) of each row of scores [R, W] (exact), through a block-max
    prefilter over groups of `group` columns when W is a multiple of group."""
    rows, width = scores.shape
    n_groups = width // group if group else 0
    if not group or width % group or n_groups <= 2 * c:
        top = scores.topk(c, dim=1)
        return top.values, top.indices
    best_groups = scores.view(rows, n_groups, group).amax(dim=2).topk(c, dim=1).indices
    cols = (best_groups[:, :, None] * group + torch.arange(group, device=scores.device)).flatten(1)
    top = scores.gather(1, cols).topk(c, dim=1)
    return top.values, cols.gather(1, top.indices)


def _finish(queries, database, cand, kk, bound=None):
    """Canonical re-rank of candidates [R, C] -> (sims [R, kk], ids [R, kk], uncertain rows).
    bound [R]: every column not in cand scores at most bound (canonically); rows whose kk-th
    score does not beat it are returned as uncertain (None: the candidates are complete)."""
    sims, ids = _select(canonical_scores(queries, database, cand), cand, kk)
    if bound is None:
        return sims, ids, None
    return sims, ids, (sims[:, -1] <= bound).nonzero().flatten()


# --------------------------------------------------------------------------- engines


def _exact_block(qb, database, kk, delta, group, scores=None):
    """Canonical top-kk of queries qb against all of database, from fp32 scores."""
    n = database.shape[0]
    if scores is None:
        with exact_fp32_matmul():
            scores = qb @ database.T
    c = min(n, kk + 8)
    vals, cand = _grouped_topk(scores, c, group)
    sims, ids, unsure = _finish(qb, database, cand, kk, None if c == n else vals[:, -1] + delta)
    if unsure is not None and unsure.numel():
        # every column within 2 delta (fp32) of the kk-th fp32 score: complete (ties included)
        thr = vals[unsure, kk - 1] - 2 * delta
        more = _mask_to_cand(scores[unsure] >= thr[:, None])
        sims[unsure], ids[unsure], _ = _finish(qb[unsure], database, more, kk)
    return sims, ids


def _exact_search(queries, database, kk, group=32):
    """Canonical top-kk by fp32 score blocks (the CPU torch engine and every fallback)."""
    delta = fp32_error(database.shape[1], _max_norm(queries), _max_norm(database))
    rows = _block_rows(database.shape[0], 4, database.device)
    out = [_exact_block(queries[s:s + rows], database, kk, delta, group) for s in range(0, queries.shape[0], rows)]
    return _cat(out, kk, database.device)


def _lowp_search(queries, database, kk, dtype, group=32, candidates=None):
    """The torch candidate path: low-precision score blocks, block-max prefilter, top-c,
    canonical re-rank, certificate, exhaustive fp32 search of the rows that fail it."""
    n, d = database.shape
    c = min(n, candidates or max(2 * kk, kk + 32))
    # Rounding to `dtype` moves each input by a relative 2^-p, the score by under 3 units of
    # `dtype` (fp32 accumulation, fp16 output rounding); 4 is the margin.
    eps = 4 * torch.finfo(dtype).eps * _max_norm(queries) * _max_norm(database) + fp32_error(d, 1, 1)
    width = -(-n // group) * group
    xl = torch.zeros(width, d, device=database.device, dtype=dtype)
    xl[:n] = database
    ql = queries.to(dtype)
    rows = _block_rows(width, torch.finfo(dtype).bits // 8, database.device)
    out, redo = [], []
    with exact_fp32_matmul():
        for s in range(0, queries.shape[0], rows):
            scores = ql[s:s + rows] @ xl.T
            scores[:, n:] = float("-inf")
            approx, cand = _grouped_topk(scores, c, group)
            del scores
            sims, ids, unsure = _finish(queries[s:s + rows], database, cand, kk,
                                        None if c == n else approx[:, -1].float() + eps)
            out.append((sims, ids))
            if unsure is not None:
                redo.append(s + unsure)
    sims, ids = _cat(out, kk, database.device)
    redo = torch.cat(redo) if redo else None
    if redo is not None and redo.numel():
        sims[redo], ids[redo] = _exact_search(queries[redo], database, kk, group)
    return sims, ids


def _triton_search(queries, database, kk, *, cap=256, block_m=64, block_n=128, chunk=None, skip=True, stats=None):
    """The Triton path (see the module docstring). stats: a dict that receives counts."""
    from clim_fast.mining import topk_triton as tt

    n, d = database.shape
    qn, xn = _max_norm(queries), _max_norm(database)
    if not _fp16_safe(queries, database):
        raise ValueError("features too large for fp16 scores")
    # fp16 inputs move the score by <= (2 u + u^2)|q||x| (u = 2^-11), fp32 accumulation of 128
    # exact products by < d 2^-22, fp16 subnormals by < d 2^-25: 2^-9 covers them twice over.
    eps = (2.0 ** -9 + (d + 4) * 2.0 ** -22) * qn * xn + fp32_error(d, qn, xn)
    x16 = tt.pad_features(database)
    n_tiles = -(-n // block_n)
    if n_tiles < kk:  # too few tiles for a tile-max bound: nothing to gain over the exact path
        return _exact_search(queries, database, kk)
    if chunk is None:
        budget = (4 << 30) if database.device.type == "cuda" else (64 << 20)
        chunk = max(block_m, budget // (n_tiles * 4) // block_m * block_m)
    # the re-rank gathers candidate rows: from a float64 copy when it fits (half the traffic)
    x64 = database.double() if database.device.type == "cuda" and _fits(database.numel() * 8, database.device) \
        else database
    out, redo, total, overflow = [], [], 0, 0
    for s in range(0, queries.shape[0], chunk):
        qc = queries[s:s + chunk]
        q16 = tt.pad_features(qc)
        maxima = tt.tile_maxima(q16, x16, block_m=block_m, block_n=block_n)
        thr = maxima.topk(kk, dim=1).values[:, -1] - 2 * eps
        cand, counts = tt.threshold_candidates(q16, x16, thr, cap, maxima=maxima if skip else None,
                                               block_m=block_m, block_n=block_n)
        del maxima
        bad = (counts > cap) | (counts < kk)
        width = int(counts.clamp_max(cap).max())
        sims, ids, _ = _finish(qc, x64, cand[:, :width].long(), kk)
        out.append((sims, ids))
        redo.append(s + bad.nonzero().flatten())
        total += int(counts.sum())
        overflow += int(bad.sum())
    del x64
    sims, ids = _cat(out, kk, database.device)
    redo = torch.cat(redo)
    if redo.numel():
        sims[redo], ids[redo] = _exact_search(queries[redo], database, kk)
    if stats is not None:
        stats.update(candidates_per_query=total / max(1, queries.shape[0]), overflow_rows=overflow)
    return sims, ids


def triton_available() -> bool:
    """Triton imports, this process has not seen it fail, and CLIM_FAST_TRITON is not 0."""
    if _triton_broken is not None or os.environ.get("CLIM_FAST_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


def _faiss_search(queries: np.ndarray, database: np.ndarray, kk: int, gpu_device: int | None):
    """faiss candidates (kk + extra), canonical re-rank, exhaustive torch search where the
    certificate fails (on the same GPU when faiss ran on one)."""
    import faiss

    n, d = database.shape
    index = faiss.IndexFlatIP(d)
    res = None
    if gpu_device is not None:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, gpu_device, index)
    index.add(database)
    c = min(n, kk + (16 if gpu_device is not None else 8))
    approx, cand = index.search(queries, c)
    del index, res
    device = torch.device("cuda", gpu_device) if gpu_device is not None else torch.device("cpu")
    q, x = torch.from_numpy(queries).to(device), torch.from_numpy(database).to(device)
    qn, xn = _max_norm(q), _max_norm(x)
    # faiss on a GPU may use TF32 tensor cores: allow their error there
    delta = (2.0 ** -10 * qn * xn if gpu_device is not None else 0) + fp32_error(d, qn, xn)
    approx, cand = torch.from_numpy(approx).to(device), torch.from_numpy(cand).to(device)
    bound = None if c == n else approx[:, -1] + delta
    sims, ids, unsure = _finish(q, x, cand, kk, bound)
    if unsure is not None and unsure.numel():
        sims[unsure], ids[unsure] = _exact_search(q[unsure], x, kk)
    return sims.cpu(), ids.cpu()


def requested_gpu(gpu: bool | int | None) -> int | None:
    """The GPU a `gpu=` argument names: None for the CPU (False or None), this process's GPU
    (True), or GPU number `gpu` (an int)."""
    if gpu is False or gpu is None:
        return None
    return torch.cuda.current_device() if gpu is True else int(gpu)


def faiss_gpu_device(device: torch.device | None = None) -> int | None:
    """The GPU faiss should use in this process (the rank's own), or None for the CPU."""
    try:
        import faiss

        if faiss.get_num_gpus() < 1 or not torch.cuda.is_available():
            return None
    except (ImportError, AttributeError):
        return None
    if device is not None and device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device()


def knn_search(queries, database, k: int, *, query_ids=None, engine: str = "torch", **options):
    """k nearest rows of `database` [N, d] for each of `queries` [q, d] by inner product.

    query_ids: int64 [q], the row of database each query is (its own id, excluded wherever it
    ranks; -1: not in database); default arange(q), i.e. queries == database[:q].
    Returns (sims float32 [q, k], ids int64 [q, k]), best first, ties by smaller id; numpy in,
    numpy out, tensors in, tensors out (on the queries' device; faiss answers on the CPU).
    engine: torch (Triton on CUDA when it works, else torch_matmul), triton, torch_matmul, faiss.
    options: dtype, group, candidates (torch_matmul); cap, block_m, block_n, chunk, skip, stats (triton).
    """
    global _triton_broken
    if engine not in ENGINES:
        raise ValueError(f"knn engine {engine!r}: choose from {', '.join(ENGINES)}")
    as_numpy = not isinstance(queries, torch.Tensor)
    q = torch.as_tensor(np.asarray(queries) if as_numpy else queries)
    x = torch.as_tensor(np.asarray(database) if not isinstance(database, torch.Tensor) else database)
    q, x = q.float().contiguous(), x.to(q.device).float().contiguous()
    n = x.shape[0]
    if query_ids is None:
        query_ids = torch.arange(q.shape[0], device=q.device)
    query_ids = torch.as_tensor(np.asarray(query_ids) if not isinstance(query_ids, torch.Tensor) else query_ids)
    query_ids = query_ids.to(q.device, torch.int64)
    outsiders = bool((query_ids < 0).all())  # no query is a row of database: nothing to exclude
    if k < 1 or k > n or (k == n and not outsiders):
        raise ValueError(f"k={k}: need 0 < k < N={n} (k <= N when every query id is -1)")
    kk = min(k + 1, n)
    triton_options = _pick(options, "cap", "block_m", "block_n", "chunk", "skip", "stats")
    if q.shape[0] == 0:
        sims, ids = q.new_zeros(0, kk), torch.zeros(0, kk, dtype=torch.int64, device=q.device)
    elif engine == "faiss":
        sims, ids = _faiss_search(q.cpu().numpy(), x.cpu().numpy(), kk, faiss_gpu_device(q.device))
        sims, ids = sims.to(q.device), ids.to(q.device)
    elif engine == "triton":
        sims, ids = _triton_search(q, x, kk, **triton_options)
    elif engine == "torch" and q.is_cuda and triton_available() and _fp16_safe(q, x):
        try:
            sims, ids = _triton_search(q, x, kk, **triton_options)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()  # transient: this call only takes the torch path
            sims, ids = _torch_path(q, x, kk, options)
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile must not stop training
            _triton_broken = f"{type(err).__name__}: {err}"
            warnings.warn(f"kNN: the Triton kernels failed ({_triton_broken[:300]}); using the torch path",
                          RuntimeWarning, stacklevel=2)
            sims, ids = _torch_path(q, x, kk, options)
    else:
        sims, ids = _torch_path(q, x, kk, options)
    if kk == k + 1:
        sims, ids = drop_self(sims, ids, query_ids)
    if as_numpy:
        return sims.cpu().numpy(), ids.cpu().numpy()
    return sims, ids


def _torch_path(q, x, kk, options):
    dtype = options.get("dtype") or search_dtype(x.device)
    if dtype == torch.float32:
        return _exact_search(q, x, kk, options.get("group", 32))
    return _lowp_search(q, x, kk, dtype, options.get("group", 32), options.get("candidates"))


def knn_torch(x: torch.Tensor, k: int, *, dtype: torch.dtype | None = None, candidates: int | None = None,
              group: int = 32, engine: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of x [N, d] against all (any device): (sims float32 [N, k], ids int64 [N, k]) on
    x's device, best first, self excluded, ties by id. dtype/candidates/group: the torch_matmul
    path's knobs (passing dtype selects that path)."""
    if dtype is not None and engine == "torch":
        engine = "torch_matmul"
    return knn_search(x, x, k, engine=engine, dtype=dtype, candidates=candidates, group=group)


def knn_faiss(x: np.ndarray, k: int, *, gpu: bool | int | None = False) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, d]. Returns (sims float32 [N, k], ids int64 [N, k]), best first, self
    excluded, ties by id. gpu: faiss on this process's GPU (True) or on GPU number `gpu` (int)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sims, ids = _faiss_search(x, x, min(k + 1, len(x)), requested_gpu(gpu))
    sims, ids = drop_self(sims, ids)
    return sims.numpy(), ids.numpy()


def knn_naive_torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline: chunked fp32 matmul + topk over full rows, then drop self. Ties by smaller id
    (rows whose (k+1)-th score ties the (k+2)-th are fully sorted); scores are plain fp32 sums,
    so near-ties within an ulp may order differently from the canonical engines."""
    x = x.float().contiguous()
    n = x.shape[0]
    kk = min(k + 1, n)
    c = min(n, kk + 1)
    rows = _block_rows(n, 4, x.device)
    out = []
    with exact_fp32_matmul():
        for s in range(0, n, rows):
            scores = x[s:s + rows] @ x.T
            top = scores.topk(c, dim=1)
            sims, ids = _select(top.values, top.indices, kk)
            if c > kk:
                tied = (top.values[:, kk - 1] == top.values[:, kk]).nonzero().flatten()
                if tied.numel():
                    full = torch.sort(scores[tied], dim=1, descending=True, stable=True)
                    sims[tied], ids[tied] = full.values[:, :kk], full.indices[:, :kk]
            out.append((sims, ids))
    return drop_self(*_cat(out, kk, x.device))


def _pick(options: dict, *names: str) -> dict:
    return {key: options[key] for key in names if options.get(key) is not None}


def _fp16_safe(queries: torch.Tensor, database: torch.Tensor) -> bool:
    """Entries and scores stay far inside fp16's range (unit rows always do)."""
    return max(float(queries.abs().max()), float(database.abs().max())) < 3e4 and \
        _max_norm(queries) * _max_norm(database) < 1e30


def _fits(nbytes: int, device: torch.device) -> bool:
    return nbytes < torch.cuda.mem_get_info(device)[0] // 8


def _max_norm(x: torch.Tensor) -> float:
    return float(x.norm(dim=1).max()) if x.numel() else 0.0


def _cat(parts, kk, device):
    if not parts:
        return torch.zeros(0, kk, device=device), torch.zeros(0, kk, dtype=torch.int64, device=device)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
