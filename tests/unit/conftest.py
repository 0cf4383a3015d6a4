"""Unit tests: no root, no namespaces, no real reactor.

Each test drives its objects with task.Clock, MemoryReactor or a private
reactor instance it never runs. A test that spins the global reactor (through
pytest-twisted) belongs in tests/guest; the fixture below fails it so it moves.
The tests also run as if not root (CI runs them as root), so one that needs
root fails here rather than passing only on CI.
"""

import os

import pytest
import pytest_twisted


@pytest.fixture(autouse=True)
def _no_global_reactor_and_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    before = pytest_twisted._instances.gr_twisted
    yield
    if before is None and pytest_twisted._instances.gr_twisted is not None:
        pytest.fail("this test ran the global reactor: it belongs in tests/guest")
