"""Analyses of captured attention: sinks, magnets, redistribution, layer ranking and metrics.

Every function takes an ``xarray.Dataset`` of the capture schema (:mod:`attnlens.schema`), from
an in-memory capture or a lazily opened store, and returns named, labelled results: Datasets
and DataArrays (lazy when the input is dask-backed), or tidy ``pandas`` tables computed from
small reductions. Definitions are in each module's documentation and in DESIGN.md §6.
"""

from . import metrics, synthetic
from ._common import GROUP_BY, key_groups
from .magnets import MAGNET_KINDS, find_magnets, magnet_words
from .metrics import auc, binarize, boundary_f, iou, j_and_f, pointing_game
from .ranking import METRICS, localisation_scores, rank
from .redistribution import destinations, redistribution, target_map, transport
from .sinks import (
    find_sinks,
    gas_by_token,
    mass_by_kind,
    plot_sinks,
    ratio_by_token,
    sink_tokens,
    sinks_by_layer,
)

__all__ = [
    "GROUP_BY",
    "MAGNET_KINDS",
    "METRICS",
    "auc",
    "binarize",
    "boundary_f",
    "destinations",
    "find_magnets",
    "find_sinks",
    "gas_by_token",
    "iou",
    "j_and_f",
    "key_groups",
    "localisation_scores",
    "magnet_words",
    "mass_by_kind",
    "metrics",
    "plot_sinks",
    "pointing_game",
    "rank",
    "ratio_by_token",
    "redistribution",
    "sink_tokens",
    "sinks_by_layer",
    "synthetic",
    "target_map",
    "transport",
]
