"""Analyses of captured attention: sinks, magnets, redistribution, layer ranking and metrics.

Every function takes an ``xarray.Dataset`` of the capture schema (:mod:`attnlens.schema`), from
an in-memory capture or a lazily opened store, and returns named, labelled results: Datasets
and DataArrays (lazy when the input is dask-backed), or tidy ``pandas`` tables computed from
small reductions. Definitions are in each module's documentation and in DESIGN.md §6.
"""

from . import metrics, synthetic
from .magnets import MAGNET_KINDS, find_magnets, magnet_words
from .metrics import auc, binarize, boundary_f, iou, j_and_f, pointing_game
from .ranking import METRICS, localisation_scores, rank
from .redistribution import destinations, redistribution, target_map, transport
from .sinks import find_sinks, mass_by_kind, plot_sinks, sink_tokens, sinks_by_layer

__all__ = [
    "MAGNET_KINDS",
    "METRICS",
    "auc",
    "binarize",
    "boundary_f",
    "destinations",
    "find_magnets",
    "find_sinks",
    "iou",
    "j_and_f",
    "localisation_scores",
    "magnet_words",
    "mass_by_kind",
    "metrics",
    "plot_sinks",
    "pointing_game",
    "rank",
    "redistribution",
    "sink_tokens",
    "sinks_by_layer",
    "synthetic",
    "target_map",
    "transport",
]
