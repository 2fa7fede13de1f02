"""Fixtures: the real iotserver in a subprocess on a free loopback port."""

import os
import shutil
import signal

import pytest

from launcher import IOTSERVER, MAC, ROOT, RunningServer, cli  # noqa: F401 (tests import them from here)

MAC2 = "6c:ef:7a:3b:9d:e9"
#: Flags that let a test post fast without meeting the per-station rate limit.
FAST = ("--rate", "600000", "--burst", "100000")


def need_tool(name):
    """Path of a system tool; skip without it on a laptop, fail under CI."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("%s is required under CI (.ci/run installs it)" % name)
    pytest.skip("%s is not installed (apt-get install it, or run .ci/run)" % name)


def need_module(name):
    """Import a Python package the tests need; skip without it on a laptop, fail under CI."""
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("%s is required under CI (pip install -r requirements-dev.txt)" % name)
        pytest.skip("%s is not installed (pip install -r requirements-dev.txt)" % name)


@pytest.fixture
def start(tmp_path):
    """Start iotserver processes (``start(*flags, db=...)``); all are stopped after the test."""
    servers = []

    def _start(*args, db=None, env=None, host="127.0.0.1"):
        server = RunningServer(db or tmp_path / "iotserver.db", args, env=env, host=host)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.fixture
def server(start):
    """A server with a generous rate limit, for tests that post many readings."""
    return start(*FAST)
