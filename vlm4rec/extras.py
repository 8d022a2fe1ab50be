"""Optional dependencies (the package's extras): import one, or say how to install it.

Reports (charts) and process measurements are not part of running the product, so matplotlib
and psutil live in the `measure` extra; the command that needs one names the install line.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{purpose} needs {module.split('.')[0]}, in the '{extra}' extra: "
            f"pip install -e '.[{extra}]' in a checkout, pip install 'vlm4rec[{extra}]' otherwise"
        ) from exc
