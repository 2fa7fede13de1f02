#!/usr/bin/env python3
"""iotserver: a self-hosted server for hobbyist sensor stations, standard library only.

Stations post readings as ``GET /update/API_key=KEY/mac=MAC/field=N/data=VALUE``;
iotserver rate-limits each station, stores readings in SQLite and serves a page.

    python3 iotserver.py                      # serve on 127.0.0.1:8000, ./iotserver.db
    python3 iotserver.py --prune-days 90      # from cron: delete old readings
    python3 iotserver.py --help               # every flag
"""

import argparse
import collections
import contextlib
import datetime
import hmac
import html
import math
import os
import re
import secrets
import signal
import socket
import sqlite3
import string
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

###############################################################################
# Configuration ###############################################################
###############################################################################

#: Environment variable that may hold the API key (for systemd EnvironmentFile=).
KEY_ENV = "IOTSERVER_API_KEY"
#: Readings per minute a station may post on average, and how many in a burst.
DEFAULT_RATE = 10.0
DEFAULT_BURST = 10
#: Wrong keys a client address may send in a burst, then one every this many seconds.
KEY_FAILURE_BURST = 10
KEY_FAILURE_INTERVAL = 6.0
#: Token buckets kept in memory at most; the least recently used is dropped first.
MAX_BUCKETS = 10_000
#: Stations registered automatically at most, so a flood of MACs cannot fill the disk.
DEFAULT_MAX_STATIONS = 100
#: Seconds an idle or slow client may hold a connection (and its thread).
DEFAULT_TIMEOUT = 20.0
#: Largest |value| accepted; real sensors are far below (pressure in Pa is ~1e5).
MAX_ABS_VALUE = 1e9
#: Longest data value accepted, in characters.
MAX_DATA_LEN = 32
#: Longest /update path accepted, in bytes.
MAX_UPDATE_PATH = 512
#: Rows deleted per transaction when pruning, so the server never waits long.
PRUNE_BATCH = 2000
#: Station roles the page compares.
ROLES = ("indoor", "outdoor")

_KEY_RE = re.compile(r"[A-Za-z0-9._~-]{8,128}", re.ASCII)


###############################################################################
# Exceptions ##################################################################
###############################################################################


class IotError(Exception):
    """Root of every error iotserver raises on purpose."""


