"""DALI graphs on the CPU: epoch contract, positives, persistence across epochs / table swaps /
passes, resume without decoding the skipped batches, the graph against a numpy/PIL application of
the same parameters, statistics against torchvision's aug_plus, feature/linear loaders, errors."""

import io
import math
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from shards.errors import UserError
from shards.neighbours import NeighbourTable
from dali_pipelines import FeatureLoader, LinearTrainLoader, PretrainLoader, epoch_share
from dali_pipelines.augment import (BLUR_SIGMA, BRIGHTNESS, CONTRAST, HUE_DEG, LINEAR_SCALE, SATURATION, ViewSpec,
                                    draw_views, moco_views, sample_rng)
from dali_pipelines.ops import IMAGENET_MEAN, IMAGENET_STD
from dali_pipelines import external
from dali_pipelines.external import PAD_SLACK, AugmentSource, ShardReader, draw_positive, jpeg_batch
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
def parallel_run(dataset, table):
    """Epochs 0 and 1 with a table, 2 spawned workers, one pipeline streaming across the boundary."""
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=2, table=table,
                            multires_sizes=(24, 16), seed=5)
    epochs = []
    for e in (0, 1):
        loader.set_epoch(e)
        epochs.append(list(loader))
    assert loader._streams_built == 1  # persisted across the epoch boundary
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


def test_persistent_loader_equals_fresh_loaders_whatever_the_workers(parallel_run, dataset, table):
    """Two epochs read through one persistent 2-worker pipeline = fresh in-process loaders started
    at each epoch: batches depend on (seed, epoch, rank, table) only."""
    for epoch in (1, 0):  # a jump back rebuilds
        loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                                multires_sizes=(24, 16), seed=5)
        loader.set_epoch(epoch)
        assert same_batches(list(loader), parallel_run[epoch])
        loader.close()


def test_resume_mid_epoch_equals_the_uninterrupted_epoch_and_decodes_nothing_skipped(
        parallel_run, dataset, table, monkeypatch):
    read = []
    original = ShardReader.jpeg
    monkeypatch.setattr(ShardReader, "jpeg", lambda self, sid: read.append(sid) or original(self, sid))
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                            multires_sizes=(24, 16), seed=5)
    loader.set_epoch(1, start_step=4)
    resumed = list(loader)
    assert len(resumed) == 2 and same_batches(resumed, parallel_run[1][4:])
    anchors_read = read[0::2]  # in-process source: anchor, positive, anchor, positive, ...
    stream = np.concatenate([epoch_share(48, BATCH, 0, 1, seed=5, epoch=1)[4 * BATCH:],
                             epoch_share(48, BATCH, 0, 1, seed=5, epoch=2)])
    assert anchors_read == stream[:len(anchors_read)].tolist()  # nothing before step 4 was read
    assert 2 * BATCH <= len(anchors_read) <= 4 * BATCH  # at most 2 batches read ahead into epoch 2
    loader.set_epoch(2)  # streams on from where the resumed epoch ended
    assert same_batches(list(loader)[:1], list_epoch(dataset, table, 2)[:1])
    assert loader._streams_built == 1
    loader.close()


def test_resume_at_an_epochs_last_step_before_a_table_swap(parallel_run, dataset, table):
    """One step left and the next epoch's table not known yet: the stream must not read ahead."""
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                            multires_sizes=(24, 16), seed=5, table_changes=lambda e: True)
    loader.set_epoch(1, start_step=5)
    assert same_batches(list(loader), parallel_run[1][5:])
    loader.set_epoch(2)
    assert same_batches(list(loader)[:1], list_epoch(dataset, table, 2)[:1])
    loader.close()


def list_epoch(dataset, table, epoch, **kwargs):
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                            multires_sizes=(24, 16), seed=5, **kwargs)
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return batches


