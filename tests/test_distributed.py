"""The collectives on 2 gloo processes: channels_last batches stay channels_last through the
shuffle-BN gather, and a failure on one rank is raised on every rank."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp


def _gather_worker(rank, port, out):
    import torch.distributed as dist

    from clim_fast.distributed import all_gather_cat, raise_if_any_failed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = (torch.arange(120.0).view(2, 3, 4, 5) + 1000 * rank).contiguous(memory_format=torch.channels_last)
        y = all_gather_cat(x)
        ref = torch.cat([torch.arange(120.0).view(2, 3, 4, 5), torch.arange(120.0).view(2, 3, 4, 5) + 1000])
        ok = torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)
        try:
            raise_if_any_failed(ValueError("boom") if rank == 1 else None, "the test step")
            raised = ""
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            raised = str(e)
        (out / f"rank{rank}.txt").write_text(f"{ok}|{raised}")
    finally:
        dist.destroy_process_group()


def test_gather_keeps_channels_last_and_failures_reach_every_rank(tmp_path):
    from clim_fast.distributed import free_port

    mp.start_processes(_gather_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split("|") for r in (0, 1))
    assert r0[0] == r1[0] == "True"
    assert r0[1] == "the test step failed on rank 1: ValueError: boom"
    assert r1[1] == "boom"
