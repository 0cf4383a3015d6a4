"""arcbox_net.reactor: the epoll reactor twistd runs the stack on.

Unit tests drive ``doPoll`` of a private reactor instance by hand (never run,
never installed) with pipes as the descriptors; the real-guest tests check what
``twistd arcbox-net`` installs and that ``-r`` still wins.
"""


import subprocess
import sys

import pytest
from conftest import TWISTD, in_ns, require_root


@pytest.mark.realguest
def test_twistd_serves_on_the_lean_reactor(netns, stack_factory):
    require_root()
    stack = stack_factory("--netns", netns, "--configure")
    out = in_ns(netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "3 packets transmitted, 3 received" in out
    assert "reactor class: arcbox_net.reactor.LeanEPollReactor" in stack.log()


@pytest.mark.realguest
def test_a_reactor_chosen_with_r_is_kept(netns, stack_factory):
    require_root()
    stack = stack_factory("--netns", netns, "--configure", twistd_args=["-r", "epoll"])
    out = in_ns(netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.1").stdout
    assert "3 packets transmitted, 3 received" in out
    assert "reactor class: twisted.internet.epollreactor.EPollReactor" in stack.log()


def test_busy_poll_with_a_chosen_reactor_is_a_one_line_error():
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "-r", "epoll", "arcbox-net",
                             "--netns", "x", "--busy-poll", "100"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["arcbox-net: --busy-poll needs arcbox-net's own reactor; "
                     "drop -r/--reactor"], result.stderr


def test_importing_the_package_leaves_the_reactor_to_the_program():
    """An embedder imports arcbox_net, then installs the lean reactor: nothing
    imported may have installed Twisted's default reactor first."""
    code = ("import importlib, pkgutil, sys, arcbox_net\n"
            "for m in pkgutil.walk_packages(arcbox_net.__path__, 'arcbox_net.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "from arcbox_net.reactor import install\n"
            "print(type(install()).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LeanEPollReactor"
