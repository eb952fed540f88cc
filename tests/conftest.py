"""Shared fixtures: small real JPEG folders and shards built from them."""

from __future__ import annotations

import pytest
import torch

from photos import make_photo_folder

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """4 classes x 12 JPEGs (48-96 px), ImageNet train layout."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"), classes=4, per_class=12, seed=0)


@pytest.fixture(scope="session")
def shard_dir(photo_folder, tmp_path_factory):
    """The photo folder as shards: 48 samples, 16 per shard."""
    from shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(photo_folder, out, maxcount=16, workers=1, seed=0)
    return out


@pytest.fixture(scope="session")
def val_shard_dir(tmp_path_factory):
    """Other photos of shard_dir's 4 classes, as validation shards: 16 samples."""
    from shards import write_shards

    src = make_photo_folder(tmp_path_factory.mktemp("val-photos"), classes=4, per_class=4, seed=7)
    out = tmp_path_factory.mktemp("val-shards")
    write_shards(src, out, maxcount=16, workers=1, seed=0)
    return out
