"""The shard format: writer, manifest, per-sample index, random-access reader, DALI index files."""

from shards.dataset import ShardDataset, open_shards
from shards.format import DEFAULT_MAXCOUNT, FORMAT_VERSION, SAMPLE_DTYPE
from shards.verify import verify_shards
from shards.writer import write_shards

__all__ = ["write_shards", "ShardDataset", "open_shards", "verify_shards", "DEFAULT_MAXCOUNT",
           "FORMAT_VERSION", "SAMPLE_DTYPE"]
