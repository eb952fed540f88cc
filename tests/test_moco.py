import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from clim_fast.training.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from clim_fast.config import make_config
from shards.errors import UserError
from clim_fast.training.export import export_backbone
from clim_fast.method.backbone import BatchNorm2d, build_backbone
from clim_fast.method.losses import clim_loss, info_nce
from clim_fast.method.moco import MoCo


def tiny_cfg(**over):
    values = dict(arch="resnet18", image_size=16, queue_size=24, batch_size=8, temperature=0.2, ema_momentum=0.9)
    values.update(over)
    return make_config("moco_v2", values)


def test_encoders_start_equal_and_head_is_mlp():
    torch.manual_seed(0)
    model = MoCo(tiny_cfg())
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad
    head = model.encoder_q.head
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 512, 128)
    assert model.queue.shape == (128, 24)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(24))


def test_forward_matches_moco_equations():
    """builder.py transcribed by hand: momentum update, keys, loss against the queue, queue update."""
    torch.manual_seed(0)
    cfg = tiny_cfg(shuffle_bn=False)
    model = MoCo(cfg)
    with torch.no_grad():  # make the encoders differ so the momentum update matters
        for p in model.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue0, m, T = model.queue.clone(), cfg.ema_momentum, cfg.temperature

    for _ in range(4):  # 4 x 8 keys through a queue of 24: the pointer wraps around
        loss, terms = model({"q": im_q, "k": im_k})
        model.enqueue_keys()
        q = F.normalize(enc_q(im_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(enc_q.parameters(), enc_k.parameters()):
                pk.data = pk.data * m + pq.data * (1.0 - m)
            k = F.normalize(enc_k(im_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue0], dim=1) / T
        expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert set(terms) == {"loss", "loss_moco"}
        queue0 = queue0.clone()
        start = (int(model.queue_ptr) - 8) % 24
        queue0[:, start:start + 8] = k.T
        assert torch.allclose(model.queue, queue0, atol=1e-6)
    assert int(model.queue_ptr) == (4 * 8) % 24
    for pk, pk_ref in zip(model.encoder_k.parameters(), enc_k.parameters()):
        assert torch.allclose(pk, pk_ref, atol=1e-6)


def test_momentum_update_formula():
    torch.manual_seed(1)
    model = MoCo(tiny_cfg(ema_momentum=0.99))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.normal_()
    for convert in (lambda m: m, lambda m: m.to(torch.float64), copy.deepcopy):
        model = convert(model)  # the parameter lists are kept from the first update: still the model's
        before = [p.clone() for p in model.encoder_k.parameters()]
        model.momentum_update()
        for k0, q, k1 in zip(before, model.encoder_q.parameters(), model.encoder_k.parameters()):
            assert torch.allclose(k1, 0.99 * k0 + 0.01 * q, atol=1e-6)


def test_queue_rejects_a_batch_that_does_not_divide_it():
    with pytest.raises(UserError, match="queue_size 20 must be a multiple of the global batch_size 8"):
        tiny_cfg(queue_size=20, batch_size=8)
    model = MoCo(tiny_cfg(queue_size=24, batch_size=8))
    with pytest.raises(ValueError, match="multiple"):
        model.dequeue_and_enqueue(torch.randn(5, 128))
    with pytest.raises(RuntimeError, match="without a forward"):
        model.enqueue_keys()


def test_single_process_shuffle_bn_is_grouped_batchnorm_on_a_permutation():
    torch.manual_seed(2)
    model = MoCo(tiny_cfg(shuffle_bn_groups=4)).train()
    x = torch.randn(8, 3, 16, 16)
    model.shuffle_generator.manual_seed(7)
    keys = model.keys(x)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    ref = torch.empty(8, 128)
    with torch.no_grad():
        for chunk in perm.view(4, 2):
            ref[chunk] = F.normalize(model.encoder_k(x[chunk]), dim=1)
    assert torch.allclose(keys, ref, atol=1e-5)
    # and it is not the whole-batch BN result: the groups matter
    with torch.no_grad():
        whole = F.normalize(model.encoder_k(x), dim=1)
    assert not torch.allclose(keys, whole, atol=1e-3)


def test_clim_loss_formula():
    torch.manual_seed(3)
    n, d, K, T = 6, 16, 10, 0.2
    unit = lambda *s: F.normalize(torch.randn(*s), dim=-1)
    q, k, k_pos, queue = unit(n, d), unit(n, d), unit(n, d), unit(K, d).T
    mixed = [(unit(n, d), torch.rand(n)), (unit(n, d), torch.rand(n))]

    def nce(a, b):  # -log softmax of the positive among [pos, queue]
        logits = torch.cat([(a * b).sum(1, keepdim=True), a @ queue], 1) / T
        return -torch.log_softmax(logits, 1)[:, 0]

    mix_terms = [(lam * nce(qm, k) + (1 - lam) * nce(qm, k_pos)).mean() for qm, lam in mixed]
    expected = nce(q, k).mean() + 0.5 * (mix_terms[0] + mix_terms[1]) / 2
    loss, terms = clim_loss(q, k, queue, T, mixed, k_pos, mix_weight=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["loss_moco"].item() == pytest.approx(nce(q, k).mean().item(), rel=1e-5)
    assert torch.allclose(info_nce(q, k, queue, T), nce(q, k), atol=1e-5)
    plain, _ = clim_loss(q, k, queue, T)
    assert plain.item() == pytest.approx(nce(q, k).mean().item(), rel=1e-5)


def test_key_features_are_normalised_eval_mode_and_restore_mode():
    model = MoCo(tiny_cfg()).train()
    x = torch.randn(4, 3, 16, 16)
    head, back = model.key_features(x, "head"), model.key_features(x, "backbone")
    assert head.shape == (4, 128) and back.shape == (4, 512)
    assert torch.allclose(head.norm(dim=1), torch.ones(4), atol=1e-5)
    assert model.encoder_k.training
    with torch.no_grad():
        model.encoder_k.eval()
        ref = F.normalize(model.encoder_k.backbone(x[:1]), dim=1)
    assert torch.allclose(model.key_features(x[:1], "backbone"), ref, atol=1e-5)  # eval BN: batch-independent


def _checkpoint(tmp_path, model, cfg, name="c.pt", epoch=1):
    path = tmp_path / name
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch}, path)
    return path


def test_export_loads_into_torchvision_resnet(tmp_path):
    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=224, queue_size=256, batch_size=256))
    torch.manual_seed(4)
    model = MoCo(cfg)
    ckpt = _checkpoint(tmp_path, model, cfg)
    summary = export_backbone(ckpt, tmp_path / "r18.pth")
    assert summary["arch"] == "resnet18" and "note" not in summary
    net = torchvision.models.resnet18(num_classes=7)
    result = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net.eval()(x), model.encoder_q.backbone.eval()(x), atol=1e-5)