class HTTPError(IotError):
    """An answer to the client other than success; raised by routes, sent in one place."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = list(headers)


class Refused(IotError):
    """Storage will not take a reading (registration locked, station limit)."""


class StoreError(IotError):
    """The database cannot be opened or used; the message says why."""


###############################################################################
# Parsing a reading ###########################################################
###############################################################################

_MAC_RE = re.compile(r"[0-9a-f]{2}([:-]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}", re.ASCII | re.I)
_FIELD_RE = re.compile(r"[1-8]", re.ASCII)
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_PERCENT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UPDATE_PARTS = ("api_key", "mac", "field", "data")


def _unquote_strict(text):
    """Percent-decode once to bytes; a stray '%' or a non-ASCII character is an error."""
    raw = text.encode("latin-1")  # http.server decodes the request line as latin-1
    if any(b > 0x7E or b < 0x21 for b in raw):
        raise ValueError("must be printable ASCII (percent-encode anything else)")
    if raw.count(b"%") != len(_PERCENT_RE.findall(raw)):
        raise ValueError("has a '%' that is not followed by two hex digits")
    return _PERCENT_RE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def parse_mac(text):
    """Return the canonical form (``6c:ef:7a:3b:9d:e8``) of a MAC, or raise ValueError."""
    if not isinstance(text, str) or not _MAC_RE.fullmatch(text):
        raise ValueError("mac must be six hex pairs, e.g. 6c:ef:7a:3b:9d:e8")
    digits = re.sub("[:-]", "", text).lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def parse_value(text):
    """Return a finite float from a plain ASCII decimal number, or raise ValueError."""
    if not text:
        raise ValueError("data is empty")
    if len(text) > MAX_DATA_LEN:
        raise ValueError("data is longer than %d characters" % MAX_DATA_LEN)
    if not _NUMBER_RE.fullmatch(text):
        raise ValueError("data must be a plain decimal number such as 21.4")
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
        raise ValueError("data is out of range (at most %g in size)" % MAX_ABS_VALUE)
    return value


def parse_update(path):
    """Split ``/update/API_key=K/mac=M/field=N/data=V`` into (key bytes, mac, field, value).

    Names must be literal; each value is percent-decoded exactly once. Raises
    HTTPError(400) naming the bad part.
    """
    if len(path) > MAX_UPDATE_PATH:
        raise HTTPError(HTTPStatus.REQUEST_URI_TOO_LONG, "path is longer than %d bytes" % MAX_UPDATE_PATH)
    segments = path.split("/")[2:]
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash is harmless
    parts = {}
    for segment in segments:
        name, sep, raw = segment.partition("=")
        lname = name.lower()
        if not sep or lname not in _UPDATE_PARTS:
            shown = name[:20].encode("latin-1").decode("ascii", "replace") if name else "(empty)"
            raise HTTPError(400, "unknown path segment %r; expected API_key=, mac=, field=, data=" % shown)
        if lname in parts:
            raise HTTPError(400, "%s is given twice" % lname)
        try:
            parts[lname] = _unquote_strict(raw)
        except ValueError as exc:
            raise HTTPError(400, "%s %s" % (lname, exc)) from None
    missing = [p for p in _UPDATE_PARTS if p not in parts]
    if missing:
        raise HTTPError(400, "missing %s" % ", ".join(missing))
    key = parts["api_key"]
    try:
        mac = parse_mac(parts["mac"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "mac must be six hex pairs, e.g. 6c:ef:7a:3b:9d:e8") from None
    field = parts["field"].decode("ascii", "replace")
    if not _FIELD_RE.fullmatch(field):
        raise HTTPError(400, "field must be a whole number from 1 to 8")
    try:
        value = parse_value(parts["data"].decode("ascii"))
    except UnicodeDecodeError:
        raise HTTPError(400, "data must be a plain decimal number such as 21.4") from None
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    return key, mac, int(field), value


###############################################################################
# Rate limiting ###############################################################
###############################################################################


class TokenBuckets:
    """One token bucket per key (a MAC or an address), at most ``max_entries`` kept."""

    def __init__(self, rate, burst, max_entries=MAX_BUCKETS):
        self.rate = float(rate)  # tokens per second
        self.burst = float(burst)
        self.max_entries = max_entries
        self._buckets = collections.OrderedDict()  # key -> [tokens, last refill]
        self._lock = threading.Lock()

    def take(self, key, now=None):
        """Take a token; return 0 when allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_entries:
                    self._buckets.popitem(last=False)
                bucket = self._buckets[key] = [self.burst, now]
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return 0.0
            return (1.0 - bucket[0]) / self.rate if self.rate > 0 else 3600.0

    def peek(self, key, now=None):
        """Return the seconds until ``key`` may take a token, without taking one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return 0.0
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            if tokens >= 1.0:
                return 0.0
            return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0

    def __len__(self):
        return len(self._buckets)


def _retry_after(seconds):
    return [("Retry-After", str(max(1, math.ceil(seconds))))]


###############################################################################
# Storage #####################################################################
###############################################################################

#: Schema changes in order; migration N is recorded as PRAGMA user_version = N
#: in the same transaction that applies it.
MIGRATIONS = (
    (
        """CREATE TABLE stations (
            id INTEGER PRIMARY KEY,
            mac TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            role TEXT UNIQUE CHECK (role IN ('indoor', 'outdoor')),
            created_at INTEGER NOT NULL)""",
        """CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            station_id INTEGER NOT NULL REFERENCES stations (id),
            field INTEGER NOT NULL CHECK (field BETWEEN 1 AND 8),
            value REAL NOT NULL,
            ts INTEGER NOT NULL)""",
        # latest reading of a station's field, and a field over a time range
        "CREATE INDEX readings_station_field_ts ON readings (station_id, field, ts)",
        # a station over a time range, and pruning station by station
        "CREATE INDEX readings_station_ts ON readings (station_id, ts)",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
)


def now_ms():
    """Milliseconds since the epoch, UTC."""
    return time.time_ns() // 1_000_000


def iso_utc(ms):
    """ISO-8601 UTC text for a stored timestamp."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """The SQLite database: one write connection shared under a lock, WAL mode."""

    def __init__(self, path, create=True):
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StoreError("database directory %s does not exist" % directory)
        if not create and not os.path.exists(self.path):
            raise StoreError("no database at %s" % self.path)
        self._lock = threading.RLock()
        self._pending = []  # readings waiting for the write lock: [mac, field, value, ts, max, id, error]
        self._pending_lock = threading.Lock()
        try:
            self._conn = self._connect()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._conn.close()
            raise StoreError("cannot use database %s: %s" % (self.path, exc)) from None
        self._data_version = None
        self._stations = {}
        self._settings = {}
        self._refresh()

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError("cannot put %s in WAL mode (got %s)" % (self.path, mode))
            # NORMAL in WAL: a commit survives a crash of this process (kill -9);
            # only a power loss may roll back the last commits
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # keep the -wal file from growing without bound after a busy spell
            conn.execute("PRAGMA journal_size_limit = 16777216")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def atomic(self):
        """One write transaction (BEGIN IMMEDIATE), committed or rolled back as a whole."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self):
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError("database %s has schema %d; this iotserver knows only %d (newer iotserver?)"
                             % (self.path, version, len(MIGRATIONS)))
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.atomic() as conn:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("PRAGMA user_version = %d" % number)

    def close(self):
        """Close the database (after a final checkpoint)."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    # -- cached settings and stations; reloaded when another process commits --

    def _refresh(self):
        """Reload stations and settings if any other connection committed since last time."""
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._stations = dict(self._conn.execute("SELECT mac, id FROM stations"))
            self._settings = dict(self._conn.execute("SELECT name, value FROM settings"))
            self._data_version = version

    def setting(self, name, default=None):
        """A stored setting (as text), current as of this call."""
        self._refresh()
        return self._settings.get(name, default)

    def set_setting(self, name, value):
        with self.atomic() as conn:
            conn.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, str(value)))
            self._settings[name] = str(value)

    def ensure_key(self):
        """Return (key, created): the stored API key, generating one on first use."""
        with self.atomic() as conn:
            row = conn.execute("SELECT value FROM settings WHERE name = 'api_key'").fetchone()
            if row:
                return row[0], False
            key = secrets.token_urlsafe(18)
            conn.execute("INSERT INTO settings (name, value) VALUES ('api_key', ?)", (key,))
        self._settings["api_key"] = key
        return key, True

    def rotate_key(self):
        key = secrets.token_urlsafe(18)
        self.set_setting("api_key", key)
        return key

    # -- readings --

    def add_reading(self, mac, field, value, max_stations=DEFAULT_MAX_STATIONS, ts=None):
        """Store one reading, registering the station if new; return the reading's id.

        Group commit: readings that arrive while another thread is writing wait for
        the lock, and whoever gets it first writes every waiting reading in one
        transaction. Each caller still returns only after its own reading committed.
        """
        item = [mac, field, value, now_ms() if ts is None else ts, max_stations, None, None]
        with self._pending_lock:
            self._pending.append(item)
        with self._lock:
            if item[5] is None and item[6] is None:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._write_batch(batch)
        if item[6] is not None:
            raise item[6]
        return item[5]

    def _write_batch(self, batch):
        """Write pending readings in one transaction; set each item's id or its exception."""
        added = {}
        try:
            with self.atomic() as conn:
                self._refresh()
                for item in batch:
                    mac, field, value, ts, max_stations = item[:5]
                    station_id = self._stations.get(mac) or added.get(mac)
                    if station_id is None:
                        if self._settings.get("locked") == "1":
                            item[6] = Refused("registration is locked; unknown station %s" % mac)
                            continue
                        if len(self._stations) + len(added) >= max_stations:
                            item[6] = Refused("station limit (%d) reached; forget a station first" % max_stations)
                            continue
                        station_id = added[mac] = conn.execute(
                            "INSERT INTO stations (mac, name, created_at) VALUES (?, ?, ?)", (mac, mac, ts)
                        ).lastrowid
                    item[5] = conn.execute(
                        "INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)",
                        (station_id, field, value, ts)).lastrowid
        except Exception as exc:
            for item in batch:
                item[5], item[6] = None, exc
            return
        self._stations.update(added)  # cached only once the transaction has committed

    def stations(self):
        """Every station as a dict, with readings count and last time seen."""
        with self._lock:
            rows = self._conn.execute(
                """SELECT s.id, s.mac, s.name, s.role, s.created_at,
                          (SELECT max(ts) FROM readings WHERE station_id = s.id),
                          (SELECT count(*) FROM readings WHERE station_id = s.id)
                   FROM stations s ORDER BY s.role IS NULL, s.role, s.name""").fetchall()
        keys = ("id", "mac", "name", "role", "created_at", "last_seen", "readings")
        return [dict(zip(keys, row)) for row in rows]

    def _station_id(self, conn, mac):
        row = conn.execute("SELECT id FROM stations WHERE mac = ?", (mac,)).fetchone()
        if row is None:
            raise StoreError("no station with mac %s (see --stations)" % mac)
        return row[0]

    def rename(self, mac, name):
        with self.atomic() as conn:
            conn.execute("UPDATE stations SET name = ? WHERE id = ?", (name, self._station_id(conn, mac)))

    def set_role(self, mac, role):
        """Mark a station indoor or outdoor (taking the role from any other), or clear it."""
        role = None if role == "none" else role
        with self.atomic() as conn:
            station_id = self._station_id(conn, mac)
            if role:
                conn.execute("UPDATE stations SET role = NULL WHERE role = ?", (role,))
            conn.execute("UPDATE stations SET role = ? WHERE id = ?", (role, station_id))

    def _delete_batches(self, where, params, pause=0.005):
        """Delete readings matching ``where`` in short transactions; return how many."""
        total = 0
        while True:
            with self.atomic() as conn:
                deleted = conn.execute(
                    "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE %s LIMIT %d)"
                    % (where, PRUNE_BATCH), params).rowcount
            total += deleted
            if deleted < PRUNE_BATCH:
                return total
            time.sleep(pause)  # let the server's writes in between batches

    def forget(self, mac):
        """Delete a station and all its readings; return how many readings went."""
        with self._lock:
            station_id = self._station_id(self._conn, mac)
        total = self._delete_batches("station_id = ?", (station_id,))
        with self.atomic() as conn:
            total += conn.execute("DELETE FROM readings WHERE station_id = ?", (station_id,)).rowcount
            conn.execute("DELETE FROM stations WHERE id = ?", (station_id,))
        return total

    def prune(self, days):
        """Delete readings older than ``days`` days, station by station, in batches."""
        cutoff = now_ms() - int(days * 86_400_000)
        with self._lock:
            ids = [row[0] for row in self._conn.execute("SELECT id FROM stations")]
        total = sum(self._delete_batches("station_id = ? AND ts < ?", (sid, cutoff)) for sid in ids)
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return total


