"""Exact k-nearest neighbours by inner product (cosine on unit rows), self excluded.

Engines: faiss (`IndexFlatIP`, on all GPUs when the installed faiss has them) and torch.
The torch engine is the GPU path. Scoring every pair dominates; `torch.topk` over 1.28M-wide
rows is what made the naive version slow, so it works in three passes per block of queries:
1. fp16 scores (tensor cores), then a block-max over groups of `group` columns and a top-k over
   those maxima: the top-c columns of a row lie in its top-c groups, so only c*group columns
   reach the real top-k;
2. exact fp32 re-rank of the c candidates;
3. a certificate: low-precision scores are within `eps` of the truth, so a row whose exact
   (k+1)-th candidate beats the c-th approximate score by more than eps has its exact answer.
   Rows that fail (near-duplicates, ties) are recomputed in fp32 over everything.
On the CPU the scores are fp32 already, so only pass 1's block-max prefilter applies (still
about twice as fast as a full-row topk).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def search_dtype(device: torch.device) -> torch.dtype:
    """Candidate-search precision: fp16 on CUDA (unit vectors, so no range issue), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@contextmanager
def exact_fp32_matmul():
    """Plain fp32 matmuls even if someone allowed TF32 (its 10-bit mantissa breaks exactness)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def drop_self(sims, ids):
    """[N, k+1] results including each query itself -> [N, k] without it.

    Self is removed wherever it sits (a duplicate vector may rank first); a row where duplicates
    pushed self out of the k+1 loses its last entry instead. Works on numpy arrays and tensors.
    """
    if isinstance(ids, torch.Tensor):
        is_self = ids == torch.arange(ids.shape[0], device=ids.device)[:, None]
        is_self[~is_self.any(1), -1] = True
        keep = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :-1]
        return sims.gather(1, keep), ids.gather(1, keep)
    is_self = ids == np.arange(ids.shape[0])[:, None]
    is_self[~is_self.any(1), -1] = True
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :-1]
    return np.take_along_axis(sims, keep, 1), np.take_along_axis(ids, keep, 1)


def knn_faiss(x: np.ndarray, k: int, *, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, d]. Returns (sims float32 [N, k], ids int64 [N, k]), best first, self excluded."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    sims, ids = index.search(x, k + 1)
    return drop_self(sims, ids)


def _block_rows(n_cols: int, itemsize: int, device: torch.device) -> int:
    """Query rows per block: a [rows, n_cols] score block of about a quarter of free GPU memory
    (capped at 16 GiB), or 64 MiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 16 << 30)
    else:
        budget = 64 << 20
    return int(max(64, min(65536, budget // max(1, n_cols * itemsize))))


def _exact_topk(queries: torch.Tensor, x: torch.Tensor, kk: int, group: int = 0):
    """fp32 scores of `queries` against all of x, top-kk per row: a full-row topk (the naive
    method) when group is 0, else through the (exact) block-max prefilter."""
    n = x.shape[0]
    if group:
        width = -(-n // group) * group
        x = torch.cat([x, x.new_zeros(width - n, x.shape[1])])
    rows = _block_rows(x.shape[0], 4, x.device)
    vals, ids = [], []
    with exact_fp32_matmul():
        for s in range(0, queries.shape[0], rows):
            scores = queries[s:s + rows] @ x.T
            if group:
                scores[:, n:] = float("-inf")
                top = _grouped_topk(scores, kk, group)
            else:
                top = scores.topk(kk, dim=1)
            vals.append(top[0])
            ids.append(top[1])
    return torch.cat(vals), torch.cat(ids)


def knn_naive_torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline: chunked fp32 matmul + topk over full rows, then drop self."""
    x = x.float().contiguous()
    return drop_self(*_exact_topk(x, x, k + 1))


def _grouped_topk(scores: torch.Tensor, c: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-c (values, column ids) of each row of scores [R, G*group] via a block-max prefilter."""
    rows, width = scores.shape
    n_groups = width // group
    if n_groups <= 2 * c:
        top = scores.topk(c, dim=1)
        return top.values, top.indices
    best_groups = scores.view(rows, n_groups, group).amax(dim=2).topk(c, dim=1).indices
    cols = (best_groups[:, :, None] * group + torch.arange(group, device=scores.device)).flatten(1)
    top = scores.gather(1, cols).topk(c, dim=1)
    return top.values, cols.gather(1, top.indices)


def _rerank(x: torch.Tensor, queries: torch.Tensor, cand: torch.Tensor, kk: int):
    """Exact fp32 sims of each query with its candidate rows; top-kk of them."""
    step = max(1, (256 << 20) // max(1, cand.shape[1] * x.shape[1] * 4))
    vals, ids = [], []
    with exact_fp32_matmul():
        for s in range(0, queries.shape[0], step):
            c = cand[s:s + step]
            exact = torch.bmm(x[c], queries[s:s + step, :, None])[:, :, 0]
            top = exact.topk(kk, dim=1)
            vals.append(top.values)
            ids.append(c.gather(1, top.indices))
    return torch.cat(vals), torch.cat(ids)


def knn_torch(x: torch.Tensor, k: int, *, dtype: torch.dtype | None = None, candidates: int | None = None,
              group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d] on any device. Returns (sims float32 [N, k], ids int64 [N, k]) on x's device,
    best first, self excluded; exact (fp32 ranking) whatever `dtype` the candidate pass uses."""
    x = x.float().contiguous()
    n = x.shape[0]
    kk = k + 1
    dtype = dtype or search_dtype(x.device)
    low = dtype != torch.float32
    c = min(n, candidates or max(2 * kk, kk + 32)) if low else kk
    # Rounding unit vectors to `dtype` and the score to `dtype` moves a score by under 3 units in
    # the last place; 4 is the margin. Scaled by the largest squared norm for non-unit input.
    eps = 4 * torch.finfo(dtype).eps * float(x.norm(dim=1).max()) ** 2
    width = -(-n // group) * group
    xl = torch.zeros(width, x.shape[1], device=x.device, dtype=dtype)
    xl[:n] = x
    rows = _block_rows(width, torch.finfo(dtype).bits // 8, x.device)
    sims = torch.empty(n, kk, device=x.device)
    ids = torch.empty(n, kk, device=x.device, dtype=torch.int64)
    uncertain = []
    with exact_fp32_matmul():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            scores = xl[s:e] @ xl.T
            scores[:, n:] = float("-inf")
            approx, cand = _grouped_topk(scores, c, group)
            del scores
            if not low:
                sims[s:e], ids[s:e] = approx, cand
                continue
            sims[s:e], ids[s:e] = _rerank(x, x[s:e], cand, kk)
            if c < n:
                uncertain.append(s + (sims[s:e, -1] <= approx[:, -1].float() + eps).nonzero().flatten())
    if uncertain:
        redo = torch.cat(uncertain)
        if redo.numel():
            sims[redo], ids[redo] = _exact_topk(x[redo], x, kk, group)
    return drop_self(sims, ids)
