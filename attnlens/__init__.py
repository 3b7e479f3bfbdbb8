"""attnlens: look inside the joint text-image/video attention of diffusion transformers.

>>> import attnlens
>>> sorted(attnlens.supported_models())
['flux']
"""

__version__ = "0.1.0"

from .capture import CaptureSpec
from .errors import AttnlensError
from .models.registry import supported_models
from .session import Capture, capture
from .text import TokenLabels, label_tokens

__all__ = [
    "AttnlensError",
    "Capture",
    "CaptureSpec",
    "TokenLabels",
    "__version__",
    "capture",
    "label_tokens",
    "supported_models",
]
