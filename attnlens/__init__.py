"""attnlens: look inside the joint text-image/video attention of diffusion transformers.

>>> import attnlens
>>> {"flux", "mochi", "wan"} <= set(attnlens.supported_models())
True
"""

__version__ = "0.1.0"

from . import (
    accessor,  # noqa: F401  (registers the ds.attnlens accessor)
    analysis,
    refam,
)
from .batch import capture_prompts
from .capture import Capture, capture
from .cluster import cluster
from .errors import AttnlensError
from .interventions import redirect, suppress
from .models.registry import supported_models
from .spec import CaptureSpec
from .store import open_store
from .text import TokenLabels, label_tokens

__all__ = [
    "AttnlensError",
    "Capture",
    "CaptureSpec",
    "TokenLabels",
    "__version__",
    "analysis",
    "capture",
    "capture_prompts",
    "cluster",
    "explore",
    "label_tokens",
    "open_store",
    "redirect",
    "refam",
    "supported_models",
    "suppress",
]


def __getattr__(name: str):
    # the explorer brings plotly (and, when called, ipywidgets): import them only for it
    if name == "explore":
        from .viz.explorer import explore

        return explore
    raise AttributeError(f"module 'attnlens' has no attribute {name!r}")
