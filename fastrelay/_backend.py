"""The one place that chooses the hub implementation.

``FASTRELAY_NO_EXTENSIONS`` is read once, here. ``BACKEND`` names what ``auto``
resolves to; ``load_hub("python")`` stays available next to the extension so
tests and benchmarks can run both in one process.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Final

__all__ = ["BACKEND", "EXTENSION_ERROR", "NO_EXTENSIONS", "BackendUnavailable", "load_hub"]

NO_EXTENSIONS: Final = bool(os.environ.get("FASTRELAY_NO_EXTENSIONS"))

EXTENSION_ERROR: str | None = None
if NO_EXTENSIONS:
    EXTENSION_ERROR = "disabled by FASTRELAY_NO_EXTENSIONS"
else:
    try:
        from . import _core as _compiled  # noqa: F401  (only probing that it loads)
    except ImportError as exc:
        EXTENSION_ERROR = f"{exc}"

BACKEND: Final = "python" if EXTENSION_ERROR else "cython"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (the Cython core was not built or was disabled)."""


def load_hub(backend: str = "auto") -> ModuleType:
    """Return the hub module for ``backend`` ("auto", "cython" or "python")."""
    if backend == "auto":
        backend = BACKEND
    if backend == "python":
        from . import _core_py

        return _core_py
    if backend == "cython":
        if EXTENSION_ERROR:
            raise BackendUnavailable(
                f"the Cython backend is not available ({EXTENSION_ERROR}); "
                "reinstall with a C compiler, or use --backend python"
            )
        from . import _core

        return _core
    raise ValueError(f"unknown backend {backend!r}: use auto, cython or python")
