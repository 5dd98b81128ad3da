"""The backend selector: no silent fallback, and both hubs expose the same API."""

from __future__ import annotations

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
    py = _backend.load_hub("python")
    cy = _backend.load_hub("cython")
    assert set(py.__all__) == set(cy.__all__)
    py_hub, cy_hub = py.Hub(), cy.Hub()
    assert _public(py_hub) == _public(cy_hub)
    assert py_hub.stats().keys() == cy_hub.stats().keys()
    assert py.frame_text(b"x" * 200) == cy.frame_text(b"x" * 200)
    for size in (0, 125, 126, 65535, 65536, 70000):
        assert py.frame_text(b"a" * size) == cy.frame_text(b"a" * size), size


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        _backend.load_hub("rust")
