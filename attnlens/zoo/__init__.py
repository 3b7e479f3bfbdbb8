"""The embedded models: small diffusion transformers trained by attnlens on the ShapesRef world.

They make every part of attnlens work offline with trained (not random) attention. Each
model's folder holds ``config.json``, ``model.safetensors`` and a model card ``card.md``
(data, steps, hardware, wall time, loss curve and measured results).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError, choices
from .shapes import ShapesConfig, ShapesPipeline

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ShapesConfig", "ShapesPipeline", "available", "bars", "load"]

_HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the models shipped with this installation."""
    return sorted(p.name for p in _HERE.iterdir() if (p / "model.safetensors").exists())


def load(name: str = "shapes-flux") -> ShapesPipeline:
    """Load a shipped model by name, offline."""
    return ShapesPipeline.load(_folder(name))


def bars(name: str = "shapes-flux") -> pd.DataFrame:
    """The bars a shipped model's card measured (``bars.json``): ``level``, ``bar``, ``measured``,
    ``required``, ``met``."""
    import pandas as pd

    return pd.read_json(_folder(name) / "bars.json", orient="records")


def _folder(name: str) -> Path:
    if name not in available():
        raise UnsupportedModelError(
            f"no embedded model {name!r}; available: {choices(available()) or 'none'}"
        )
    return _HERE / name
