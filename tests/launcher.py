"""The real iotserver.py in a subprocess on loopback: one launcher for the tests, the soak and the benchmarks.

    from launcher import RunningServer      # tests/ on sys.path (bench/ scripts insert it)
    server = RunningServer(db, ["--quiet", "--api-key", KEY])
    ...
    server.stop()

Standard library only, so a benchmark can use it without pytest.
"""

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

ROOT = pathlib.Path(__file__).resolve().parent.parent
IOTSERVER = ROOT / "iotserver.py"
MAC = "6c:ef:7a:3b:9d:e8"
#: The line the server logs once it accepts connections; its port is group 1.
LISTENING = r"listening on http://[^:]+:(\d+)/"


def cli(db, *args, check=True, env=None):
    """Run iotserver.py with --db and the given flags; return the finished process."""
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(db), *args],
                          capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError("iotserver %s failed (%d): %s" % (args, proc.returncode, proc.stderr))
    return proc


class RunningServer:
    """One iotserver process, restartable on the same port and database.

    ``lines`` collects what it writes to stdout and stderr (across restarts); with ``log_path`` each
    line is also appended to that file. ``exits`` records (signal name, exit status) of each stop.
    """

    def __init__(self, db, args=(), env=None, host="127.0.0.1", port=0, log_path=None, timeout=20, module=False):
        self.db = pathlib.Path(db)
        # module: run as the systemd unit does, `python3 -m iotserver` (no script compiled in __main__)
        self.command = [sys.executable, "-m", "iotserver"] if module else [sys.executable, str(IOTSERVER)]
        if module:
            env = dict(os.environ if env is None else env, PYTHONPATH=str(IOTSERVER.parent))
        self.args, self.env, self.host, self.port = list(args), env, host, port
        self.log_path = log_path
        self.lines = []
        self.exits = []
        self.proc = None
        self._readers = []
        self._new_line = threading.Condition()
        self._key = None
        self._key_lock = threading.Lock()
        self.start(timeout)

    def start(self, timeout=20):
        """Start the process (again) on ``port`` (0: a free one) and wait until it listens."""
        with self._new_line:
            first = len(self.lines)
        self.proc = subprocess.Popen(
            [*self.command, "--port", str(self.port), "--host", self.host, "--db", str(self.db),
             *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, errors="backslashreplace")
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()
        match = self.wait_for_log(LISTENING, timeout=timeout, since=first)
        self.port = int(match.group(1))
        self.url = "http://%s:%d" % (self.host, self.port)

    def _read(self, stream):
        log = open(self.log_path, "a") if self.log_path else None
        try:
            for line in stream:
                with self._new_line:
                    self.lines.append(line.rstrip("\n"))
                    if log:
                        log.write(line)
                        log.flush()
                    self._new_line.notify_all()
        finally:
            if log:
                log.close()

    @property
    def log(self):
        with self._new_line:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern, timeout=10.0, since=0):
        """Wait until a log line (from index ``since`` on) matches; return the match."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines[since:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError("no log line matches %r; log:\n%s" % (pattern, "\n".join(self.lines)))
                self._new_line.wait(min(left, 0.2))

    @property
    def key(self):
        """The stored API key, read the way an owner would (--show-key): once, whichever thread asks first."""
        with self._key_lock:
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
                       "ORDER BY r.ts, r.n, r.field", params=()):
        """Read the database the way a second process would."""
        conn = sqlite3.connect(str(self.db), timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def rss_kb(self):
        """The server's resident memory now and its peak so far (VmRSS, VmHWM in kB); (0, 0) once it exited."""
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                status = f.read()
            return tuple(int(re.search(r"%s:\s+(\d+)" % name, status).group(1)) for name in ("VmRSS", "VmHWM"))
        except (OSError, AttributeError):
            return 0, 0

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal the server and return its exit status; kill it and raise AssertionError if it does not exit."""
        name = signal.Signals(sig).name
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if os.environ.get("SOAK_DUMP") and shutil.which("py-spy"):  # the stacks of a server that will not stop
                subprocess.run(["py-spy", "dump", "--pid", str(self.proc.pid)])
            self.proc.kill()
            self.proc.wait()
            self.exits.append((name, "still running %g s after %s" % (timeout, name)))
            raise AssertionError("server did not exit within %ss of %s" % (timeout, sig))
        for reader in self._readers:
            reader.join(5)
        self.exits.append((name, code))
        return code