def test_table_swap_mid_run_equals_a_fresh_loader_with_that_table(dataset, table):
    """Tables swapped at announced epochs keep the pipeline (the workers wait for the new table);
    an unannounced swap rebuilds it. Either way each epoch equals a fresh loader's."""
    other = random_table(dataset, seed=7)
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=2, table=table,
                            multires_sizes=(24, 16), seed=5, table_changes=lambda e: e in (1, 2))
    got = []
    for epoch, new in ((0, None), (1, other), (2, None), (3, table)):
        if new is not None:
            loader.set_table(new)
        loader.set_epoch(epoch)
        got.append(list(loader))
        assert loader._streams_built == (1 if epoch < 3 else 2), epoch  # epoch 3 was not announced
    loader.close()
    for epoch, expect in ((1, other), (2, other), (3, table)):
        assert same_batches(got[epoch], list_epoch(dataset, expect, epoch)), epoch
    assert not same_batches(got[1], list_epoch(dataset, table, 1))


def test_two_ranks_split_each_global_batch(dataset):
    loaders = [PretrainLoader(dataset, batch_size=BATCH, image_size=16, rank=r, world_size=2, workers=0, seed=1)
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


def test_table_is_picked_up_at_the_next_epoch(dataset, table):
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=16, workers=0)
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


def test_positive_draws_cover_the_row_uniformly(table):
    rng = np.random.default_rng(0)
    for anchor in range(48):
        row = table.positives[anchor, :table.counts[anchor]]
        draws = np.array([draw_positive(rng, table.positives, table.counts, anchor) for _ in range(300)])
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


class FixedTable:
    def __init__(self, table):
        self.arrays = (table.positives, table.counts)

    def table(self, epoch, wait=True):
        return self.arrays


def test_graph_applies_the_drawn_parameters(parallel_run, table, dataset):
    source = AugmentSource(ShardReader(dataset), num_samples=48, global_batch=BATCH, rank=0, world_size=1, seed=5,
                           start=0, anchor_views=moco_views(SIZE, (24, 16)),
                           positive_views=moco_views(SIZE, (24, 16)), tables=FixedTable(table))

    batch = parallel_run[0][0]
    errors, checked, seen = [], 0, set()
    for i in range(BATCH):
        jpeg, params, flips, meta, pjpeg, pparams, pflips, pos_id = source.sample(i)
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


# --- JPEG batches: one padded array or a list ---------------------------------------------------

def test_jpeg_batch_pads_small_jpegs_and_lists_spread_ones():
    small = [np.arange(n, dtype=np.uint8) for n in (900, 1500, 1200)]
    padded, lengths = jpeg_batch(small)
    assert isinstance(padded, np.ndarray) and padded.shape == (3, 1500) and padded.dtype == np.uint8
    assert lengths.dtype == np.int32 and lengths[:, 0].tolist() == [900, 1500, 1200]
    assert all(np.array_equal(row[:n], j) and not row[n:].any() for row, n, j in zip(padded, lengths[:, 0], small))
    spread = [np.ones(n, np.uint8) for n in (1000, 1000, PAD_SLACK * 2 + 1000)]
    as_list, lengths = jpeg_batch(spread)
    assert isinstance(as_list, list) and [len(j) for j in as_list] == lengths[:, 0].tolist()