###############################################################################
# Rendering ###################################################################
###############################################################################

_INDEX_PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>iotserver</title></head>
<body><h1>iotserver</h1>
<p>$count station(s) registered.</p>
</body></html>
""")


def render_index(store):
    """The page at /."""
    return _INDEX_PAGE.substitute(count=len(store.stations())).encode()


###############################################################################
# HTTP handler ################################################################
###############################################################################

_CONTROL_CHARS = {c: "\\x%02x" % c for c in list(range(0x20)) + [0x7F]}
_KEY_IN_TEXT_RE = re.compile(r"(api_key=)[^/&\s\"]*", re.I)


def redact(text, key=None):
    """Hide every API key in a log line."""
    if key:
        text = text.replace(key, "[redacted]")
    return _KEY_IN_TEXT_RE.sub(r"\1[redacted]", text)


class Response:
    """What a route returns: status, body bytes, content type and extra headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, body=b"", status=HTTPStatus.OK, content_type="text/plain; charset=utf-8", headers=()):
        self.status = HTTPStatus(status)
        self.body = body
        self.content_type = content_type
        self.headers = list(headers)


class Handler(BaseHTTPRequestHandler):
    """Answers stations, browsers and uptime monitors."""

    server_version = "iotserver/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # header and body are separate writes: without TCP_NODELAY a keep-alive
    # response stalls ~40 ms (Nagle + delayed ACK)
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.client_timeout  # idle clients cannot hold a thread forever
        super().setup()
        self._busy = False
        self.server.track(self, True)

    def finish(self):
        self.server.track(self, False)
        with contextlib.suppress(OSError):
            super().finish()

    # -- dispatch --

    def handle_one_request(self):
        """Read one request and dispatch by method name; unknown methods get 405, not 501."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            self._busy = True
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"  # answer with a status line all the same
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self._send(self._method_not_allowed())
            else:
                method()
            self.wfile.flush()
        except TimeoutError as exc:
            self.log_error("request timed out: %r", exc)
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        finally:
            self._busy = False
            if self.server.stopping:
                self.close_connection = True

    def do_GET(self):
        self._send(self._route())

    def do_HEAD(self):
        self._send(self._route())

    def do_POST(self):
        self._send(self._method_not_allowed())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _path(self):
        """The request path without query, scheme or host."""
        path = self.path
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        return path.split("?", 1)[0]

    def _method_not_allowed(self):
        path = self._path()
        if path == "/" or path == "/update" or path.startswith("/update/"):
            allow = "GET" if path.startswith("/update") else "GET, HEAD"
            return HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method %s not allowed here; use %s"
                             % (self.command[:16], allow), [("Allow", allow)])
        return HTTPError(HTTPStatus.NOT_FOUND, "no such page")

    def _route(self):
        """Find the route for a GET/HEAD and run it; errors come back as values."""
        try:
            path = self._path()
            if path == "/":
                return Response(render_index(self.server.store), content_type="text/html; charset=utf-8")
            if path == "/update" or path.startswith("/update/"):
                if self.command == "HEAD":
                    return HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "use GET to post a reading", [("Allow", "GET")])
                return self._update(path)
            return HTTPError(HTTPStatus.NOT_FOUND, "no such page")
        except HTTPError as exc:
            return exc
        except MemoryError:
            raise
        except sqlite3.Error as exc:
            self.log_error("storage error: %s", exc)
            return HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "storage unavailable, try again later",
                             _retry_after(30))
        except Exception:
            self.log_error("internal error:\n%s", traceback.format_exc())
            return HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    # -- routes --

    def _update(self, path):
        """Store one reading from a station."""
        server = self.server
        key, mac, field, value = parse_update(path)
        address = self.client_ip()
        wait = server.key_failures.peek(address)
        if wait:
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "too many wrong keys; wait", _retry_after(wait))
        if not hmac.compare_digest(key, server.api_key().encode()):
            wait = server.key_failures.take(address)
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "wrong API key")
        wait = server.buckets.take(mac)
        if wait:
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "station %s is posting too often" % mac,
                            _retry_after(wait))
        try:
            server.store.add_reading(mac, field, value, max_stations=server.max_stations)
        except Refused as exc:
            raise HTTPError(HTTPStatus.FORBIDDEN, str(exc)) from None
        return Response(b"stored\n")

    # -- answering --

    def client_ip(self):
        """The client's address."""
        return self.client_address[0] if self.client_address else "-"

    def _send(self, response):
        if isinstance(response, HTTPError):
            body = ("%d %s\n" % (response.status, response.message)).encode("utf-8", "replace")
            response = Response(body, response.status, headers=response.headers)
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            # an unread request body would be parsed as the next request
            self.close_connection = True
        if self.server.stopping:
            self.close_connection = True
        self.log_request(response.status, len(response.body))
        self.send_response_only(response.status)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself: short plain text, never 5xx for client input."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code = HTTPStatus.METHOD_NOT_ALLOWED
        elif code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code, message = HTTPStatus.BAD_REQUEST, "unsupported HTTP version"
        code = HTTPStatus(code)
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line all the same
        text = (message or code.phrase).split(" (")[0][:80]
        self.close_connection = True
        try:
            self.log_message("%s %d %s", redact(self.requestline[:200], self.server.api_key()), code, text)
            body = ("%d %s\n" % (code, text)).encode("utf-8", "replace")
            self.send_response_only(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def version_string(self):
        return self.server_version

    # -- logging: every line goes through log_message --

    def log_request(self, code="-", size="-"):
        if not self.server.quiet:
            code = code.value if isinstance(code, HTTPStatus) else code
            self.log_message('"%s" %s %s', self.requestline, code, size)

    def log_message(self, format, *args):
        """One line to stderr: keys redacted, control characters escaped."""
        line = redact(format % args, self.server.api_key()).translate(_CONTROL_CHARS)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        sys.stderr.write("%s %s %s\n" % (stamp, self.client_ip(), line))


###############################################################################
# Server control ##############################################################
###############################################################################


class Server(ThreadingHTTPServer):
    """The HTTP server with the store, the rate limiters and the settings attached."""

    # threads are joined on close so SIGTERM lets in-flight requests finish
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address, store, api_key=None, rate=DEFAULT_RATE, burst=DEFAULT_BURST,
                 client_timeout=DEFAULT_TIMEOUT, quiet=False, max_stations=DEFAULT_MAX_STATIONS):
        self.store = store
        self.fixed_key = api_key
        self.buckets = TokenBuckets(rate / 60.0, burst)
        self.key_failures = TokenBuckets(1.0 / KEY_FAILURE_INTERVAL, KEY_FAILURE_BURST)
        self.client_timeout = client_timeout
        self.quiet = quiet
        self.max_stations = max_stations
        self.stopping = False
        self._connections = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def api_key(self):
        """The key stations must send: the fixed one, or the one stored (it may be rotated)."""
        return self.fixed_key or self.store.setting("api_key", "")

    def track(self, handler, alive):
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(handler)

    def stop(self):
        """Stop accepting, let busy requests finish, hang up on idle keep-alive clients."""
        self.stopping = True
        self.shutdown()
        with self._connections_lock:
            idle = [h for h in self._connections if not h._busy]
        for handler in idle:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RD)
        self.server_close()

    def url(self):
        host, port = self.server_address[:2]
        host = "[%s]" % host if ":" in host else host
        return "http://%s:%d/" % (host, port)


