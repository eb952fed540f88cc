"""The neighbour table (docs/architecture.md, "Files"): each anchor's center-wise positives, best first.

Stored as one `.npz` (loaded with allow_pickle=False): `positives` int32[N, k] padded with -1,
`counts` int32[N] (valid entries per row, >= 1), `assignment` int32[N] (K-means cluster), and
`meta` (a JSON string: dataset_id, num_samples, clusters, k, epoch, feature, checkpoint, ...).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.errors import UserError
from shards.atomic import atomic_write_bytes

TABLE_FORMAT = 1


@dataclass
class NeighbourTable:
    positives: np.ndarray  # int32 [N, k], -1 padded, best first
    counts: np.ndarray  # int32 [N], number of valid entries in each row
    assignment: np.ndarray  # int32 [N], cluster of each sample
    meta: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.positives.shape[0])

    @property
    def dataset_id(self) -> str | None:
        return self.meta.get("dataset_id")

    def save(self, path: str | Path) -> None:
        meta = dict(self.meta, format=TABLE_FORMAT, num_samples=self.num_samples)
        buf = io.BytesIO()
        np.savez(buf, positives=self.positives.astype(np.int32), counts=self.counts.astype(np.int32),
                 assignment=self.assignment.astype(np.int32), meta=np.array(json.dumps(meta, sort_keys=True)))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "NeighbourTable":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                positives, counts, assignment = z["positives"], z["counts"], z["assignment"]
                meta = json.loads(str(z["meta"]))
        except FileNotFoundError:
            raise UserError(f"{path}: neighbour table not found") from None
        except Exception as e:  # zip, key or JSON errors: the file is not a table we wrote
            raise UserError(f"{path}: not a readable neighbour table ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise UserError(f"{path}: not a readable neighbour table (its meta is not a JSON object)")
        table = cls(positives, counts, assignment, meta)
        table.check_consistent(path)
        return table

    def check_consistent(self, where: str | Path = "neighbour table") -> None:
        if self.positives.ndim != 2:
            raise UserError(f"{where}: malformed neighbour table (positives of shape {self.positives.shape}, "
                            "expected [N, k])")
        n = self.num_samples
        if self.counts.shape != (n,) or self.assignment.shape != (n,):
            raise UserError(f"{where}: malformed neighbour table (shapes {self.positives.shape}, "
                            f"{self.counts.shape}, {self.assignment.shape})")
        arrays = (self.positives, self.counts, self.assignment)
        if not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
            raise UserError(f"{where}: malformed neighbour table (positives {self.positives.dtype}, "
                            f"counts {self.counts.dtype}, assignment {self.assignment.dtype}; expected integers)")
        if n and (self.counts.min() < 1 or self.counts.max() > self.positives.shape[1]):
            raise UserError(f"{where}: malformed neighbour table (counts outside 1..k)")
        if not n:
            return
        if self.assignment.min() < 0:
            raise UserError(f"{where}: malformed neighbour table (negative cluster numbers in assignment)")
        inside = np.arange(self.positives.shape[1])[None, :] < self.counts[:, None]  # entries below each count
        bad = np.where(inside, (self.positives < 0) | (self.positives >= n), self.positives != -1)
        if bad.any():
            row, col = (int(x) for x in np.argwhere(bad)[0])
            value, count = int(self.positives[row, col]), int(self.counts[row])
            rows = int(bad.any(axis=1).sum())
            expected = f"a sample id in 0..{n - 1}" if col < count else "-1 padding"
            raise UserError(f"{where}: malformed neighbour table (row {row}, entry {col}: {value}, expected "
                            f"{expected} since the row's count is {count}; {rows} bad row(s))")

    def check_matches(self, dataset_id: str, num_samples: int, where: str | Path = "neighbour table") -> None:
        """Refuse a table made for other shards (docs/architecture.md, "Files"), or one that does not
        say which shards it was made for: every table clim-fast writes carries their dataset id."""
        if self.num_samples != num_samples or self.dataset_id != dataset_id:
            made_for = (f"for dataset {self.dataset_id}" if self.dataset_id else "for no dataset id (a table clim-fast "
                        "did not write?)")
            raise UserError(
                f"{where}: neighbour table is {made_for} with {self.num_samples} samples, "
                f"but the shards are dataset {dataset_id} with {num_samples} samples")
