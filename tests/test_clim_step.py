"""The CLIM training step (`CLIM.forward`, the one the loop trains with) against a re-derivation
written from the method's equations: query and mixed-query encodings, the momentum update before
the keys, InfoNCE against the queue as it was, lambda weights, and only k enqueued."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clim_fast.config import make_config
from clim_fast.method.clim import CLIM
from clim_fast.method.mixing import mix_images


def cfg_for(preset="clim_multires", **over):
    values = dict(arch="resnet18", image_size=32, queue_size=16, batch_size=8, temperature=0.2, ema_momentum=0.9,
                  shuffle_bn=False, mix_weight=0.7, seed=3)
    values.update(over)
    return make_config(preset, values)


def batch_for(cfg, positives=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = lambda s: torch.randn(8, 3, s, s, generator=g)  # noqa: E731
    batch = {"q": views(32), "k": views(32)}
    if positives:
        batch.update(pos=views(32), k_pos=views(32))
        for s in cfg.multires_sizes:
            batch[f"q_r{s}"], batch[f"pos_r{s}"] = views(s), views(s)
    return batch


def nce(a, b, queue, T):
    """-log of the softmax weight of the positive pair among [a.b, a.queue] (per sample)."""
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ queue], 1) / T
    return -torch.log_softmax(logits, 1)[:, 0]


def perturbed(model):
    with torch.no_grad():  # query and key encoders differ, so the momentum update is visible
        for p in model.encoder_q.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset", ["clim_multires", "clim_mixup"])
def test_clim_step_matches_the_equations(preset):
    torch.manual_seed(0)
    cfg = cfg_for(preset, multires=True)
    model = perturbed(CLIM(cfg, rank=1)).train()
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    enc_k_before = copy.deepcopy(model.encoder_k)
    queue0 = model.queue.clone()
    batch = batch_for(cfg)

    loss, terms = model(batch)

    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + 1)  # rank 1's mixing stream
    pairs = [("q", "pos")] + [(f"q_r{s}", f"pos_r{s}") for s in cfg.multires_sizes]
    assert len(pairs) == 5
    mixed = [mix_images(cfg.mix, batch[a], batch[p], cfg.alpha, gen) for a, p in pairs]
    q = F.normalize(enc_q(batch["q"]), dim=1)
    q_mix = [F.normalize(enc_q(x), dim=1) for x, _ in mixed]
    with torch.no_grad():
        for pq, pk in zip(enc_q.parameters(), enc_k.parameters()):
            pk.mul_(cfg.ema_momentum).add_(pq, alpha=1 - cfg.ema_momentum)
        k = F.normalize(enc_k(batch["k"]), dim=1)
        k_pos = F.normalize(enc_k(batch["k_pos"]), dim=1)
        k_stale = F.normalize(enc_k_before(batch["k"]), dim=1)
    T = cfg.temperature
    mix_terms = [(lam * nce(qm, k, queue0, T) + (1 - lam) * nce(qm, k_pos, queue0, T)).mean()
                 for qm, (_, lam) in zip(q_mix, mixed)]
    expected_moco = nce(q, k, queue0, T).mean()
    expected = expected_moco + cfg.mix_weight * torch.stack(mix_terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["loss_moco"].item() == pytest.approx(expected_moco.item(), rel=1e-5)
    # keys come from the momentum-updated encoder, not the one before the update
    wrong = nce(q, k_stale, queue0, T).mean()
    assert abs(wrong.item() - expected_moco.item()) > 1e-4

    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    model.enqueue_keys()  # only k (the anchor's key) enters the queue
    assert torch.allclose(model.queue[:, :8], k.T, atol=1e-5)
    assert torch.equal(model.queue[:, 8:], queue0[:, 8:])
    assert int(model.queue_ptr) == 8


def test_without_positives_the_step_is_moco_v2():
    torch.manual_seed(1)
    cfg = cfg_for("clim", multires=False)
    model = perturbed(CLIM(cfg))
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue0 = model.queue.clone()
    batch = batch_for(cfg, positives=False)
    mix_state = model.mix_generator.get_state()
    loss, terms = model(batch)
    with torch.no_grad():
        for pq, pk in zip(enc_q.parameters(), enc_k.parameters()):
            pk.mul_(cfg.ema_momentum).add_(pq, alpha=1 - cfg.ema_momentum)
        k = F.normalize(enc_k(batch["k"]), dim=1)
    expected = nce(F.normalize(enc_q(batch["q"]), dim=1), k, queue0, cfg.temperature).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "loss_mix" not in terms
    assert torch.equal(model.mix_generator.get_state(), mix_state)  # no mixing draws were spent


def test_the_mixed_query_sees_the_positive():
    """Changing only the positive's views changes the loss; with lambda = 1 everywhere it would not."""
    torch.manual_seed(2)
    cfg = cfg_for("clim", multires=False)
    a, b = CLIM(cfg), CLIM(cfg)
    b.load_state_dict(a.state_dict())
    batch = batch_for(cfg)
    other = dict(batch, pos=torch.randn_like(batch["pos"]))
    assert a(batch)[0].item() != pytest.approx(b(other)[0].item(), rel=1e-4)


def test_compiled_encoders_trace_three_graphs_and_give_the_eager_steps():
    """compile_encoders: the six query views of clim_multires cost two query graphs (image_size,
    then dynamic height and width for the four smaller sizes) and one key graph, not one per size;
    the steps through the traced graphs equal the eager steps. (A counting backend runs the traced
    graphs as they are; the inductor build is the GPU test's.)"""
    torch.manual_seed(0)
    cfg = cfg_for("clim_multires", shuffle_bn=True, shuffle_bn_groups=2)
    eager = CLIM(cfg)
    compiled = copy.deepcopy(eager)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled.compile_encoders(backend=counting_backend)
    outcomes = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        losses = []
        for step in range(2):
            loss, _ = model(batch_for(cfg, seed=step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.enqueue_keys()
            losses.append(loss.item())
        outcomes.append((losses, model.queue.clone(), [p.detach().clone() for p in model.encoder_q.parameters()]))
    assert len(graphs) == 3
    (losses0, queue0, params0), (losses1, queue1, params1) = outcomes
    assert losses1 == pytest.approx(losses0, rel=1e-5)
    assert torch.allclose(queue0, queue1, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(params0, params1)) < 1e-5


def test_compile_mode_reaches_torch_compile_and_cuda_graph_steps_are_marked(monkeypatch):
    """compile_mode goes to torch.compile as its mode (none for "default"); with reduce-overhead
    every train_step first tells torch a new step begins (a CUDA graph's outputs of the last step
    may be overwritten), and without it never does."""
    from clim_fast.training.step import grad_scaler, train_step

    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, expected in (("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"}),
                           ("max-autotune", {"mode": "max-autotune"})):  # max-autotune uses CUDA graphs too
        calls.clear(), marks.clear()
        cfg = cfg_for("moco_v2", compile=True, compile_mode=mode)
        model = CLIM(cfg)
        model.compile_encoders(mode=cfg.compile_mode)
        assert calls == [{"backend": "inductor", **expected}] * 2  # query and key encoder
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        scaler = grad_scaler(model, torch.device("cpu"))
        for step in range(2):
            train_step(model, model, optimizer, scaler, batch_for(cfg, seed=step))
        assert len(marks) == (0 if mode == "default" else 2)