def test_the_graph_cuts_each_padded_jpeg_to_its_own_bytes(dataset):
    """ops.jpeg_bytes hands the decoder exactly the stored JPEG (trailing zeros could trip a
    decoder that reads to the end: the hardware decoder is not tested on the CPU)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from dali_pipelines.ops import jpeg_bytes

    stored = [dataset.read(i)[0] for i in range(4)]
    padded, lengths = jpeg_batch([np.frombuffer(b, np.uint8) for b in stored])
    assert isinstance(padded, np.ndarray) and len(set(lengths[:, 0])) > 1

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def graph():
        data, length = fn.external_source(source=lambda: (padded, lengths), num_outputs=2, batch=True,
                                          dtype=[types.UINT8, types.INT32])
        return jpeg_bytes(data, length)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    assert [bytes(np.array(out[i])) for i in range(4)] == stored


def test_listed_jpegs_give_the_padded_batches(dataset, table, monkeypatch):
    """The graph cuts each JPEG to its length whichever way the batch came: equal outputs."""
    def read(**kwargs):
        loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=table,
                                multires_sizes=(24,), seed=5)
        loader.set_epoch(0)
        batches = list(loader)[:2]
        loader.close()
        centre = FeatureLoader(dataset, batch_size=16, image_size=SIZE, workers=0)
        batches.append(next(iter(centre)))
        centre.close()
        return batches

    kinds = []
    original = external.jpeg_batch
    monkeypatch.setattr(external, "jpeg_batch", lambda jpegs: kinds.append(type(original(jpegs)[0])) or original(jpegs))
    padded = read()
    assert set(kinds) == {np.ndarray}
    kinds.clear()
    monkeypatch.setattr(external, "PAD_SLACK", -1)  # never pad
    listed = read()
    assert set(kinds) == {list}
    assert same_batches(padded, listed)


# --- where each stage of a GPU graph runs (defined, not built: no GPU needed) --------------------

class DeclaredColumns:
    """A source that only declares its columns: the graph is defined, never run."""

    def __init__(self, columns):
        self.columns = columns

    def __call__(self, batch_index):
        raise AssertionError("not run")


def gpu_graph_placement(graph, columns, *args, **settings_kwargs):
    """(operator name -> devices, output devices) of `graph` over a source with `columns`, defined
    for a GPU pipeline. Uses DALI's graph definition step (`Pipeline._build_graph`), which needs no
    device."""
    from dali_pipelines.loader import Settings

    settings = Settings("cpu", torch.float16, 0, 1, **settings_kwargs)
    settings.gpu = True  # as a CUDA device would set it; the pipeline below is only defined
    pipe = graph(DeclaredColumns(columns), *args, settings, batch_size=2, num_threads=1, device_id=None)
    pipe._build_graph()
    devices = {}
    for op in pipe._ops:
        devices.setdefault(getattr(op._op, "schema_name", type(op._op).__name__), set()).add(op._op.device)
    return devices, {node.device for node in pipe._graph_outputs}


VIEW_OPS = ("Resize", "ColorTwist", "GaussianBlur", "CropMirrorNormalize")


@pytest.mark.parametrize("cpu_decode, cpu_views, decoder, views", [
    (False, False, "mixed", "gpu"),  # nvJPEG (hardware + hybrid), views on the GPU
    (True, False, "cpu", "gpu"),     # libjpeg-turbo on DALI's threads, views on the GPU
    (False, True, "cpu", "cpu"),     # everything on DALI's threads; only finished views go up
    (True, True, "cpu", "cpu"),
])
def test_gpu_graphs_run_each_stage_where_the_settings_say(cpu_decode, cpu_views, decoder, views):
    from dali_pipelines.center import center_graph
    from dali_pipelines.external import ANCHOR_COLUMNS, CENTER_COLUMNS, POSITIVE_COLUMNS
    from dali_pipelines.pretrain import augment_graph

    for graph, columns, args in ((augment_graph, ANCHOR_COLUMNS + POSITIVE_COLUMNS, (moco_views(SIZE, (16,)), moco_views(SIZE))),
                                 (center_graph, CENTER_COLUMNS, (SIZE,))):
        devices, outputs = gpu_graph_placement(graph, columns, *args, cpu_decode=cpu_decode, cpu_views=cpu_views)
        assert outputs == {"gpu"}  # every output of a GPU pipeline is handed out on the GPU
        assert devices["decoders__Image"] == {decoder}
        assert devices["Slice"] == {"cpu"}  # the padded JPEGs are cut before the decoder
        for name in VIEW_OPS:
            if name in devices:
                assert devices[name] == {views}, (graph.__name__, name)
        assert "Resize" in devices and "CropMirrorNormalize" in devices


# --- feature / linear loaders -----------------------------------------------------------------

def test_feature_loader_visits_every_id_once(dataset):
    seen = []
    for rank in range(3):
        loader = FeatureLoader(dataset, batch_size=21, image_size=SIZE, rank=rank, world_size=3,
                               workers=1 if rank == 0 else 0)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # 16 ids per rank in batches of 7, padding cut
        ids = torch.cat([b["id"] for b in batches])
        assert torch.equal(ids, torch.arange(rank, 48, 3))
        assert all(b["image"].shape[1:] == (3, SIZE, SIZE) and len(b["label"]) == len(b["id"]) for b in batches)
        assert torch.equal(torch.cat([b["id"] for b in loader]), ids)  # a second pass, same order
        assert loader._stream.next_step == 2 * len(loader)  # ... from the same pipeline
        seen.append(ids)
        loader.close()
    assert sorted(torch.cat(seen).tolist()) == list(range(48))


def test_feature_view_is_a_centre_crop(dataset):
    loader = FeatureLoader(dataset, batch_size=48, image_size=SIZE, workers=0)
    batch = next(iter(loader))
    loader.close()
    ref_tf = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ref = torch.stack([ref_tf(Image.open(io.BytesIO(dataset.read(i)[0])).convert("RGB")) for i in range(48)])
    levels = (batch["image"] - ref).abs().mean(dim=(1, 2, 3)) * 255 * 0.226
    assert levels.max() < 1.5 and levels.mean() < 0.5  # the same sampling grid, to rounding


def test_linear_loaders(dataset):
    train = LinearTrainLoader(dataset, batch_size=16, image_size=SIZE, rank=0, world_size=1,
                              device=torch.device("cpu"), seed=2, workers=0, threads=1, dtype=torch.float32)
    epochs = []
    for epoch in (4, 5):
        train.set_epoch(epoch)
        epochs.append(list(train))
    batches = epochs[0]
    assert len(batches) == 3 and set(batches[0]) == {"image", "id", "label"}
    ids = torch.cat([b["id"] for b in batches]).numpy()
    assert np.array_equal(ids, epoch_share(48, 16, 0, 1, seed=2, epoch=4))
    assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), dataset.labels[ids])
    assert train._stream.first_step == 4 * 3  # epoch 5 streamed on from epoch 4
    train.set_epoch(5, start_step=1)  # a resume starts a fresh stream at that step: the same batches
    assert same_batches(list(train), epochs[1][1:])
    val = FeatureLoader(dataset, batch_size=20, image_size=SIZE, workers=0)
    val.set_epoch(1)
    assert torch.equal(torch.cat([b["id"] for b in val]), torch.arange(48))
    train.close(), val.close()


def test_float16_output(dataset):
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=16, workers=0, dtype=torch.float16)
    batch = next(iter(loader))
    loader.close()
    assert batch["q"].dtype == torch.float16 and torch.isfinite(batch["q"]).all()


def test_bfloat16_output_is_the_float32_batch_cast_down(dataset):
    """DALI has no bfloat16: the graph makes float32 and the loader casts on the device."""
    batches = {}
    for dtype in (torch.float32, torch.bfloat16):
        loader = PretrainLoader(dataset, batch_size=BATCH, image_size=16, workers=0, dtype=dtype, seed=2)
        batches[dtype] = next(iter(loader))
        loader.close()
    low, full = batches[torch.bfloat16], batches[torch.float32]
    assert low["q"].dtype == torch.bfloat16 and low["id"].dtype == torch.int64
    assert torch.equal(low["q"], full["q"].to(torch.bfloat16)) and torch.equal(low["id"], full["id"])


@pytest.mark.parametrize("positives, decoders", [(False, 1), (True, 2)])
def test_each_jpeg_is_decoded_once_however_many_views(positives, decoders):
    """One decoder per JPEG stream (anchor, positive), whatever the number of multi-resolution views."""
    from dali_pipelines.external import ANCHOR_COLUMNS, POSITIVE_COLUMNS
    from dali_pipelines.pretrain import augment_graph

    views = moco_views(SIZE, (24, 16, 8))  # q, k and three smaller queries
    source = DeclaredColumns(ANCHOR_COLUMNS + (POSITIVE_COLUMNS if positives else ()))
    counts = {}
    for placement in ({}, {"cpu_views": True}):
        from dali_pipelines.loader import Settings

        settings = Settings("cpu", torch.float32, 0, 1, **placement)
        pipe = augment_graph(source, views, views if positives else (), settings, batch_size=2,
                             num_threads=1, device_id=None)
        pipe._build_graph()
        counts[str(placement)] = sum(getattr(op._op, "schema_name", "") == "decoders__Image" for op in pipe._ops)
    assert set(counts.values()) == {decoders}


# --- errors and shutdown ------------------------------------------------------------------------

def test_clear_errors(shard_dir, tmp_path, dataset):
    with pytest.raises(UserError):
        PretrainLoader(tmp_path / "nowhere", batch_size=BATCH, image_size=SIZE, workers=0)
    wrong = random_table(dataset)
    wrong.meta["dataset_id"] = "someone-else"
    with pytest.raises(UserError, match="neighbour table"):
        PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0, table=wrong)
    small = NeighbourTable(np.zeros((10, 1), np.int32), np.ones(10, np.int32), np.zeros(10, np.int32), {})
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=SIZE, workers=0)
    with pytest.raises(UserError, match="10 samples"):
        loader.set_table(small)
    loader.close()
    with pytest.raises(UserError, match="divisible"):
        PretrainLoader(dataset, batch_size=9, image_size=SIZE, world_size=2, workers=0)
    with pytest.raises(UserError, match="larger than"):
        PretrainLoader(dataset, batch_size=64, image_size=SIZE, workers=0)


def test_undecodable_sample_names_its_shard_in_one_line(shard_dir, tmp_path, dataset):
    """Same-size bit rot inside a tar: a one-line UserError naming the shard and `clim-fast verify`."""
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    victim = int(epoch_share(48, BATCH, 0, 1, seed=0, epoch=0)[BATCH + 2])  # in the second batch
    row = dataset.index[victim]
    tar = broken / dataset.manifest["shards"][int(row["shard"])]["name"]
    with open(tar, "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(b"\0" * 64)  # the JPEG header is gone, the size unchanged
    loader = PretrainLoader(ShardDataset(broken), batch_size=BATCH, image_size=16, workers=0)
    with pytest.raises(UserError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and tar.name in message and f"clim-fast verify {broken}" in message
    assert str(victim) in message
    loader.close()


def test_close_stops_worker_processes(dataset):
    before = set(p.pid for p in multiprocessing.active_children())
    loader = PretrainLoader(dataset, batch_size=BATCH, image_size=16, workers=2)
    it = iter(loader)
    next(it)  # abandon the epoch half-way
    assert len(set(p.pid for p in multiprocessing.active_children()) - before) >= 2
    loader.close()
    assert not set(p.pid for p in multiprocessing.active_children()) - before


# --- the per-sample parameter draws are bit-identical to the straightforward implementation ------

def straightforward_view(rng, width, height, spec):
    """The draws as first written (rng.uniform / rng.integers(0, n) / fancy indexing)."""
    p = np.zeros(9, np.float32)
    area, log_ratio = height * width, (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < min(spec.ratio):
            w, h = width, int(round(width / min(spec.ratio)))
        elif in_ratio > max(spec.ratio):
            h, w = height, int(round(height * max(spec.ratio)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    p[0:4] = (top / height, left / width, (top + h) / height, (left + w) / width)
    p[[BRIGHTNESS, CONTRAST, SATURATION, HUE_DEG]] = (1.0, 1.0, 1.0, 0.0)
    if spec.color:
        if rng.random() < 0.8:
            p[BRIGHTNESS], p[CONTRAST], p[SATURATION] = (rng.uniform(0.6, 1.4) for _ in range(3))
            p[HUE_DEG] = rng.uniform(-0.1, 0.1) * 360.0
        if rng.random() < 0.2:
            p[SATURATION] = 0.0
        if rng.random() < 0.5:
            p[BLUR_SIGMA] = rng.uniform(0.1, 2.0)
    return p, int(rng.random() < 0.5)


def test_fast_parameter_draws_are_bit_identical_to_the_straightforward_ones():
    specs = moco_views(224, (192, 160, 128, 96)) + (ViewSpec(224, LINEAR_SCALE, color=False),)
    sizes = np.random.default_rng(1).integers(8, 600, (400, 2))
    sizes[::9] = (1000, 20)  # the centre fallback
    for i, (w, h) in enumerate(sizes.tolist()):
        params, flips = draw_views(sample_rng(3, 1, i, 0), w, h, specs)
        rng = sample_rng(3, 1, i, 0)
        for v, spec in enumerate(specs):
            p, f = straightforward_view(rng, w, h, spec)
            assert params[v].tobytes() == p.tobytes() and flips[v] == f, (i, v)


def test_rng_bank_is_default_rng_per_sample():
    """The vectorised SeedSequence + reused PCG64 give exactly `default_rng([seed, epoch, id, stream])`,
    and fall back to it for key parts beyond 32 bits."""
    from dali_pipelines.augment import RngBank

    ids = np.arange(0, 3000) * 7919 + 11
    for seed, epoch, stream in ((0, 0, 0), (5, 3, 1), (2**32 - 1, 1199, 1), (2**40 + 3, 2, 0)):
        bank = RngBank(seed, epoch, ids, stream)
        assert bank.fallback == (seed > 2**32 - 1)
        for i in range(0, len(ids), 37):
            ref = sample_rng(seed, epoch, int(ids[i]), stream)
            assert bank.rng(i).bit_generator.state == ref.bit_generator.state, (seed, epoch, stream, i)
            assert bank.rng(i).random(3).tolist() == ref.random(3).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("placement", [{}, {"cpu_decode": True}, {"cpu_views": True}])
def test_gpu_pipeline_matches_cpu(dataset, table, placement):
    """mixed decode (or CPU decode, or all on the CPU) + GPU operators: same ids, float16 CUDA
    tensors close to the CPU graph's."""
    kwargs = dict(batch_size=BATCH, image_size=SIZE, workers=1, table=table, multires_sizes=(16,), seed=5)
    cpu = PretrainLoader(dataset, **kwargs)
    gpu = PretrainLoader(dataset, device=torch.device("cuda"), dtype=torch.float16, **placement, **kwargs)
    for a, b in zip(cpu, gpu):
        assert b["q"].is_cuda and b["q"].dtype == torch.float16 and b["id"].is_cuda
        assert torch.equal(a["id"], b["id"].cpu()) and torch.equal(a["pos_id"], b["pos_id"].cpu())
        for key in ("q", "k", "pos", "k_pos", "q_r16", "pos_r16"):
            levels = (a[key] - b[key].float().cpu()).abs().mean() * 255 * 0.226
            assert levels < 3, (key, levels)  # nvJPEG vs libjpeg-turbo and GPU resampling differ slightly
    cpu.close(), gpu.close()


