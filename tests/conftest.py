"""Fixtures: the real iotserver in a subprocess on a free loopback port."""

import http.client
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
IOTSERVER = ROOT / "iotserver.py"
MAC = "6c:ef:7a:3b:9d:e8"
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


def cli(db, *args, check=True, env=None):
    """Run iotserver.py with --db and the given flags; return the finished process."""
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(db), *args],
                          capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError("iotserver %s failed (%d): %s" % (args, proc.returncode, proc.stderr))
    return proc


class RunningServer:
    """One iotserver process; ``log`` collects what it writes to stderr."""

    def __init__(self, db, args=(), env=None, host="127.0.0.1"):
        self.db = pathlib.Path(db)
        self.host = host
        self.lines = []
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, str(IOTSERVER), "--port", "0", "--host", host, "--db", str(db), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            errors="backslashreplace")
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()
        match = self.wait_for_log(r"listening on http://[^:]+:(\d+)/", timeout=20)
        self.port = int(match.group(1))
        self.url = "http://%s:%d" % (host, self.port)
        self._key = None

    def _read(self, stream):
        for line in stream:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    @property
    def log(self):
        with self._new_line:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern, timeout=10.0):
        """Wait until a log line matches; return the match."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    match = re.search(pattern, line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError("no log line matches %r; log:\n%s" % (pattern, "\n".join(self.lines)))
                self._new_line.wait(min(left, 0.2))

    @property
    def key(self):
        """The API key, read the way an owner would: --show-key."""
        if self._key is None:
            out = cli(self.db, "--show-key").stdout
            self._key = re.search(r"API key: (\S+)", out).group(1)
        return self._key

    def request(self, path, method="GET", headers=None, body=None, source=None):
        """One request on a new connection; return (status, headers dict, body text)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8")
        finally:
            conn.close()

    def update(self, data="21.4", mac=MAC, field=1, key=None, **kwargs):
        """Post a reading the way a station does."""
        key = self.key if key is None else key
        return self.request("/update/API_key=%s/mac=%s/field=%s/data=%s" % (key, mac, field, data), **kwargs)

    def rows(self, sql="SELECT s.mac, r.field, r.value, r.ts FROM readings r JOIN stations s ON s.id = r.station_id "
                       "ORDER BY r.id", params=()):
        """Read the database the way a second process would."""
        conn = sqlite3.connect(str(self.db), timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal the server and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError("server did not exit within %ss of %s" % (timeout, sig))
        for reader in self._readers:
            reader.join(5)
        return code


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
