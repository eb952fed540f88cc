"""DALI graphs on the CPU: epoch contract, positives, the graph against a numpy/PIL application of
the same parameters, statistics against torchvision's aug_plus, feature/linear loaders, errors."""

import io
import math
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from shards.errors import UserError
from shards.neighbours import NeighbourTable
from dali_pipelines import FeatureLoader, LinearLoader, PretrainLoader, epoch_share
from dali_pipelines.augment import BLUR_SIGMA, BRIGHTNESS, CONTRAST, HUE_DEG, SATURATION, moco_views
from dali_pipelines.ops import IMAGENET_MEAN, IMAGENET_STD
from dali_pipelines.external import AugmentSource
from shards import ShardDataset

SIZE = 32
BATCH = 8  # 48 samples -> 6 steps per epoch


def random_table(ds, k=3, seed=0):
    rng = np.random.default_rng(seed)
    n = ds.num_samples
    positives = np.full((n, k), -1, np.int32)
    counts = rng.integers(1, k + 1, n).astype(np.int32)
    for i in range(n):
        positives[i, :counts[i]] = rng.choice(np.delete(np.arange(n), i), counts[i], replace=False)
    return NeighbourTable(positives, counts, np.zeros(n, np.int32), {"dataset_id": ds.dataset_id})


@pytest.fixture(scope="module")
def dataset(shard_dir):
    return ShardDataset(shard_dir)


@pytest.fixture(scope="module")
def table(dataset):
    return random_table(dataset)


@pytest.fixture(scope="module")
def parallel_run(shard_dir, table):
    """Epochs 0 and 1 with a table, 2 spawned workers, the pipeline reused across the epoch boundary."""
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=SIZE, workers=2, table=table,
                            multires_sizes=(24, 16), seed=5)
    epochs = []
    for e in (0, 1):
        loader.set_epoch(e)
        epochs.append(list(loader))
    loader.close()
    return epochs


def same_batches(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_one_rank_epoch_is_the_seeded_permutation(parallel_run, dataset):
    for epoch, batches in enumerate(parallel_run):
        assert len(batches) == 6
        ids = torch.cat([b["id"] for b in batches]).numpy()
        assert np.array_equal(ids, epoch_share(48, BATCH, 0, 1, seed=5, epoch=epoch))
        labels = torch.cat([b["label"] for b in batches]).numpy()
        assert np.array_equal(labels, dataset.labels[ids])
        b = batches[0]
        assert b["q"].shape == b["k"].shape == b["pos"].shape == b["k_pos"].shape == (BATCH, 3, SIZE, SIZE)
        assert b["q_r24"].shape == b["pos_r24"].shape == (BATCH, 3, 24, 24) and b["q_r16"].shape[-1] == 16
        assert b["q"].dtype == torch.float32 and b["id"].dtype == torch.int64 and b["pos_id"].shape == (BATCH,)
        assert not torch.equal(b["q"], b["k"])


def test_resume_and_worker_count_give_identical_batches(parallel_run, shard_dir, table):
    """A fresh in-process pipeline started at epoch 1 = epoch 1 of the 2-worker pipeline that ran
    through epoch 0 and was reset: batches depend on (seed, epoch, rank, table) only."""
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                            multires_sizes=(24, 16), seed=5)
    loader.set_epoch(1)
    assert same_batches(list(loader), parallel_run[1])
    loader.set_epoch(0)  # a jump back rebuilds
    assert same_batches(list(loader), parallel_run[0])
    loader.close()


