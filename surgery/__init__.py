"""surgery: declarative model surgery for pretrained PyTorch image models.

    >>> import surgery
    >>> spec = surgery.load_spec("specs/resnet18-cbam-garbage.yaml")
    >>> built = surgery.build(spec)          # .model, .report, .groups
    >>> surgery.validate("specs/resnet18-cbam-garbage.yaml")   # warnings; raises SpecError

Importing this package does not import torch; `build` and the training engine do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import RunDirError, SpecError, UsageError, UserError
from .spec import Spec, load_spec, schema

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .model.builder import Built, build
    from .validation import validate


def __getattr__(name: str) -> Any:
    if name in ("build", "Built"):
        from .model import builder as _builder

        return getattr(_builder, name)
    if name == "validate":
        from .validation import validate

        return validate
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = [
    "UserError",
    "SpecError",
    "UsageError",
    "RunDirError",
    "Spec",
    "load_spec",
    "schema",
    "build",
    "Built",
    "validate",
    "__version__",
]
