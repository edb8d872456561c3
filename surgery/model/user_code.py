"""User classes named in a spec: 'package.module:Class' (or a dotted path), and where they are found.

A module is looked up on `sys.path` first (an installed package, PYTHONPATH, the working
directory under `python -m`), then in the folder of the spec file that names it, so that a
`my_attn.py` beside the spec works without PYTHONPATH. That folder is put on `sys.path` for
this one import and taken off again; the imported module stays in `sys.modules`.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Sequence

from ..spec import Spec


def _not_found(exc: ModuleNotFoundError, module_name: str) -> bool:
    # the module itself (or a package above it) is missing, not something it imports
    return exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + "."))


def import_user_module(
    spec: Spec, where: Sequence, module_name: str, *, found: str, expected: str, hint: str | None = None
) -> ModuleType:
    """Import `module_name` for the spec entry at `where`: from sys.path, else from the spec's folder.

    Raises:
        SpecError: at `where`, naming the folder searched, when neither has it or it fails to import.
    """
    folder = spec.resolve_path(".", tuple(where)).resolve()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _not_found(exc, module_name):
            raise _failed(spec, where, module_name, exc, found, expected, hint) from None
    except Exception as exc:  # noqa: BLE001 - a user module that fails on import is the entry's problem
        raise _failed(spec, where, module_name, exc, found, expected, hint) from None
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _not_found(exc, module_name):
            raise _failed(spec, where, module_name, exc, found, expected, hint) from None
        top = module_name.partition(".")[0]
        raise spec.error(
            where,
            f"cannot import {module_name!r}: no such module on sys.path, nor in the spec's folder {folder}",
            found=found,
            expected=expected,
            hint=hint
            or f"put {top}.py (or a {top}/ package) beside the spec, install its package, "
            "or add its folder to PYTHONPATH",
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise _failed(spec, where, module_name, exc, found, expected, hint) from None
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


def _failed(
    spec: Spec, where: Sequence, module_name: str, exc: BaseException, found: str, expected: str, hint: str | None
):
    from ..errors import describe_exception

    return spec.error(
        where,
        f"cannot import {module_name!r}: {describe_exception(exc, 300)}",
        found=found,
        expected=expected,
        hint=hint,
    )


__all__ = ["import_user_module"]
