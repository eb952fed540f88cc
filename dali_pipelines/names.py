"""The names of a pretraining batch's views, written once for the graph and the model.

Anchor views: `q`, `k`, then `q_r{S}` per multi-resolution size S; positive views (with a
neighbour table): `pos`, `k_pos`, then `pos_r{S}`.
"""

from __future__ import annotations


def anchor_view_names(multires_sizes=()) -> list[str]:
    return ["q", "k"] + [f"q_r{s}" for s in multires_sizes]


def positive_view_names(multires_sizes=()) -> list[str]:
    return ["pos", "k_pos"] + [f"pos_r{s}" for s in multires_sizes]


def mixing_pairs(multires_sizes=()) -> list[tuple[str, str]]:
    """(anchor view, positive view) pairs that CLIM mixes: the main query, then one per size."""
    return [("q", "pos")] + [(f"q_r{s}", f"pos_r{s}") for s in multires_sizes]
