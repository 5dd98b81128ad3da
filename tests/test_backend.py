"""The backend selector: no silent fallback, and both hubs expose the same API."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import fastrelay
from fastrelay import _backend


def test_extension_loaded_unless_pure_build_was_asked_for():
    if os.environ.get("FASTRELAY_NO_EXTENSIONS"):
        assert fastrelay.BACKEND == "python"
    else:
        assert fastrelay.BACKEND == "cython", (
            f"the Cython core did not load ({_backend.EXTENSION_ERROR}); build it with "
            "FASTRELAY_BUILD_EXTENSION=yes pip install -e . or set FASTRELAY_NO_EXTENSIONS=1")


def test_no_extensions_switch_forces_python():
    out = subprocess.run(
        [sys.executable, "-c", "import fastrelay; print(fastrelay.BACKEND)"],
        env={**os.environ, "FASTRELAY_NO_EXTENSIONS": "1"}, capture_output=True, text=True,
        check=True)
    assert out.stdout.strip() == "python"


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.mark.skipif(bool(os.environ.get("FASTRELAY_NO_EXTENSIONS")), reason="pure build")
def test_both_hubs_have_the_same_api():
    from fastrelay import _core, _core_py

    py_hub, cy_hub = _backend.load_hub("python")(), _backend.load_hub("cython")()
    assert (py_hub.backend, cy_hub.backend) == ("python", "cython")
    assert _public(py_hub) == _public(cy_hub)
    py_stats = py_hub.stats()
    assert py_stats == dataclasses.replace(cy_hub.stats(), backend="python", epoch=py_stats.epoch)
    # The primitives: one API, and the same bytes out of both.
    assert set(_core.__all__) == set(_core_py.__all__)
    assert _public(_core.Batch(1024)) == _public(_core_py.Batch(1024))
    for size in (0, 125, 126, 65535, 65536, 70000):
        assert _core.frame_text(b"a" * size) == _core_py.frame_text(b"a" * size), size


def test_compiled_hub_is_the_compiled_copy_of_hub_py():
    """_hub_c must be an extension module built from fastrelay/hub.py, not the link imported as Python."""
    if _backend.EXTENSION_ERROR:
        pytest.skip(_backend.EXTENSION_ERROR)
    from fastrelay import _hub_c, hub

    assert not _hub_c.__file__.endswith(".py")
    assert _hub_c.NATIVE and not hub.NATIVE
    assert _public(hub.Hub) <= _public(_hub_c.Hub)  # the compiled class adds attribute descriptors


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        _backend.load_hub("rust")