@pytest.mark.gpu
def test_gpu_feature_and_linear_loaders_match_cpu(dataset):
    """The centre-crop and linear-train graphs on the GPU: every output (ids too) on the device,
    two passes through one persistent pipeline, close to the CPU graphs."""
    cuda = torch.device("cuda")
    for make in (lambda device: FeatureLoader(dataset, batch_size=16, image_size=SIZE, device=device, workers=1),
                 lambda device: LinearTrainLoader(dataset, batch_size=16, image_size=SIZE, rank=0, world_size=1,
                                                  device=device, seed=2, workers=1, threads=2,
                                                  dtype=torch.float32)):
        cpu, gpu = make(torch.device("cpu")), make(cuda)
        for epoch in (0, 1):
            cpu.set_epoch(epoch), gpu.set_epoch(epoch)
            for a, b in zip(cpu, gpu):
                assert b["image"].is_cuda and b["id"].is_cuda and b["label"].is_cuda
                assert torch.equal(a["id"], b["id"].cpu())
                assert (a["image"] - b["image"].cpu()).abs().mean() * 255 * 0.226 < 3
        assert gpu._stream.next_step == 2 * len(gpu)  # one pipeline for both passes
        cpu.close(), gpu.close()


@pytest.mark.gpu
def test_gpu_batches_stay_intact_while_the_gpu_is_behind(dataset, table):
    """The CPU takes batches while the GPU is still busy with work queued before it reads them (as
    an asynchronous training step leaves it): DALI must not reuse a buffer the GPU has yet to read.
    Copies queued behind a GPU sleep equal the copies of a loader read in lockstep."""
    kwargs = dict(batch_size=BATCH, image_size=SIZE, workers=1, table=table, seed=7, device=torch.device("cuda"),
                  dtype=torch.float32)  # float32: the batch tensors are DALI's own buffers (no cast)
    behind, lockstep = [], []
    with PretrainLoader(dataset, **kwargs) as loader:
        for batch in loader:
            torch.cuda._sleep(20_000_000)  # keeps the stream busy for about 10 ms before the copy runs
            behind.append({key: batch[key].clone() for key in ("q", "pos", "id")})
    with PretrainLoader(dataset, **kwargs) as loader:
        for batch in loader:
            lockstep.append({key: batch[key].clone() for key in ("q", "pos", "id")})
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    assert len(behind) == len(lockstep) > 2
    for a, b in zip(behind, lockstep):
        assert all(torch.equal(a[key], b[key]) for key in a)
