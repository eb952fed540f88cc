"""Shuffle BN across ranks: what each rank receives and how long the exchange takes, side by side
in one run. Baseline: MoCo's reference (every rank all-gathers the whole global batch of key
images, then picks its shuffled share); ours: `MoCo._keys_shuffled_across_ranks`'s exchange
(`distributed.shuffled_share`: each rank receives only the images it encodes). Both move the
same fp16 channels_last images and hand each rank the same shuffled share (checked); the encoder
is left out, so the time is the exchange alone.

    python bench/shuffle_bn.py [--world 2] [--batch 32] [--image-size 224] [--reps 5] [--json out.json]

Runs `--world` gloo processes on the CPU (loopback TCP): on a few cores the times are rough, the
bytes are exact. At W ranks the baseline receives (W - 1) x B images a rank, ours (W - 1) x B / W
on average.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from clim_fast.machine import machine_info  # noqa: E402


def gathered_share(images: torch.Tensor, perm: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """The baseline: the whole global batch on every rank, then this rank's shuffled share."""
    from clim_fast import distributed as dist

    return dist.all_gather_cat(images)[perm.view(world, -1)[rank]]


def worker(rank: int, port: int, args, out: Path) -> None:
    import torch.distributed as tdist

    from clim_fast import distributed as dist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(rank)
        s = args.image_size
        images = torch.randn(args.batch, 3, s, s, generator=g).half().contiguous(memory_format=torch.channels_last)
        perms = torch.Generator().manual_seed(0)
        rows = {}
        ours = lambda images, perm, world, rank: dist.shuffled_share(images, perm)  # noqa: E731
        for name, share in (("all_gather_baseline", gathered_share), ("all_to_all_ours", ours)):
            perm = torch.randperm(args.world * args.batch, generator=perms)
            share(images, perm, args.world, rank)  # warm-up: buffers, connections
            times = []
            for _ in range(args.reps):
                tdist.barrier()
                t0 = time.perf_counter()
                share(images, perm, args.world, rank)
                times.append(time.perf_counter() - t0)
            received = args.batch * (args.world - 1) if share is gathered_share else \
                int((perm[rank * args.batch:(rank + 1) * args.batch] // args.batch != rank).sum())
            rows[name] = {"ms": 1000 * min(times), "images_received": received,
                          "mb_received": received * images[0].numel() * images.element_size() / 1e6}
        perm = torch.randperm(args.world * args.batch, generator=torch.Generator().manual_seed(9))
        same = torch.equal(gathered_share(images, perm, args.world, rank), dist.shuffled_share(images, perm))
        (out / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "same_share": same}))
    finally:
        tdist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="images a rank")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    import tempfile

    from clim_fast.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(free_port(), args, Path(tmp)), nprocs=args.world, start_method="spawn")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.world)]
    result = {"machine": machine_info(), "world": args.world, "batch_per_rank": args.batch,
              "image_size": args.image_size, "same_share_on_every_rank": all(r["same_share"] for r in ranks)}
    for name in ("all_gather_baseline", "all_to_all_ours"):
        result[name] = {"ms_slowest_rank": max(r["rows"][name]["ms"] for r in ranks),
                        "mb_received_per_rank": sum(r["rows"][name]["mb_received"] for r in ranks) / args.world}
    base, ours = result["all_gather_baseline"], result["all_to_all_ours"]
    result["ratio_time"] = base["ms_slowest_rank"] / ours["ms_slowest_rank"]
    result["ratio_bytes"] = base["mb_received_per_rank"] / ours["mb_received_per_rank"]
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