def test_two_ranks_split_each_global_batch(shard_dir):
    loaders = [PretrainLoader(shard_dir, batch_size=BATCH, image_size=16, rank=r, world_size=2, workers=0, seed=1)
               for r in range(2)]
    for epoch in (0, 3):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append(list(loader))
        assert [len(b) for b in per_rank] == [6, 6]
        assert all(b["q"].shape[0] == BATCH // 2 and set(b) == {"q", "k", "id", "label"} for b in per_rank[0])
        ids = [torch.cat([b["id"] for b in batches]).numpy() for batches in per_rank]
        assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 48
        for r in range(2):
            assert np.array_equal(ids[r], epoch_share(48, BATCH, r, 2, seed=1, epoch=epoch))
    for loader in loaders:
        loader.close()


def test_table_is_picked_up_at_the_next_epoch(shard_dir, table):
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=16, workers=0)
    first = next(iter(loader))
    assert "pos" not in first
    loader.set_table(table)
    assert "pos" not in next(iter(loader))  # still the old epoch's configuration
    loader.set_epoch(1)
    batch = next(iter(loader))
    assert {"pos", "k_pos", "pos_id"} <= set(batch)
    loader.set_table(None)
    loader.set_epoch(2)
    assert "pos" not in next(iter(loader))
    loader.close()


def test_positives_come_from_the_anchor_row(parallel_run, table):
    for batches in parallel_run:
        for b in batches:
            for anchor, pos in zip(b["id"].tolist(), b["pos_id"].tolist()):
                assert pos in table.positives[anchor, :table.counts[anchor]]


def test_positive_draws_cover_the_row_uniformly(shard_dir, table):
    source = AugmentSource(shard_dir, num_samples=48, global_batch=BATCH, rank=0, world_size=1, seed=0,
                           start_epoch=0, anchor_views=moco_views(SIZE), positive_views=moco_views(SIZE),
                           table_dir="unused")
    source._table = (table.positives, table.counts)
    rng = np.random.default_rng(0)
    for anchor in range(48):
        row = table.positives[anchor, :table.counts[anchor]]
        draws = np.array([source.draw_positive(rng, anchor) for _ in range(300)])
        assert set(draws) == set(row)
        freq = np.array([(draws == p).mean() for p in row])
        assert np.all(np.abs(freq - 1 / len(row)) < 0.12)


# --- the graph against a numpy/PIL application of the same parameters ---------------------------

RGB2YIQ = np.array([[.299, .587, .114], [.596, -.274, -.321], [.211, -.523, .311]])
YIQ2RGB = np.array([[1, .956, .621], [1, -.272, -.647], [1, -1.107, 1.705]])


