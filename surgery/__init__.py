"""surgery: declarative model surgery for pretrained PyTorch image models.

    >>> import surgery
    >>> spec = surgery.load_spec("specs/resnet18-cbam-garbage.yaml")
    >>> built = surgery.build(spec)          # .model, .report, .groups

Importing this package does not import torch; `build` and the training engine do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import SpecError
from .spec import Spec, load_spec, schema

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .builder import Built, build


def __getattr__(name: str) -> Any:
    if name in ("build", "Built"):
        from . import builder as _builder

        return getattr(_builder, name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = ["SpecError", "Spec", "load_spec", "schema", "build", "Built", "__version__"]
