"""kNN engines (clim_fast.mining.knn): one answer for all, ties by id, query subsets, Triton kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clim_fast.mining.knn import drop_self, knn_faiss, knn_naive_torch, knn_search, knn_torch

ROOT = Path(__file__).resolve().parents[1]


def clustered(n=400, d=32, clusters=8, noise=0.2, seed=0, dups=40):
    """Unit rows around a few centres, with exact duplicates (ties) appended and one pair copied."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    x = torch.cat([x, x[:dups], x[:dups // 4]])
    x[7] = x[3]
    return x


def reference(x, k, query_ids=None, queries=None):
    """Brute force: float64 dots rounded once to float32, order (-score, id), self dropped."""
    queries = x if queries is None else queries
    s = (queries.double() @ x.double().T).float().numpy()
    ids = np.tile(np.arange(x.shape[0]), (s.shape[0], 1))
    order = np.lexsort((ids, -s), axis=1)
    qid = np.arange(s.shape[0]) if query_ids is None else np.asarray(query_ids)
    out_ids = np.stack([row[row != q][:k] for row, q in zip(order, qid)])
    return np.take_along_axis(s, out_ids, 1), out_ids


ENGINES_CPU = ["torch", "torch_matmul"] + (["faiss"] if __import__("importlib").util.find_spec("faiss") else [])


@pytest.mark.parametrize("engine", ENGINES_CPU)
def test_engines_equal_reference_with_ties_by_id(engine):
    x = clustered()
    k = 12
    ref_s, ref_i = reference(x, k)
    opts = dict(dtype=torch.bfloat16, group=8, candidates=20) if engine == "torch_matmul" else {}
    sims, ids = knn_search(x, x, k, engine=engine, **opts)
    np.testing.assert_array_equal(ids.numpy(), ref_i)
    np.testing.assert_array_equal(sims.numpy(), ref_s)


def test_wrappers_agree_and_naive_orders_ties_by_id():
    x = clustered(seed=1)
    k = 10
    _, ref_i = reference(x, k)
    np.testing.assert_array_equal(knn_torch(x, k)[1].numpy(), ref_i)
    np.testing.assert_array_equal(knn_torch(x, k, dtype=torch.bfloat16, group=8)[1].numpy(), ref_i)
    np.testing.assert_array_equal(knn_naive_torch(x, k)[1].numpy(), ref_i)
    if "faiss" in ENGINES_CPU:
        np.testing.assert_array_equal(knn_faiss(x.numpy(), k)[1], ref_i)


def test_all_copies_tie_and_go_by_id():
    base = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    x = torch.cat([base] * 5)  # every vector five times: its 4 other copies are its nearest, by id
    for engine in ENGINES_CPU:
        _, ids = knn_search(x, x, 6, engine=engine)
        ids = ids.numpy() if isinstance(ids, torch.Tensor) else ids
        own = np.arange(len(x))
        copies = np.stack([np.array([j for j in own[own % len(base) == i % len(base)] if j != i]) for i in own])
        np.testing.assert_array_equal(ids[:, :4], copies)


@pytest.mark.parametrize("engine", ENGINES_CPU)
def test_query_subset_equals_rows_of_full_search(engine):
    x = clustered(seed=2)
    k = 9
    full_s, full_i = knn_search(x, x, k, engine=engine)
    rows = torch.tensor([0, 3, 7, 41, 100, 401, 405, x.shape[0] - 1])
    sims, ids = knn_search(x[rows], x, k, query_ids=rows, engine=engine)
    assert torch.equal(torch.as_tensor(ids), torch.as_tensor(full_i)[rows])
    assert torch.equal(torch.as_tensor(sims), torch.as_tensor(full_s)[rows])
    # numpy in, numpy out; -1 ids: nothing excluded, k results from all rows
    s_np, i_np = knn_search(x[rows].numpy(), x.numpy(), k, query_ids=np.full(len(rows), -1), engine=engine)
    assert isinstance(i_np, np.ndarray) and i_np.dtype == np.int64 and s_np.dtype == np.float32
    _, ref_i = reference(x, k + 1, queries=x[rows], query_ids=np.full(len(rows), -1))
    np.testing.assert_array_equal(i_np, ref_i[:, :k])


def test_drop_self_numpy_and_torch():
    ids = np.array([[5, 6, 7], [1, 0, 2], [2, 9, 4]])
    sims = ids.astype(np.float32)
    s, i = drop_self(sims, ids)
    np.testing.assert_array_equal(i, [[5, 6], [0, 2], [9, 4]])
    assert isinstance(s, np.ndarray)
    st, it = drop_self(torch.from_numpy(sims), torch.from_numpy(ids), torch.tensor([6, -1, 4]))
    assert it.tolist() == [[5, 7], [1, 0], [2, 9]]


def test_k_bounds():
    x = clustered(n=20, dups=0)
    with pytest.raises(ValueError):
        knn_search(x, x, x.shape[0])
    assert knn_search(x[:3], x, x.shape[0], query_ids=torch.full((3,), -1))[1].shape == (3, x.shape[0])


