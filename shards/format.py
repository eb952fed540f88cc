"""The on-disk shard format (docs/architecture.md, "Files"): file names, keys, the per-sample index dtype."""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "clim-fast-shards"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
SAMPLES = "samples.npy"
SOURCES = "sources.txt"
PARTIAL = ".partial"  # per-shard progress of an unfinished run; removed once the manifest exists

# ImageNet averages ~110 KB per JPEG: 6000 samples make a ~0.66 GB shard.
DEFAULT_MAXCOUNT = 6000
MIN_KEY_WIDTH = 9

# One row per sample id. offset/size locate the JPEG payload inside its tar; width/height are the
# stored JPEG's size (the pipelines compute exact RandomResizedCrop windows from them).
SAMPLE_DTYPE = np.dtype([
    ("shard", np.int32),
    ("offset", np.int64),
    ("size", np.int64),
    ("label", np.int32),
    ("width", np.int32),
    ("height", np.int32),
])


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_name(number: int) -> str:
    return f"shard-{number:06d}.idx"


def key_width(num_samples: int) -> int:
    return max(MIN_KEY_WIDTH, len(str(max(num_samples - 1, 0))))


def sample_key(sample_id: int, width: int) -> str:
    return f"{sample_id:0{width}d}"
