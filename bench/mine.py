"""Benchmark the kNN of a mining round (plus K-means and selection) on synthetic clustered features.

Side by side in one run, each on the same features: the baseline (naive chunked fp32 matmul +
full-row topk), the torch candidate path (fp16 score blocks, block-max prefilter, re-rank:
the engine of 2026-11-27), the Triton kernels (the default torch engine on CUDA), and faiss
(when it has GPUs, or on the CPU up to 100k rows). For each: kNN seconds, speed-up against the
naive kNN, and agreement with an exact answer on a sample of rows (float64 brute force, scores
rounded to float32, ties by id): ids equal position by position, recall@k as sets, and a
tie-tolerant recall (returned neighbours whose exact score reaches the exact k-th score less
1e-6). One K-means + selection round is timed once, with the default engine's neighbours.

    python bench/mine.py --size small [--json out.json]          # CPU: N = 10k, 20k
    python bench/mine.py --size full --json out.json             # GPU: 1.28M x 128, m=10000, k=40

Prints one line per engine and, at the end, one JSON line with every figure. A failing engine
(a Triton kernel that does not compile, say) is reported in the JSON, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from clim_fast.mining.knn import faiss_gpu_device, knn_naive_torch, knn_search, triton_available  # noqa: E402

SIZES = {"small": [10_000, 20_000], "full": [1_280_000]}


def machine() -> dict:
    try:
        from clim_fast.machine import machine_info

        return machine_info()
    except Exception as err:  # noqa: BLE001 - the figures matter more than the label
        import os
        import platform

        info = dict(cpu=platform.processor(), cores=os.cpu_count(), error=str(err))
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
        return info


def faiss_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def synthetic_features(n: int, d: int, true_clusters: int, device, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `true_clusters` random centres, cluster sizes uneven (as real data)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(true_clusters, d, generator=g), dim=1)
    weights = torch.rand(true_clusters, generator=g) + 0.2
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    x = centres[labels] + 0.12 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def exact_reference(x: torch.Tensor, rows: torch.Tensor, k: int):
    """float64 brute force for `rows`, self dropped: (ids [r, k] by (-score32, id), the top k + 64
    (scores32, ids) of each row)."""
    ids, top_v, top_i = [], [], []
    step = max(1, (2 << 30) // (x.shape[0] * 8))
    xd = x.double()
    for s in range(0, rows.numel(), step):
        r = rows[s:s + step]
        sc = (xd[r] @ xd.T).float()
        sc[torch.arange(r.numel()), r] = float("-inf")
        top = sc.topk(min(x.shape[0], k + 64), dim=1)  # enough to order ties by id below
        v, i = top.values.cpu().numpy(), top.indices.cpu().numpy()
        order = np.lexsort((i, -v), axis=1)
        ids.append(np.take_along_axis(i, order[:, :k], 1))
        top_v.append(v)
        top_i.append(i)
        del sc
    return np.concatenate(ids), (np.concatenate(top_v), np.concatenate(top_i))


def agreement(ids: np.ndarray, ref_ids: np.ndarray, ref_top, k: int) -> dict:
    top_v, top_i = ref_top
    tolerant = 0
    for row, (v, i) in enumerate(zip(top_v, top_i)):
        score = dict(zip(i.tolist(), v.tolist()))
        kth = score[int(ref_ids[row, -1])]
        tolerant += sum(score.get(int(j), float("-inf")) >= kth - 1e-6 for j in ids[row])
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), ref_ids.tolist())])
    return dict(ids_equal=float((ids == ref_ids).mean()), recall=float(recall),
                recall_tie_tolerant=tolerant / ids.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="full" if torch.cuda.is_available() else "small")
    parser.add_argument("--n", type=int, nargs="*", help="override the sample counts")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--per-cluster", type=int, default=128, help="N / m (1.28M / 10000 = 128)")
    parser.add_argument("--check-rows", type=int, default=2000, help="rows checked against the exact answer")
    parser.add_argument("--engines", default="naive,torch_matmul,triton,faiss",
                        help="comma-separated subset of naive,torch_matmul,triton,faiss")
    parser.add_argument("--faiss", choices=["auto", "yes", "no"], default="auto",
                        help="auto: faiss when it has GPUs, or on the CPU up to 100k rows")
    parser.add_argument("--no-round", action="store_true", help="skip the K-means + selection timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(machine(), faiss_gpu=faiss_gpu_device() is not None, triton=triton_available(), device=str(device))
    print(f"machine: {info}", flush=True)
    wanted = args.engines.split(",")
    results = []
    for n in args.n or SIZES[args.size]:
        m = max(1, n // args.per_cluster)
        x = synthetic_features(n, args.dim, true_clusters=max(1, m // 2), device=device)
        row = dict(n=n, dim=args.dim, clusters=m, k=args.k, device=str(device), engines={})
        check = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:min(n, args.check_rows)].to(device)
        (ref_ids, ref_top), t_ref = timed(lambda: exact_reference(x, check, args.k))
        row["reference_s"] = t_ref
        engines = {}
        if "naive" in wanted:
            engines["naive_torch"] = lambda: knn_naive_torch(x, args.k)
        if "torch_matmul" in wanted:
            engines["torch_matmul"] = lambda: knn_search(x, x, args.k, engine="torch_matmul")
        stats = {}
        if "triton" in wanted and device.type == "cuda":
            engines["triton"] = lambda: knn_search(x, x, args.k, engine="triton", stats=stats)
        run_faiss = args.faiss == "yes" or (args.faiss == "auto" and faiss_installed()
                                            and (faiss_gpu_device() is not None or n <= 100_000))
        if "faiss" in wanted and run_faiss:
            x_np = x.cpu().numpy()
            engines["faiss"] = lambda: knn_search(x_np, x_np, args.k, engine="faiss")
        if "triton" in wanted and device.type != "cuda":
            row["engines"]["triton"] = dict(skipped="needs CUDA (the kernels are tested on the CPU under TRITON_INTERPRET=1)")
        for name, fn in engines.items():
            entry = {}
            try:
                if device.type == "cuda":  # warm-up: CUDA context, cuBLAS handles, Triton compiles
                    w = x[:20000]
                    if name == "naive_torch":
                        knn_naive_torch(w, args.k)
                    elif name == "faiss":
                        knn_search(w.cpu().numpy(), w.cpu().numpy(), args.k, engine="faiss")
                    else:
                        knn_search(w, w, args.k, engine=name)
                (sims, ids), t = timed(fn)
                ids = np.asarray(torch.as_tensor(ids)[torch.as_tensor(check).cpu()].cpu())
                entry = dict(knn_s=round(t, 3), **agreement(ids, ref_ids, ref_top, args.k))
                if name == "triton":
                    entry.update(stats)
                del sims
            except Exception as err:  # noqa: BLE001 - report, keep benchmarking the others
                entry = dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            row["engines"][name] = entry
            print(f"N={n:,} {name}: {json.dumps(entry)}", flush=True)
            if args.json:  # partial results survive a time box
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(dict(benchmark="mine", machine=info, results=results + [row]), indent=2))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        naive = row["engines"].get("naive_torch", {}).get("knn_s")
        for name, entry in row["engines"].items():
            if naive and "knn_s" in entry:
                entry["speedup_vs_naive"] = round(naive / entry["knn_s"], 2)
        if not args.no_round:  # the online round's own code (sharded.mine_round, one rank)
            try:
                from clim_fast.mining.sharded import block_search, mine_round

                ids = torch.arange(n, device=device)
                (_, _, _, _, parts), t_round = timed(lambda: mine_round(x, ids, None, n, clusters=m, k=args.k, seed=0,
                                                                       search=block_search("torch")))
                row["round"] = dict({key: round(v, 3) for key, v in parts.items()}, total_s=round(t_round, 3))
            except Exception as err:  # noqa: BLE001 - report it with the kNN figures
                row["round"] = dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            print(f"N={n:,} round: {json.dumps(row['round'])}", flush=True)
        results.append(row)
        del x
    report = dict(benchmark="mine", machine=info, results=results)
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
