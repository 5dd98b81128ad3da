"""Fixtures shared by the suite: every relay test runs once per backend.

Relays are real `fastrelay serve` subprocesses on loopback, each with its own
socket path and log directory; tests talk to them with real clients.
"""

from __future__ import annotations

import os

import pytest
from netns import LinkUnavailable, SlowLink
from relayproc import Relay, RelayFactory

# The backends every relay test runs on. The Cython one is skipped only when
# the pure build was asked for; otherwise a missing extension fails the suite
# (see test_backend.py), it never silently falls back.
BACKENDS = ["cython", "python"]
NO_EXTENSIONS = bool(os.environ.get("FASTRELAY_NO_EXTENSIONS"))


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "cython" and NO_EXTENSIONS:
        pytest.skip("FASTRELAY_NO_EXTENSIONS=1: the pure-Python backend only")
    return name


@pytest.fixture
def relay_factory(backend: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    factory = RelayFactory(backend, tmp_path_factory.mktemp("relay"))
    yield factory
    factory.stop_all()


@pytest.fixture
def relay(relay_factory: RelayFactory) -> Relay:
    """A running relay with default options but a fast ping (so silent tests stay short)."""
    return relay_factory.start()


@pytest.fixture
def slow_link():  # type: ignore[no-untyped-def]
    """A private network namespace whose loopback is capped at 20 Mbit/s (tests/netns.py).

    Start a relay in it with ``relay_factory.start(..., link=slow_link)``; make
    client sockets in it with ``slow_link.connect(host, port)``. Skips when the
    machine cannot make one (not root, no iproute2, no netns support).
    """
    try:
        link = SlowLink()
    except LinkUnavailable as exc:
        pytest.skip(f"no slow link: {exc}")
    yield link
    link.close()
