"""attnlens: look inside the joint text-image/video attention of diffusion transformers.

>>> import attnlens
>>> {"flux", "mochi", "wan"} <= set(attnlens.supported_models())
True
"""

import importlib
import sys
import types

__version__ = "0.1.0"

from . import accessor  # noqa: F401  (registers the ds.attnlens accessor)

# Where each public name lives. They are imported on first use, so that `import attnlens` (and
# with it every `attnlens` command, `inspect` or `plan` say) does not pay for torch and
# diffusers until a model is touched.
_HOMES = {
    "AttnlensError": "errors",
    "Capture": "capture",
    "CaptureSpec": "spec",
    "TokenLabels": "text",
    "capture": "capture",
    "capture_prompts": "batch",
    "cluster": "cluster",
    "explore": "viz.explorer",
    "label_tokens": "text",
    "open_store": "store",
    "redirect": "interventions",
    "supported_models": "models.registry",
    "suppress": "interventions",
}
_SUBMODULES = ("analysis", "refam")

__all__ = sorted(["__version__", *_HOMES, *_SUBMODULES])


def __getattr__(name: str):
    if name not in _HOMES:  # a submodule, as once any import has loaded it
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'attnlens' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, whose functions ``capture`` and ``cluster`` share their names with modules.

    Importing a submodule sets it as an attribute of the package; for these two the function
    stays, as it does when ``from .capture import capture`` runs after the import.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _HOMES and _HOMES[name] == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
