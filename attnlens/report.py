"""Moved to :mod:`attnlens.viz.report`; kept so that ``from attnlens.report import ...`` still works."""

from .viz.report import Report, markdown_table

__all__ = ["Report", "markdown_table"]
