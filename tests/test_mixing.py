import numpy as np
import pytest
import torch
from scipy import stats

from clim_fast.method.mixing import box_masks, cutmix, cutmix_boxes, mix_images, mixup, sample_beta


def _pair(n=64, h=20, w=24, device="cpu"):
    a = torch.arange(n * 3 * h * w, dtype=torch.float32, device=device).view(n, 3, h, w)
    return a, -1.0 - a  # every pixel tells which source it came from


def _check_cutmix(device):
    a, b = _pair(device=device)
    g = torch.Generator().manual_seed(0)
    mixed, lam = cutmix(a, b, 2.0, g)
    assert mixed.device == a.device and lam.device == a.device and lam.shape == (64,)
    # rebuild the boxes from the same generator state: pixels inside come from b, outside from a
    g2 = torch.Generator().manual_seed(0)
    lam_raw = sample_beta(64, 2.0, g2)
    boxes = cutmix_boxes(lam_raw, 20, 24, g2)
    for i in range(64):
        y1, y2, x1, x2 = boxes[i].tolist()
        inside = torch.zeros(20, 24, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        expected = torch.where(inside.to(device), b[i], a[i])
        assert torch.equal(mixed[i], expected)
        from_anchor = (mixed[i, 0] >= 0).float().mean().item()
        assert lam[i].item() == pytest.approx(from_anchor, abs=1e-6)  # lam is the true area share
        assert lam[i].item() == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (20 * 24), abs=1e-6)


def test_cutmix_regions_are_pixel_exact_and_lambda_is_the_area():
    _check_cutmix("cpu")


@pytest.mark.gpu
def test_cutmix_on_cuda_matches_cpu():
    _check_cutmix("cuda")
    a, b = _pair()
    m_cpu, l_cpu = cutmix(a, b, 2.0, torch.Generator().manual_seed(3))
    m_gpu, l_gpu = cutmix(a.cuda(), b.cuda(), 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(m_cpu, m_gpu.cpu()) and torch.equal(l_cpu, l_gpu.cpu())


def test_box_follows_cutmix_rand_bbox():
    lam = torch.tensor([0.75, 0.0, 1.0])
    g = torch.Generator().manual_seed(1)
    boxes = cutmix_boxes(lam, 16, 16, g)
    cy, cx = torch.randint(0, 16, (3,), generator=torch.Generator().manual_seed(1)), None
    g3 = torch.Generator().manual_seed(1)
    cy = torch.randint(0, 16, (3,), generator=g3)
    cx = torch.randint(0, 16, (3,), generator=g3)
    cut = [int(16 * np.sqrt(1 - v)) for v in lam.tolist()]  # rand_bbox: int(W * sqrt(1 - lam))
    for i in range(3):
        assert boxes[i].tolist() == [int(np.clip(int(cy[i]) - cut[i] // 2, 0, 16)), int(np.clip(int(cy[i]) + cut[i] // 2, 0, 16)),
                                     int(np.clip(int(cx[i]) - cut[i] // 2, 0, 16)), int(np.clip(int(cx[i]) + cut[i] // 2, 0, 16))]
    assert box_masks(boxes, 16, 16, "cpu")[2].sum() == 0  # lam 1: nothing pasted


def test_lambda_is_beta_distributed():
    lam = sample_beta(4000, 2.0, torch.Generator().manual_seed(0)).numpy()
    assert stats.kstest(lam, stats.beta(2.0, 2.0).cdf).pvalue > 0.01
    assert stats.kstest(lam, stats.beta(0.2, 0.2).cdf).pvalue < 1e-6  # the test can tell them apart
    small = sample_beta(4000, 0.2, torch.Generator().manual_seed(1)).numpy()
    assert stats.kstest(small, stats.beta(0.2, 0.2).cdf).pvalue > 0.01


def test_cutmix_lambda_mean_close_to_beta_mean():
    a, b = _pair(n=2000, h=32, w=32)
    _, lam = cutmix(a, b, 2.0, torch.Generator().manual_seed(5))
    # clipping only shrinks boxes, so the true share sits above Beta(2,2)'s mean 0.5
    assert 0.5 < lam.mean().item() < 0.75
    assert lam.min() >= 0 and lam.max() <= 1


def test_mixup_blend():
    a, b = _pair(n=16)
    mixed, lam = mixup(a, b, 0.2, torch.Generator().manual_seed(0))
    expected = lam.view(-1, 1, 1, 1) * a + (1 - lam.view(-1, 1, 1, 1)) * b
    assert torch.allclose(mixed, expected)
    assert ((lam >= 0) & (lam <= 1)).all()


def test_same_generator_same_result_and_dispatch():
    a, b = _pair(n=8)
    m1, l1 = mix_images("cutmix", a, b, 2.0, torch.Generator().manual_seed(9))
    m2, l2 = mix_images("cutmix", a, b, 2.0, torch.Generator().manual_seed(9))
    assert torch.equal(m1, m2) and torch.equal(l1, l2)
    with pytest.raises(Exception):
        mix_images("nope", a, b, 2.0, torch.Generator())


def test_cutmix_scalars_depend_only_on_the_generator():
    # lambdas and boxes are drawn and computed on the CPU, so the images' dtype (and device)
    # cannot change them: the same seed gives the same lam and the same pasted region
    a, b = _pair(n=32, h=24, w=20)
    ref_mixed, ref_lam = cutmix(a, b, 2.0, torch.Generator().manual_seed(11))
    ref_inside = ref_mixed[:, 0] < 0
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        mixed, lam = cutmix(a.to(dtype), b.to(dtype), 2.0, torch.Generator().manual_seed(11))
        assert lam.dtype == torch.float32 and torch.equal(lam, ref_lam)
        assert torch.equal(mixed[:, 0] < 0, ref_inside)
    _, lam_mix = mixup(a, b, 0.2, torch.Generator().manual_seed(4))
    _, lam_mix16 = mixup(a.half(), b.half(), 0.2, torch.Generator().manual_seed(4))
    assert torch.equal(lam_mix, lam_mix16)
    assert sample_beta(8, 2.0, torch.Generator().manual_seed(2)).device.type == "cpu"


@pytest.mark.gpu
def test_cutmix_and_mixup_lambdas_identical_on_cpu_and_cuda():
    a, b = _pair(n=256, h=32, w=32)
    for fn, alpha in ((cutmix, 2.0), (mixup, 0.2)):
        m_cpu, l_cpu = fn(a, b, alpha, torch.Generator().manual_seed(5))
        m_gpu, l_gpu = fn(a.cuda(), b.cuda(), alpha, torch.Generator().manual_seed(5))
        assert l_gpu.device.type == "cuda" and torch.equal(l_cpu, l_gpu.cpu())
        if fn is cutmix:
            assert torch.equal(m_cpu, m_gpu.cpu())
