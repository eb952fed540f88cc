"""Per-view augmentation parameters, drawn in numpy (MoCo v2 `aug_plus`).

All randomness of the graphs lives here so a batch is a pure function of (seed, epoch, sample id):
the DALI graph only applies the numbers it is given. One view is a float32 row of PARAMS_PER_VIEW
numbers plus an int flip flag:

    ROI (y0, x0, y1, x1), relative to the decoded image: the RandomResizedCrop window
    BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG: the color_twist factors (identity when the
        ColorJitter coin said no; SATURATION = 0 when RandomGrayscale fired)
    BLUR_SIGMA: Gaussian blur sigma, 0 when the blur coin said no

Mapping to torchvision (what differs, and why it is close enough for contrastive pretraining):
- RandomResizedCrop: `rrc_window` is torchvision's `get_params` line by line (10 attempts, then
  the centre fallback); DALI's resize of the relative ROI then does crop + antialiased resize.
- ColorJitter(0.4, 0.4, 0.4, 0.1): the same factor distributions, but DALI's `color_twist` applies
  them as one affine map in YIQ space in a fixed order (saturation, hue, contrast, brightness)
  instead of torchvision's random order of four clamped steps; contrast pivots on mid-grey (128)
  rather than the image's mean grey, and hue is a YIQ rotation of +-36 degrees rather than an HSV
  hue shift of +-0.1 turns.
- RandomGrayscale(0.2): folded into the same color_twist as saturation 0, which yields exactly
  PIL's luma (0.299, 0.587, 0.114) of the jittered image (without the intermediate clamp).
- GaussianBlur([0.1, 2.0]) p=0.5: same sigma distribution; DALI sizes the kernel from sigma
  (2 * ceil(3 * sigma) + 1) where PIL approximates the Gaussian with box blurs.
- The horizontal flip is drawn last, as in `aug_plus`; it commutes with the other steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROI = slice(0, 4)
BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG, BLUR_SIGMA = 4, 5, 6, 7, 8
PARAMS_PER_VIEW = 9

MOCO_SCALE = (0.2, 1.0)
LINEAR_SCALE = (0.08, 1.0)  # torchvision's default, as in MoCo's main_lincls.py
RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)
JITTER_P, GRAY_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)


@dataclass(frozen=True)
class ViewSpec:
    """One output view: its side in pixels, its crop scale range, and whether the MoCo v2 colour
    and blur augmentations apply (linear-evaluation training uses crop + flip only)."""

    size: int
    scale: tuple[float, float] = MOCO_SCALE
    ratio: tuple[float, float] = RATIO
    color: bool = True


def moco_views(image_size: int, extra_sizes: tuple[int, ...] = (),
               min_scale: float = MOCO_SCALE[0]) -> tuple[ViewSpec, ...]:
    """Two views at `image_size` (query, key), then one per multi-resolution size S whose crop scale
    range is MoCo's (0.2, 1.0) times S / image_size: CLIM's smaller crops cover proportionally
    less of the image, so objects keep roughly their apparent size at the lower resolution.
    `min_scale` replaces MoCo's lower crop bound 0.2 (milder crops for tiny images)."""
    scale = (min_scale, MOCO_SCALE[1])
    views = [ViewSpec(image_size, scale), ViewSpec(image_size, scale)]
    for s in extra_sizes:
        r = s / image_size
        views.append(ViewSpec(s, (scale[0] * r, scale[1] * r)))
    return tuple(views)