def test_backbone_batchnorm_is_torchs_without_the_batch_count():
    """backbone.BatchNorm2d: the outputs, running statistics and gradients of nn.BatchNorm2d in
    training and eval mode; only num_batches_tracked stays 0 (one kernel launch less per call)."""
    torch.manual_seed(5)
    ours, ref = BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 5) * (step + 1) + step
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        (yo * x).sum().backward(), (yr * x).sum().backward()
        assert torch.allclose(yo, yr, atol=1e-6) and torch.allclose(xo.grad, xr.grad, atol=1e-5)
        assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-5)
    assert torch.equal(ours.running_mean, ref.running_mean) and torch.equal(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 0 and int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    backbone, _ = build_backbone("resnet18", 32)
    assert all(type(m) is BatchNorm2d for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a clim-fast checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_resume_auto_skips_a_torn_last_checkpoint(tmp_path):
    cfg = tiny_cfg()
    model = MoCo(cfg)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _checkpoint(folder.parent, model, cfg, "checkpoints/epoch-0002.pt", epoch=2)
    _checkpoint(folder.parent, model, cfg, "checkpoints/epoch-0001.pt", epoch=1)
    (folder / "last.pt").write_bytes(b"torn")
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "epoch-0002.pt" and ckpt["epoch"] == 2
    assert find_resume_checkpoint(tmp_path / "nothing") is None


def test_precision_picks_the_autocast_and_image_dtypes():
    """auto: fp16 on CUDA (cuDNN batch norm; loss scaling in training.step), fp32 on the CPU; the
    loaders hand fp16 images only to fp16 encoders (DALI has no bf16)."""
    from clim_fast.method.moco import autocast_dtype, image_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype("auto", cuda) == torch.float16 and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cuda) == torch.bfloat16 and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert image_dtype("auto", cuda) == torch.float16 and image_dtype("fp16", cuda) == torch.float16
    assert image_dtype("bf16", cuda) == torch.float32 and image_dtype("auto", cpu) == torch.float32


def test_export_of_a_small_image_run_loads_into_a_torchvision_resnet_with_its_stem(tmp_path):
    """Under 96 px the backbone has a 3x3 stride-1 conv1 and no maxpool: the export says so, and a
    torchvision ResNet built that way gives the backbone's outputs."""
    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=32, queue_size=256, batch_size=256))
    torch.manual_seed(5)
    model = MoCo(cfg)
    summary = export_backbone(_checkpoint(tmp_path, model, cfg), tmp_path / "r18.pth")
    assert "conv1 is 3x3 stride 1 and there is no maxpool" in summary["note"]
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = torch.nn.Identity()
    result = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net.eval()(x), model.encoder_q.backbone.eval()(x), atol=1e-5)


def test_export_of_a_narrow_run_says_how_to_build_it_and_loads_that_way(tmp_path):
    from clim_fast.method.backbone import resnet

    cfg = make_config("moco_v2", dict(arch="resnet18", image_size=224, width=16, queue_size=256, batch_size=256))
    torch.manual_seed(6)
    model = MoCo(cfg)
    summary = export_backbone(_checkpoint(tmp_path, model, cfg), tmp_path / "r18.pth")
    assert summary["width"] == 16 and "resnet('resnet18', width=16)" in summary["note"]
    net = resnet("resnet18", width=16)
    result = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("fc.") for k in result.missing_keys)
