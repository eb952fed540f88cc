"""The collectives on 2 gloo processes: channels_last batches stay channels_last through the
shuffle-BN gather and exchange, a failure on one rank is raised on every rank, and shuffle BN
across ranks gives the single process's grouped keys while each rank receives only its own images."""

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


def _exchange_worker(rank, port, out):
    import torch.distributed as dist

    from clim_fast.distributed import all_to_all_rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = (torch.arange(3 * 24.0).view(3, 2, 3, 4) + 1000 * rank).contiguous(memory_format=torch.channels_last)
        # rank 0 keeps row 0 and sends rows 1-2 to rank 1; rank 1 sends row 0 to rank 0, keeps rows 1-2
        y = all_to_all_rows(x, [1, 2] if rank == 0 else [1, 2], [1, 1] if rank == 0 else [2, 2])
        other = x + (1000 if rank == 0 else -1000)
        ref = torch.stack([x[0], other[0]] if rank == 0 else [other[1], other[2], x[1], x[2]])
        ok = torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)
        (out / f"rank{rank}.txt").write_text(str(bool(ok)))
    finally:
        dist.destroy_process_group()


def test_all_to_all_rows_sends_each_rank_its_rows_and_keeps_channels_last(tmp_path):
    from clim_fast.distributed import free_port

    mp.start_processes(_exchange_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["True", "True"]


def _moco(groups):
    from clim_fast.config import make_config
    from clim_fast.method.moco import MoCo

    torch.manual_seed(4)
    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=16, queue_size=32, batch_size=16,
                                      shuffle_bn_groups=groups))
    model = MoCo(cfg).train()
    model.shuffle_generator.manual_seed(11)
    return model


def _global_batch():
    return torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _shuffle_worker(rank, port, out):
    import torch.distributed as dist

    import clim_fast.distributed as cdist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gathered = []
        original = cdist.all_gather_cat
        cdist.all_gather_cat = lambda t: gathered.append(tuple(t.shape)) or original(t)
        model = _moco(groups=1)
        keys = [model.keys(_global_batch()[rank * 8:(rank + 1) * 8]) for _ in range(2)]  # two draws
        torch.save({"keys": keys, "gathered": gathered}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_across_ranks_gives_the_grouped_keys_of_one_process(tmp_path):
    """Rank s encodes positions perm[8s:8s+8] of the global batch: the same groups, so the same keys,
    as one process with shuffle_bn_groups=2 on the whole batch; only keys are all-gathered."""
    from clim_fast.distributed import free_port

    mp.start_processes(_shuffle_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = _moco(groups=2)
    for draw in range(2):
        expected = single.keys(_global_batch())
        got = torch.cat([ranks[0]["keys"][draw], ranks[1]["keys"][draw]])
        assert torch.allclose(got, expected, atol=1e-5)
    assert all(shape == (8, 128) for r in ranks for shape in r["gathered"])  # no image was gathered


def _stop_worker(rank, port, out):
    import torch.distributed as dist

    from clim_fast.training.loop import StopFlag

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop = StopFlag(torch.device("cpu"))
        try:
            decisions = []
            for iteration in range(1, 31):
                if rank == 1 and iteration == 7:
                    stop.signum = 15  # SIGTERM reaches rank 1 only
                decisions.append(stop.agreed(iteration))
        finally:
            stop.restore()
        (out / f"rank{rank}.txt").write_text(",".join(str(i + 1) for i, d in enumerate(decisions) if d))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_stop_at_the_same_step_one_round_after_the_signal(tmp_path):
    """A signal on one rank stops every rank at the same iteration: the flags summed at iteration
    10 are acted on at 20 (and at every agreement point after), so no rank waits for the GPU's queue
    to read them."""
    from clim_fast.distributed import free_port

    mp.start_processes(_stop_worker, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["20,30", "20,30"]