def rrc_window(rng: np.random.Generator, width: int, height: int, scale=MOCO_SCALE,
               ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params with numpy draws: (top, left, h, w).

    `lo + (hi - lo) * rng.random()` is exactly what `rng.uniform(lo, hi)` computes (numpy's
    `random_uniform`), at a third of the call cost; `rng.integers(n)` is `rng.integers(0, n)`."""
    area = height * width
    log_lo = math.log(ratio[0])
    log_span = math.log(ratio[1]) - log_lo
    scale_lo, scale_span = scale[0], scale[1] - scale[0]
    random = rng.random
    for _ in range(10):
        target_area = area * (scale_lo + scale_span * random())
        aspect = math.exp(log_lo + log_span * random())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(height - h + 1))
            left = int(rng.integers(width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_B, _C, _S, _H = JITTER
# (low, high - low) exactly as `Generator.uniform(low, high)` computes them, in float64
_B_LO, _B_SPAN = 1 - _B, (1 + _B) - (1 - _B)
_C_LO, _C_SPAN = 1 - _C, (1 + _C) - (1 - _C)
_S_LO, _S_SPAN = 1 - _S, (1 + _S) - (1 - _S)
_HUE_LO, _HUE_SPAN = -_H, _H - (-_H)
_BLUR_LO, _BLUR_SPAN = BLUR_SIGMA_RANGE[0], BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0]


def _draw_view_into(rng: np.random.Generator, width: int, height: int, spec: ViewSpec, p: np.ndarray) -> int:
    """Fill one parameter row `p` in aug_plus order (crop, jitter, gray, blur, flip); returns the
    flip flag. Every draw is the one `uniform`/`integers` would make, in the same order and with
    the same float64 arithmetic (the four jitter factors are one `rng.random(4)`: the same four
    doubles), so the float32 row is bit-identical to the straightforward version's; the values
    are Python floats written into the row at once (small numpy operations cost more than the
    draws)."""
    top, left, h, w = rrc_window(rng, width, height, spec.scale, spec.ratio)
    bright = contrast = sat = 1.0
    hue = sigma = 0.0
    if spec.color:
        random = rng.random
        if random() < JITTER_P:
            u0, u1, u2, u3 = rng.random(4).tolist()
            bright, contrast, sat = _B_LO + _B_SPAN * u0, _C_LO + _C_SPAN * u1, _S_LO + _S_SPAN * u2
            hue = (_HUE_LO + _HUE_SPAN * u3) * 360.0
        if random() < GRAY_P:
            sat = 0.0
        if random() < BLUR_P:
            sigma = _BLUR_LO + _BLUR_SPAN * random()
    p[:] = (top / height, left / width, (top + h) / height, (left + w) / width, bright, contrast, sat, hue, sigma)
    return int(rng.random() < FLIP_P)


def draw_view(rng: np.random.Generator, width: int, height: int, spec: ViewSpec) -> tuple[np.ndarray, int]:
    """One view's parameter row and flip flag, drawn in aug_plus order: crop, jitter, gray, blur, flip."""
    p = np.zeros(PARAMS_PER_VIEW, np.float32)
    flip = _draw_view_into(rng, width, height, spec, p)
    return p, flip


def draw_views(rng: np.random.Generator, width: int, height: int,
               specs: tuple[ViewSpec, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parameters of several views cut from one decoded image: float32[V, 9], int32[V]."""
    params = np.zeros((len(specs), PARAMS_PER_VIEW), np.float32)
    flips = np.empty(len(specs), np.int32)
    for v, spec in enumerate(specs):
        flips[v] = _draw_view_into(rng, width, height, spec, params[v])
    return params, flips


def sample_rng(seed: int, epoch: int, sample_id: int, stream: int) -> np.random.Generator:
    """The generator for one sample's draws in one epoch; stream 0: anchor views, 1: positive."""
    return np.random.default_rng([int(seed), int(epoch), int(sample_id), int(stream)])


# --- the same generators, cheaper: numpy's SeedSequence hashing vectorised over many sample ids ----
# (numpy/random/bit_generator.pyx: SeedSequence.mix_entropy / generate_state, PCG64's seeding in
# pcg64.h). A fresh `default_rng(key)` costs ~11 us, most of it the hashing; here the hashing runs
# once per epoch over the whole share and a sample's generator is one reusable PCG64 whose state
# is set (~2 us). `tests/test_pipelines.py` checks the states against `default_rng` itself.

_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_SHIFT16 = np.uint32(16)
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_MASK128 = (1 << 128) - 1


def seed_words(seed: int, epoch: int, sample_ids, stream: int) -> np.ndarray | None:
    """`SeedSequence([seed, epoch, id, stream]).generate_state(4, uint64)` for every id at once:
    uint64[n, 4]; None when a key part is outside 0..2**32-1 (numpy then splits it into several
    words: use `sample_rng`)."""
    ids = np.asarray(sample_ids, np.int64)
    if not (0 <= seed <= _MASK32 and 0 <= epoch <= _MASK32 and 0 <= stream <= _MASK32) or \
            (len(ids) and (ids.min() < 0 or ids.max() > _MASK32)):
        return None
    n = len(ids)
    entropy = [np.full(n, seed, np.uint32), np.full(n, epoch, np.uint32), ids.astype(np.uint32),
               np.full(n, stream, np.uint32)]
    hash_const = _INIT_A

    def hashmix(value):
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = value * np.uint32(hash_const)  # uint32 arrays wrap around, as the C code does
        return value ^ (value >> _SHIFT16)

    def mix(x, y):
        result = _MIX_L * x - _MIX_R * y
        return result ^ (result >> _SHIFT16)

    mixer = [hashmix(e) for e in entropy]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                mixer[dst] = mix(mixer[dst], hashmix(mixer[src]))
    hash_const = _INIT_B
    words32 = []
    for i in range(8):
        value = mixer[i % 4] ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_B) & _MASK32
        value = value * np.uint32(hash_const)
        words32.append((value ^ (value >> _SHIFT16)).astype(np.uint64))
    return np.stack([words32[2 * k] | (words32[2 * k + 1] << np.uint64(32)) for k in range(4)], axis=1)


def pcg64_state(words) -> tuple[int, int]:
    """PCG64's (state, inc) after seeding with the four uint64 words of `generate_state(4)`."""
    w0, w1, w2, w3 = (int(x) for x in words)
    inc = ((((w2 << 64) | w3) << 1) | 1) & _MASK128
    state = (inc + ((w0 << 64) | w1)) & _MASK128
    return (state * _PCG_MULT + inc) & _MASK128, inc


class RngBank:
    """`sample_rng(seed, epoch, ids[i], stream)` for the ids of one share, as one reused Generator
    whose state is set per call: draws are bit-identical, the generator is valid until the next
    call of `rng`. The seed words are computed per block of BLOCK positions, when first needed
    (a worker touches only its own chunks, and an epoch start costs no pass over the whole share)."""

    BLOCK = 2048

    def __init__(self, seed: int, epoch: int, sample_ids, stream: int):
        self.key = (int(seed), int(epoch), int(stream))
        self.ids = sample_ids
        self.fallback = seed_words(self.key[0], self.key[1], np.zeros(0, np.int64), self.key[2]) is None
        self._blocks: dict[int, np.ndarray | None] = {}
        self._bitgen = np.random.PCG64()
        self._gen = np.random.Generator(self._bitgen)

    def _words(self, i: int) -> np.ndarray | None:
        block = i // self.BLOCK
        words = self._blocks.get(block, False)
        if words is False:
            if len(self._blocks) >= 8:
                self._blocks.clear()
            lo = block * self.BLOCK
            words = seed_words(self.key[0], self.key[1], self.ids[lo:lo + self.BLOCK], self.key[2])
            self._blocks[block] = words
        return None if words is None else words[i - block * self.BLOCK]

    def rng(self, i: int) -> np.random.Generator:
        words = None if self.fallback else self._words(i)
        if words is None:
            seed, epoch, stream = self.key
            return sample_rng(seed, epoch, int(self.ids[i]), stream)
        state, inc = pcg64_state(words)
        self._bitgen.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                              "has_uint32": 0, "uinteger": 0}
        return self._gen


def center_crop_roi(width: int, height: int, size: int) -> np.ndarray:
    """torchvision's Resize(round(size * 256 / 224)) + CenterCrop(size) as a relative ROI (y0, x0,
    y1, x1) of the original image, so one resize of the ROI samples the same grid."""
    short = round(size * 256 / 224)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.array([top / new_h, left / new_w, (top + size) / new_h, (left + size) / new_w], np.float32)