def serve(server, log=sys.stderr):
    """Serve until SIGTERM or SIGINT, then stop cleanly and close the database."""
    done = threading.Event()

    def on_signal(signum, frame):
        if not done.is_set():
            done.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        print("iotserver: stopping", file=log, flush=True)
        server.stop()
        server.store.close()
    print("iotserver: stopped", file=log, flush=True)


###############################################################################
# Command line ################################################################
###############################################################################


def _positive(kind):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError("must be greater than 0")
        return value
    return check


def _mac_arg(text):
    try:
        return parse_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    """The command line: serving flags and the owner's admin actions."""
    parser = argparse.ArgumentParser(
        prog="iotserver.py",
        description="Self-hosted server for sensor stations: stores readings, serves a page.",
        epilog="Stations post GET /update/API_key=KEY/mac=MAC/field=N/data=VALUE. "
               "Admin actions run against --db and exit; they are safe while the server runs.")
    serving = parser.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serving.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    serving.add_argument("--db", default="iotserver.db", help="SQLite database file (default: ./%(default)s)")
    serving.add_argument("--api-key", metavar="KEY", default=os.environ.get(KEY_ENV),
                         help="key stations must send, instead of the stored one; also read from $%s" % KEY_ENV)
    serving.add_argument("--rate", type=_positive(float), default=DEFAULT_RATE, metavar="PER_MINUTE",
                         help="readings per minute each station may post on average (default: %(default)g)")
    serving.add_argument("--burst", type=_positive(int), default=DEFAULT_BURST, metavar="N",
                         help="readings a station may post back to back (default: %(default)s)")
    serving.add_argument("--max-stations", type=_positive(int), default=DEFAULT_MAX_STATIONS, metavar="N",
                         help="stations registered at most (default: %(default)s)")
    serving.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                         help="drop clients idle this long (default: %(default)g)")
    serving.add_argument("--quiet", action="store_true", help="do not log one line per request")

    admin = parser.add_argument_group("admin actions (run, print, exit)")
    actions = admin.add_mutually_exclusive_group()
    actions.add_argument("--stations", action="store_true", help="list stations and exit")
    actions.add_argument("--rename", nargs=2, metavar=("MAC", "NAME"), help="give a station a name")
    actions.add_argument("--role", nargs=2, metavar=("MAC", "ROLE"),
                         help="mark a station indoor or outdoor (the page compares them), or none")
    actions.add_argument("--forget", type=_mac_arg, metavar="MAC", help="delete a station and its readings")
    actions.add_argument("--show-key", action="store_true", help="print the API key and an example station URL")
    actions.add_argument("--rotate-key", action="store_true", help="replace the API key with a new random one")
    actions.add_argument("--lock", action="store_true", help="refuse stations not yet registered (403)")
    actions.add_argument("--unlock", action="store_true", help="register unknown stations again")
    actions.add_argument("--prune-days", type=_positive(float), metavar="DAYS",
                         help="delete readings older than DAYS days (for cron) and exit")
    return parser


