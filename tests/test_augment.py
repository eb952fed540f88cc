"""The numpy parameter sampler against torchvision's MoCo v2 `aug_plus` transforms."""

import math

import numpy as np
import pytest
import torch
from torchvision import transforms

from dali_pipelines.augment import (BLUR_SIGMA, BRIGHTNESS, CONTRAST, HUE_DEG, ROI, SATURATION, ViewSpec,
                                    draw_view, moco_views, rrc_window, sample_rng)


class TorchDraws:
    """numpy Generator look-alike drawing from torch's global RNG in get_params' call order."""

    def uniform(self, low, high):
        return torch.empty(1).uniform_(float(low), float(high)).item()

    def random(self):
        return torch.empty(1).uniform_(0.0, 1.0).item()

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        return int(torch.randint(low, high, size=(1,)).item())


@pytest.mark.parametrize("width,height", [(80, 60), (40, 100), (300, 20)])
def test_rrc_window_is_torchvision_get_params(width, height):
    image = torch.zeros(3, height, width)
    torch.manual_seed(0)
    ref = [transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(500)]
    torch.manual_seed(0)
    ours = [rrc_window(TorchDraws(), width, height, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(500)]
    same = sum(tuple(map(int, r)) == o for r, o in zip(ref, ours))
    assert same >= 495  # float32 vs float64 log-ratio can flip a rounding, rarely


def test_rrc_window_distribution_matches_torchvision():
    width, height, n = 90, 64, 4000
    image = torch.zeros(3, height, width)
    torch.manual_seed(1)
    ref = np.array([transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    rng = np.random.default_rng(1)
    ours = np.array([rrc_window(rng, width, height) for _ in range(n)])
    for windows in (ref, ours):
        assert np.all(windows[:, 0] + windows[:, 2] <= height) and np.all(windows[:, 1] + windows[:, 3] <= width)
    area = lambda w: w[:, 2] * w[:, 3] / (width * height)
    log_aspect = lambda w: np.log(w[:, 3] / w[:, 2])
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.allclose(np.quantile(area(ours), qs), np.quantile(area(ref), qs), atol=0.03)
    assert np.allclose(np.quantile(log_aspect(ours), qs), np.quantile(log_aspect(ref), qs), atol=0.04)
    centre = lambda w: (w[:, 1] + w[:, 3] / 2) / width
    assert abs(centre(ours).mean() - centre(ref).mean()) < 0.02


def test_view_rates_and_ranges_match_aug_plus():
    n = 20000
    rng = np.random.default_rng(2)
    draws = [draw_view(rng, 80, 60, ViewSpec(32)) for _ in range(n)]
    params = np.stack([p for p, _ in draws])
    flips = np.array([f for _, f in draws])
    gray = params[:, SATURATION] == 0
    jitter = params[:, BRIGHTNESS] != 1
    blur = params[:, BLUR_SIGMA] > 0
    tol = 4 * math.sqrt(0.25 / n)  # four standard errors of a rate
    assert abs(jitter.mean() - 0.8) < tol and abs(gray.mean() - 0.2) < tol
    assert abs(blur.mean() - 0.5) < tol and abs(flips.mean() - 0.5) < tol
    # independence of the coins (RandomApply / RandomGrayscale draw separately)
    assert abs((jitter & gray).mean() - 0.16) < tol
    # ColorJitter(0.4, 0.4, 0.4, 0.1) factor distributions vs torchvision's get_params
    torch.manual_seed(3)
    ref = np.array([transforms.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))[1:]
                    for _ in range(4000)], dtype=np.float64)
    ours = params[jitter & ~gray][:, [BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG]].astype(np.float64)
    ours[:, 3] /= 360.0  # degrees -> torchvision's fraction of the hue circle
    qs = [0.05, 0.5, 0.95]
    for col in range(4):
        assert np.allclose(np.quantile(ours[:, col], qs), np.quantile(ref[:, col], qs), atol=0.03)
    sigma = params[blur, BLUR_SIGMA]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.02
    # the ROI is the crop window relative to the image
    roi = params[:, ROI]
    assert np.all((roi >= 0) & (roi <= 1)) and np.all(roi[:, 2] > roi[:, 0]) and np.all(roi[:, 3] > roi[:, 1])


def test_linear_view_has_no_colour_augmentation():
    rng = np.random.default_rng(0)
    params = np.stack([draw_view(rng, 50, 50, ViewSpec(32, (0.08, 1.0), color=False))[0] for _ in range(200)])
    assert np.all(params[:, [BRIGHTNESS, CONTRAST, SATURATION]] == 1) and np.all(params[:, [HUE_DEG, BLUR_SIGMA]] == 0)


def test_multires_views_scale_the_crop_range():
    views = moco_views(224, (192, 96))
    assert [v.size for v in views] == [224, 224, 192, 96]
    assert views[0].scale == (0.2, 1.0)
    assert views[2].scale == pytest.approx((0.2 * 192 / 224, 192 / 224))
    assert views[3].scale == pytest.approx((0.2 * 96 / 224, 96 / 224))


def test_sample_rng_is_a_pure_function_of_its_key():
    a = sample_rng(0, 3, 17, 0).random(4)
    assert np.array_equal(a, sample_rng(0, 3, 17, 0).random(4))
    assert not np.array_equal(a, sample_rng(0, 3, 17, 1).random(4))
    assert not np.array_equal(a, sample_rng(0, 4, 17, 0).random(4))


def test_crop_min_scale_bounds_the_crop_area():
    views = moco_views(64, (32,), min_scale=0.5)
    assert [v.scale for v in views] == [(0.5, 1.0), (0.5, 1.0), (0.25, 0.5)]
    assert moco_views(64)[0].scale == (0.2, 1.0)
    rng = np.random.default_rng(0)
    areas = [h * w / (200 * 160) for _, _, h, w in (rrc_window(rng, 200, 160, views[0].scale) for _ in range(400))]
    assert min(areas) > 0.47 and np.mean(areas) > 0.65  # rounding of h, w allows slightly under 0.5; (0.2, 1) gives ~0.55