INTERPRETED = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from clim_fast.mining import topk_triton as tt
from clim_fast.mining.knn import _triton_search
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_knn import clustered, reference
x = clustered(n=150, d=24, dups=24)
kk = 8
out = {}
# pass 1: tile maxima equal the fp16-input fp32-accumulated brute force
q16, x16 = tt.pad_features(x[:40]), tt.pad_features(x)
m = tt.tile_maxima(q16, x16, block_m=16, block_n=16)
s = q16.float() @ x16.float().T
pad = torch.full((40, m.shape[1] * 16 - x.shape[0]), float("-inf"))
ref_m = torch.cat([s, pad], 1).view(40, -1, 16).amax(2)
out["maxima_err"] = float((m - ref_m).abs().max())
# pass 2: exactly the columns over each row's threshold
thr = s.kthvalue(s.shape[1] - 10, dim=1).values
cand, counts = tt.threshold_candidates(q16, x16, thr, 32, block_m=16, block_n=16)
want = [sorted(torch.nonzero(s[i] >= thr[i]).flatten().tolist()) for i in range(40)]
got = [sorted(c[c >= 0].tolist()) for c in cand]
out["threshold_ok"] = got == want and counts.tolist() == [len(w) for w in want]
skipping = tt.threshold_candidates(q16, x16, thr, 32, maxima=m, block_m=16, block_n=16)
out["skip_ok"] = [sorted(c[c >= 0].tolist()) for c in skipping[0]] == want
small = tt.threshold_candidates(q16, x16, thr, 4, block_m=16, block_n=16)
out["overflow_counts_ok"] = small[1].tolist() == counts.tolist() and bool((small[0] >= 0).all())
# the whole path (small cap: some rows overflow to the exact search)
stats = {}
sims, ids = _triton_search(x, x, kk, cap=10, block_m=16, block_n=16, stats=stats)
s2, i2 = _triton_search(x, x, kk, cap=10, block_m=16, block_n=16, skip=False)
out["skip_same"] = bool((i2 == ids).all() and (s2 == sims).all())
ref_s, ref_i = reference(x, kk, query_ids=torch.full((x.shape[0],), -1))
out["ids_equal"] = bool((ids.numpy() == ref_i).all())
out["sims_equal"] = bool((sims.numpy() == ref_s).all())
out["stats"] = stats
print(json.dumps(out))
"""


def test_triton_kernels_interpreted_match_brute_force():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", INTERPRETED, str(ROOT)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["maxima_err"] == 0
    assert out["threshold_ok"] and out["skip_ok"] and out["overflow_counts_ok"]
    assert out["ids_equal"] and out["sims_equal"] and out["skip_same"], out
    assert out["stats"]["overflow_rows"] > 0  # the exact fallback ran too


@pytest.mark.gpu
def test_gpu_triton_matches_naive_and_torch_paths():
    x = clustered(n=20000, d=64, clusters=150, noise=0.25, dups=200).cuda()
    k = 40
    stats = {}
    t_s, t_i = knn_search(x, x, k, engine="triton", stats=stats)
    m_s, m_i = knn_search(x, x, k, engine="torch_matmul")
    a_s, a_i = knn_torch(x, k)  # auto: Triton on CUDA
    assert torch.equal(t_i, m_i) and torch.equal(t_s, m_s) and torch.equal(a_i, t_i)
    assert stats["candidates_per_query"] >= k + 1
    n_s, n_i = knn_naive_torch(x, k)
    torch.testing.assert_close(t_s, n_s, rtol=0, atol=2e-6)
    # naive sums in plain fp32: only near-ties (within 2e-6) may order differently
    differ = t_i != n_i
    assert differ.float().mean() < 1e-3
    assert ((t_s - n_s).abs()[differ] <= 2e-6).all()
    # a CPU exact search of a sample of rows: the canonical scores agree across devices
    rows = torch.arange(0, x.shape[0], 97)
    c_s, c_i = knn_search(x[rows].cpu(), x.cpu(), k, query_ids=rows)
    assert (c_i == t_i[rows].cpu()).float().mean() > 0.999
    torch.testing.assert_close(c_s, t_s[rows].cpu(), rtol=0, atol=1e-7)


@pytest.mark.gpu
def test_gpu_triton_query_subset():
    x = clustered(n=20000, d=128, clusters=150, noise=0.25, dups=100).cuda()
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:3000].cuda()
    full = knn_search(x, x, 40, engine="triton")
    part = knn_search(x[rows], x, 40, query_ids=rows, engine="triton")
    assert torch.equal(part[1], full[1][rows]) and torch.equal(part[0], full[0][rows])


@pytest.mark.gpu
def test_gpu_triton_failure_falls_back(monkeypatch):
    import clim_fast.mining.knn as knn
    from clim_fast.mining import topk_triton

    x = clustered(n=6000, d=32, clusters=40).cuda()
    want = knn_search(x, x, 10, engine="torch_matmul")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(topk_triton, "tile_maxima", broken)
    monkeypatch.setattr(knn, "_triton_broken", None)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed"):
        got = knn_torch(x, 10)
    assert torch.equal(got[1], want[1]) and knn._triton_broken is not None
    assert not knn.triton_available()


def test_matmul_settings_restored_after_search():
    x = clustered(n=200, dups=0)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    torch.set_float32_matmul_precision("high")
    try:
        knn_torch(x, 5, dtype=torch.bfloat16, group=8)
        knn_search(x, x, 5)
        assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is True
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