def _example_url(base, key):
    return "%supdate/API_key=%s/mac=6c:ef:7a:3b:9d:e8/field=1/data=21.4" % (base, key)


def _admin(args, store, out):
    """Run one admin action; return the exit status."""
    if args.stations:
        rows = store.stations()
        if not rows:
            print("no stations yet", file=out)
        for s in rows:
            seen = iso_utc(s["last_seen"]) if s["last_seen"] else "never"
            print("%s  %-7s  %8d readings  last %s  %s" % (s["mac"], s["role"] or "-", s["readings"], seen,
                                                         s["name"]), file=out)
    elif args.rename:
        name = args.rename[1].strip()
        if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
            raise StoreError("a name is 1 to 64 printable characters")
        store.rename(parse_mac(args.rename[0]), name)
        print("renamed %s to %s" % (parse_mac(args.rename[0]), name), file=out)
    elif args.role:
        mac, role = parse_mac(args.role[0]), args.role[1].lower()
        if role not in ROLES + ("none",):
            raise StoreError("role must be indoor, outdoor or none")
        store.set_role(mac, role)
        print("%s is now %s" % (mac, role if role != "none" else "without a role"), file=out)
    elif args.forget:
        count = store.forget(args.forget)
        print("forgot %s and %d readings" % (args.forget, count), file=out)
    elif args.show_key or args.rotate_key:
        key = store.rotate_key() if args.rotate_key else store.ensure_key()[0]
        print("API key: %s" % key, file=out)
        print("example: %s" % _example_url("http://%s:%d/" % (args.host, args.port), key), file=out)
        if args.rotate_key:
            print("every station must now send the new key", file=out)
    elif args.lock or args.unlock:
        store.set_setting("locked", "1" if args.lock else "0")
        print("registration %s" % ("locked: unknown stations get 403" if args.lock else "open"), file=out)
    elif args.prune_days:
        count = store.prune(args.prune_days)
        print("pruned %d readings older than %g days" % (count, args.prune_days), file=out)
    return 0


