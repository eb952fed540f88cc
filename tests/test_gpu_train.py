"""The GPU training path on one CUDA device: no NCCL peers, bf16 autocast, channels_last, mixed
decode, online mining with the torch engine on CUDA. Skipped on CPU-only machines."""

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_single_gpu_clim_multires_run_with_autocast_and_resume(shard_dir, tmp_path):
    from clim_fast.training.checkpoint import model_from_checkpoint
    from clim_fast.config import make_config
    from clim_fast.training.loop import run_training

    cfg = make_config("clim_multires", dict(arch="resnet18", image_size=32, batch_size=16, epochs=2,
                                            queue_size=32, clusters=4, knn_k=4, mine_every=1, log_every=1,
                                            workers=1, mine_engine="torch", checkpoint_every=1))
    run = tmp_path / "run"
    run_training(cfg, shard_dir, run, gpus=1)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2 * (48 // 16) and all(np.isfinite(s["loss"]) for s in steps)
    assert all(s["gpu_mem_gb"] > 0 for s in steps)
    assert sorted(p.name for p in (run / "tables").iterdir()) == ["table-epoch-0000.npz", "table-epoch-0001.npz"]

    cfg3 = make_config("clim_multires", dict(cfg.to_dict(), epochs=3))
    run_training(cfg3, shard_dir, run, gpus=1, resume="auto")
    _, _, ckpt = model_from_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 3
    assert ckpt["scaler"]["scale"] > 0  # precision auto on CUDA: fp16 with loss scaling, resumed with it


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_encoders_run_in_half_precision_close_to_fp32(precision, dtype):
    from clim_fast.config import make_config
    from clim_fast.method.moco import MoCo

    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=32, queue_size=64, batch_size=16,
                                      precision=precision))
    model = MoCo(cfg).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        ref = model.encoder_q([x])[0].float()
        with model.autocast(x):
            low = model.encoder_q([x])[0]
    assert low.dtype == dtype
    assert torch.nn.functional.cosine_similarity(ref, low.float()).min() > 0.98


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_matches_eager(mode):
    """torch.compile of the encoders (config compile=true, compile_mode) gives the eager steps'
    losses and updates; with reduce-overhead the third step on is a replay of the recorded CUDA
    graphs, so four steps cover warm-up, recording and replays."""
    import copy

    from clim_fast.config import make_config
    from clim_fast.method.clim import CLIM
    from clim_fast.training.step import grad_scaler, train_step

    cfg = make_config("clim", dict(arch="resnet18", image_size=32, queue_size=64, batch_size=16, shuffle_bn=False,
                                   precision="fp32"))
    torch.manual_seed(0)
    eager = CLIM(cfg).cuda()
    compiled = copy.deepcopy(eager)
    compiled.compile_encoders(mode=mode)
    assert compiled.uses_cuda_graphs == (mode == "reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [{n: torch.randn(16, 3, 32, 32, device="cuda", generator=g) for n in ("q", "k", "pos", "k_pos")}
               for _ in range(4)]
    results = []
    for model in (eager, compiled):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        scaler = grad_scaler(model, torch.device("cuda"))
        losses = [train_step(model, model, opt, scaler, batch)[0].item() for batch in batches]
        results.append((losses, [p.detach().clone() for p in model.encoder_q.parameters()], model.queue.clone()))
    (l0, p0, q0), (l1, p1, q1) = results
    assert l1 == pytest.approx(l0, rel=1e-3)
    assert torch.allclose(q0, q1, atol=1e-3)
    assert max((a - b).abs().max().item() for a, b in zip(p0, p1)) < 5e-3  # four steps of fp32 rounding


def test_training_step_never_waits_for_the_gpu():
    """A clim_multires step (mixing, shuffle BN, loss, backward, fused SGD, enqueue) issues no
    host-device synchronisation, so the CPU queues the next step while the GPU runs this one."""
    from clim_fast.config import make_config
    from clim_fast.method.clim import CLIM
    from clim_fast.training.step import grad_scaler, train_step
    from dali_pipelines.names import anchor_view_names, positive_view_names

    cfg = make_config("clim_multires", dict(arch="resnet18", image_size=32, queue_size=64, batch_size=16))
    model = CLIM(cfg).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, fused=True)
    scaler = grad_scaler(model, torch.device("cuda"))
    assert scaler.is_enabled()  # precision auto: fp16 with loss scaling
    sizes = {n: int(n.rsplit("_r", 1)[1]) if "_r" in n else 32
             for n in anchor_view_names(cfg.multires_sizes) + positive_view_names(cfg.multires_sizes)}
    batch = {n: torch.randn(16, 3, s, s, device="cuda") for n, s in sizes.items()}

    def step():
        return train_step(model, model, optimizer, scaler, batch)[1]

    step()  # first step: allocations, cudnn autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            terms = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms["loss"]).item()


def test_log_values_reach_the_host_without_waiting_for_the_gpu():
    """A step record's values go to pinned memory without a synchronisation; they are read later."""
    from clim_fast.transfer import HostCopy

    x = torch.randn(1 << 20, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copy = HostCopy({"loss": x.square().mean(), "acc": x.mean()})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    values = copy.values()
    assert sorted(values) == ["acc", "loss"]
    assert values["loss"] == pytest.approx(x.square().mean().item(), rel=1e-5)
    assert values["acc"] == pytest.approx(x.mean().item(), rel=1e-4, abs=1e-6)
