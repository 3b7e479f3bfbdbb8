"""Seeing captured attention: plotly figures, the notebook explorer and the HTML report.

- :mod:`~attnlens.viz.figures`: figures whose every label names the value it shows;
- :mod:`~attnlens.viz.explorer`: :func:`explore`, one ipywidgets view of a capture or store;
- :mod:`~attnlens.viz.report`: a self-contained HTML report.
"""

from .explorer import Explorer, explore
from .figures import sink_figure, static_images
from .report import Report

__all__ = ["Explorer", "Report", "explore", "sink_figure", "static_images"]
