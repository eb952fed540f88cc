"""Benchmark one mining round (K-means + kNN + selection) on synthetic clustered features.

Side by side in one run: our torch engine, the faiss engine, and the baseline (same K-means, then
the naive chunked fp32 matmul + topk kNN). Full size (GPU): 1.28M x 128, m=10000, k=40.
Small size (CPU): a few N up to 40k with m scaled to keep 128 samples per cluster, to show the
scaling.

    python bench/mine.py --size small [--json out.json]
    python bench/mine.py --size full --json out.json   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from clim_fast.mining.kmeans import kmeans_faiss, kmeans_torch  # noqa: E402
from clim_fast.mining.knn import knn_faiss, knn_naive_torch, knn_torch  # noqa: E402
from clim_fast.mining.engine import faiss_gpus, select_positives  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402

SIZES = {"small": [10_000, 20_000, 40_000], "full": [1_280_000]}


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


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def select(x, centroids, assignment, neighbours):
    """Selection on the arrays' device (GPU for the torch engine), centre similarities included."""
    def run():
        centre_sim = (x * centroids[assignment]).sum(1)
        return select_positives(neighbours, assignment, centre_sim)
    return timed(run)[1]


def run_torch(x, m, k, knn):
    (c, a), t_km = timed(lambda: kmeans_torch(x, m, niter=20, seed=0))
    (_, ids), t_knn = timed(lambda: knn(x, k))
    t_sel = select(x, c, a, ids)
    return dict(kmeans_s=t_km, knn_s=t_knn, select_s=t_sel, total_s=t_km + t_knn + t_sel), ids.cpu().numpy()


def run_faiss(x, m, k):
    x_np = x.cpu().numpy()
    gpu = faiss_gpus() > 0
    (c, a), t_km = timed(lambda: kmeans_faiss(x_np, m, niter=20, seed=0, gpu=gpu))
    (_, ids), t_knn = timed(lambda: knn_faiss(x_np, k, gpu=gpu))
    t_sel = select(*(torch.from_numpy(v) for v in (x_np, c, a, ids)))
    return dict(kmeans_s=t_km, knn_s=t_knn, select_s=t_sel, total_s=t_km + t_knn + t_sel), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="full" if torch.cuda.is_available() else "small")
    parser.add_argument("--n", type=int, nargs="*", help="override the sample counts")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--per-cluster", type=int, default=128, help="N / m (1.28M / 10000 = 128)")
    parser.add_argument("--faiss", choices=["auto", "yes", "no"], default="auto",
                        help="auto: skip CPU faiss above 100k samples (hours of brute force)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(machine_info(), faiss_gpus=faiss_gpus())
    print(f"machine: {info}")
    results = []
    for n in args.n or SIZES[args.size]:
        m = max(1, n // args.per_cluster)
        x = synthetic_features(n, args.dim, true_clusters=max(1, m // 2), device=device)
        if device.type == "cuda":  # warm-up: CUDA context, cuBLAS handles, topk kernels
            kmeans_torch(x[:20000], 64, niter=2)
            knn_torch(x[:20000], args.k)
            knn_naive_torch(x[:20000], args.k)
        row = dict(n=n, dim=args.dim, clusters=m, k=args.k, device=str(device))
        row["ours_torch"], ours_ids = run_torch(x, m, args.k, knn_torch)
        row["baseline_naive_torch"], naive_ids = run_torch(x, m, args.k, knn_naive_torch)
        row["knn_ids_agree"] = float((ours_ids == naive_ids).mean())
        if args.faiss == "yes" or (args.faiss == "auto" and faiss_installed() and (faiss_gpus() > 0 or n <= 100_000)):
            row["faiss"], faiss_ids = run_faiss(x, m, args.k)
            row["faiss_vs_torch_ids_agree"] = float((faiss_ids == ours_ids).mean())
        row["knn_speedup_vs_naive"] = row["baseline_naive_torch"]["knn_s"] / row["ours_torch"]["knn_s"]
        row["round_speedup_vs_naive"] = row["baseline_naive_torch"]["total_s"] / row["ours_torch"]["total_s"]
        results.append(row)
        line = (f"N={n:>9,} m={m:>6} k={args.k}: ours(torch) {row['ours_torch']['total_s']:.2f}s "
                f"[kmeans {row['ours_torch']['kmeans_s']:.2f} knn {row['ours_torch']['knn_s']:.2f} "
                f"select {row['ours_torch']['select_s']:.2f}] | naive {row['baseline_naive_torch']['total_s']:.2f}s "
                f"[knn {row['baseline_naive_torch']['knn_s']:.2f}]")
        if "faiss" in row:
            line += f" | faiss {row['faiss']['total_s']:.2f}s [kmeans {row['faiss']['kmeans_s']:.2f} knn {row['faiss']['knn_s']:.2f}]"
        line += (f" | kNN speed-up vs naive x{row['knn_speedup_vs_naive']:.2f}, round x{row['round_speedup_vs_naive']:.2f}, "
                 f"ids agree {100 * row['knn_ids_agree']:.2f}%")
        print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(benchmark="mine", machine=info, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