def main(argv=None):
    """Parse the command line; run an admin action or serve."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key is not None and not _KEY_RE.fullmatch(args.api_key):
        parser.error("--api-key must be 8 to 128 characters from A-Z a-z 0-9 . _ ~ -")
    if args.role and args.role[1].lower() not in ROLES + ("none",):
        parser.error("--role takes indoor, outdoor or none")
    for text in (args.rename or [None])[:1] + (args.role or [None])[:1]:
        if text is not None and not _MAC_RE.fullmatch(text):
            parser.error("not a MAC: %r (six hex pairs, e.g. 6c:ef:7a:3b:9d:e8)" % text)
    admin = any((args.stations, args.rename, args.role, args.forget, args.show_key, args.rotate_key,
                 args.lock, args.unlock, args.prune_days))
    try:
        store = Store(args.db, create=not admin)
    except StoreError as exc:
        print("iotserver: %s" % exc, file=sys.stderr)
        return 2
    if admin:
        try:
            return _admin(args, store, sys.stdout)
        except (StoreError, sqlite3.Error) as exc:
            print("iotserver: %s" % exc, file=sys.stderr)
            return 1
        finally:
            store.close()
    try:
        key, created = store.ensure_key()
        server = Server((args.host, args.port), store, api_key=args.api_key, rate=args.rate,
                        burst=args.burst, client_timeout=args.timeout, quiet=args.quiet,
                        max_stations=args.max_stations)
    except (OSError, sqlite3.Error) as exc:
        print("iotserver: cannot start: %s" % exc, file=sys.stderr)
        store.close()
        return 1
    print("iotserver %s listening on %s (database %s)" % (__version__, server.url(), store.path),
          file=sys.stderr, flush=True)
    if created and not args.api_key:
        if sys.stdout.isatty():
            # shown once, on a terminal only: a journal or log file must never hold the key
            print("New API key (shown once; --show-key prints it again): %s" % key)
            print("Point a station at: %s" % _example_url(server.url(), key), flush=True)
        else:
            print("iotserver: generated an API key; print it with: python3 iotserver.py --db %s --show-key"
                  % store.path, file=sys.stderr, flush=True)
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
