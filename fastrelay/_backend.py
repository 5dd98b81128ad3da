"""The one place that chooses the hub implementation.

``FASTRELAY_NO_EXTENSIONS`` is read once, here. ``BACKEND`` names what ``auto``
resolves to; ``load_hub("python")`` stays available next to the extension so
tests and benchmarks can run both in one process. Type checkers always see the
Python hub (``fastrelay.hub``): the compiled one is the same source.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from typing import TYPE_CHECKING, Final, cast

from . import hub as _hub_py
from .clients import Client

__all__ = ["BACKEND", "EXTENSION_ERROR", "NO_EXTENSIONS", "BackendUnavailable", "Client", "Hub",
           "load_hub"]

NO_EXTENSIONS: Final = bool(os.environ.get("FASTRELAY_NO_EXTENSIONS"))

EXTENSION_ERROR: str | None = None
if NO_EXTENSIONS:
    EXTENSION_ERROR = "disabled by FASTRELAY_NO_EXTENSIONS"
else:
    try:
        from . import _core, _hub_c
    except ImportError as exc:
        EXTENSION_ERROR = f"{exc}"
    else:
        # _hub_c.py (the link Cython compiles) imports as plain Python when
        # the build left out its extension: that is not the accelerated hub.
        for _module in (_core, _hub_c):
            if not (_module.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES)):
                EXTENSION_ERROR = f"{_module.__name__} is not compiled"

BACKEND: Final = "python" if EXTENSION_ERROR else "cython"

if TYPE_CHECKING or EXTENSION_ERROR:
    from .hub import Hub
else:
    from ._hub_c import Hub


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (the Cython core was not built or was disabled)."""


def load_hub(backend: str = "auto") -> type[Hub]:
    """Return the hub class for ``backend`` ("auto", "cython" or "python")."""
    if backend == "auto":
        backend = BACKEND
    if backend == "python":
        return _hub_py.Hub
    if backend == "cython":
        if EXTENSION_ERROR:
            raise BackendUnavailable(
                f"the Cython backend is not available ({EXTENSION_ERROR}); "
                "reinstall with a C compiler, or use --backend python"
            )
        from . import _hub_c

        return cast("type[Hub]", _hub_c.Hub)
    raise ValueError(f"unknown backend {backend!r}: use auto, cython or python")
