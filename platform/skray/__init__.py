"""skray: SK-ResNeXt-50 on Ray — bulk labeling, training, sweeps and serving.

The names a user imports first are re-exported here and loaded on first use, as timm's
``__init__`` does, so ``import skray`` loads neither torch's model code nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "skray.core.model",
    "list_models": "skray.core.specs",
    "model_spec": "skray.core.specs",
    "prepare_for_inference": "skray.core.model",
    "PreprocessingConfig": "skray.core.preprocessing",
    "Classifier": "skray.inference.classifier",
    "Prediction": "skray.inference.classifier",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from skray.core.model import create_model as create_model
    from skray.core.model import prepare_for_inference as prepare_for_inference
    from skray.core.preprocessing import PreprocessingConfig as PreprocessingConfig
    from skray.core.specs import list_models as list_models
    from skray.core.specs import model_spec as model_spec
    from skray.inference.classifier import Classifier as Classifier
    from skray.inference.classifier import Prediction as Prediction


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'skray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