def reference_view(jpeg: bytes, params: np.ndarray, flip: int, size: int) -> np.ndarray:
    """PIL crop+resize, DALI's color_twist formula, a reflect-101 Gaussian, flip, normalise."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    y0, x0, y1, x1 = params[:4]
    x = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(x0 * w, y0 * h, x1 * w, y1 * h)),
                   np.float64)
    b, c, s, hue = params[[BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG]]
    a = math.radians(hue)
    rot = np.array([[1, 0, 0], [0, math.cos(a), math.sin(a)], [0, -math.sin(a), math.cos(a)]])
    mat = b * c * YIQ2RGB @ rot @ np.diag([1, s, s]) @ RGB2YIQ
    x = np.clip(np.rint(x @ mat.T + (128 - 128 * c) * b), 0, 255)
    sigma = params[BLUR_SIGMA]
    if sigma > 0:
        radius = math.ceil(3 * sigma)
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        for axis in (0, 1):
            padded = np.pad(x, [(radius, radius) if a_ == axis else (0, 0) for a_ in range(3)], mode="reflect")
            x = sum(k * np.take(padded, np.arange(i, i + x.shape[axis]), axis=axis) for i, k in enumerate(kernel))
        x = np.clip(np.rint(x), 0, 255)
    if flip:
        x = x[:, ::-1]
    x = (x / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return x.transpose(2, 0, 1)


def test_graph_applies_the_drawn_parameters(parallel_run, shard_dir, table, dataset):
    source = AugmentSource(shard_dir, num_samples=48, global_batch=BATCH, rank=0, world_size=1, seed=5,
                           start_epoch=0, anchor_views=moco_views(SIZE, (24, 16)),
                           positive_views=moco_views(SIZE, (24, 16)), table_dir="unused")
    source._table = (table.positives, table.counts)

    class Info:
        epoch_idx = 0

    batch = parallel_run[0][0]
    errors, checked, seen = [], 0, set()
    for i in range(BATCH):
        Info.idx_in_epoch = i
        jpeg, params, flips, meta, pjpeg, pparams, pflips, pos_id = source(Info)
        assert meta[0] == batch["id"][i] and pos_id[0] == batch["pos_id"][i]
        for name, v, data, p, f in (("q", 0, jpeg, params, flips), ("k", 1, jpeg, params, flips),
                                    ("q_r16", 3, jpeg, params, flips), ("pos", 0, pjpeg, pparams, pflips)):
            ref = reference_view(bytes(data), p[v], f[v], batch[name].shape[-1])
            seen |= {k for k, on in (("blur", p[v, BLUR_SIGMA] > 0), ("gray", p[v, SATURATION] == 0),
                                     ("jitter", p[v, BRIGHTNESS] != 1), ("flip", f[v])) if on}
            diff = np.abs(batch[name][i].numpy() - ref) * 255 * 0.226  # in 8-bit levels
            errors.append(diff.mean())
            assert diff.mean() < 1.0, (name, i, diff.mean(), p[v])
            checked += 1
    assert seen == {"blur", "gray", "jitter", "flip"}  # every step was exercised
    assert checked == 4 * BATCH and np.mean(errors) < 0.5  # measured: 0.18 levels on average


# --- statistics against torchvision's MoCo v2 aug_plus on the same images ------------------------

def test_output_statistics_match_torchvision_aug_plus(parallel_run, dataset):
    ours = torch.cat([torch.cat([b["q"], b["k"]]) for batches in parallel_run for b in batches])
    aug_plus = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    images = [Image.open(io.BytesIO(dataset.read(i)[0])).convert("RGB") for i in range(48)]
    ref = torch.stack([aug_plus(images[i % 48]) for i in range(len(ours))])
    mean_ours, mean_ref = ours.mean(dim=(0, 2, 3)), ref.mean(dim=(0, 2, 3))
    std_ours, std_ref = ours.std(dim=(0, 2, 3)), ref.std(dim=(0, 2, 3))
    assert torch.allclose(mean_ours, mean_ref, atol=0.12), (mean_ours, mean_ref)
    assert torch.allclose(std_ours, std_ref, rtol=0.1), (std_ours, std_ref)
    # per-view saturation: the grayscale rate shows as views whose channels coincide
    gray = lambda x: ((x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None])
                      .diff(dim=1).abs().amax(dim=(1, 2, 3)) < 0.02)
    assert abs(gray(ours).float().mean() - gray(ref).float().mean()) < 0.12


# --- feature / linear loaders -----------------------------------------------------------------

def test_feature_loader_visits_every_id_once(shard_dir):
    seen = []
    for rank in range(3):
        loader = FeatureLoader(shard_dir, batch_size=21, image_size=SIZE, rank=rank, world_size=3,
                               workers=1 if rank == 0 else 0)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 16 ids per rank in batches of 7, padding cut
        ids = torch.cat([b["id"] for b in batches])
        assert torch.equal(ids, torch.arange(rank, 48, 3))
        assert all(b["image"].shape[1:] == (3, SIZE, SIZE) and len(b["label"]) == len(b["id"]) for b in batches)
        assert torch.equal(torch.cat([b["id"] for b in loader]), ids)  # a second pass, same order
        seen.append(ids)
        loader.close()
    assert sorted(torch.cat(seen).tolist()) == list(range(48))


def test_feature_view_is_a_centre_crop(shard_dir, dataset):
    loader = FeatureLoader(shard_dir, batch_size=48, image_size=SIZE, workers=0)
    batch = next(iter(loader))
    loader.close()
    ref_tf = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ref = torch.stack([ref_tf(Image.open(io.BytesIO(dataset.read(i)[0])).convert("RGB")) for i in range(48)])
    levels = (batch["image"] - ref).abs().mean(dim=(1, 2, 3)) * 255 * 0.226
    assert levels.max() < 1.5 and levels.mean() < 0.5  # the same sampling grid, to rounding


def test_linear_loaders(shard_dir, dataset):
    train = LinearLoader(shard_dir, batch_size=16, image_size=SIZE, train=True, workers=0, seed=2)
    train.set_epoch(4)
    batches = list(train)
    assert len(batches) == 3 and set(batches[0]) == {"image", "id", "label"}
    ids = torch.cat([b["id"] for b in batches]).numpy()
    assert np.array_equal(ids, epoch_share(48, 16, 0, 1, seed=2, epoch=4))
    assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), dataset.labels[ids])
    val = LinearLoader(shard_dir, batch_size=20, image_size=SIZE, train=False, workers=0)
    val.set_epoch(1)
    assert torch.equal(torch.cat([b["id"] for b in val]), torch.arange(48))
    train.close(), val.close()


def test_float16_output(shard_dir):
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=16, workers=0, dtype=torch.float16)
    batch = next(iter(loader))
    loader.close()
    assert batch["q"].dtype == torch.float16 and torch.isfinite(batch["q"]).all()


# --- errors and shutdown ------------------------------------------------------------------------

def test_clear_errors(shard_dir, tmp_path, dataset):
    with pytest.raises(UserError):
        PretrainLoader(tmp_path / "nowhere", batch_size=BATCH, image_size=SIZE, workers=0)
    wrong = random_table(dataset)
    wrong.meta["dataset_id"] = "someone-else"
    with pytest.raises(UserError, match="neighbour table"):
        PretrainLoader(shard_dir, batch_size=BATCH, image_size=SIZE, workers=0, table=wrong)
    small = NeighbourTable(np.zeros((10, 1), np.int32), np.ones(10, np.int32), np.zeros(10, np.int32), {})
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=SIZE, workers=0)
    with pytest.raises(UserError, match="10 samples"):
        loader.set_table(small)
    loader.close()
    with pytest.raises(UserError, match="divisible"):
        PretrainLoader(shard_dir, batch_size=9, image_size=SIZE, world_size=2, workers=0)
    with pytest.raises(UserError, match="larger than"):
        PretrainLoader(shard_dir, batch_size=64, image_size=SIZE, workers=0)


def test_close_stops_worker_processes(shard_dir):
    before = set(p.pid for p in multiprocessing.active_children())
    loader = PretrainLoader(shard_dir, batch_size=BATCH, image_size=16, workers=2)
    it = iter(loader)
    next(it)  # abandon the epoch half-way
    assert len(set(p.pid for p in multiprocessing.active_children()) - before) >= 2
    loader.close()
    assert not set(p.pid for p in multiprocessing.active_children()) - before


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(shard_dir, table):
    """mixed decode + GPU operators: same ids, float16 CUDA tensors close to the CPU graph's."""
    kwargs = dict(batch_size=BATCH, image_size=SIZE, workers=1, table=table, multires_sizes=(16,), seed=5)
    cpu = PretrainLoader(shard_dir, **kwargs)
    gpu = PretrainLoader(shard_dir, device=torch.device("cuda"), dtype=torch.float16, **kwargs)
    for a, b in zip(cpu, gpu):
        assert b["q"].is_cuda and b["q"].dtype == torch.float16 and b["id"].is_cuda
        assert torch.equal(a["id"], b["id"].cpu()) and torch.equal(a["pos_id"], b["pos_id"].cpu())
        for key in ("q", "k", "pos", "k_pos", "q_r16", "pos_r16"):
            levels = (a[key] - b[key].float().cpu()).abs().mean() * 255 * 0.226
            assert levels < 3, (key, levels)  # nvJPEG vs libjpeg-turbo and GPU resampling differ slightly
    cpu.close(), gpu.close()
