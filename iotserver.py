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
import base64
import contextlib
import csv
import datetime
import email.message
import errno
import email.utils
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import io
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import ssl
import string
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
import zoneinfo
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

###############################################################################
# Configuration ###############################################################
###############################################################################

#: Environment variable that may hold the API key (for systemd EnvironmentFile=).
KEY_ENV = "IOTSERVER_API_KEY"
#: Environment variable that may hold the bearer token Prometheus sends for /metrics.
METRICS_TOKEN_ENV = "IOTSERVER_METRICS_TOKEN"
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
#: Seconds between the page's own refreshes.
DEFAULT_REFRESH = 30
#: Connections (each a thread) served at once; the systemd unit allows 512 tasks.
MAX_CONNECTIONS = 400
#: Seconds an idle client may keep a connection, and a slow one may take to send a request
#: or to take the next part of an answer.
DEFAULT_TIMEOUT = 20.0
#: Answers up to this size are sent whole with a Content-Length (what simple clients expect);
#: longer ones (exports, big feeds) are sent chunked as they are read from the database.
STREAM_AFTER = 64 * 1024
#: Long answers sent at once at most (each holds a read snapshot and a thread); one more gets
#: 503 with a Retry-After of this many seconds.
HEAVY_READS = 4
HEAVY_RETRY = 5
#: Largest |value| accepted; real sensors are far below (pressure in Pa is ~1e5).
MAX_ABS_VALUE = 1e9
#: Longest data value accepted, in characters.
MAX_DATA_LEN = 32
#: Longest /update path accepted, in bytes.
MAX_UPDATE_PATH = 512
#: Seconds a write waits for another process's lock (a prune batch takes milliseconds).
BUSY_TIMEOUT = 5.0
#: After a failed write, further writes are refused at once for this long (no pile-up).
FAIL_FAST_SECONDS = 1.0
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


#: What /metrics calls a refusal whose HTTPError names no reason of its own.
_REASONS = {400: "invalid", 401: "wrong_key", 403: "forbidden", 404: "not_found", 405: "method", 408: "timeout",
            411: "invalid", 413: "too_large", 414: "too_large", 429: "rate_limited", 503: "storage"}


class HTTPError(IotError):
    """An answer to the client other than success; raised by routes, sent in one place."""

    def __init__(self, status, message, headers=(), reason=None):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = list(headers)
        self.reason = reason or _REASONS.get(self.status, "status_%d" % self.status)


class Refused(IotError):
    """Storage will not take a reading (registration locked, station limit); ``reason`` names which."""

    def __init__(self, message, reason="refused"):
        super().__init__(message)
        self.reason = reason


class StoreError(IotError):
    """The database cannot be opened or used; the message says why."""


###############################################################################
# Time and logging ############################################################
###############################################################################


def now_ms():
    """Milliseconds since the epoch, UTC."""
    return time.time_ns() // 1_000_000


#: Stored times a datetime can show in any zone (0001-01-02 .. 9999-12-30 UTC): a database
#: written by hand or by an older iotserver may hold any number, and reads must still answer.
_SHOWN_MS = (-62_135_510_400_000, 253_402_128_000_000)


def to_datetime(ms, zone=datetime.timezone.utc):
    """A stored time as an aware datetime in ``zone``, clamped to the years a datetime can hold."""
    ms = min(max(ms, _SHOWN_MS[0]), _SHOWN_MS[1])
    return datetime.datetime.fromtimestamp(ms // 1000, zone).replace(microsecond=ms % 1000 * 1000)


def iso_utc(ms):
    """ISO-8601 UTC text for a stored timestamp (four-digit years, as ISO 8601 wants)."""
    return to_datetime(ms).isoformat(timespec="seconds")[:-6] + "Z"


def iso_ms(ms):
    """ISO-8601 UTC with milliseconds, as the read API writes times."""
    return to_datetime(ms).isoformat(timespec="milliseconds")[:-6] + "Z"


#: A date and time as people and ThingSpeak write them: '2026-11-21 10:26:2 -0500' (ThingSpeak's own
#: example: one-digit parts, a space before the offset), '2026-07-01T12:00:00.5Z', '... UTC'.
_TIME_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[T ]([0-9]{1,2}):([0-9]{1,2})(?::([0-9]{1,2})(\.[0-9]{1,6})?)?"
                      r" ?(Z|UTC|[+-][0-9]{2}:?[0-9]{2})?", re.ASCII | re.I)


def parse_time(name, text, zone=None):
    """Epoch ms from ISO 8601 or ThingSpeak's '2026-07-01 12:00:00'; no offset means ``zone`` (UTC)."""
    stamp = text.strip()
    match = _TIME_RE.fullmatch(stamp)
    if match:  # written out as fromisoformat needs it: two-digit parts, '+hh:mm'
        day, hour, minute, second, fraction, offset = match.groups()
        offset = "+00:00" if (offset or "").upper() in ("Z", "UTC") else offset or ""
        if offset and ":" not in offset:
            offset = offset[:3] + ":" + offset[3:]
        stamp = "%sT%02d:%02d:%02d%s%s" % (day, int(hour), int(minute), int(second or 0),
                                           (fraction or "").ljust(7, "0") if fraction else "", offset)
    elif stamp[-1:] in ("Z", "z"):
        stamp = stamp[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(stamp)
        if when.tzinfo is None:
            when = when.replace(tzinfo=zone or datetime.timezone.utc)
        return int(when.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "%s must be an ISO-8601 time such as 2026-07-01T12:00:00Z" % name) from None


#: Measurement times accepted: not before this (a station whose clock was never set sends
#: times near 2000-01-01), and not further ahead of the server's clock than this.
EARLIEST_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
FUTURE_SKEW_MS = 300_000


def check_time(name, ms, now=None):
    """``ms`` if it is a measurement time iotserver stores and reads back, else HTTPError(400)."""
    now = now_ms() if now is None else now
    if ms > now + FUTURE_SKEW_MS:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "%s is in the future (more than %d s ahead of the server's clock)"
                        % (name, FUTURE_SKEW_MS // 1000))
    if ms < EARLIEST_MS:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "%s is before %s (is the station's clock set?)"
                        % (name, iso_utc(EARLIEST_MS)[:10]))
    return ms


def _retry_after(seconds):
    """The Retry-After header for a wait of ``seconds`` (at least one second)."""
    return [("Retry-After", str(max(1, math.ceil(seconds))))]


#: Escapes for log lines, as http.server's: C0 and C1 control characters, DEL and backslash
#: (so an escaped byte cannot be told from one a client wrote as text).
_CONTROL_CHARS = {c: "\\x%02x" % c for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL_CHARS[ord("\\")] = "\\\\"


def _spelled(word):
    """A pattern for ``word`` as a client may write it: any letter percent-encoded too (k%65y is key)."""
    return "".join("(?:%s|%%%02x|%%%02x)" % (re.escape(c), ord(c.lower()), ord(c.upper())) for c in word)


_KEY_IN_TEXT_RE = re.compile(r"((?:%s)?%s=)[^/&\s\"]*" % (_spelled("api_"), _spelled("key")), re.I)
_DATE = [0, ""]


def _http_date():
    """The Date header, formatted once a second rather than once a request."""
    now = int(time.time())
    if _DATE[0] != now:
        _DATE[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _DATE[1]


def _plain_ip(text):
    """An IP address in canonical form (IPv4-mapped IPv6 as IPv4), or '' if ``text`` is none."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return ""
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def log(message, key=None):
    """The one place iotserver logs: a line to stderr (the journal), keys redacted, control characters escaped."""
    sys.stderr.write(redact(message, key).translate(_CONTROL_CHARS) + "\n")


def redact(text, key=None):
    """Hide every API key in a log line."""
    if key:
        text = text.replace(key, "[redacted]")
    return _KEY_IN_TEXT_RE.sub(r"\1[redacted]", text)


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


def parse_query(text, max_fields):
    """The name/value pairs of a query string or form, or HTTPError(400): malformed, not UTF-8, too many."""
    try:
        return urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(HTTPStatus.BAD_REQUEST,
                        "parameters are malformed, not UTF-8, or more than %d" % max_fields) from None


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


def _path_parts(path, names):
    """The ``name=value`` segments after ``/update/``, each of ``names`` exactly once: {name: bytes}.

    Names must be literal (any case); each value is percent-decoded exactly once.
    Raises HTTPError(400) naming the bad part.
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
        if not sep or lname not in names:
            shown = name[:20].encode("latin-1").decode("ascii", "replace") if name else "(empty)"
            raise HTTPError(HTTPStatus.BAD_REQUEST, "unknown path segment %r; expected %s" % (
                shown, ", ".join(("API_key" if n == "api_key" else n) + "=" for n in names)))
        if lname in parts:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "%s is given twice" % lname)
        try:
            parts[lname] = _unquote_strict(raw)
        except ValueError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "%s %s" % (lname, exc)) from None
    missing = [p for p in names if p not in parts]
    if missing:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "missing %s" % ", ".join(missing))
    try:
        parts["mac"] = parse_mac(parts["mac"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "mac must be six hex pairs, e.g. 6c:ef:7a:3b:9d:e8") from None
    return parts


def parse_station(path):
    """Split ``/update/API_key=K/mac=M`` (a station's bulk upload) into (key bytes, mac)."""
    parts = _path_parts(path, _UPDATE_PARTS[:2])
    return parts["api_key"], parts["mac"]


def parse_update(path):
    """Split ``/update/API_key=K/mac=M/field=N/data=V`` into (key bytes, mac, field, value)."""
    parts = _path_parts(path, _UPDATE_PARTS)
    key, mac = parts["api_key"], parts["mac"]
    field = parts["field"].decode("ascii", "replace")
    if not _FIELD_RE.fullmatch(field):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "field must be a whole number from 1 to 8")
    try:
        value = parse_value(parts["data"].decode("ascii"))
    except UnicodeDecodeError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "data must be a plain decimal number such as 21.4") from None
    except ValueError as exc:
        raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None
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

    def _refill(self, key, now):
        """The bucket of ``key`` topped up to ``now`` (under the lock), a full one if it is new."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = [self.burst, now]
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        return bucket

    def _wait(self, tokens):
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0

    def take(self, key, now=None, cost=1.0):
        """Take ``cost`` tokens if there is one, in one step; return 0 when allowed, else the seconds to wait."""
        with self._lock:
            bucket = self._refill(key, time.monotonic() if now is None else now)
            wait = self._wait(bucket[0])
            if not wait:
                bucket[0] -= cost
            return wait

    def __len__(self):
        return len(self._buckets)


def client_network(address):
    """Whom the wrong-key throttle counts as one client: an IPv4 address, or an IPv6 address's /64
    (one home or VM gets a whole /64: counted per address, it would have endless guesses)."""
    return str(ipaddress.IPv6Network((address, 64), strict=False)) if ":" in address else address



###############################################################################
# Fields and units ############################################################
###############################################################################
# What a station's field holds: FIELDS (see Advice) unless the owner said otherwise with
# --field. Values are stored as posted; the page, the charts and the advice read them in one
# unit per quantity, and a value outside the quantity's plausible range is flagged.

#: Quantities converted and checked, by field name: the unit they are read in, the plausible
#: range in that unit (air at a weather station), and the units a station may post in, each as
#: (offset, factor) to that unit.
QUANTITIES = {
    "temperature": ("°C", -60.0, 60.0, {"°C": (0.0, 1.0), "°F": (-32.0, 5 / 9), "K": (-273.15, 1.0)}),
    "pressure": ("hPa", 300.0, 1100.0, {"hPa": (0.0, 1.0), "mbar": (0.0, 1.0), "Pa": (0.0, 0.01),
                                        "kPa": (0.0, 10.0), "inHg": (0.0, 33.8639), "mmHg": (0.0, 1.333224)}),
    "humidity": ("%", 0.0, 100.0, {"%": (0.0, 1.0)}),
}


class Field:
    """One field of a station: its name, the unit it is posted in, how to read it in its quantity's unit."""

    __slots__ = ("number", "name", "key", "unit", "quantity")

    def __init__(self, number, name=None, unit=None):
        default = FIELDS.get(number, ("Field %d" % number, ""))
        self.number, self.name = number, name or default[0]
        self.key = self.name.lower() if name or number in FIELDS else "field%d" % number  # its name in the APIs
        self.unit = default[1] if unit is None else unit
        quantity = QUANTITIES.get(self.name.lower())
        self.quantity = quantity if quantity and self.unit in quantity[3] else None

    @property
    def base_unit(self):
        """The unit convert() gives: the quantity's (°C, hPa, %), or the posted one."""
        return self.quantity[0] if self.quantity else self.unit

    def convert(self, value):
        if value is None or not self.quantity:
            return value
        offset, factor = self.quantity[3][self.unit]
        return (value + offset) * factor

    def plausible(self, value):
        """Whether a converted value can be real (a wrong unit or a broken sensor is not)."""
        return not self.quantity or self.quantity[1] <= value <= self.quantity[2]


def field_unit(name, text):
    """The unit ``text`` names for a field called ``name`` ('f' for a temperature is '°F'), or ValueError."""
    quantity = QUANTITIES.get(name.lower())
    if not quantity:
        if len(text) > 16 or not text.isprintable():
            raise ValueError("a unit is at most 16 printable characters")
        return text
    for unit in quantity[3]:
        if text.lower() in (unit.lower(), unit.lstrip("°").lower()):
            return unit
    raise ValueError("a %s is posted in %s" % (name.lower(), ", ".join(u.lstrip("°") for u in quantity[3])))


###############################################################################
# Storage #####################################################################
###############################################################################

HOUR_MS, DAY_MS = 3_600_000, 86_400_000
#: The rollups kept of every station's field: hourly and daily (UTC).
ROLLUP_SPANS = (HOUR_MS, DAY_MS)
_SPANS = ", ".join("(%d)" % span for span in ROLLUP_SPANS)


def _pack(value):
    """A value as stored: the integer m*8+e when it is exactly m/10**e (2-3 bytes on disk), else the float."""
    if value or math.copysign(1.0, value) > 0:  # -0.0 stays a float, its sign intact
        for e in range(8):
            m = round(value * 10 ** e)
            if abs(m) < 2 ** 49 and m / 10 ** e == value:
                return m * 8 + e
    return value


def _unpack(stored):
    """The value a stored number stands for (_pack undone): exactly the float that was posted."""
    return stored if isinstance(stored, float) else (stored >> 3) / 10 ** (stored & 7)


def _unpacked(column):
    """_unpack as an SQL expression (the same division, so the same float) for the view and the triggers."""
    return ("(CASE WHEN typeof(%s) = 'integer' THEN (%s >> 3) / (CASE %s & 7 %s END) ELSE %s END)"
            % (column, column, column, " ".join("WHEN %d THEN 1e%d" % (e, e) for e in range(8)), column))


def _copied(rows):
    """Readings of schema 2, in key order, for the samples table: packed, and numbered within a millisecond."""
    last, n = None, 0
    for station_id, field, ts, value in rows:
        n = n + 1 if (station_id, field, ts) == last else 0
        last = (station_id, field, ts)
        yield station_id, field, ts, n, _pack(value)


def _insert(station_id, field, ts, value):
    """The SQL that stores a reading, numbered after any its field already has in that millisecond."""
    return ("INSERT INTO samples (station_id, field, ts, n, v) SELECT {s}, {f}, {t}, coalesce(max(n) + 1, 0), {v} "
            "FROM samples WHERE station_id = {s} AND field = {f} AND ts = {t}").format(s=station_id, f=field, t=ts, v=value)


#: Schema changes in order; migration N is recorded as PRAGMA user_version = N
#: in the same transaction that applies it. A step is an SQL statement or a function of the connection.
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
    (
        # ThingSpeak compatibility: each station is a channel with a write key of its own
        "ALTER TABLE stations ADD COLUMN write_key TEXT",
        "UPDATE stations SET write_key = upper(hex(randomblob(8)))",
        "CREATE UNIQUE INDEX stations_write_key ON stations (write_key)",
        # the readings written together in one ThingSpeak update; NULL means the row's own id
        "ALTER TABLE readings ADD COLUMN entry INTEGER",
    ),
    (
        # a reading costs its key and its packed value (about 19 bytes on disk): no rowid, no
        # index beside the key; an entry (the fields of one write) is known by its time. n numbers
        # the readings a field got in one millisecond (0, stored in no bytes, but for a flood)
        """CREATE TABLE samples (
            station_id INTEGER NOT NULL REFERENCES stations (id),
            field INTEGER NOT NULL CHECK (field BETWEEN 1 AND 8),
            ts INTEGER NOT NULL,
            n INTEGER NOT NULL,
            v NOT NULL,
            PRIMARY KEY (station_id, field, ts, n)) WITHOUT ROWID""",
        lambda conn: conn.executemany("INSERT INTO samples (station_id, field, ts, n, v) VALUES (?, ?, ?, ?, ?)",
                                      _copied(conn.execute("SELECT station_id, field, ts, value FROM readings "
                                                           "ORDER BY station_id, field, ts"))),
        "DROP TABLE readings",
        # hourly and daily (UTC) summaries: what charts longer than a day draw; pruning keeps them
        """CREATE TABLE rollups (
            station_id INTEGER NOT NULL REFERENCES stations (id),
            field INTEGER NOT NULL,
            span INTEGER NOT NULL,
            start INTEGER NOT NULL,
            count INTEGER NOT NULL,
            total REAL NOT NULL,
            low REAL NOT NULL,
            high REAL NOT NULL,
            PRIMARY KEY (station_id, field, span, start)) WITHOUT ROWID""",
        """INSERT INTO rollups (station_id, field, span, start, count, total, low, high)
           SELECT station_id, field, span.column1, ts - ts %% span.column1, count(*), sum(value), min(value), max(value)
           FROM (SELECT station_id, field, ts, %s AS value FROM samples), (VALUES %s) AS span
           GROUP BY 1, 2, 3, 4""" % (_unpacked("v"), _SPANS),
        # every write path keeps the rollups current: the server's, a back-dated or bulk entry, plain SQL
        """CREATE TRIGGER samples_rollup AFTER INSERT ON samples BEGIN
           INSERT INTO rollups (station_id, field, span, start, count, total, low, high)
           SELECT NEW.station_id, NEW.field, span.column1, NEW.ts - NEW.ts %% span.column1, 1, %s, %s, %s
           FROM (VALUES %s) AS span WHERE true
           ON CONFLICT DO UPDATE SET count = count + 1, total = total + excluded.total,
               low = min(low, excluded.low), high = max(high, excluded.high);
           END""" % ((_unpacked("NEW.v"),) * 3 + (_SPANS,)),
        # the readings as before, values unpacked, for your own SQL (and older tools): id orders
        # them by time, then field; entry is the ThingSpeak entry id (the time). Written to by
        # hand, the rollups take what is inserted and keep what is deleted (as after a prune)
        """CREATE VIEW readings (id, station_id, field, value, ts, entry, n) AS
           SELECT ts * 8 + field - 1, station_id, field, %s, ts, ts, n FROM samples""" % _unpacked("v"),
        """CREATE TRIGGER readings_insert INSTEAD OF INSERT ON readings BEGIN
           %s;
           END""" % _insert("NEW.station_id", "NEW.field", "NEW.ts", "CAST(NEW.value AS REAL)"),
        """CREATE TRIGGER readings_delete INSTEAD OF DELETE ON readings BEGIN
           DELETE FROM samples WHERE station_id = OLD.station_id AND field = OLD.field AND ts = OLD.ts AND n = OLD.n;
           END""",
        """CREATE TRIGGER readings_update INSTEAD OF UPDATE ON readings BEGIN
           DELETE FROM samples WHERE station_id = OLD.station_id AND field = OLD.field AND ts = OLD.ts AND n = OLD.n;
           %s;
           END""" % _insert("NEW.station_id", "NEW.field", "NEW.ts", "CAST(NEW.value AS REAL)"),
        # what a station's field holds when it is not what FIELDS says (--field)
        """CREATE TABLE fields (
            station_id INTEGER NOT NULL REFERENCES stations (id),
            field INTEGER NOT NULL,
            name TEXT NOT NULL,
            unit TEXT NOT NULL,
            PRIMARY KEY (station_id, field))""",
    ),
)


#: Rows a long read fetches and encodes at a time (see Snapshot.readings): ~30 KB of JSON; larger
#: chunks left the allocator holding megabytes after an export (4 exports: +10 MB at 1,000 rows, +5 MB at 250).
READ_BATCH = 250


def _new_write_key():
    """A ThingSpeak-style write key: 16 upper-case hex digits."""
    return secrets.token_hex(8).upper()


class _Pending:
    """An entry waiting for the group commit (see Store.add_entry), and what became of it."""

    __slots__ = ("mac", "values", "ts", "measured", "max_stations", "entry", "error")

    def __init__(self, mac, values, ts, max_stations):
        self.mac, self.values, self.max_stations = mac, values, max_stations
        # a time the client gave is the entry's identity: sent again, it is stored once
        self.measured = ts is not None
        self.ts = now_ms() if ts is None else ts
        self.entry = None  # the stored entry's id, once committed
        self.error = None  # or why it was not stored

    @property
    def settled(self):
        return self.entry is not None or self.error is not None


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
        self._pending = []  # _Pending entries waiting for the write lock
        self._stamped = {}  # station id -> the last time this process stamped one of its entries
        self._pending_lock = threading.Lock()
        self._readers = []  # idle read-only connections; list.pop/append are atomic
        self._failing_until = 0.0  # monotonic time until which writes fail fast (see add_entry)
        # in-memory views of the data (see latest() and series()); emptied when another process
        # changes the database; _generation counts every change, ours and theirs
        self._latest, self._series_cache, self._generation = {}, {}, 0
        try:
            self._conn = self._connect()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._conn.close()
            raise StoreError("cannot use database %s: %s" % (self.path, exc)) from None
        self._data_version = None
        self._stations = {}
        self._write_keys = {}
        self._settings = {}
        self._refresh()

    def _connect(self):
        # a station gives up after ~10 s: answer 503 before that rather than wait longer
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
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
        converting = 0 < version < len(MIGRATIONS)
        if converting:
            # a note committed on its own: if the conversion never finishes, the next start says so
            with self.atomic() as conn:
                again = conn.execute("SELECT value FROM settings WHERE name = 'converting'").fetchone()
                conn.execute("INSERT OR REPLACE INTO settings (name, value) VALUES ('converting', ?)",
                             (str(len(MIGRATIONS)),))
            if again:
                log("iotserver: the last conversion of %s did not finish; the database was left as it was "
                    "(schema %d)" % (self.path, version))
            log("iotserver: converting %s from schema %d to %d (once; an interruption leaves it as it is)"
                % (self.path, version, len(MIGRATIONS)))
        try:
            for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
                with self.atomic() as conn:
                    for step in steps:
                        step(conn) if callable(step) else conn.execute(step)
                    conn.execute("DELETE FROM settings WHERE name = 'converting'")
                    conn.execute("PRAGMA user_version = %d" % number)
                version = number
        except BaseException:
            if converting:
                log("iotserver: the conversion stopped; %s is as it was (schema %d)" % (self.path, version))
            raise
        if converting:
            free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
            if free > pages // 4:  # the old tables' space: give it back to the disk
                self._conn.execute("VACUUM")
            log("iotserver: converted %s to schema %d" % (self.path, version))

    def close(self):
        """Close the database after a checkpoint that waits for no one (the last connection's close finishes it)."""
        with self._lock:
            while self._readers:
                self._readers.pop().close()
            # not TRUNCATE: it holds the write lock while it waits for readers (a backup), so every
            # station would wait up to BUSY_TIMEOUT at the end of each admin command
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._conn.close()

    # -- cached settings and stations; reloaded when another process commits --

    def _refresh(self):
        """Reload stations and settings if any other connection committed since last time."""
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            rows = self._conn.execute("SELECT mac, id, write_key FROM stations").fetchall()
            self._stations = {mac: sid for mac, sid, _ in rows}
            self._write_keys = {key: mac for mac, _, key in rows}
            self._settings = dict(self._conn.execute("SELECT name, value FROM settings"))
            self._data_version = version
            self._latest.clear()
            self._series_cache.clear()
            self._generation += 1

    @property
    def generation(self):
        """A number that changes whenever the data does, by this process or another (seen on the next read)."""
        return self._generation

    def setting(self, name, default=None, refresh=True):
        """A stored setting (as text), current as of this call (or of the last refresh)."""
        if refresh:
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
        """Store one reading, registering the station if new; return its entry id."""
        return self.add_entry(mac, [(field, value)], max_stations, ts)

    def add_entry(self, mac, values, max_stations=DEFAULT_MAX_STATIONS, ts=None):
        """Store readings [(field, value)] of one moment (a ThingSpeak entry); return the entry id.

        ``ts`` is the measurement time the client gave (None: now). A field already
        stored for this station at that time is not stored again (a retry after a lost
        answer); the entry id returned is then the stored one's.
        """
        return self.add_entries(mac, [(ts, values)], max_stations)[0]

    def add_entries(self, mac, entries, max_stations=DEFAULT_MAX_STATIONS):
        """Store entries [(ts or None, [(field, value)])] of one station, all or none; return their ids.

        Group commit: entries that arrive while another thread is writing wait for
        the lock, and whoever gets it first writes every waiting entry in one
        transaction. Each caller still returns only after its own entries committed,
        and one caller's entries always land in the same transaction.
        """
        items = [_Pending(mac, values, ts, max_stations) for ts, values in entries]
        with self._pending_lock:
            self._pending.extend(items)
        with self._lock:
            if not items[-1].settled:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                if time.monotonic() < self._failing_until:
                    # a write just failed (locked, full, read-only): answer at once, do not wait again
                    error = sqlite3.OperationalError("storage failed a moment ago; not retried yet")
                    for waiting in batch:
                        waiting.error = error
                else:
                    self._write_batch(batch)
        for item in items:
            if item.error is not None:
                raise item.error
        return [item.entry for item in items]

    def _write_batch(self, batch):
        """Write pending entries in one transaction; set each item's entry id or its exception."""
        added, keys = {}, {}  # stations registered by this batch: mac -> id, write key -> mac
        try:
            with self.atomic() as conn:
                self._refresh()
                for item in batch:
                    station_id = self._stations.get(item.mac) or added.get(item.mac)
                    if station_id is None:
                        if self._settings.get("locked") == "1":
                            item.error = Refused("registration is locked; unknown station %s" % item.mac, "locked")
                            continue
                        if len(self._stations) + len(added) >= item.max_stations:
                            item.error = Refused("station limit (%d) reached; forget a station first"
                                                 % item.max_stations, "station_limit")
                            continue
                        write_key = _new_write_key()
                        station_id = added[item.mac] = conn.execute(
                            "INSERT INTO stations (mac, name, created_at, write_key) VALUES (?, ?, ?, ?)",
                            (item.mac, item.mac, item.ts, write_key)).lastrowid
                        keys[write_key] = item.mac
                    if not item.measured:
                        # the server's stamp: two writes of a station in one millisecond stay two entries
                        # (an entry is known by its time); past the rate limit no station gets that close
                        item.ts = max(item.ts, self._stamped.get(station_id, 0) + 1)
                        self._stamped[station_id] = item.ts
                    if item.measured:  # a retry: fields already stored at this measurement time are not stored again
                        stored = {f for (f,) in conn.execute(  # eight key look-ups
                            "SELECT field FROM samples WHERE station_id = ? AND field IN (1, 2, 3, 4, 5, 6, 7, 8) "
                            "AND ts = ?", (station_id, item.ts))}
                        item.values = [(f, v) for f, v in item.values if f not in stored]
                    conn.executemany(_insert("?1", "?2", "?3", "?4"),
                                     [(station_id, f, item.ts, _pack(v)) for f, v in item.values])
                    item.entry = item.ts  # an entry is known by its time: that is its id
        except Exception as exc:
            for item in batch:
                item.entry, item.error = None, exc
            if isinstance(exc, sqlite3.Error):
                self._failing_until = time.monotonic() + FAIL_FAST_SECONDS
            return
        # cached only once the transaction has committed
        self._stations.update(added)
        self._write_keys.update(keys)
        self._generation += 1
        for item in batch:
            if item.entry is not None and item.values:
                self._remember(self._stations[item.mac], item.values, item.ts)
        settled = now_ms() - 60_000
        if any(item.ts < settled for item in batch):
            self._series_cache.clear()  # a back-dated entry (created_at) may land in a finished bucket

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

    def _station_id(self, conn, station):
        """The id of a station given by MAC or by channel id (an int)."""
        column = "id" if isinstance(station, int) else "mac"
        row = conn.execute("SELECT id FROM stations WHERE %s = ?" % column, (station,)).fetchone()
        if row is None:
            raise StoreError("no station with %s %s (see --stations)" % ("channel id" if column == "id" else column, station))
        return row[0]

    def station_for_write_key(self, key):
        """(mac, station id) of the station whose write key ``key`` (bytes) is, or None."""
        self._refresh()
        try:
            text = key.decode("ascii")
        except UnicodeDecodeError:
            return None
        matches = [mac for known, mac in self._write_keys.items()
                   if known and hmac.compare_digest(known.encode(), text.encode())]
        return (matches[0], self._stations[matches[0]]) if matches else None

    def write_key(self, station, rotate=False):
        """(channel id, mac, write key) of a station (a MAC or channel id); with ``rotate``, a new key first."""
        with self.atomic() as conn:
            station_id = self._station_id(conn, station)
            if rotate:
                conn.execute("UPDATE stations SET write_key = ? WHERE id = ?", (_new_write_key(), station_id))
            return conn.execute("SELECT id, mac, write_key FROM stations WHERE id = ?", (station_id,)).fetchone()

    def add_channel(self, name):
        """A station for a ThingSpeak client that has no MAC: a random locally administered one."""
        mac = "02:" + ":".join("%02x" % b for b in secrets.token_bytes(5))
        with self.atomic() as conn:
            conn.execute("INSERT INTO stations (mac, name, created_at, write_key) VALUES (?, ?, ?, ?)",
                         (mac, name, now_ms(), _new_write_key()))
        return mac

    def rename(self, mac, name):
        """Name a station; names are unique (the page, /api/latest's by_name and /metrics tell stations by them)."""
        with self.atomic() as conn:
            station_id = self._station_id(conn, mac)
            other = conn.execute("SELECT mac FROM stations WHERE name = ? AND id != ?", (name, station_id)).fetchone()
            if other:
                raise StoreError("station %s is named %s already; pick another name" % (other[0], name))
            conn.execute("UPDATE stations SET name = ? WHERE id = ?", (name, station_id))

    def set_role(self, mac, role):
        """Mark a station indoor or outdoor (taking the role from any other), or clear it; return the MAC it was taken from."""
        role = None if role == "none" else role
        with self.atomic() as conn:
            station_id = self._station_id(conn, mac)
            before = conn.execute("SELECT mac FROM stations WHERE role = ? AND id != ?", (role, station_id)).fetchone()
            if role:
                conn.execute("UPDATE stations SET role = NULL WHERE role = ?", (role,))
            conn.execute("UPDATE stations SET role = ? WHERE id = ?", (role, station_id))
        return before[0] if before else None

    def set_field(self, mac, number, name, unit):
        """Say what a station's field holds (see Field): its name and the unit it is posted in."""
        with self.atomic() as conn:
            conn.execute("INSERT OR REPLACE INTO fields (station_id, field, name, unit) VALUES (?, ?, ?, ?)",
                         (self._station_id(conn, mac), number, name, unit))

    def _delete_batches(self, table, where, params, pause=0.005):
        """Delete rows of samples or rollups matching ``where`` in short transactions; return how many."""
        key = "station_id, field, ts, n" if table == "samples" else "station_id, field, span, start"
        total = 0
        while True:
            with self.atomic() as conn:
                deleted = conn.execute("DELETE FROM %s WHERE (%s) IN (SELECT %s FROM %s WHERE %s LIMIT %d)"
                                       % (table, key, key, table, where, PRUNE_BATCH), params).rowcount
            total += deleted
            if deleted < PRUNE_BATCH:
                return total
            time.sleep(pause)  # let the server's writes in between batches

    def forget(self, mac):
        """Delete a station, all its readings and their rollups; return how many readings went."""
        with self._lock:
            station_id = self._station_id(self._conn, mac)
        total = self._delete_batches("samples", "station_id = ?", (station_id,))
        self._delete_batches("rollups", "station_id = ?", (station_id,))
        with self.atomic() as conn:
            total += conn.execute("DELETE FROM samples WHERE station_id = ?", (station_id,)).rowcount
            for table in ("rollups", "fields"):
                conn.execute("DELETE FROM %s WHERE station_id = ?" % table, (station_id,))
            conn.execute("DELETE FROM stations WHERE id = ?", (station_id,))
        return total

    def backup(self, target):
        """Copy the database, as of one moment, to ``target`` (replaced atomically); return its pages."""
        target = os.path.abspath(target)
        if target == self.path:
            raise StoreError("the backup must go to another file than the database")
        if not os.path.isdir(os.path.dirname(target)):
            raise StoreError("cannot write the backup: directory %s does not exist" % os.path.dirname(target))
        partial = target + ".partial"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        try:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                with self._lock:
                    self._conn.backup(copy)  # one step: one read snapshot; the server keeps writing (WAL)
                copy.execute("PRAGMA journal_mode = DELETE")
                pages = copy.execute("PRAGMA page_count").fetchone()[0]
                if copy.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                    raise StoreError("the copy failed its integrity check")
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        return pages

    def size(self):
        """Bytes the database takes on disk, its write-ahead log included."""
        total = 0
        for path in (self.path, self.path + "-wal"):
            with contextlib.suppress(OSError):  # no -wal file right after a checkpoint
                total += os.path.getsize(path)
        return total

    def prune(self, days, rollups=False):
        """Delete readings (or with ``rollups``, rollups) older than ``days`` days, in batches; return how many."""
        cutoff = now_ms() - int(days * DAY_MS)
        with self._lock:
            ids = [row[0] for row in self._conn.execute("SELECT id FROM stations")]
        if rollups:
            total = sum(self._delete_batches("rollups", "station_id = ? AND start + span <= ?", (sid, cutoff))
                        for sid in ids)
        else:  # field by field: each batch is one stretch of the key
            total = sum(self._delete_batches("samples", "station_id = ? AND field = ? AND ts < ?", (sid, f, cutoff))
                        for sid in ids for f in range(1, 9))
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return total

    def _remember(self, station_id, values, ts):
        """Update the in-memory latest values after a committed write (under the lock)."""
        entry = self._latest.get(station_id)
        if entry is None:
            return
        primary = min([f for f, _ in values] + list(entry["fields"]))
        for field, value in values:
            current = entry["fields"].get(field)
            if current is None or ts >= current[1]:
                entry["fields"][field] = (value, ts)
            for (f, since), span in entry["ranges"].items():
                if f == field and ts >= since:
                    span[0] = value if span[0] is None else min(span[0], value)
                    span[1] = value if span[1] is None else max(span[1], value)
        if any(f == primary for f, _ in values):
            entry["recent"] = sorted(entry["recent"] + [ts], reverse=True)[:7]

    # -- reading, on a small pool of read-only connections (WAL: readers never block the writer) --

    @contextlib.contextmanager
    def snapshot(self):
        """A Snapshot of the database, consistent for the whole block (one read transaction)."""
        try:
            conn = self._readers.pop()
        except IndexError:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            # each pooled reader keeps a page cache of its own (2 MB by default); the OS caches the file anyway
            conn.execute("PRAGMA cache_size = -256")
        conn.execute("BEGIN")
        try:
            yield Snapshot(self, conn)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")
            if len(self._readers) < 8:
                self._readers.append(conn)
            else:
                conn.close()


class Snapshot:
    """The read side: one consistent view of the database, and every query a page or API runs.

    Made once per request by Store.snapshot(). Its constructor first lets the store's
    in-memory views catch up with changes another process made, so no read can see a
    view older than the database. Values come back in their quantity's unit (see Field)
    except where a method says "as posted".
    """

    def __init__(self, store, conn):
        store._refresh()
        self._store, self._conn = store, conn
        rows = conn.execute("SELECT id, mac, name, role FROM stations "
                            "ORDER BY role IS NULL, role DESC, name, mac").fetchall()
        #: Stations as dicts (id, mac, name, role): outdoor, indoor, then the rest by name.
        self.stations = [dict(zip(("id", "mac", "name", "role"), row)) for row in rows]
        self._fields = {(sid, n): Field(n, name, unit)
                        for sid, n, name, unit in conn.execute("SELECT station_id, field, name, unit FROM fields")}

    def station(self, station_id):
        """The station with this id (a ThingSpeak channel id), or None."""
        return next((s for s in self.stations if s["id"] == station_id), None)

    def field(self, station_id, number):
        """What a station's field holds: a Field."""
        return self._fields.get((station_id, number)) or Field(number)

    def latest(self, station, since_ms=None):
        """Fill ``station`` with its latest value per field, min/max since ``since_ms``, interval.

        Each field: value, min, max (converted), ts, posted (the value as posted), field (a
        Field) and implausible. Kept in memory and updated by every write, so a page with many
        stations costs dictionary look-ups, not eight queries a station; read from the database
        on first use and again whenever another process changed it.
        """
        store, conn = self._store, self._conn
        with store._lock:
            entry, generation = store._latest.get(station["id"]), store._generation
        if entry is None:
            entry = self._load_latest(station["id"])
            with store._lock:
                if generation == store._generation:
                    store._latest[station["id"]] = entry  # nothing was written meanwhile
        fields = {}
        for number, (value, ts) in sorted(entry["fields"].items()):
            low = high = None
            if since_ms is not None:
                span = entry["ranges"].get((number, since_ms))
                if span is None:
                    span = conn.execute("SELECT min(value), max(value) FROM readings WHERE station_id = ? "
                                        "AND field = ? AND ts >= ?", (station["id"], number, since_ms)).fetchone()
                    with store._lock:
                        if generation == store._generation:
                            entry["ranges"][(number, since_ms)] = list(span)
                low, high = span
            field = self.field(station["id"], number)
            fields[number] = {"value": field.convert(value), "ts": ts, "min": field.convert(low),
                              "max": field.convert(high), "posted": value, "field": field,
                              "implausible": not field.plausible(field.convert(value))}
        station["fields"] = fields
        station["last_seen"] = max((f["ts"] for f in fields.values()), default=None)
        recent = list(entry["recent"])
        gaps = sorted(a - b for a, b in zip(recent, recent[1:]))
        station["interval_ms"] = gaps[len(gaps) // 2] if gaps else None
        return station

    def _load_latest(self, station_id):
        """A station's latest values from the database: eight key seeks, cheap at any table size."""
        fields = {}
        for field in range(1, 9):
            row = self._conn.execute("SELECT value, ts FROM readings WHERE station_id = ? AND field = ? "
                                     "ORDER BY ts DESC LIMIT 1", (station_id, field)).fetchone()
            if row is not None:
                fields[field] = row
        recent = []
        if fields:
            recent = [r[0] for r in self._conn.execute(
                "SELECT ts FROM readings WHERE station_id = ? AND field = ? ORDER BY ts DESC LIMIT 7",
                (station_id, min(fields)))]
        return {"fields": fields, "recent": recent, "ranges": {}}

    def series(self, station_id, field, since_ms, bucket_ms, now):
        """A field per time bucket since ``since_ms``: [(bucket start ms, min, mean, max, count)].

        Buckets of an hour or more come from the rollups (a year is 365 rows, and pruning the
        readings does not empty it). Shorter ones from the readings: buckets that ended over a
        minute ago cannot change (the server stamps readings on arrival), so they are kept in
        memory until another process changes the database (a prune, a forget); only the newest
        buckets are read again.
        """
        first = since_ms // bucket_ms * bucket_ms
        if bucket_ms >= HOUR_MS:
            span = DAY_MS if bucket_ms % DAY_MS == 0 else HOUR_MS
            rows = self._conn.execute(
                "SELECT start / ?1 * ?1, min(low), sum(total) / sum(count), max(high), sum(count) FROM rollups "
                "WHERE station_id = ?2 AND field = ?3 AND span = ?4 AND start >= ?5 GROUP BY start / ?1 ORDER BY 1",
                (bucket_ms, station_id, field, span, first)).fetchall()
        else:
            cache = self._store._series_cache
            key = (station_id, field, bucket_ms)
            done, until = cache.get(key, ({}, first))
            fresh = self._conn.execute(
                "SELECT ts / ?1 * ?1, min(value), avg(value), max(value), count(*) FROM readings "
                "WHERE station_id = ?2 AND field = ?3 AND ts >= ?4 GROUP BY ts / ?1 ORDER BY 1",
                (bucket_ms, station_id, field, max(first, until))).fetchall()
            complete = (now - 60_000) // bucket_ms * bucket_ms
            done = {row[0]: row for row in done.values() if row[0] >= first}
            done.update((row[0], row) for row in fresh if row[0] + bucket_ms <= complete)
            cache[key] = (done, max(until, complete))
            rows = sorted(done.values()) + [row for row in fresh if row[0] + bucket_ms > complete]
        f = self.field(station_id, field)
        return [(start, f.convert(low), f.convert(mean), f.convert(high), count)
                for start, low, mean, high, count in rows]

    def values(self, station_id, field, since_ms, limit):
        """The last ``limit`` plausible values of a field since ``since_ms``, oldest first: [(ms, value)]."""
        f = self.field(station_id, field)
        rows = self._conn.execute(
            "SELECT ts, value FROM readings WHERE station_id = ? AND field = ? AND ts >= ? "
            "ORDER BY ts DESC LIMIT ?", (station_id, field, since_ms, limit)).fetchall()
        return [(ts, f.convert(v)) for ts, v in reversed(rows) if f.plausible(f.convert(v))]

    def readings(self, station_ids, field, since_ms, until_ms, limit):
        """Readings in a time range, oldest first, as posted, READ_BATCH at a time: lists of
        (ts, mac, name, field, value, unit).

        Read in time windows that widen while they hold few readings and narrow while they
        hold many: one query over the whole range would have SQLite sort all of it, or hold a
        statement open for every station and field, before the first row came out.
        """
        order = {station_id: i for i, station_id in enumerate(station_ids)}
        names = {s["id"]: (s["mac"], s["name"]) for s in self.stations}
        numbers = [field] if field else list(range(1, 9))
        sql = ("SELECT ts, station_id, field, n, value FROM readings WHERE station_id IN (%s) AND field IN (%s) "
               "AND ts >= ? AND ts < ? ORDER BY ts LIMIT ?"
               % (",".join("?" * len(station_ids)), ",".join("?" * len(numbers))))
        start, width = since_ms, 60_000
        while limit > 0 and start < until_ms:
            end = min(until_ms, start + width)
            rows = self._conn.execute(sql, [*station_ids, *numbers, start, end, READ_BATCH + 1]).fetchall()
            if len(rows) > READ_BATCH:  # a batch ends with a whole millisecond; the next window is narrower
                end = rows[-1][0] if rows[-1][0] > start else start + 1
                rows = [r for r in rows if r[0] < end] if end > start + 1 else self._conn.execute(
                    sql, [*station_ids, *numbers, start, end, -1]).fetchall()  # one millisecond, read whole
                width = max(1, width // 2)
            elif len(rows) < READ_BATCH // 2:
                width *= 2
            rows.sort(key=lambda r: (r[0], order[r[1]], r[2], r[3]))  # as the stations are listed, then by field
            if rows[:limit]:
                yield [(ts, *names[sid], number, value, self.field(sid, number).unit)
                       for ts, sid, number, _, value in rows[:limit]]
            limit -= len(rows)
            start = end

    def entries(self, station_id, field, since_ms, until_ms, limit):
        """A channel's newest ``limit`` ThingSpeak entries in a range, oldest first, as posted, READ_BATCH at a
        time: lists of (entry id, ms, {field: value}).

        An entry is known by its time. A first pass, newest first, only counts times to find the
        oldest one wanted; the second reads forward from there, so no more than a batch is held.
        """
        def runs(start, direction):
            """Each field's readings in time order, merged into one stream of (ts, field, value)."""
            return heapq.merge(*(self._conn.execute(
                "SELECT ts, ?, value FROM readings WHERE station_id = ? AND field = ? AND ts >= ? AND ts < ? "
                "ORDER BY ts %s" % direction, (number, station_id, number, start, until_ms))
                for number in ([field] if field else range(1, 9))), reverse=direction == "DESC")

        start = until_ms  # the oldest time wanted; none yet
        for start, _ in itertools.islice(itertools.groupby(ts for ts, _, _ in runs(since_ms, "DESC")), limit):
            pass
        batch = []
        for ts, readings in itertools.groupby(runs(start, "ASC"), key=lambda r: r[0]):
            values = {}
            for _, number, value in readings:
                values.setdefault(number, value)  # a field twice in one millisecond (a flood): the first
            batch.append((ts, ts, values))
            if len(batch) == READ_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def channel_facts(self, station_id):
        """(last entry id, created at ms) of a station's ThingSpeak channel."""
        last = max((self._conn.execute("SELECT max(ts) FROM samples WHERE station_id = ? AND field = ?",
                                       (station_id, number)).fetchone()[0] or 0 for number in range(1, 9)))
        created = self._conn.execute("SELECT created_at FROM stations WHERE id = ?", (station_id,)).fetchone()[0]
        return last or None, created


###############################################################################
# Advice ######################################################################
###############################################################################
# How values are shown, when a station counts as offline, and what the headline advises.

#: What each field holds as the stations post it: (label, unit of the stored value).
#: Field 1 is converted to the page's unit; the others are shown as stored.
FIELDS = {1: ("Temperature", "°C"), 2: ("Pressure", "hPa"), 3: ("Humidity", "%")}
#: Outside must differ from inside by this much (°C) before the advice flips.
DEAD_BAND_C = 0.5
#: A station is offline after this many of its usual intervals without a post (at least 3 min).
OFFLINE_INTERVALS = 4
OFFLINE_MIN_MS = 3 * 60_000
#: Assumed interval for a station with too few readings to tell (the firmware posts once a minute).
DEFAULT_INTERVAL_MS = 60_000
#: What the advice looks at: the last two hours, at most this many readings of each of the
#: two stations' temperature and humidity (two hours at one a minute).
ADVICE_MEMORY_MS = 2 * 3_600_000
ADVICE_MEMORY_READINGS = 120
#: The comfort band (°C) the advice brings the inside toward (--comfort): 20–24 °C is the
#: range heating and cooling guides (EN 16798, ASHRAE 55) give for living rooms in clothes
#: worn indoors.
COMFORT_C = (20.0, 24.0)
#: Outside air with a dew point above this (°C) is muggy: the advice will not open for it.
MAX_DEW_POINT_C = 18.0
#: Inside is humid from this relative humidity (%) on, until it falls this much below it.
HUMID_RH, HUMID_RH_HYSTERESIS = 60.0, 5.0
#: Outside air is clearly drier when it holds at most this share of the water inside air
#: holds (g/m³), and stays so until it holds more than the second share.
DRIER_SHARE, DRIER_SHARE_OFF = 0.8, 0.9
#: The Magnus formula's constants over water (Sonntag 1990), good from -45 to 60 °C.
MAGNUS_A, MAGNUS_B, MAGNUS_C = 6.112, 17.62, 243.12
#: The crossover estimate: a straight line through each station's last 90 minutes (at least
#: 10 readings over 30 minutes). Said only when the lines' difference changes by 5 standard
#: errors of its slope and by twice the scatter around them over the time fitted, the
#: crossing's own standard error is at most 4 minutes, and it is no further ahead than
#: half the time fitted: beyond that a curving evening throws a straight line off.
CROSSOVER_FIT_MS = 90 * 60_000
CROSSOVER_MIN_POINTS, CROSSOVER_MIN_SPAN_MS = 10, 30 * 60_000
CROSSOVER_T, CROSSOVER_CHANGE, CROSSOVER_SE_MS = 5.0, 2.0, 4 * 60_000


class View:
    """How the page shows values (unit, time zone) and what the advice aims for (comfort band, limits)."""

    def __init__(self, unit="F", tz=None, dead_band_c=DEAD_BAND_C, comfort=COMFORT_C, max_dew_point=MAX_DEW_POINT_C):
        self.unit = unit
        self.tz = tz  # a tzinfo, or None for the server's local zone
        self.dead_band_c = dead_band_c
        self.comfort = comfort
        self.max_dew_point = max_dew_point

    def temperature(self, celsius):
        return celsius * 9 / 5 + 32 if self.unit == "F" else celsius

    def degrees(self, celsius_difference):
        return abs(celsius_difference) * (9 / 5 if self.unit == "F" else 1)

    def show(self, field, value):
        """A value in its field's base unit (°C for a temperature) as text in the page's unit; field: a number or a Field."""
        unit = (field if isinstance(field, Field) else Field(field)).base_unit
        if unit == "°C":
            return "%.1f\u00a0°%s" % (self.temperature(value), self.unit)
        text = ("%.1f" % value) if abs(value) < 10_000 else ("%.0f" % value)
        return text + ("\u00a0" + unit if unit else "")

    def local(self, ms):
        stamp = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
        return stamp.astimezone(self.tz) if self.tz else stamp.astimezone()

    def midnight(self, date):
        """Epoch ms of the local midnight that starts ``date``."""
        stamp = datetime.datetime.combine(date, datetime.time())
        return int((stamp.replace(tzinfo=self.tz) if self.tz else stamp.astimezone()).timestamp() * 1000)

    def day_start(self, ms):
        """Local midnight of the day ``ms`` falls on, in epoch ms."""
        local = self.local(ms)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.tz is None:
            midnight = midnight.replace(tzinfo=None).astimezone()  # the offset at midnight (DST)
        return int(midnight.timestamp() * 1000)


def ago(ms):
    """'just now', '42 s ago', '5 min ago', '3 h ago', '2 days ago'."""
    seconds = max(0, ms // 1000)
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return "%d s ago" % seconds
    if seconds < 3600:
        return "%d min ago" % (seconds // 60)
    if seconds < 48 * 3600:
        return "%d h ago" % (seconds // 3600)
    return "%d days ago" % (seconds // 86400)


def is_offline(station, now):
    """True when a station has missed a few of its usual posts."""
    if station["last_seen"] is None:
        return True
    limit = max(OFFLINE_MIN_MS, OFFLINE_INTERVALS * (station["interval_ms"] or DEFAULT_INTERVAL_MS))
    return now - station["last_seen"] > limit


def humid_air(celsius, rh):
    """(dew point °C, absolute humidity g/m³) by the Magnus formula, or None outside its range."""
    if not (0 < rh <= 100 and -45 <= celsius <= 60):
        return None
    vapour = rh / 100 * MAGNUS_A * math.exp(MAGNUS_B * celsius / (MAGNUS_C + celsius))  # hPa
    ratio = math.log(vapour / MAGNUS_A)
    return MAGNUS_C * ratio / (MAGNUS_B - ratio), 216.7 * vapour / (273.15 + celsius)


def station_air(station):
    """A station's dew point and absolute humidity from its latest temperature and humidity.

    The humidity counts for as long as the advice carries it forward (ADVICE_MEMORY_MS),
    so the card and the headline show the same dew point.
    """
    fields = station["fields"]
    if (1 not in fields or 3 not in fields or fields[1]["ts"] - fields[3]["ts"] > ADVICE_MEMORY_MS
            or fields[1].get("implausible") or fields[3].get("implausible")):
        return None
    return humid_air(fields[1]["value"], fields[3]["value"])


#: One moment of the comparison: both stations' latest values at ``ms`` (humidity may be None).
Sample = collections.namedtuple("Sample", "ms inside outside rh_inside rh_outside")


def samples(inside, rh_inside, outside, rh_outside, after=-1):
    """Both stations' readings [(ms, value)] merged in time, each value carried forward: [Sample], one per moment.

    Only the moments after ``after``, and always the latest (if both have a temperature).
    """
    merged = sorted((ms, which, value) for which, series in enumerate((inside, rh_inside, outside, rh_outside))
                    for ms, value in series)
    latest, out = [None] * 4, []
    for i, (ms, which, value) in enumerate(merged):
        latest[which] = value
        if latest[0] is None or latest[2] is None or ms <= after and i < len(merged) - 1:
            continue
        if out and out[-1].ms == ms:
            out.pop()
        out.append(Sample(ms, latest[0], latest[2], latest[1], latest[3]))
    return out


class Advice:
    """What advise() decided: the action (open, close, unknown) and how to say it."""

    __slots__ = ("action", "headline", "reason", "since", "crossover", "outlook", "inside", "outside")

    def __init__(self, action, headline, reason="", since=None, crossover=None, outlook="", inside=None, outside=None):
        self.action, self.headline, self.reason, self.since = action, headline, reason, since
        self.crossover, self.outlook = crossover, outlook  # ms outside is expected to cross inside, and the words
        self.inside, self.outside = inside, outside  # {"temperature", "humidity", "dew_point", "absolute_humidity"}


def _judge(memory, s, view):
    """Fold one sample into the hysteresis memory; return (action, why) for it."""
    band, (low, high), diff = view.dead_band_c, view.comfort, s.outside - s.inside
    if diff <= -band:
        memory["side"] = "cooler"
    elif diff >= band:
        memory["side"] = "warmer"
    zone = memory.get("zone")
    if s.inside > high or zone == "warm" and s.inside > high - band:
        zone = "warm"
    elif s.inside < low or zone == "cool" and s.inside < low + band:
        zone = "cool"
    else:
        zone = "comfortable"
    memory["zone"] = zone
    inside = humid_air(s.inside, s.rh_inside) if s.rh_inside is not None else None
    outside = humid_air(s.outside, s.rh_outside) if s.rh_outside is not None else None
    limit = view.max_dew_point
    memory["muggy"] = bool(outside) and (outside[0] > limit or memory.get("muggy") and outside[0] > limit - band)
    humid = drier = False
    if inside and outside:
        humid = s.rh_inside >= HUMID_RH or memory.get("humid") and s.rh_inside > HUMID_RH - HUMID_RH_HYSTERESIS
        share = outside[1] / inside[1]
        drier = share <= DRIER_SHARE or memory.get("drier") and share < DRIER_SHARE_OFF
    memory["humid"], memory["drier"] = bool(humid), bool(drier)
    side = memory.get("side")
    helps = zone == "warm" and side == "cooler" or zone == "cool" and side == "warmer"
    if helps and not memory["muggy"]:
        return "open", zone
    if humid and drier:
        return "open", "air"
    if helps:
        return "close", "muggy"
    if zone == "comfortable":
        return "close", "comfortable"
    return "close", "unclear" if side is None else "already"


def _words(why, memory, s, view):
    """The headline and the reason for a verdict of _judge on the latest sample."""
    diff, band = s.outside - s.inside, view.dead_band_c
    size = "%.1f\u00a0°%s" % (view.degrees(diff), view.unit)
    about = "outside is about the same (%s %s)" % (size, "cooler" if diff < 0 else "warmer")
    comfort = "%s–%s" % tuple(view.show(1, c).split("\u00a0")[0] for c in view.comfort) + "\u00a0°" + view.unit
    if why in ("warm", "cool"):
        way = "cooler" if why == "warm" else "warmer"
        clear = diff <= -band if why == "warm" else diff >= band
        headline = ("Open the windows — outside is %s %s" % (size, way) if clear
                    else "Windows can stay open — " + about)
        low, high = view.comfort
        if low <= s.inside <= high:  # held by the hysteresis: a little further, or it flips straight back
            where = "still at the %s of" % ("top" if why == "warm" else "bottom")
        else:
            where = "above" if why == "warm" else "below"
        return headline, "Inside is %s the comfort band (%s): let the %s air in." % (where, comfort, way)
    if why == "air":
        inside, outside = humid_air(s.inside, s.rh_inside), humid_air(s.outside, s.rh_outside)
        return ("Open for a few minutes: outside air is drier",
                "Inside is humid (%.0f\u00a0%%); a cubic metre of outside air holds %.1f\u00a0g of water, "
                "inside air %.1f\u00a0g." % (s.rh_inside, outside[1], inside[1]))
    if why == "muggy":
        dew = humid_air(s.outside, s.rh_outside)[0]
        return ("Keep the windows closed — %s outside, but muggy: dew point %s" % (
                    "cooler" if memory["zone"] == "warm" else "warmer", view.show(1, dew)),
                "Air with a dew point above %s feels sticky and would bring damp into the house."
                % view.show(1, view.max_dew_point))
    if why == "comfortable":
        return ("Keep the windows closed — inside is comfortable",
                "Inside %s is within the comfort band (%s)." % (view.show(1, s.inside), comfort))
    if why == "already":
        warmer = memory["side"] == "warmer"
        if diff >= band if warmer else diff <= -band:
            return ("Keep the windows closed — outside is %s %s" % (size, "warmer" if warmer else "colder"),
                    "Outside is warmer and the house is already warm." if warmer
                    else "Outside is colder and the house is already cool.")
        return ("Keep the windows closed — " + about, "Outside is not clearly %s yet, and the house is %s." % (
            ("cooler", "warm") if warmer else ("warmer", "cool")))
    return ("Keep the windows closed — " + about,
            "Inside is %s the comfort band, but outside is not clearly %s yet." % (
                ("above", "cooler") if memory["zone"] == "warm" else ("below", "warmer")))


def _line(points, now):
    """A least-squares line through [(ms, °C)]: (value now, slope, residual variance, n, mean x, Sxx), x in minutes."""
    n = len(points)
    mx, my = sum(ms for ms, _ in points) / n, sum(v for _, v in points) / n
    sxx = sxy = syy = 0.0
    for ms, v in points:
        dx, dy = ms - mx, v - my
        sxx, sxy, syy = sxx + dx * dx, sxy + dx * dy, syy + dy * dy
    sxx /= 60_000 ** 2  # in minutes
    slope = sxy / 60_000 / sxx
    residual = max(0.0, syy - slope * sxy / 60_000) / (n - 2)
    return my - slope * (mx - now) / 60_000, slope, residual, n, (mx - now) / 60_000, sxx


def crossover(inside, outside, now):
    """When outside is expected to cross inside: (ms, "cooler" or "warmer"), or None when the trend is unclear.

    A least-squares line through each station's readings [(ms, °C)] of the last
    CROSSOVER_FIT_MS; their difference is trusted only as far as the CROSSOVER_* limits say.
    """
    lines = []
    for series in (inside, outside):
        points = [(ms, v) for ms, v in series if ms >= now - CROSSOVER_FIT_MS]
        if len(points) < CROSSOVER_MIN_POINTS or points[-1][0] - points[0][0] < CROSSOVER_MIN_SPAN_MS:
            return None
        lines.append(_line(points, now))
    (level_in, slope_in, var_in, n_in, mx_in, sxx_in), (level_out, slope_out, var_out, n_out, mx_out, sxx_out) = lines
    level, slope = level_out - level_in, slope_out - slope_in  # the difference now, and per minute
    span = min(inside[-1][0], outside[-1][0]) - max(now - CROSSOVER_FIT_MS, min(inside[0][0], outside[0][0]))
    if not slope or abs(slope) < CROSSOVER_T * math.sqrt(var_in / sxx_in + var_out / sxx_out):
        return None  # no trend beyond the noise
    if abs(slope) * span / 60_000 < CROSSOVER_CHANGE * math.sqrt(var_in + var_out):
        return None  # a trend, but small beside the scatter around it
    ahead = -level / slope  # minutes
    latest = outside[-1][1] - inside[-1][1]
    if latest * level <= 0 or not 0 < ahead * 60_000 <= span / 2:
        return None  # crossed already, going the other way, or too far ahead to trust a line
    spread = (var_in * (1 / n_in + (ahead - mx_in) ** 2 / sxx_in)
              + var_out * (1 / n_out + (ahead - mx_out) ** 2 / sxx_out))
    if math.sqrt(spread) / abs(slope) * 60_000 > CROSSOVER_SE_MS:
        return None
    return now + round(ahead * 60_000), "cooler" if slope < 0 else "warmer"


def _conditions(station, s, inside):
    """What the advice used of one station, in °C: for the JSON and the page."""
    celsius, rh = (s.inside, s.rh_inside) if inside else (s.outside, s.rh_outside)
    air = humid_air(celsius, rh) if rh is not None else None
    return {"mac": station["mac"], "name": station["name"], "temperature": celsius, "humidity": rh,
            "dew_point": air and air[0], "absolute_humidity": air and air[1]}


def advise(indoor, outdoor, series, view, now, memory=None):
    """The window advice: whether to open, why, and when outside will cross inside.

    ``series`` are the last ADVICE_MEMORY_MS of inside temperature, inside humidity,
    outside temperature and outside humidity, each [(ms, value)], oldest first. ``memory`` (a dict
    the caller keeps) carries the hysteresis from one call to the next: the state after
    the last sample both stations have reported past ("upto"), from which the newer
    samples are replayed on every call. So the advice holds near a threshold however
    often it is asked, a station's late readings still count, and "since" says when the
    action last changed.
    """
    for role, station in (("outdoor", outdoor), ("indoor", indoor)):
        if station is None:
            return Advice("unknown", "Can't compare yet: no station is marked %s" % role,
                          "Mark them on the server: python3 iotserver.py --role MAC outdoor and --role MAC indoor")
    for role, station in (("Outside", outdoor), ("Inside", indoor)):
        if 1 not in station["fields"]:
            return Advice("unknown", "Can't compare yet: %s station %s has sent no temperature" % (
                role.lower(), station["name"]), "The advice needs field 1, the temperature in °C.")
        if station["fields"][1]["implausible"]:
            return Advice("unknown", "Can't compare: %s station %s sends an implausible temperature" % (
                role.lower(), station["name"]), "Check the sensor, or tell the server its unit (--field).")
        if is_offline(station, now):
            return Advice("unknown", "Can't compare: %s station %s is offline (last seen %s)" % (
                role.lower(), station["name"], ago(now - station["last_seen"])),
                "The advice resumes when it posts again.")
    memory = {} if memory is None else memory
    pair = [indoor["id"], outdoor["id"]]
    if memory.get("pair") != pair or memory.get("upto", 0) < now - ADVICE_MEMORY_MS:
        memory.clear()  # other stations, or a memory too old to hold on to
        memory.update(pair=pair, upto=0, state={})
    history = samples(*series, after=memory["upto"])
    if not history:
        return Advice("unknown", "Can't compare: no temperatures from both stations in the last 2 hours",
                      "The advice resumes when both post a temperature.")
    settled = min(indoor["fields"][1]["ts"], outdoor["fields"][1]["ts"])  # no reading older than this is to come
    state = dict(memory["state"])
    for s in history:
        if s.ms > memory["upto"]:
            action, state["why"] = _judge(state, s, view)
            if action != state.get("action"):
                state["action"], state["since"] = action, s.ms
            if s.ms <= settled:
                memory["state"], memory["upto"] = dict(state), s.ms
    latest = history[-1]
    if "why" not in state:  # nothing newer than the memory: readings were deleted since
        state["action"], state["why"] = _judge(state, latest, view)
        state["since"] = latest.ms
    headline, reason = _words(state["why"], state, latest, view)
    cross = crossover(series[0], series[2], now)
    outlook = ""
    if cross:
        rounded = (cross[0] + 150_000) // 300_000 * 300_000
        outlook = "Outside should be %s than inside around %s." % (cross[1], view.local(rounded).strftime("%H:%M"))
    return Advice(state["action"], headline, reason, state["since"], cross and cross[0], outlook,
                  _conditions(indoor, latest, True), _conditions(outdoor, latest, False))


class Advisor:
    """The advice over time, for the page, /api/advice and the notifications alike.

    Holds advise()'s memory between calls (one lock: calls from the page and the
    background check are folded in one at a time).
    """

    def __init__(self, view, memory=None):
        self.view = view
        self.memory = dict(memory or {})
        self.lock = threading.Lock()

    def evaluate(self, snap, by_role, now):
        """The advice from a read snapshot and the stations by role (filled by Snapshot.latest)."""
        indoor, outdoor = by_role.get("indoor"), by_role.get("outdoor")
        series = [[]] * 4
        if indoor and outdoor:
            series = [snap.values(s["id"], field, now - ADVICE_MEMORY_MS, ADVICE_MEMORY_READINGS)
                      for s in (indoor, outdoor) for field in (1, 3)]
        with self.lock:
            return advise(indoor, outdoor, series, self.view, now, self.memory)

    def current(self, store, now):
        """(advice, stations by role) read in a snapshot of their own."""
        with store.snapshot() as snap:
            by_role = {s["role"]: snap.latest(s) for s in snap.stations if s["role"]}
            return self.evaluate(snap, by_role, now), by_role


###############################################################################
# Page ########################################################################
###############################################################################
# The phone page at /: headline, a card per station, the 24-hour chart.

#: The chart: last 24 hours, averaged into 10-minute buckets (at most 145 points a line).
CHART_MS = 24 * 3_600_000
CHART_BUCKET_MS = 10 * 60_000
#: The chart's ranges (?range=): link text, title, span and bucket. A day is drawn from the
#: readings, longer ranges from the rollups (an hour, 6 hours, a day a point).
RANGES = {"24h": ("24 h", "Last 24 hours", CHART_MS, CHART_BUCKET_MS),
          "7d": ("7 d", "Last 7 days", 7 * DAY_MS, HOUR_MS),
          "30d": ("30 d", "Last 30 days", 30 * DAY_MS, 6 * HOUR_MS),
          "1y": ("1 y", "Last year", 365 * DAY_MS, DAY_MS)}
#: Colours of the chart lines of stations without a role, in card order (then again).
LINE_COLOURS = 8
#: Station cards on the page at most (the compared ones and the most recently heard).
MAX_CARDS = 24


def _nice_step(span, ticks=4):
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _time_ticks(view, start, now, range_name):
    """Where the time axis is labelled: [(ms, text)]: every 6 hours (midnight by its date) on a
    day, days on a week, Mondays on a month, the first of each month (January by its year) on a year."""
    if range_name == "24h":
        ticks = []
        # looked for every quarter hour: zones are offset by whole, half and quarter hours
        # (Asia/Kathmandu +5:45, Australia/Eucla +8:45)
        tick = (start // 900_000 + 1) * 900_000
        while tick <= now:
            local = view.local(tick)
            if local.minute == 0 and local.hour % 6 == 0:
                ticks.append((tick, local.strftime("%H:%M") if local.hour else "%s %d" % (local.strftime("%a"), local.day)))
            tick += 900_000
        return ticks
    first = view.local(start).date()
    dates = [first + datetime.timedelta(days=i) for i in range(1, (view.local(now).date() - first).days + 1)]
    if range_name == "7d":
        return [(view.midnight(d), "%s %d" % (d.strftime("%a"), d.day)) for d in dates]
    if range_name == "30d":
        return [(view.midnight(d), "%s %d" % (d.strftime("%b"), d.day)) for d in dates if d.weekday() == 0]
    return [(view.midnight(d), str(d.year) if d.month == 1 else d.strftime("%b")) for d in dates if d.day == 1]


def _runs(data, bucket_ms):
    """Points split where the line has a gap (over three buckets without a reading): no line across it."""
    runs = []
    for point in data:
        if not runs or point[0] - runs[-1][-1][0] > 3 * bucket_ms:
            runs.append([])
        runs[-1].append(point)
    return runs


def render_chart(lines, view, now, range_name="24h", field=None):
    """Inline SVG of lines (label, css class, [(ms, min, mean, max, count)]) over one of RANGES.

    Values are in ``field``'s base unit (default: a temperature in °C); ranges longer than a
    day draw each line's min–max band behind it.
    """
    title, span, bucket = RANGES[range_name][1:]
    field = field or Field(1)
    convert, unit = ((view.temperature, "°" + view.unit) if field.base_unit == "°C" else
                     ((lambda v: v), field.base_unit))
    width, height, left, right, top, bottom = 360, 210, 38, 8, 22, 26
    start = now - span
    band = span > DAY_MS
    points = [convert(v) for _, _, data in lines for _, low, mean, high, _ in data
              for v in ((low, high) if band else (mean,))]
    if not points:
        return '<p class="muted">No %s in the %s.</p>' % (html.escape(field.name.lower()), title[0].lower() + title[1:])
    low, high = min(points), max(points)
    step = _nice_step(max(high - low, 1.0))
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    if high - low < step:
        high = low + step
    levels = [low + i * step for i in range(int(round((high - low) / step)) + 1)]
    labels = ["%g" % round(value, 2) for value in levels]
    left = max(left, 8 + round(5.6 * max(len(text) for text in labels)))  # room for "1006.25" at 10 px

    def x(ms):  # a bucket is drawn at its middle, inside the chart
        return left + (min(max(ms + bucket / 2, start), now) - start) / span * (width - left - right)

    def y(v):
        return top + (high - convert(v)) / (high - low) * (height - top - bottom)

    out = ['<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s in %s, %s">'
           % (width, height, html.escape(field.name), html.escape(unit), title.lower())]
    for value, text in zip(levels, labels):
        level = top + (high - value) / (high - low) * (height - top - bottom)
        out.append('<line class="grid" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/>'
                   '<text class="tick" x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (left, width - right, level, level, left - 4, level + 3.5, text))
    out.append('<text class="tick" x="%d" y="10" text-anchor="end">%s</text>' % (left - 4, html.escape(unit)))
    for tick, text in _time_ticks(view, start, now, range_name):
        at = left + (tick - start) / span * (width - left - right)
        out.append('<line class="grid" x1="%.1f" x2="%.1f" y1="%d" y2="%d"/>'
                   '<text class="tick" x="%.1f" y="%d" text-anchor="middle">%s</text>'
                   % (at, at, top, height - bottom, at, height - bottom + 13, text))
    zone = view.local(now).tzname() or ""
    out.append('<text class="tick" x="%d" y="%d" text-anchor="end">time (%s)</text>'
               % (width - right, height - 2, html.escape(zone)))
    for _, css, data in lines:
        for run in _runs(data, bucket):
            if band:
                edge = ["%.1f,%.1f" % (x(p[0]), y(p[3])) for p in run] + \
                       ["%.1f,%.1f" % (x(p[0]), y(p[1])) for p in reversed(run)]
                out.append('<polygon class="band %s" points="%s"/>' % (css, " ".join(edge)))
            out.append(_polyline(["%.1f,%.1f" % (x(p[0]), y(p[2])) for p in run], css))
    out.append("</svg>")
    return "".join(out)


def _polyline(run, css):
    if len(run) == 1:
        cx, cy = run[0].split(",")
        return '<circle class="line %s" cx="%s" cy="%s" r="2"/>' % (css, cx, cy)
    return '<polyline class="line %s" points="%s"/>' % (css, " ".join(run))


_CSS = """
:root{color-scheme:light dark;--bg:#f6f7f9;--card:#fff;--fg:#16181d;--muted:#636b78;--line:#d9dde3;
--open:#0b7a3e;--close:#b3261e;--same:#5b6470;--out:#1668dc;--in:#d9730d;--warn:#b3261e}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1b1e25;--fg:#e8eaef;--muted:#9aa3b2;
--line:#2e333d;--open:#1d6b45;--close:#9c2f27;--same:#444b57;--out:#6aa9ff;--in:#ffad5c;--warn:#ff8a80}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:960px;margin:0 auto;padding:16px}
.headline{border-radius:14px;padding:18px 16px;margin:0 0 16px;color:#fff;background:var(--same)}
.headline h1{margin:0;font-size:1.45rem;line-height:1.25}
.headline p{margin:6px 0 0;opacity:.9}
.headline.open{background:var(--open)}.headline.close{background:var(--close)}
.headline.unknown{background:var(--card);color:var(--fg);border:1px solid var(--line)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px}
.card,.panel{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:14px 16px}
.card h2{margin:0;font-size:1.1rem}
.role{font-size:.75rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin-left:6px}
.mac,.muted,.seen{color:var(--muted);font-size:.85rem;margin:2px 0 8px}
.offline{border-color:var(--warn)}.badge{color:var(--warn);font-weight:600}
dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:4px 12px;align-items:baseline}
dt{color:var(--muted);font-size:.9rem}dd{margin:0}
.value{font-size:1.6rem;font-weight:600;font-variant-numeric:tabular-nums}
.range{display:block;color:var(--muted);font-size:.8rem}
.panel{margin-top:16px}.panel h2{margin:0 0 8px;font-size:1rem}
.chart{width:100%;max-width:720px;height:auto;display:block;margin:0 auto}
.grid{stroke:var(--line);stroke-width:1}.tick{fill:var(--muted);font-size:10px}
.outdoor{--c:var(--out)}.indoor{--c:var(--in)}.c0{--c:#8e44ad}.c1{--c:#16a085}.c2{--c:#c2185b}.c3{--c:#7cb342}
.c4{--c:#8d6e63}.c5{--c:#0097a7}.c6{--c:#e0a800}.c7{--c:#5c6bc0}
.line{fill:none;stroke:var(--c);stroke-width:2.2;stroke-linejoin:round}circle.line{fill:var(--c)}
.band{fill:var(--c);stroke:none;opacity:.18}
.legend{font-size:.85rem;color:var(--muted)}.legend b{font-weight:600;color:var(--c)}
.ranges{display:flex;gap:6px;margin:16px 0 0}.ranges a{padding:4px 12px;border:1px solid var(--line);border-radius:999px;
color:var(--fg);text-decoration:none;background:var(--card)}.ranges a[aria-current]{background:var(--fg);color:var(--bg)}
.card h2 a{color:inherit;text-decoration:none}.back{margin:0 0 12px}.implausible{display:block;font-size:.8rem}
code{font-size:.85rem}.url{overflow-wrap:anywhere}.word{white-space:nowrap}
footer{color:var(--muted);font-size:.8rem;margin-top:16px;text-align:center}
"""

# refreshes <main> and the title in place; without JavaScript the <noscript> meta refresh does it
_SCRIPT = """(function(){var s=document.currentScript,ms=1000*(+s.getAttribute("data-refresh"));
function tick(){var u=new URL(location.href);u.searchParams.set("fragment","1");
fetch(u,{cache:"no-store",credentials:"same-origin"}).then(function(r){
if(!r.ok)throw new Error(r.status);return r.text()}).then(function(t){var d=new DOMParser().parseFromString(t,"text/html"),
m=d.querySelector("main");if(m){document.querySelector("main").replaceWith(document.adoptNode(m));document.title=d.title}
}).catch(function(){}).then(function(){setTimeout(tick,ms)})}setTimeout(tick,ms)})();"""

# what the page's script fetches to refresh itself: no <style> or <script> to parse again
_MAIN = string.Template("""<main>
$main
<footer>Updated $updated · refreshes every $refresh s · <a href="/api/latest">JSON</a> ·
<a href="/api/readings.csv">CSV</a></footer>
</main>""")

_PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="theme-color" content="#f6f7f9" media="(prefers-color-scheme: light)">
<meta name="theme-color" content="#111318" media="(prefers-color-scheme: dark)">
<meta name="apple-mobile-web-app-title" content="iotserver">
<link rel="icon" href="/icon.svg" type="image/svg+xml">
<link rel="apple-touch-icon" href="/apple-touch-icon.png">
<link rel="manifest" href="/manifest.webmanifest">
<title>$title</title>
<noscript><meta http-equiv="refresh" content="$refresh"></noscript>
<style nonce="$nonce">$css</style>
</head><body>
$main
<script nonce="$nonce" data-refresh="$refresh">$script</script>
</body></html>
""")


def _gather(store, view, now, advisor, range_name="24h"):
    """What the page shows, read in one snapshot: (stations, by role, chart lines, advice).

    Values are in °C (a station posting °F is converted), each flagged when implausible;
    the chart has a line for every station that sends a temperature, in card order.
    """
    span, bucket = RANGES[range_name][2:]
    with store.snapshot() as snap:
        stations = [snap.latest(s, view.day_start(now)) for s in snap.stations]
        by_role = {s["role"]: s for s in stations if s["role"]}
        lines = []
        for s in stations[:MAX_CARDS]:
            number = next((n for n, f in sorted(s["fields"].items()) if f["field"].base_unit == "°C"), None)
            if number is not None:
                css = s["role"] or "c%d" % (sum(not line[0]["role"] for line in lines) % LINE_COLOURS)
                lines.append((s, css, snap.series(s["id"], number, now - span, bucket, now)))
        advice = advisor.evaluate(snap, by_role, now)
    return stations, by_role, lines, advice


def _command(text):
    """A command in <code> that wraps only between its words (browsers also break after a '-')."""
    return "<code>%s</code>" % " ".join('<span class="word">%s</span>' % html.escape(word) for word in text.split(" "))


def _empty_state(base_url):
    """What a new server shows: how to point a station at it (no part of the key: anyone may look)."""
    return ('<section class="headline unknown"><h1>No readings yet</h1>'
            "<p>Point a station at this server. It posts one URL per reading:</p>"
            '<p><code class="url">%s</code></p>'
            "<p>The key: %s on the server. "
            "Field 1 is the temperature in °C; the station appears here with its first reading.</p></section>"
            # the long URL may wrap after a slash of its path (or, only where nothing else fits, inside a part)
            % (html.escape(base_url) + html.escape(_example_url("", "KEY")).replace("/", "/<wbr>"),
               _command("python3 iotserver.py --show-key")))


def _headline(advice, view):
    """The advice as the page's headline: what to do, why, the values it used, what comes next."""
    reason = html.escape(advice.reason)
    if advice.action == "unknown" and "marked" in advice.headline:
        reason = "Mark them on the server: %s and %s" % (
            _command("python3 iotserver.py --role MAC outdoor"), _command("--role MAC indoor"))
    parts = ["<h1>%s</h1>" % html.escape(advice.headline), "<p>%s</p>" % reason]
    if advice.inside:
        parts.append("<p>%s</p>" % " · ".join(
            "%s %s%s" % (where, view.show(1, c["temperature"]),
                         ", dew point %s" % view.show(1, c["dew_point"]) if c["dew_point"] is not None else "")
            for where, c in (("Outside", advice.outside), ("inside", advice.inside))))
    if advice.outlook:
        parts.append('<p class="outlook">%s</p>' % html.escape(advice.outlook))
    return '<section class="headline %s" id="headline">%s</section>' % (advice.action, "".join(parts))


def _card(s, view, now):
    """One station: name, role, last seen, latest value per field with today's range."""
    esc = html.escape
    offline = is_offline(s, now)
    role = '<span class="role">%s</span>' % esc(s["role"]) if s["role"] else ""
    if s["last_seen"] is None:
        seen = '<p class="seen"><span class="badge">No readings</span></p>'
    elif offline:
        seen = '<p class="seen"><span class="badge">Offline</span> · last seen %s</p>' % ago(now - s["last_seen"])
    else:
        seen = '<p class="seen">%s</p>' % ago(now - s["last_seen"])
    rows, air = [], station_air(s)
    for number, f in sorted(s["fields"].items()):
        field, span = f["field"], ""
        if f["min"] is not None:
            span = '<span class="range">today %s – %s</span>' % (view.show(field, f["min"]), view.show(field, f["max"]))
        if number == 3 and air:
            span += ('<span class="range">dew point <b data-field="dew">%s</b></span>'
                     '<span class="range">water %.1f\u00a0g/m³ of air</span>' % (view.show(1, air[0]), air[1]))
        if f["implausible"]:  # stored, but no real air is like this: a wrong unit or a broken sensor
            span += ('<span class="badge implausible">Implausible for a %s: check the sensor, or its unit '
                     '(now %s; see --field)</span>' % (esc(field.name.lower()), esc(field.unit)))
        rows.append('<dt>%s</dt><dd><span class="value" data-field="%d">%s</span>%s</dd>'
                    % (esc(field.name), number, view.show(field, f["value"]), span))
    mac = '<p class="mac">%s</p>' % esc(s["mac"]) if s["name"] != s["mac"] else ""
    return ('<section class="card%s" data-mac="%s"><h2><a href="/station/%s">%s</a>%s</h2>%s%s<dl>%s</dl></section>'
            % (" offline" if offline else "", esc(s["mac"]), esc(s["mac"]), esc(s["name"]), role, mac, seen,
               "".join(rows)))


def _cards(stations, view, now):
    """The compared stations first, then the others by name (Snapshot's order); a long tail is left to /api/latest."""
    shown = stations
    parts = ['<div class="cards">'] + [_card(s, view, now) for s in shown[:MAX_CARDS]] + ["</div>"]
    if len(shown) > MAX_CARDS:
        parts.append('<p class="muted">… and %d more stations: <a href="/api/latest">/api/latest</a> lists them all.</p>'
                     % (len(shown) - MAX_CARDS))
    return parts


def _range_links(path, range_name):
    """The range switch: plain links, so it works without JavaScript."""
    return '<nav class="ranges">%s</nav>' % "".join(
        '<a href="%s?range=%s"%s>%s</a>' % (path, name, ' aria-current="page"' if name == range_name else "", text)
        for name, (text, _, _, _) in RANGES.items())


def _chart_panel(lines, view, now, range_name="24h", field=None, heading=None):
    """A chart with a legend naming each line in its colour."""
    legend = " · ".join('<b class="%s">━</b> %s' % (css, html.escape(s["name"])) for s, css, _ in lines)
    return ('<section class="panel"><h2>%s</h2>%s<p class="legend">%s</p></section>'
            % (html.escape(heading or RANGES[range_name][1]),
               render_chart([(s["name"], css, data) for s, css, data in lines], view, now, range_name, field), legend))


def _document(title, parts, view, now, refresh, fragment):
    """A whole page around ``parts`` (or, with ``fragment``, the title and <main> the open page swaps in): (html, nonce)."""
    body = _MAIN.substitute(main="\n".join(parts), refresh=refresh, updated=view.local(now).strftime("%H:%M:%S"))
    nonce = secrets.token_urlsafe(16)
    if fragment:
        return ("<title>%s</title>\n%s" % (html.escape(title), body)).encode("utf-8"), nonce
    page = _PAGE.substitute(title=html.escape(title), nonce=nonce, refresh=refresh, css=_CSS, main=body, script=_SCRIPT)
    return page.encode("utf-8"), nonce


def render_page(store, view, now, base_url, refresh, advisor, fragment=False, range_name="24h"):
    """The page at /: headline, a card per station, the chart over ``range_name``. Returns (html, nonce).

    With ``fragment``, only the title and <main>, which the open page swaps in.
    """
    stations, by_role, lines, advice = _gather(store, view, now, advisor, range_name)
    if any(s["fields"] for s in stations):
        parts = [_headline(advice, view)]
    else:
        parts = [_empty_state(base_url)]
    parts += _cards(stations, view, now)
    if stations:
        parts += [_range_links("/", range_name), _chart_panel(lines, view, now, range_name)]
    outdoor = by_role.get("outdoor")
    title = "iotserver"
    if outdoor and 1 in outdoor["fields"] and not is_offline(outdoor, now) and not outdoor["fields"][1]["implausible"]:
        title = "%s outside · iotserver" % view.show(1, outdoor["fields"][1]["value"])
    return _document(title, parts, view, now, refresh, fragment)


def render_station(store, view, now, mac, refresh, fragment=False, range_name="24h"):
    """The page of one station (/station/MAC): its card and a chart of each of its fields. Returns (html, nonce)."""
    span, bucket = RANGES[range_name][2:]
    with store.snapshot() as snap:
        station = next((s for s in snap.stations if s["mac"] == mac), None)
        if station is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no station with mac %s" % mac)
        snap.latest(station, view.day_start(now))
        charts = [(f["field"], snap.series(station["id"], n, now - span, bucket, now))
                  for n, f in sorted(station["fields"].items())]
    parts = ['<p class="back"><a href="/">← All stations</a></p>', _card(station, view, now),
             _range_links("/station/" + mac, range_name)]
    # the temperature in the colour the main page draws a compared station in
    parts += [_chart_panel([(station, station["role"] if station["role"] and field.base_unit == "°C"
                             else "c%d" % (i % LINE_COLOURS), data)], view, now, range_name, field,
                           "%s, %s" % (field.name, RANGES[range_name][1][0].lower() + RANGES[range_name][1][1:]))
              for i, (field, data) in enumerate(charts)]
    return _document("%s · iotserver" % station["name"], parts, view, now, refresh, fragment)


###############################################################################
# Home-screen app #############################################################
###############################################################################
# What "Add to Home Screen" needs: a web app manifest and icons, drawn by the server.
# They hold no data, so they are served without the key even with --private.

#: The icon, as rectangles on a unit square drawn over a background: a window on the
#: page's blue. Maskable: all of it lies inside the middle circle a platform may crop to.
_ICON_BG = "#1668dc"
_ICON_RECTS = ((0.26, 0.22, 0.74, 0.76, "#ffffff"),
               (0.30, 0.26, 0.48, 0.47, "#bcd8ff"), (0.52, 0.26, 0.70, 0.47, "#bcd8ff"),
               (0.30, 0.51, 0.48, 0.72, "#bcd8ff"), (0.52, 0.51, 0.70, 0.72, "#bcd8ff"),
               (0.24, 0.76, 0.76, 0.80, "#ffffff"))
#: The icons the page and the manifest name: path -> (content type, pixels; None for SVG).
ICONS = {"/icon.svg": ("image/svg+xml", None), "/favicon.ico": ("image/x-icon", 32),
         "/apple-touch-icon.png": ("image/png", 180), "/icon-192.png": ("image/png", 192),
         "/icon-512.png": ("image/png", 512)}


def _png(size):
    """The icon as an RGB PNG, ``size`` pixels square."""
    rows = []
    for y in range(size):
        row = bytearray(bytes.fromhex(_ICON_BG[1:]) * size)
        for x0, y0, x1, y1, colour in _ICON_RECTS:
            if round(y0 * size) <= y < round(y1 * size):
                left, right = round(x0 * size), round(x1 * size)
                row[3 * left:3 * right] = bytes.fromhex(colour[1:]) * (right - left)
        rows.append(b"\0" + row)  # filter type 0: the row as it is

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">2I5B", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=None)
def render_icon(path):
    """The bytes of one of ICONS, drawn on first use and then kept."""
    kind, size = ICONS[path]
    if size is None:
        rects = "".join('<rect x="%g" y="%g" width="%g" height="%g" fill="%s"/>'
                        % (100 * x0, 100 * y0, 100 * (x1 - x0), 100 * (y1 - y0), colour)
                        for x0, y0, x1, y1, colour in _ICON_RECTS)
        return ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 100">'
                '<rect width="100" height="100" rx="18" fill="%s"/>%s</svg>\n' % (_ICON_BG, rects)).encode()
    png = _png(size)
    if kind == "image/x-icon":  # an ICO file holding one PNG, as every browser reads it
        return struct.pack("<3H4B2H2I", 0, 1, 1, size, size, 0, 0, 1, 32, len(png), 22) + png
    return png


def render_manifest():
    """The web app manifest: name, start page, standalone display, colours, icons."""
    icons = [{"src": path, "type": kind, "sizes": "%dx%d" % (size, size) if size else "any"}
             for path, (kind, size) in ICONS.items() if path.startswith("/icon")]
    icons.append(dict(icons[-1], purpose="maskable"))
    return _json({"name": "iotserver", "short_name": "iotserver",
                  "description": "Open the windows or keep them closed? Your sensor stations at a glance.",
                  "start_url": "/", "scope": "/", "display": "standalone",
                  "theme_color": _ICON_BG, "background_color": "#f6f7f9", "icons": icons})


###############################################################################
# Read API ####################################################################
###############################################################################

#: Readings returned by /api/readings by default and at most.
API_LIMIT, API_MAX_LIMIT = 1000, 100_000


def _json(obj):
    return (json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def render_latest(store, now):
    """/api/latest: every station with its role, last-seen time and latest value per field."""
    with store.snapshot() as snap:
        stations = [snap.latest(s) for s in snap.stations]
    listed = [{
        "mac": s["mac"], "name": s["name"], "role": s["role"],
        "last_seen": iso_ms(s["last_seen"]) if s["last_seen"] else None,
        "online": not is_offline(s, now),
        "fields": {str(n): {"value": f["posted"], "time": iso_ms(f["ts"]), "name": f["field"].key,
                            "unit": f["field"].unit, "implausible": f["implausible"]}
                   for n, f in sorted(s["fields"].items())},
    } for s in stations]
    # the same stations keyed by role and by name, each latest value under its field's name,
    # so one short path reaches a value (Home Assistant: value_json.by_role.outdoor.temperature)
    flat = [dict({k: v for k, v in s.items() if k != "fields"}, **{f["name"]: f["value"] for f in s["fields"].values()})
            for s in listed]
    return _json({"generated": iso_ms(now), "stations": listed,
                  "by_role": {s["role"]: s for s in flat if s["role"]}, "by_name": {s["name"]: s for s in flat}})


def render_advice(advisor, store, now):
    """/api/advice: the advice the page shows, with the values (°C) it used."""
    advice = advisor.current(store, now)[0]
    view = advisor.view
    used = {}
    for where, values in (("inside", advice.inside), ("outside", advice.outside)):
        used[where] = values and dict(values)
        for name in ("dew_point", "absolute_humidity"):
            if values and values[name] is not None:
                used[where][name] = round(values[name], 2)
    return _json(dict({
        "generated": iso_ms(now), "action": advice.action, "headline": advice.headline, "reason": advice.reason,
        "since": iso_utc(advice.since) if advice.since is not None else None,
        "crossover": iso_utc(advice.crossover) if advice.crossover else None, "outlook": advice.outlook or None,
        "comfort": list(view.comfort), "dead_band": view.dead_band_c, "max_dew_point": view.max_dew_point}, **used))


def _api_params(query, allowed):
    """A read API's query string as {name: value}: each of ``allowed`` (the last being "key") once at most."""
    params = {}
    for name, value in parse_query(query, len(allowed) + 1):
        if name not in allowed:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "unknown parameter %r; use %s" % (name[:20], ", ".join(allowed[:-1])))
        if name in params:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "%s is given twice" % name)
        params[name] = value
    return params


def _api_station(params, out):
    """Check the mac and field parameters into ``out``."""
    if "mac" in params:
        try:
            out["mac"] = parse_mac(params["mac"])
        except ValueError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    if "field" in params:
        if not _FIELD_RE.fullmatch(params["field"]):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "field must be a whole number from 1 to 8")
        out["field"] = int(params["field"])
    return out


def parse_readings_query(query, now):
    """The parameters of /api/readings: mac, field, since, until, limit, format."""
    params = _api_params(query, ("mac", "field", "since", "until", "limit", "format", "key"))
    out = _api_station(params, {"mac": None, "field": None, "format": params.get("format", "json")})
    out["until"] = parse_time("until", params["until"]) if "until" in params else now + 1
    out["since"] = parse_time("since", params["since"]) if "since" in params else out["until"] - CHART_MS
    if out["since"] >= out["until"]:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "since must be before until")
    limit = params.get("limit", str(API_LIMIT))
    if not re.fullmatch(r"[0-9]{1,7}", limit, re.ASCII) or not 1 <= int(limit) <= API_MAX_LIMIT:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "limit must be a whole number from 1 to %d" % API_MAX_LIMIT)
    out["limit"] = int(limit)
    if out["format"] not in ("json", "csv"):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "format must be json or csv")
    return out


def _csv_cell(text):
    """Text a spreadsheet will not run as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_chunks(header, batches, lineterminator):
    """CSV in chunks of bytes: the header row, then a chunk per batch of rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=lineterminator)
    for rows in itertools.chain([[header]], batches):
        writer.writerows(rows)
        yield buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()


def _json_array(batches):
    """A JSON array in chunks of bytes, a chunk per batch of items."""
    yield b"["
    comma = b""
    for items in batches:
        yield comma + _json(items)[1:-2]  # the items without the list's brackets and newline
        comma = b","
    yield b"]"


def render_readings(store, query):
    """/api/readings as chunks of JSON or CSV: rows are read and encoded a batch at a time, never all at once."""
    with store.snapshot() as snap:
        ids = [s["id"] for s in snap.stations if query["mac"] in (None, s["mac"])]
        if query["mac"] and not ids:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no station with mac %s" % query["mac"])
        batches = snap.readings(ids, query["field"], query["since"], query["until"], query["limit"]) if ids else []
        if query["format"] == "csv":
            yield from _csv_chunks(("time", "mac", "name", "field", "value", "unit"), (
                [(iso_ms(ts), mac, _csv_cell(name), field, repr(value), _csv_cell(unit))
                 for ts, mac, name, field, value, unit in rows] for rows in batches), "\r\n")
        else:
            yield from _json_array(
                [{"time": iso_ms(ts), "mac": mac, "name": name, "field": field, "value": value, "unit": unit}
                 for ts, mac, name, field, value, unit in rows] for rows in batches)
            yield b"\n"


def parse_series_query(query):
    """The parameters of /api/series: mac (needed), field (1), range (24h)."""
    params = _api_params(query, ("mac", "field", "range", "key"))
    if "mac" not in params:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "mac is missing: the station's MAC, e.g. mac=6c:ef:7a:3b:9d:e8")
    out = _api_station(params, {"field": 1, "range": params.get("range", "24h")})
    if out["range"] not in RANGES:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "range must be %s" % ", ".join(RANGES))
    return out


def render_series(store, view, query, now):
    """/api/series: what a chart draws, per bucket min, mean, max and count, in the chart's unit."""
    span, bucket = RANGES[query["range"]][2:]
    with store.snapshot() as snap:
        station = next((s for s in snap.stations if s["mac"] == query["mac"]), None)
        if station is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no station with mac %s" % query["mac"])
        field = snap.field(station["id"], query["field"])
        points = snap.series(station["id"], query["field"], now - span, bucket, now)
    to_unit, unit = ((view.temperature, "°" + view.unit) if field.base_unit == "°C" else
                     ((lambda v: v), field.base_unit))

    converted = field.base_unit == "°C" and view.unit == "F"

    def convert(value, averaged=False):  # a mean or a °F value to ten digits: no 71.17999999999999
        value = to_unit(value)
        return float("%.10g" % value) if averaged or converted else value

    return _json({"mac": station["mac"], "station": station["name"], "field": query["field"], "name": field.name,
                  "unit": unit, "range": query["range"], "bucket_seconds": bucket // 1000,
                  "points": [{"time": iso_ms(start), "min": convert(low), "mean": convert(mean, True), "max": convert(high),
                              "count": count} for start, low, mean, high, count in points]})


###############################################################################
# Metrics #####################################################################
###############################################################################
# /metrics in Prometheus's text format (0.0.4): each station's latest values, and every
# counter Server.count() keeps, rendered as they come, so a new counter needs no change here.

#: The # HELP text of the counters iotserver keeps; any other counter gets a generic one.
COUNTER_HELP = {
    "readings_stored": "Readings answered as stored (a resent one counts, though kept once), by the API they came by.",
    "readings_refused": "Writes refused (one a request), by reason: invalid, wrong_key, rate_limited, locked...",
    "rate_limited": "Posts refused because their station posts faster than --rate and --burst allow.",
    "wrong_keys": "Requests with a wrong API key, channel write key or metrics token.",
    "notifications": "Notifications, by result and kind.",
    "requests": "HTTP requests answered, by route and status.",
}


def _sample(name, labels, value):
    """One line of the text format: name{label="value",...} value, label values escaped."""
    if labels:
        name += "{%s}" % ",".join('%s="%s"' % (label, str(text).replace("\\", "\\\\").replace('"', '\\"')
                                                .replace("\n", "\\n")) for label, text in labels)
    return "%s %s" % (name, repr(value) if isinstance(value, float) else value)


def render_metrics(server, now):
    """/metrics: per station and field the latest value, age and online state; counters; size; uptime."""
    with server.store.snapshot() as snap:
        stations = [snap.latest(s) for s in snap.stations]
    values, ages, online = [], [], []
    for s in stations:
        who = (("station", s["name"]), ("mac", s["mac"]))
        for n, f in sorted(s["fields"].items()):
            values.append((who + (("field", n), ("quantity", f["field"].key), ("unit", f["field"].unit)), f["posted"]))
        if s["last_seen"] is not None:
            ages.append((who, (now - s["last_seen"]) / 1000))
        online.append((who, int(not is_offline(s, now))))
    families = [
        ("station_value", "gauge", "Latest value of a station's field as sent, in the unit its label names.", values),
        ("station_last_seen_age_seconds", "gauge", "Seconds since the station's latest reading.", ages),
        ("station_online", "gauge", "1 while the station posts as usual, 0 once it missed a few posts.", online),
        ("stations", "gauge", "Stations registered.", [((), len(stations))]),
    ]
    counted = server.counter_values()
    for name in sorted(set(COUNTER_HELP) | {name for (name, _), _ in counted}):
        families.append((name + "_total", "counter", COUNTER_HELP.get(name, "Count of %s." % name.replace("_", " ")),
                         [(labels, count) for (counter, labels), count in counted if counter == name]))
    families += [("database_bytes", "gauge", "Size of the database on disk, write-ahead log included.",
                  [((), server.store.size())]),
                 ("uptime_seconds", "gauge", "Seconds since the server started.",
                  [((), round(time.monotonic() - server.started, 3))])]
    lines = []
    for name, kind, text, samples in families:
        lines += ["# HELP iotserver_%s %s" % (name, text), "# TYPE iotserver_%s %s" % (name, kind)]
        lines += [_sample("iotserver_" + name, labels, value) for labels, value in samples]
    return ("\n".join(lines) + "\n").encode("utf-8")


###############################################################################
# ThingSpeak API ##############################################################
###############################################################################
# Each station is a ThingSpeak channel: its channel id is the station's id and it
# has a write key of its own. Writes take api_key / field1..field8 / created_at;
# reads answer the JSON, CSV and text shapes ThingSpeak's clients parse.

#: Entries /channels/ID/feeds returns by default and at most (ThingSpeak's numbers).
TS_RESULTS, TS_MAX_RESULTS = 100, 8000
#: Largest POST body accepted on /update.
MAX_BODY = 16 * 1024
#: A bulk write: entries per call and body size at most (ThingSpeak takes 960 entries a call).
MAX_BULK_ENTRIES = 960
MAX_BULK_BODY = 128 * 1024
_TS_FIELD_RE = re.compile(r"field([1-8])", re.ASCII)
#: Members of a bulk entry that ThingSpeak stores and iotserver accepts and ignores.
_BULK_IGNORED = ("status", "latitude", "longitude", "elevation")
_TS_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "txt": "text/plain; charset=utf-8"}
#: A read's aggregations, the first one given being used (as ThingSpeak does), and their periods
#: in minutes; "daily" is a calendar day in the request's time zone.
TS_AGGREGATIONS = ("timescale", "sum", "average", "median")
TS_PERIODS = ("10", "15", "20", "30", "60", "240", "720", "1440", "daily")


def _ts_value(value, digits=None):
    """A value as ThingSpeak writes it: a stored one without a needless '.0', a computed one (text) as
    computed; with ``digits`` (?round=), rounded to that many decimal places."""
    if digits is not None:
        return "%.*f" % (digits, float(value))
    if isinstance(value, str):
        return value
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _ts_zone(params):
    name = params.get("timezone")
    if not name:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "timezone %r is not a known time zone" % name[:40]) from None


def _ts_time(ms, zone, csv_style=False):
    """ThingSpeak's time text: UTC with Z, or the requested zone's offset."""
    stamp = to_datetime(ms, zone or datetime.timezone.utc)
    if csv_style:
        return stamp.isoformat(" ", "seconds")[:19] + " " + ("UTC" if zone is None else stamp.strftime("%z"))
    return stamp.isoformat(timespec="seconds")[:19] + "Z" if zone is None else stamp.isoformat(timespec="seconds")


def parse_ts_params(query, body=b"", content_type=""):
    """Parameters from the query string and a form or JSON body, each name once."""
    params = {}
    pairs = parse_query(query, 40)
    try:
        if body and content_type.split(";")[0].strip().lower() == "application/json":
            data = json.loads(body.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not an object")
            pairs += [(str(k), "" if v is None else str(v)) for k, v in data.items()
                      if isinstance(v, (str, int, float)) or v is None]
        elif body:
            pairs += parse_query(body.decode("utf-8"), 40)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise HTTPError(HTTPStatus.BAD_REQUEST, "parameters are malformed (send a form, JSON object or query string)") from None
    for name, value in pairs:
        if name in params and params[name] != value:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "%s is given twice" % name[:20])
        params[name] = value
    return params


def parse_ts_write(params):
    """[(field, value)] and the entry time (ms or None) from a ThingSpeak write."""
    values = []
    for name, text in params.items():
        match = _TS_FIELD_RE.fullmatch(name)
        if match and text != "":  # an empty field is "no value", as on ThingSpeak
            try:
                values.append((int(match.group(1)), parse_value(text)))
            except ValueError as exc:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "%s: %s" % (name, str(exc).replace("data ", "", 1))) from None
    if not values:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "no field1 ... field8 with a value")
    when = None
    if params.get("created_at"):
        when = check_time("created_at", parse_time("created_at", params["created_at"], _ts_zone(params)))
    return sorted(values), when


def _bulk_time(text, zone=None):
    """Epoch ms from a bulk entry's time: epoch seconds, ISO 8601, or '2026-07-01 12:00:00 -0500'."""
    text = str(text).strip()
    if re.fullmatch(r"[0-9]{1,12}(?:\.[0-9]{1,3})?", text, re.ASCII):
        return round(float(text) * 1000)
    return parse_time("created_at", text, zone)


def _bulk_delta(text):
    """Milliseconds from a delta_t (seconds since the previous entry)."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]{1,9}(?:\.[0-9]{1,3})?", text, re.ASCII):
        raise ValueError("delta_t must be a number of seconds such as 60")
    return round(float(text) * 1000)


def parse_bulk(body, content_type, now):
    """A bulk write's (write key or None, [(ms, [(field, value)])]), all entries checked; HTTPError names the first bad one.

    The JSON form is ``{"write_api_key", "updates": [{"created_at" | "delta_t", "field1".., ...}]}``;
    the form-encoded (CSV) one is ``write_api_key, time_format=absolute|relative,
    updates=T,f1,..,f8[,lat,long,elevation,status]|...``. A relative time (delta_t) counts
    from the entry before; the last entry of a run of relative ones is placed now.
    """
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            data = json.loads(body.decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("updates"), list):
                raise ValueError("send a JSON object with an updates list")
            key, rows = data.get("write_api_key"), data["updates"]
        else:
            form = dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8,
                                               errors="strict", strict_parsing=True))
            if form.get("time_format") not in ("absolute", "relative"):
                raise ValueError("send time_format=absolute or time_format=relative")
            if "updates" not in form:
                raise ValueError("send updates=T,field1,field2,...|T,field1,...")
            relative = form["time_format"] == "relative"
            key, rows = form.get("write_api_key"), []
            for line in form["updates"].split("|"):
                cells = line.split(",")
                row = {"delta_t" if relative else "created_at": cells[0]}
                row.update(("field%d" % n, cell) for n, cell in enumerate(cells[1:9], start=1) if cell != "")
                rows.append(row)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        message = str(exc) if str(exc).startswith("send") else "the body is not valid %s" % (
            "JSON" if kind == "application/json" else "form data")
        raise HTTPError(HTTPStatus.BAD_REQUEST, message) from None
    if key is not None and not isinstance(key, str):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "write_api_key must be text")
    if not rows:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "updates is empty")
    if len(rows) > MAX_BULK_ENTRIES:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "at most %d entries a call" % MAX_BULK_ENTRIES)
    times, deltas, entries = [], [], []
    for number, row in enumerate(rows, start=1):
        try:
            if not isinstance(row, dict):
                raise ValueError("must be an object")
            values = []
            for name, text in row.items():
                match = _TS_FIELD_RE.fullmatch(name)
                if match and text is not None and text != "":
                    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
                        raise ValueError("%s must be a number" % name)
                    try:
                        values.append((int(match.group(1)), parse_value(str(text))))
                    except ValueError as exc:
                        raise ValueError("%s: %s" % (name, str(exc).replace("data ", "", 1))) from None
                elif not match and name not in ("created_at", "delta_t") + _BULK_IGNORED:
                    raise ValueError("unknown member %r" % name[:20])
            if not values:
                raise ValueError("no field1 ... field8 with a value")
            if ("created_at" in row) == ("delta_t" in row):
                raise ValueError("give created_at or delta_t")
            times.append(_bulk_time(row["created_at"]) if "created_at" in row else None)
            deltas.append(_bulk_delta(row["delta_t"]) if "delta_t" in row else None)
            entries.append(sorted(values))
        except (ValueError, HTTPError) as exc:
            reason = exc.message if isinstance(exc, HTTPError) else str(exc)
            raise HTTPError(HTTPStatus.BAD_REQUEST, "entry %d: %s" % (number, reason)) from None
    for i in range(1, len(times)):  # a relative time after a known one counts forward
        if times[i] is None and times[i - 1] is not None:
            times[i] = times[i - 1] + deltas[i]
    if times[-1] is None:
        times[-1] = now
    for i in range(len(times) - 2, -1, -1):  # and one before a known one counts back
        if times[i] is None:
            times[i] = times[i + 1] - deltas[i + 1]
    for number, ms in enumerate(times, start=1):
        try:
            check_time("created_at", ms, now)
        except HTTPError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "entry %d: %s" % (number, exc.message)) from None
    return key, list(zip(times, entries))


def _ts_entries(snap, station_id, field, params, zone, now):
    """The entries a feed request asks for, oldest first: [(entry id, ms, {field: value})]."""
    results = params.get("results", "")
    if results and (not re.fullmatch(r"[0-9]{1,6}", results, re.ASCII) or int(results) > TS_MAX_RESULTS):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "results must be a whole number from 0 to %d" % TS_MAX_RESULTS)
    limit = int(results) if results else TS_RESULTS
    if not results and any(params.get(name) for name in ("days", "minutes", "start", "end")):
        limit = TS_MAX_RESULTS  # as ThingSpeak: a time range without results means all of it, up to 8,000
    since, until = 0, now + 1
    for name, unit in (("days", 86_400_000), ("minutes", 60_000)):
        if params.get(name):
            try:
                amount = float(params[name])
            except ValueError:
                amount = -1
            if not 0 < amount < 1e6:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "%s must be a positive number" % name)
            since = max(since, now - int(amount * unit))
    if params.get("start"):
        since = max(since, parse_time("start", params["start"], zone))
    if params.get("end"):
        until = parse_time("end", params["end"], zone) + 1
    return snap.entries(station_id, field, since, until, limit)


def _ts_aggregate(batches, params, zone):
    """Batches of entries grouped by period as ?timescale= (the first entry of each period), sum, average or
    median ask, each at its period's start; ThingSpeak's ``results`` limits the entries read, not the periods."""
    how = next((name for name in TS_AGGREGATIONS if params.get(name)), None)
    if how is None:
        return batches
    period = params[how]
    if period not in TS_PERIODS:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "%s must be %s (minutes) or daily" % (how, ", ".join(TS_PERIODS[:-1])))
    return _ts_periods(batches, how, period, zone)


def _ts_periods(batches, how, period, zone):
    """The periods of _ts_aggregate, READ_BATCH at a time (entries come in time order: a period's are adjacent)."""
    def start_of(entry):
        if period == "daily":
            day = to_datetime(entry[1], zone or datetime.timezone.utc)
            return int(day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
        return entry[1] // (int(period) * 60_000) * (int(period) * 60_000)

    out = []
    for start, members in itertools.groupby(itertools.chain.from_iterable(batches), key=start_of):
        members = list(members)
        if how == "timescale":
            out.append((members[0][0], start, members[0][2]))
        else:
            fields = collections.defaultdict(list)
            for _, _, values in members:
                for field, value in values.items():
                    fields[field].append(value)
            out.append((None, start, {f: repr(_ts_combine(how, sorted(vs))) for f, vs in fields.items()}))
        if len(out) == READ_BATCH:
            yield out
            out = []
    if out:
        yield out


def _ts_combine(how, values):
    """The sum, average or median of a field's sorted values in one period."""
    if how == "sum":
        return math.fsum(values)
    if how == "average":
        return math.fsum(values) / len(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _ts_round(params):
    """?round=N: the decimal places values are written with, or None."""
    digits = params.get("round")
    if not digits:
        return None
    if not re.fullmatch(r"[0-9]{1,2}", digits, re.ASCII) or int(digits) > 15:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "round must be a whole number of decimal places from 0 to 15")
    return int(digits)


def _ts_channel(snap, station, zone):
    """The 'channel' object of a ThingSpeak feed."""
    snap.latest(station)
    last, created = snap.channel_facts(station["id"])
    channel = {"id": station["id"], "name": station["name"],
               "description": "iotserver station %s" % station["mac"], "latitude": "0.0", "longitude": "0.0"}
    for n in sorted(station["fields"]):
        channel["field%d" % n] = station["fields"][n]["field"].name
    channel.update(created_at=_ts_time(created, zone),
                   updated_at=_ts_time(station["last_seen"] or created, zone), last_entry_id=last)
    return channel


def render_ts_read(store, channel_id, what, field, fmt, params):
    """Answer /channels/ID/...: feeds, a field's feed, last entries, last data age; as chunks of bytes."""
    now = now_ms()
    zone, digits = _ts_zone(params), _ts_round(params)
    with store.snapshot() as snap:
        station = snap.station(channel_id)
        if station is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "no channel %d" % channel_id)
        if what == "view":
            yield _json(_ts_channel(snap, station, zone))
            return
        if what in ("last", "age"):
            last = [e for batch in _ts_entries(snap, channel_id, field, dict(params, results="1"), zone, now)
                    for e in batch]
            yield _ts_last(what, last, field, fmt, zone, now, digits)
            return
        channel = _ts_channel(snap, station, zone)
        fields = [field] if field else sorted(int(k[5:]) for k in channel if k[:5] == "field")
        batches = _ts_aggregate(_ts_entries(snap, channel_id, field, params, zone, now), params, zone)
        if fmt == "csv":
            yield from _csv_chunks(["created_at", "entry_id"] + ["field%d" % f for f in fields], (
                [[_ts_time(ts, zone, csv_style=True), entry] + [_ts_value(values[f], digits) if f in values else ""
                                                               for f in fields] for entry, ts, values in batch]
                for batch in batches), "\n")
        else:
            yield b'{"channel":' + _json(channel)[:-1] + b',"feeds":'
            yield from _json_array([_ts_feed(entry, fields, zone, digits) for entry in batch] for batch in batches)
            yield b"}\n"


def _ts_feed(entry, fields, zone, digits):
    """One entry as a ThingSpeak feed item: created_at, entry_id, then each field (None where it has none)."""
    entry_id, ts, values = entry
    item = {"created_at": _ts_time(ts, zone), "entry_id": entry_id}
    item.update(("field%d" % f, _ts_value(values[f], digits) if f in values else None) for f in fields)
    return item


def _ts_last(what, entries, field, fmt, zone, now, digits):
    """The answer of a last.* or last_data_age.* read, from the newest entry (a list of at most one)."""
    if not entries:
        # ThingSpeak answers -1; the 404 lets a careful script tell it from a reading of -1
        raise HTTPError(HTTPStatus.NOT_FOUND, "no readings yet" if what == "age" else "-1")
    entry_id, ts, values = entries[0]
    if what == "age":
        age = str(max(0, (now - ts) // 1000))
        return _json({"last_data_age": age, "last_data_age_units": "s"}) if fmt == "json" else age.encode()
    fields = [field] if field else sorted(values)
    if fmt == "csv":
        return b"".join(_csv_chunks(["created_at", "entry_id"] + ["field%d" % f for f in fields], [[
            [_ts_time(ts, zone, csv_style=True), entry_id] + [_ts_value(values[f], digits) for f in fields]]], "\n"))
    if fmt == "txt" and field:
        return _ts_value(values[field], digits).encode()
    return _json(_ts_feed(entries[0], fields, zone, digits))


###############################################################################
# Notifications ###############################################################
###############################################################################
# Tells people when to open the windows without their opening the page. A check thread
# evaluates the advice every few seconds; one sender thread per --notify URL (Apprise's
# URL forms: ntfy, Gotify, e-mail, a JSON webhook) delivers what that target has not
# been told yet, so a slow or dead target never holds up a station or another target.

#: Environment variable with more --notify URLs, space-separated (systemd EnvironmentFile=).
NOTIFY_ENV = "IOTSERVER_NOTIFY"
#: Minutes a changed advice must hold before it is pushed (--notify-hold).
NOTIFY_HOLD_MIN = 5.0
#: Seconds a target may take to connect, and then to answer.
NOTIFY_TIMEOUT = 10.0
#: Seconds before a failed target is tried again, growing up to the last.
NOTIFY_RETRY_S = (10, 30, 60, 300, 600)
#: Seconds between checks while no reading arrives (after a reading: within a second).
CHECK_INTERVAL_S = 30.0
#: Seconds between notes in the settings that the server is up, so that after a restart a
#: station's silence while the server itself was down is not taken for an outage.
ALIVE_INTERVAL_S = 60.0
_NOTIFY_KINDS = ("ntfy", "gotify", "mailto", "json")
#: ntfy's priorities (1 min … 5 max) as Gotify's (0 … 10; from 8 Android pops it up).
_GOTIFY_PRIORITY = {1: 1, 2: 3, 3: 5, 4: 8, 5: 10}

#: What a target is told: an event's new state (what is compared with what it was told
#: before), a title, one line saying what to do and why, ntfy's priority (1-5) and tags.
Message = collections.namedtuple("Message", "kind state title text priority tags")


class Target:
    """One --notify URL, parsed: where and how to deliver, and a label that holds none of its secrets."""

    __slots__ = ("kind", "secure", "host", "port", "path", "user", "password", "params", "label", "secrets", "key")


def parse_target(text):
    """A Target from an Apprise-style URL; ValueError saying what is wrong without repeating the URL."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
        # a + is itself here (+Header=value, me+iot@example.org), not a space as in a form
        params = {urllib.parse.unquote(name): urllib.parse.unquote(value)
                  for name, _, value in (pair.partition("=") for pair in parts.query.split("&") if pair)}
    except ValueError:
        raise ValueError("is not a URL such as ntfys://ntfy.sh/my-topic") from None
    scheme = parts.scheme.lower()
    kind = scheme[:-1] if scheme[:-1] in _NOTIFY_KINDS else scheme
    if kind not in _NOTIFY_KINDS:
        raise ValueError("has an unknown scheme %r: use ntfy(s)://, gotify(s)://, mailto(s):// or json(s)://"
                         % scheme[:12])
    t = Target()
    t.kind, t.secure, t.port, t.params = kind, scheme != kind, port, params
    t.host = parts.hostname or ""
    t.user = urllib.parse.unquote(parts.username or "")
    t.password = urllib.parse.unquote(parts.password or "")
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    allowed = {"ntfy": ("token",), "gotify": (), "mailto": ("to", "from", "mode"), "json": ()}[kind]
    unknown = [name for name in params if name not in allowed and not (kind == "json" and name.startswith("+"))]
    if unknown:
        raise ValueError("has an unknown parameter %r (%s takes %s)" % (
            unknown[0][:20], kind, ", ".join(allowed) or ("+Header=value" if kind == "json" else "none")))
    if kind == "ntfy" and not segments:  # ntfy://topic: the public server, always over HTTPS (topics keep their case)
        segments, t.host, t.secure = [urllib.parse.unquote(parts.netloc.rpartition("@")[2])], "ntfy.sh", True
        scheme = "ntfys"
    if not t.host:
        raise ValueError("names no host")
    if kind == "ntfy":
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", segments[-1], re.ASCII):
            raise ValueError("needs a topic of 1-64 letters, digits, - or _")
        t.path = "/" + "/".join(urllib.parse.quote(s) for s in segments)
    elif kind == "gotify":
        if not segments:
            raise ValueError("needs the application token: gotify://host/TOKEN")
        t.path = "/" + "".join(urllib.parse.quote(s) + "/" for s in segments[:-1]) + "message"
        params["token"] = segments[-1]
    elif kind == "json":
        t.path = parts.path or "/"
    else:
        mode = params.get("mode", "ssl" if t.secure and port == 465 else "starttls" if t.secure else "plain")
        if mode not in ("ssl", "starttls", "plain") or (mode == "plain") == t.secure:
            raise ValueError("has mode %r: mailtos:// takes mode=ssl or mode=starttls, mailto:// is plain" % mode[:10])
        params["mode"] = mode
        t.port = port or {"ssl": 465, "starttls": 587, "plain": 25}[mode]
        params.setdefault("from", t.user if "@" in t.user else "iotserver@" + t.host)
        params["to"] = [a.strip() for a in params.get("to", params["from"] if "@" in t.user else "").split(",")
                        if a.strip()]
        if not params["to"] or not all("@" in a for a in params["to"] + [params["from"]]):
            raise ValueError("needs ?to=you@example.org (or a user name that is an address)")
    shown = "[%s]" % t.host if ":" in t.host else t.host
    t.label = "%s://%s%s%s" % (scheme, shown, ":%d" % port if port else "", "" if kind == "mailto" else "/…")
    t.secrets = [s for s in [t.user, t.password, params.get("token", "")] + segments
                 + [v for k, v in params.items() if k.startswith("+")] if len(s) >= 3]
    t.key = hashlib.sha256(text.strip().encode()).hexdigest()[:12]  # names what it was told, in the settings
    return t


def describe_failure(target, exc):
    """Why a delivery failed, in one line without the target's secrets."""
    text = "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
    for secret in sorted(target.secrets, key=len, reverse=True):
        text = text.replace(secret, "…")
    return text[:200]


def _basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def _http_post(target, path, body, headers):
    """POST over HTTP(S) (certificates checked); IotError unless the answer is 2xx."""
    if target.secure:
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=NOTIFY_TIMEOUT,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=NOTIFY_TIMEOUT)
    try:
        conn.request("POST", path, body, dict(headers, **{"User-Agent": "iotserver/" + __version__}))
        response = conn.getresponse()
        response.read(65536)
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise IotError("answered %d %s" % (response.status, response.reason))


def _to_ntfy(target, message, link):
    """ntfy's publish API: the text as body, the rest in headers."""
    title = message.title
    if not title.isascii():  # HTTP headers are Latin-1; ntfy decodes RFC 2047 encoded words
        title = "=?UTF-8?B?%s?=" % base64.b64encode(title.encode()).decode()
    headers = {"Title": title, "Priority": str(message.priority), "Tags": ",".join(message.tags),
               "Content-Type": "text/plain; charset=utf-8"}
    if link:
        headers["Click"] = link
    if target.params.get("token"):
        headers["Authorization"] = "Bearer " + target.params["token"]
    elif target.user:
        headers["Authorization"] = _basic(target.user, target.password)
    _http_post(target, target.path, message.text.encode(), headers)


def _to_gotify(target, message, link):
    """Gotify's POST /message with the application token in X-Gotify-Key."""
    body = {"title": message.title, "message": message.text, "priority": _GOTIFY_PRIORITY[message.priority]}
    if link:
        body["extras"] = {"client::notification": {"click": {"url": link}}}
    _http_post(target, target.path, _json(body), {"X-Gotify-Key": target.params["token"],
                                                  "Content-Type": "application/json"})


def _to_json(target, message, link):
    """Apprise's JSON webhook: version, title, message, type, attachments."""
    body = {"version": "1.0", "title": message.title, "message": message.text + ("\n" + link if link else ""),
            "type": {"offline": "warning", "online": "success"}.get(message.kind, "info"), "attachments": []}
    headers = {"Content-Type": "application/json"}
    headers.update((name[1:], value) for name, value in target.params.items() if name.startswith("+"))
    if target.user:
        headers["Authorization"] = _basic(target.user, target.password)
    _http_post(target, target.path, _json(body), headers)


def _to_mail(target, message, link):
    """An e-mail over SMTP: implicit TLS, STARTTLS or plain, as the URL says (certificates checked)."""
    mail = email.message.EmailMessage()
    mail["Subject"], mail["From"], mail["To"] = message.title, target.params["from"], ", ".join(target.params["to"])
    mail["Date"] = email.utils.formatdate(localtime=True)
    mail["Message-ID"] = email.utils.make_msgid("iotserver", domain=target.params["from"].rpartition("@")[2])
    mail.set_content(message.text + ("\n\n" + link if link else "") + "\n")
    context, mode = ssl.create_default_context(), target.params["mode"]
    if mode == "ssl":
        smtp = smtplib.SMTP_SSL(target.host, target.port, timeout=NOTIFY_TIMEOUT, context=context)
    else:
        smtp = smtplib.SMTP(target.host, target.port, timeout=NOTIFY_TIMEOUT)
    with smtp:
        if mode == "starttls":
            smtp.starttls(context=context)
        if target.user:
            smtp.login(target.user, target.password)
        smtp.send_message(mail)


def deliver(target, message, link=None):
    """Send one message to one target now; raises on failure (see describe_failure)."""
    {"ntfy": _to_ntfy, "gotify": _to_gotify, "mailto": _to_mail, "json": _to_json}[target.kind](target, message, link)


def _in_quiet(quiet, local):
    """True when a local time falls in quiet hours (start, end) given in minutes after midnight."""
    minute, (start, end) = local.hour * 60 + local.minute, quiet
    return start <= minute < end if start < end else minute >= start or minute < end


class Notifier:
    """Checks the advice and the compared stations in the background and tells every target of a change.

    ``want`` holds, per event (the advice; each compared station), the message a target
    should have had last. Each target's sender delivers what differs from what that
    target was told, which is kept in the settings: a restart neither repeats a message
    nor forgets a change. Only the newest state is sent, so nothing queues up while a
    target is down: it is retried with growing waits and gets what is true by then.
    """

    def __init__(self, server, targets, hold_ms=NOTIFY_HOLD_MIN * 60_000, quiet=None):
        self.server, self.targets, self.hold_ms, self.quiet = server, list(targets), hold_ms, quiet
        self.started = now_ms()
        alive = server.store.setting("alive", "")
        self.down = (int(alive), self.started) if alive.isdigit() else None  # this server's own last downtime
        self.want = {}
        self._saved = _memory_key(server.advisor.memory)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._failing = False
        self._threads = [threading.Thread(target=self._check_loop, name="advice", daemon=True)]
        self._threads += [threading.Thread(target=self._send_loop, args=(t,), name="notify", daemon=True)
                          for t in self.targets]
        for thread in self._threads:
            thread.start()

    def stop(self):
        """Stop checking and sending (a delivery under way is cut off and tried again after a restart)."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._threads[0].join(5)

    def _check_loop(self):
        seen, due, alive_due = None, 0.0, 0.0
        while not self._stop.wait(1.0):
            generation, now = self.server.store.generation, time.monotonic()
            if generation == seen and now < due:
                continue
            seen = generation
            try:
                due = now + min(CHECK_INTERVAL_S, self.check(now_ms()))
                if self.targets and now >= alive_due:
                    self.server.store.set_setting("alive", now_ms())
                    alive_due = now + ALIVE_INTERVAL_S
                self._failing = False
            except Exception as exc:  # a locked or full database, or a bug: log once, keep checking
                if not self._failing:
                    log("iotserver: checking the advice failed: %s: %s" % (type(exc).__name__, exc))
                self._failing = True

    def check(self, now):
        """Evaluate the advice and the stations once, keep its memory, wake the senders on a change.

        Returns the seconds until a new advice will have held long enough (else CHECK_INTERVAL_S).
        """
        server = self.server
        advice, by_role = server.advisor.current(server.store, now)
        with server.advisor.lock:
            memory = dict(server.advisor.memory)
        if _memory_key(memory) != self._saved:  # only when more than the last sample's time changed
            server.store.set_setting("advice", json.dumps(memory))
            self._saved = _memory_key(memory)
        if not self.targets or self.quiet and _in_quiet(self.quiet, server.view.local(now)):
            return CHECK_INTERVAL_S
        want, held = {}, advice.action != "unknown" and now - advice.since >= self.hold_ms
        if held:
            want["advice"] = Message("advice", advice.action, re.split(" — |: ", advice.headline)[0],
                                     "%s. %s" % (advice.headline, advice.reason), 4 if advice.action == "open" else 3,
                                     ["window"] if advice.action == "open" else ["house"])
        for role, station in sorted(by_role.items()):
            if station["last_seen"] is not None:
                want["station " + station["mac"]] = self._station_message(role, station, now)
        with self._changed:
            if {k: m.state for k, m in want.items()} != {k: m.state for k, m in self.want.items()}:
                self._changed.notify_all()
            self.want = want
        if advice.action == "unknown" or held:
            return CHECK_INTERVAL_S
        return (advice.since + self.hold_ms - now) / 1000 + 0.05

    def _station_message(self, role, station, now):
        """A compared station's state (offline or online) as a message."""
        last = self.server.view.local(station["last_seen"]).strftime("%H:%M")
        where = "Outside" if role == "outdoor" else "Inside"
        if self.down:  # the part of its silence during which this server was down does not count
            stopped, started = self.down
            silent = max(0, started - max(station["last_seen"], stopped))
            station = dict(station, last_seen=station["last_seen"] + silent)
        if is_offline(station, now):
            return Message("offline", "offline", "%s is offline" % station["name"],
                           "%s station %s has sent nothing since %s: the window advice waits until it is back. "
                           "Check its power and Wi-Fi." % (where, station["name"], last), 3, ["warning"])
        return Message("online", "online", "%s is back" % station["name"],
                       "%s station %s is posting again (last reading %s)." % (where, station["name"], last),
                       2, ["white_check_mark"])

    def _send_loop(self, target):
        """Tell one target whatever it has not been told; wait longer after each failure."""
        store, name, failures = self.server.store, "notified " + target.key, 0
        try:
            told = json.loads(store.setting(name, "{}"))
        except ValueError:
            told = {}
        while not self._stop.is_set():
            with self._changed:
                # a station's first state is taken as online: only a change to offline is news
                pending = [(k, m) for k, m in sorted(self.want.items())
                           if told.get(k, "online" if k.startswith("station ") else None) != m.state]
                if not pending:
                    self._changed.wait()
                    continue
            for key, message in pending:
                try:
                    deliver(target, message, self.server.public_url)
                except Exception as exc:  # whatever the target or the network did: count, log, wait, retry
                    failures += 1
                    wait = NOTIFY_RETRY_S[min(failures, len(NOTIFY_RETRY_S)) - 1]
                    self.server.count("notifications", result="failed", kind=message.kind)
                    log("iotserver: notifying %s failed (%s); next try in %d s"
                        % (target.label, describe_failure(target, exc), wait))
                    self._stop.wait(wait)
                    break
                failures = 0
                told[key] = message.state
                self.server.count("notifications", result="sent", kind=message.kind)
                log("iotserver: notified %s: %s" % (target.label, message.title))
                try:
                    store.set_setting(name, json.dumps(told))
                except (sqlite3.Error, StoreError) as exc:
                    log("iotserver: cannot record what %s was told (%s); a restart may repeat it" % (target.label, exc))


def _memory_key(memory):
    """The advice's memory without the time of its last sample (that alone changes with every reading)."""
    return {k: v for k, v in memory.items() if k != "upto"}


###############################################################################
# HTTP handler ################################################################
###############################################################################
# The plumbing: read a request, find its row in ROUTES (the next section), check the
# caller, run the route, write the answer. Errors come back from routes as values.


class Response:
    """What a route returns: status, body, content type and extra headers.

    The body is bytes, or chunks of bytes from a generator (a long read): see Handler._stream.
    """

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, body=b"", status=HTTPStatus.OK, content_type="text/plain; charset=utf-8", headers=()):
        self.status = HTTPStatus(status)
        self.body = body
        self.content_type = content_type
        self.headers = list(headers)


class Route:
    """One row of the URL table: the path it answers, its methods, its function, who may call it."""

    __slots__ = ("path", "methods", "handler", "auth", "writes", "label")

    def __init__(self, path, methods, handler, auth=None, writes=False):
        self.path = path  # an exact path, or a compiled pattern the whole path must match
        self.methods = tuple(methods.split())
        self.handler = handler  # handler(req, match) -> Response; raises HTTPError
        self.auth = auth  # auth(req, match) raises HTTPError when the caller may not; None: the route checks
        self.writes = writes  # its refusals are readings refused (/metrics)
        # the row in /metrics: the path, or a pattern's literal start and '*' (/channels/*)
        self.label = path if isinstance(path, str) else re.split(r"[\\(\[.?*+{|]", path.pattern, maxsplit=1)[0] + "*"

    def match(self, path):
        """A match object (or the path) when this row answers ``path``, else None."""
        if isinstance(self.path, str):
            return path if path == self.path else None
        return self.path.fullmatch(path)


def _split_target(target):
    """(path, query) of a request target, without scheme or host."""
    if target.startswith(("http://", "https://")):
        target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
    path, _, query = target.partition("?")
    return path, query


def _first_bytes(chunks, size):
    """At least ``size`` bytes from the start of ``chunks``, unless it ends sooner: (bytes, ended)."""
    parts, total = [], 0
    for chunk in chunks:
        parts.append(chunk)
        total += len(chunk)
        if total >= size:
            return b"".join(parts), False
    return b"".join(parts), True


class _LineReader:
    """The request stream, remembering the last line read (to tell a finished header block)."""

    __slots__ = ("_raw", "last_line")

    def __init__(self, raw):
        self._raw = raw
        self.last_line = None

    def readline(self, limit=-1):
        self.last_line = self._raw.readline(limit)
        return self.last_line

    def read(self, size=-1):
        return self._raw.read(size)

    def close(self):
        self._raw.close()

    @property
    def closed(self):
        return self._raw.closed


class Handler(BaseHTTPRequestHandler):
    """Answers stations, browsers and uptime monitors: one request at a time per connection."""

    server_version = "iotserver/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # header and body are separate writes: without TCP_NODELAY a keep-alive
    # response stalls ~40 ms (Nagle + delayed ACK)
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.client_timeout  # idle clients cannot hold a thread forever
        super().setup()
        self.rfile = _LineReader(self.rfile)
        self._peer = _plain_ip(self.client_address[0]) if self.client_address else "-"
        # idle: waiting for a request line; reading: its headers; body: its body; busy: answering it;
        # sending: a long answer, chunk by chunk (a client that stops reading it may be dropped)
        self._phase, self._since, self._dropped = "idle", time.monotonic(), False
        self.route = None  # the ROUTES row answering the current request, once found
        self.server.track(self, True)

    def finish(self):
        self.server.track(self, False)
        with contextlib.suppress(OSError):
            super().finish()

    # -- reading a request and dispatching it --

    def handle_one_request(self):
        """Read one request, find its route, answer it; any method a route lacks gets 405, not 501."""
        try:
            self._phase = "idle"
            self.raw_requestline = self.rfile.readline(65537)
            self._phase, self._since = "reading", time.monotonic()
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.rfile.last_line == b"" and self.request_version != "HTTP/0.9":
                # the headers ended with the connection, not a blank line: a request cut off
                # (a slow client giving up, or one dropped at shutdown) is not answered
                self.close_connection = True
                return
            if self._dropped:  # too slow: the rest of the request never came
                self.close_connection = True
                return
            self._phase = "busy"
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"  # answer with a status line all the same
            self._body_read, self.route = False, None
            self.target, self.query = _split_target(self.path)
            self._send(self._safely(self._dispatch))
            self.wfile.flush()
        except TimeoutError as exc:
            self.log_error("request timed out: %r", exc)
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except OSError:
            if not self._dropped:
                raise
            self.close_connection = True
        finally:
            self._phase = "idle"
            if self.server.stopping or self._dropped:
                self.close_connection = True

    def _dispatch(self):
        """Run the row of ROUTES that answers this path and method, after its access check."""
        self._check_framing()
        allowed = []
        for route in ROUTES:
            match = route.match(self.target)
            if match is None:
                continue
            self.route = route
            if self.command in route.methods:
                if route.auth:
                    route.auth(self, match)
                return route.handler(self, match)
            allowed += [m for m in route.methods if m not in allowed]
        if allowed:
            allow = ", ".join(allowed)
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method %s not allowed here; use %s"
                            % (self.command[:16], allow), [("Allow", allow)])
        raise HTTPError(HTTPStatus.NOT_FOUND, "no such page")

    def _safely(self, route):
        """Run a route; every error comes back as a value, none as a traceback to the client."""
        answer = self._answer(route)
        if isinstance(answer, HTTPError) and self.route is not None and self.route.writes:
            self.server.count("readings_refused", reason=answer.reason)
        return answer

    def _answer(self, route):
        """The route's Response, or the HTTPError that answers what went wrong."""
        try:
            return route()
        except HTTPError as exc:
            return exc
        except Refused as exc:
            return HTTPError(HTTPStatus.FORBIDDEN, str(exc), reason=exc.reason)
        except MemoryError:
            raise
        except sqlite3.Error as exc:
            self.log_error("storage error: %s", exc)
            return HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "storage unavailable, nothing stored; try again",
                             _retry_after(10))
        except Exception:
            self.log_error("internal error:\n%s", traceback.format_exc())
            return HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _check_framing(self):
        """400 and hang up unless the body's end is told one way only (RFC 9112: two ways smuggle requests)."""
        lengths = self.headers.get_all("Content-Length", [])
        chunked = "Transfer-Encoding" in self.headers
        problem = ("a header is folded over two lines" if any("\n" in v or "\r" in v for v in self.headers.values())
                   else "Content-Length is given twice" if len(lengths) > 1
                   else "Content-Length is not a number" if lengths and not re.fullmatch(r"[0-9]+", lengths[0].strip())
                   else "Content-Length and Transfer-Encoding together" if lengths and chunked
                   else None)
        if problem:
            self.close_connection = True
            raise HTTPError(HTTPStatus.BAD_REQUEST, problem)

    def read_body(self, limit=MAX_BODY):
        """The request body (a form or JSON), at most ``limit`` bytes."""
        if "Transfer-Encoding" in self.headers:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        length = self.headers.get("Content-Length", "0").strip()  # digits only: see _check_framing
        if len(length) > 9 or int(length) > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body is larger than %d bytes" % limit)
        self._phase = "body"  # a body trickled in byte by byte is cut off like slow headers
        try:
            body = self.rfile.read(int(length))
        except OSError:  # the socket timeout: the rest of the body never came
            body = None
        finally:
            self._phase = "busy"
        if body is None or self._dropped:  # timed out, or cut off by the reaper (which leaves us the answer)
            self.close_connection = True
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive in time")
        if len(body) != int(length):
            self.close_connection = True
            raise HTTPError(HTTPStatus.BAD_REQUEST, "body is shorter than its Content-Length")
        self._body_read = True
        return body

    def check_key(self, found, message, headers=()):
        """The wrong-key throttle: 429 while this client is throttled; a wrong key costs a token and gets 401.

        ``found`` is what the key check (in constant time) found, falsy for a wrong key. Whether
        the client may learn it and the charge for a wrong one are one step of its bucket, so
        keys sent at once cannot all be checked while each waits for the others to be counted.
        """
        wait = self.server.key_failures.take(client_network(self.client_ip()), cost=0.0 if found else 1.0)
        if wait:
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "too many wrong keys; wait", _retry_after(wait),
                            reason="too_many_wrong_keys")
        if not found:
            self.server.count("wrong_keys")
            raise HTTPError(HTTPStatus.UNAUTHORIZED, message, headers)
        return found

    def client_ip(self):
        """The client's address: the TCP peer, or the X-Real-IP a trusted proxy (nginx) sent."""
        peer = self._peer
        headers = getattr(self, "headers", None)
        if headers is not None and peer in self.server.trusted_proxies:
            real = headers.get("X-Real-IP")
            if real:
                return _plain_ip(real) or peer
        return peer

    def from_proxy(self):
        """True when the TCP peer is a trusted reverse proxy."""
        return bool(self.client_address) and _plain_ip(self.client_address[0]) in self.server.trusted_proxies

    # -- answering --

    def _send(self, response):
        """Write a route's Response, or an HTTPError as a short plain-text answer."""
        if isinstance(response, HTTPError):
            body = ("%d %s\n" % (response.status, response.message)).encode("utf-8", "replace")
            response = Response(body, response.status, headers=response.headers)
        unread = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers
        if (unread and not self._body_read) or self.server.stopping:
            # an unread request body would be parsed as the next request
            self.close_connection = True
        if not isinstance(response.body, bytes):
            return self._stream(response)
        self.log_request(response.status, len(response.body))
        self._write(response.status, response.body, response.content_type, response.headers)

    def _stream(self, response):
        """Send a body of chunks: whole with a Content-Length if it is short, else chunk by chunk as it is read.

        A long answer takes one of HEAVY_READS places for as long as it is sent, or gets 503 at
        once: waiting would hold a read snapshot, a buffer and a thread. The chunks are closed
        in every case, so a client that leaves releases the snapshot at once.
        """
        with contextlib.closing(response.body) as chunks:
            first = self._safely(lambda: _first_bytes(chunks, STREAM_AFTER))  # errors before the status line
            if isinstance(first, HTTPError):
                return self._send(first)
            head, finished = first
            if finished:
                return self._send(Response(head, response.status, response.content_type, response.headers))
            if not self.server.heavy_reads.acquire(blocking=False):
                return self._send(HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "busy sending other long answers; "
                                            "try again", _retry_after(HEAVY_RETRY)))
            size = "-"  # in the log: not sent whole
            try:
                self._phase, self._since = "sending", time.monotonic()
                size = self._write(response.status, itertools.chain([head], chunks), response.content_type,
                                   response.headers)
            except (OSError, MemoryError):
                raise
            except Exception:
                # the status line is out: end the answer without its last chunk, so it shows as cut short
                self.log_error("internal error while sending:\n%s", traceback.format_exc())
                self.close_connection = True
            finally:
                self.server.heavy_reads.release()
                self.log_request(response.status, size)
                give_back_memory()  # what the batches of a long answer freed

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
            self.log_message("%s %d %s", self.requestline[:200], code, text)  # log() redacts
            self._write(code, ("%d %s\n" % (code, text)).encode("utf-8", "replace"))
        except OSError:
            pass

    def _write(self, status, body, content_type="text/plain; charset=utf-8", headers=()):
        """Status line, headers and body (none for HEAD): the one place an answer is written.

        ``body`` is bytes, or chunks: sent chunked to HTTP/1.1 clients, and to HTTP/1.0 ones until
        the connection closes. Returns the body's size.
        """
        self.server.count("requests", route=self.route.label if self.route else "other", status=int(status))
        whole, chunked = isinstance(body, bytes), self.request_version == "HTTP/1.1"
        self.send_response_only(status)
        self.send_header("Server", self.version_string())
        self.send_header("Date", _http_date())
        self.send_header("Content-Type", content_type)
        if whole:
            self.send_header("Content-Length", str(len(body)))
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return 0
        if whole:
            self.wfile.write(body)
            return len(body)
        size = 0
        for chunk in body:
            if chunk:  # an empty chunk would end a chunked body
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                size += len(chunk)
                self._since = time.monotonic()  # progress: the client is reading
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return size

    def version_string(self):
        return self.server_version

    # -- logging: every line goes through log_message --

    def log_request(self, code="-", size="-"):
        if not self.server.quiet:
            code = code.value if isinstance(code, HTTPStatus) else code
            self.log_message('"%s" %s %s', self.requestline, code, size)

    def log_message(self, format, *args):
        """Every request line and error goes to log() with the time and the client's address."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        log("%s %s %s" % (stamp, self.client_ip(), format % args), self.server.api_key(refresh=False))


###############################################################################
# Routes ######################################################################
###############################################################################
# What each URL does. Every route is a function (req, match) -> Response, where req
# is the Handler; ROUTES at the end of this section is the whole URL space.

_API_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                ("Access-Control-Allow-Origin", "*")]


def read_access(req, match):
    """With --private, the page and read API need the key: HTTP Basic password or ?key=."""
    server = req.server
    if not server.private or (req.command == "HEAD" and req.target == "/"):  # uptime monitors: see on_page
        return
    given = None
    auth = req.headers.get("Authorization", "")
    if auth[:6].lower() == "basic ":
        with contextlib.suppress(ValueError):
            given = base64.b64decode(auth[6:].strip(), validate=True).partition(b":")[2]
    for name, value in parse_query(req.query, 20):
        if name == "key":
            given = value.encode("utf-8", "replace")
    message = "this server is private: log in with the API key as password"
    challenge = [("WWW-Authenticate", 'Basic realm="iotserver", charset="UTF-8"')]
    if given is None:  # the browser's first try: ask for the password, count nothing
        raise HTTPError(HTTPStatus.UNAUTHORIZED, message, challenge)
    req.check_key(hmac.compare_digest(given, server.api_key().encode()), message, challenge)


def channel_access(req, match):
    """With --private, a ThingSpeak read needs the server key or that channel's write key."""
    server = req.server
    if not server.private:
        return
    params = parse_ts_params(req.query)
    given = (params.get("api_key") or params.get("key", "")).encode()
    channel = int(match.group(1))
    req.check_key(hmac.compare_digest(given, server.api_key().encode())
                  or (server.store.station_for_write_key(given) or (None, None))[1] == channel,
                  "this channel is private: send api_key")


def metrics_access(req, match):
    """/metrics: a scraper's bearer token (--metrics-token), or the same access as the read API."""
    token = req.server.metrics_token
    auth = req.headers.get("Authorization", "")
    if token and auth[:7].lower() == "bearer ":
        given = auth[7:].strip().encode("utf-8", "replace")
        req.check_key(hmac.compare_digest(given, token.encode()), "wrong metrics token")
    else:
        read_access(req, match)


def on_station_update(req, match):
    """GET /update/API_key=KEY/mac=MAC/field=N/data=VALUE: store one reading from a station."""
    server = req.server
    key, mac, field, value = parse_update(req.target)
    req.check_key(hmac.compare_digest(key, server.api_key().encode()), "wrong API key")
    wait = server.buckets.take(mac)
    if wait:
        server.count("rate_limited", api="station")
        raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "station %s is posting too often" % mac, _retry_after(wait))
    server.store.add_reading(mac, field, value, max_stations=server.max_stations)
    server.count("readings_stored", api="station")
    return Response(b"stored\n")


def _store_bulk(req, mac, entries):
    """Store a bulk write's entries (one token of the station's rate limit) and answer as ThingSpeak does."""
    server = req.server
    wait = server.buckets.take(mac)
    if wait:
        server.count("rate_limited", api="bulk")
        raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "station %s is posting too often" % mac, _retry_after(wait))
    server.store.add_entries(mac, entries, server.max_stations)
    server.count("readings_stored", sum(len(values) for _, values in entries), api="bulk")
    return Response(_json({"success": True}), HTTPStatus.ACCEPTED, "application/json")


def on_station_bulk(req, match):
    """POST /update/API_key=KEY/mac=MAC: a station's buffered entries, with their measurement times."""
    server = req.server
    key, mac = parse_station(req.target)
    body = req.read_body(MAX_BULK_BODY)
    req.check_key(hmac.compare_digest(key, server.api_key().encode()), "wrong API key")
    _, entries = parse_bulk(body, req.headers.get("Content-Type", ""), now_ms())
    return _store_bulk(req, mac, entries)


def on_ts_bulk(req, match):
    """POST /channels/ID/bulk_update.json or .csv: ThingSpeak's bulk write with the channel's write key."""
    server = req.server
    kind = "application/json" if match.group(2) == "json" else "application/x-www-form-urlencoded"
    key, entries = parse_bulk(req.read_body(MAX_BULK_BODY), kind, now_ms())
    if not key:
        raise HTTPError(HTTPStatus.UNAUTHORIZED, "write_api_key missing: the channel's write key (see --channel-key)")
    channel = int(match.group(1))
    found = server.store.station_for_write_key(key.encode("utf-8", "replace"))
    mac, _ = req.check_key(found if found and found[1] == channel else None,
                           "wrong write API key for channel %d (its own key: see --channel-key)" % channel)
    return _store_bulk(req, mac, entries)


def _page_query(req):
    """(range, fragment) of a page: ?range=24h|7d|30d|1y, and ?fragment=1 (what the open page fetches to refresh itself)."""
    params = dict(parse_query(req.query, 20))
    if params.get("range", "24h") not in RANGES:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "range must be %s" % ", ".join(RANGES))
    return params.get("range", "24h"), params.get("fragment") == "1"


def on_page(req, match):
    """GET / (?range=7d, ?fragment=1)."""
    server = req.server
    if req.command == "HEAD" and server.private:  # anyone may ask (read_access): say it is up, show nothing
        return Response(b"", content_type="text/html; charset=utf-8", headers=[("Cache-Control", "no-store")])
    host = req.headers.get("Host", "")
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,255}", host, re.ASCII):
        host = "%s:%d" % server.server_address[:2]
    scheme = "https" if req.headers.get("X-Forwarded-Proto") == "https" and req.from_proxy() else "http"
    range_name, fragment = _page_query(req)
    return _html(*render_page(server.store, server.view, now_ms(), "%s://%s/" % (scheme, host),
                              server.refresh, server.advisor, fragment, range_name))


def on_station(req, match):
    """GET /station/MAC (?range=7d, ?fragment=1): one station, every field charted."""
    server = req.server
    try:
        mac = parse_mac(urllib.parse.unquote(match.group(1)))
    except ValueError as exc:
        raise HTTPError(HTTPStatus.NOT_FOUND, str(exc)) from None
    range_name, fragment = _page_query(req)
    return _html(*render_station(server.store, server.view, now_ms(), mac, server.refresh, fragment, range_name))


def _html(body, nonce):
    """A page's answer, with the headers that keep it to itself."""
    return Response(body, content_type="text/html; charset=utf-8", headers=[
        ("Content-Security-Policy", "default-src 'none'; style-src 'nonce-%s'; script-src 'nonce-%s'; "
         "connect-src 'self'; img-src 'self' data:; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
         "frame-ancestors 'none'" % (nonce, nonce)),
        ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer")])


def on_latest(req, match):
    """GET /api/latest"""
    return Response(render_latest(req.server.store, now_ms()), content_type="application/json",
                    headers=_API_HEADERS)


def on_advice(req, match):
    """GET /api/advice"""
    return Response(render_advice(req.server.advisor, req.server.store, now_ms()), content_type="application/json",
                    headers=_API_HEADERS)


def on_series(req, match):
    """GET /api/series?mac=&field=&range="""
    body = render_series(req.server.store, req.server.view, parse_series_query(req.query), now_ms())
    return Response(body, content_type="application/json", headers=_API_HEADERS)


def on_readings(req, match):
    """GET /api/readings[.json|.csv]?mac=&field=&since=&until=&limit=&format="""
    params = parse_readings_query(req.query, now_ms())
    if req.target.endswith(".csv"):
        params["format"] = "csv"
    content_type = "text/csv; charset=utf-8" if params["format"] == "csv" else "application/json"
    return Response(render_readings(req.server.store, params), content_type=content_type, headers=_API_HEADERS)


def on_ts_update(req, match):
    """ThingSpeak's write: /update or /update.json with a channel's write key, GET or POST."""
    server = req.server
    body = req.read_body() if req.command == "POST" else b""
    params = parse_ts_params(req.query, body, req.headers.get("Content-Type", ""))
    key = (params.get("api_key") or params.get("key")  # older ThingSpeak sketches send key=
           or req.headers.get("X-THINGSPEAKAPIKEY") or req.headers.get("THINGSPEAKAPIKEY"))
    if not key:
        if {"mac", "data"} & {name.lower() for name in params}:  # the station URL's parts, sent as a query
            raise HTTPError(HTTPStatus.BAD_REQUEST, "a station puts its parts in the path: "
                            "/update/API_key=KEY/mac=MAC/field=N/data=VALUE")
        raise HTTPError(HTTPStatus.UNAUTHORIZED, "api_key missing: a channel's write key (see --channel-key)")
    mac, channel = req.check_key(server.store.station_for_write_key(key.encode("utf-8", "replace")),
                                 "wrong write API key: a channel's own key (see --channel-key), not the server's")
    values, when = parse_ts_write(params)
    wait = server.buckets.take(mac)
    if wait:  # ThingSpeak's clients read 0 as "not inserted"
        server.count("rate_limited", api="thingspeak")
        server.count("readings_refused", reason="rate_limited")
        return Response(b"0", headers=_retry_after(wait))
    entry = server.store.add_entry(mac, values, server.max_stations, when)
    server.count("readings_stored", len(values), api="thingspeak")
    if not req.target.endswith(".json"):
        return Response(str(entry).encode())
    stored = dict(values)
    answer = {"channel_id": channel, "created_at": _ts_time(when or now_ms(), None), "entry_id": entry}
    answer.update(("field%d" % f, _ts_value(stored[f]) if f in stored else None) for f in range(1, 9))
    answer.update(latitude=None, longitude=None, elevation=None, status=None)
    return Response(_json(answer), content_type="application/json")


def on_ts_read(req, match):
    """ThingSpeak's reads under /channels/ID: feeds, a field, the last entry, last data age."""
    params = parse_ts_params(req.query)
    last = match.group("last") or match.group("feedlast")
    fmt = match.group("fmt") or ("txt" if last else "json")
    what = ("age" if last == "/last_data_age" else "last" if last else
            "feed" if match.group("feeds") or match.group("field") else "view")
    if fmt == "txt" and what not in ("last", "age") or fmt == "csv" and what == "view":
        raise HTTPError(HTTPStatus.NOT_FOUND, "no such page (use .json or .csv)")
    chunks = render_ts_read(req.server.store, int(match.group(1)), what, int(match.group("field") or 0) or None,
                            fmt, params)
    return Response(chunks, content_type=_TS_TYPES[fmt], headers=_API_HEADERS)


def on_metrics(req, match):
    """GET /metrics: Prometheus's text format."""
    return Response(render_metrics(req.server, now_ms()), content_type="text/plain; version=0.0.4; charset=utf-8",
                    headers=[("Cache-Control", "no-store")])


_STATIC_HEADERS = [("Cache-Control", "public, max-age=86400"), ("X-Content-Type-Options", "nosniff"),
                   ("Content-Security-Policy", "default-src 'none'")]


def on_manifest(req, match):
    """GET /manifest.webmanifest: what "Add to Home Screen" reads."""
    return Response(render_manifest(), content_type="application/manifest+json", headers=_STATIC_HEADERS)


def on_icon(req, match):
    """GET one of ICONS."""
    return Response(render_icon(req.target), content_type=ICONS[req.target][0], headers=_STATIC_HEADERS)


#: The URL space, in one table: path (exact, or a pattern for the whole path), methods,
#: the function that answers, the access check run first (None: the route checks a key
#: that comes with the request itself, or serves no data), and whether it stores readings.
#: A path with no row for the method gets 405.
ROUTES = (
    Route("/", "GET HEAD", on_page, read_access),
    Route("/api/latest", "GET HEAD", on_latest, read_access),
    Route("/api/advice", "GET HEAD", on_advice, read_access),
    Route(re.compile(r"/station/([^/]{1,64})"), "GET HEAD", on_station, read_access),
    Route("/api/series", "GET HEAD", on_series, read_access),
    Route("/api/readings", "GET HEAD", on_readings, read_access),
    Route("/api/readings.json", "GET HEAD", on_readings, read_access),
    Route("/api/readings.csv", "GET HEAD", on_readings, read_access),
    Route("/metrics", "GET HEAD", on_metrics, metrics_access),
    Route("/manifest.webmanifest", "GET HEAD", on_manifest),
    *(Route(path, "GET HEAD", on_icon) for path in ICONS),
    Route(re.compile(r"/update/.*", re.S), "GET", on_station_update, writes=True),
    Route(re.compile(r"/update/[^/]+/[^/]+/?"), "POST", on_station_bulk, writes=True),
    Route("/update", "GET POST", on_ts_update, writes=True),
    Route("/update.json", "GET POST", on_ts_update, writes=True),
    Route(re.compile(r"/channels/([0-9]{1,9})(?:(?P<feeds>/feeds)(?P<feedlast>/last)?|/fields/(?P<field>[1-8])"
                     r"(?P<last>/last|/last_data_age)?)?(?:\.(?P<fmt>json|csv|txt))?", re.ASCII),
          "GET HEAD", on_ts_read, channel_access),
    Route(re.compile(r"/channels/([0-9]{1,9})/bulk_update\.(json|csv)", re.ASCII), "POST", on_ts_bulk, writes=True),
)


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
                 client_timeout=DEFAULT_TIMEOUT, quiet=False, max_stations=DEFAULT_MAX_STATIONS,
                 view=None, refresh=DEFAULT_REFRESH, private=False, trusted_proxies=("127.0.0.1", "::1"),
                 max_connections=MAX_CONNECTIONS, public_url=None, metrics_token=None, notify=(),
                 notify_hold=NOTIFY_HOLD_MIN, quiet_hours=None):
        self.store = store
        self.fixed_key = api_key
        self.buckets = TokenBuckets(rate / 60.0, burst)
        self.key_failures = TokenBuckets(1.0 / KEY_FAILURE_INTERVAL, KEY_FAILURE_BURST)
        self.heavy_reads = threading.BoundedSemaphore(HEAVY_READS)
        self.client_timeout = client_timeout
        self.quiet = quiet
        self.max_stations = max_stations
        self.view = view or View()
        self.refresh = refresh
        self.private = private
        self.trusted_proxies = frozenset(_plain_ip(a) for a in trusted_proxies) - {""}
        self.stopping = False
        self._connections = set()
        self._connections_lock = threading.Lock()
        self._open = 0
        self.dropped = 0
        self.max_connections = max_connections
        self.public_url = public_url
        self.metrics_token = metrics_token
        self.started = time.monotonic()
        self.counters = collections.Counter()  # (name, labels) -> count; see count()
        self._counters_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        try:
            memory = json.loads(store.setting("advice", "{}"))
        except ValueError:
            memory = {}
        self.advisor = Advisor(self.view, memory if isinstance(memory, dict) else {})
        super().__init__(address, Handler)
        self._reaper_stop = threading.Event()
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()
        self.notifier = Notifier(self, notify, notify_hold * 60_000, quiet_hours)

    def count(self, name, amount=1, **labels):
        """Add to a counter (shown by /metrics), e.g. count("readings_refused", reason="rate")."""
        key = (name, tuple(sorted(labels.items())))
        with self._counters_lock:
            self.counters[key] += amount

    def counter_values(self):
        """Every counter as ((name, labels), count), sorted."""
        with self._counters_lock:
            return sorted(self.counters.items(), key=str)

    def api_key(self, refresh=True):
        """The key stations must send: the fixed one, or the one stored (it may be rotated)."""
        return self.fixed_key or self.store.setting("api_key", "", refresh)

    def track(self, handler, alive):
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(handler)

    def process_request(self, request, client_address):
        """A thread per connection, at most MAX_CONNECTIONS: past that, the slowest client makes room."""
        with self._connections_lock:
            self._open += 1
            full = self._open > self.max_connections
            waiting = [h for h in self._connections if h._phase != "busy" and not h._dropped]
        if full:
            if not waiting:
                self.dropped += 1
                self.shutdown_request(request)
                return
            self._drop(min(waiting, key=lambda h: h._since))
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._open -= 1
        super().shutdown_request(request)

    def _drop(self, handler, how=socket.SHUT_RDWR):
        handler._dropped = True
        self.dropped += 1
        with contextlib.suppress(OSError):
            handler.connection.shutdown(how)

    def _reap(self):
        """Drop clients that take longer than the timeout to send a whole request (slowloris).

        The socket timeout bounds each read, not the request: a client that sends
        one byte every few seconds would otherwise hold its thread for ever.
        """
        reported, last_report = 0, 0.0
        while not self._reaper_stop.wait(0.5):
            now = time.monotonic()
            with self._connections_lock:
                slow = [h for h in self._connections if h._phase in ("reading", "body") and not h._dropped
                        and now - h._since > self.client_timeout]
            for handler in slow:
                # one stuck in its body is still answered (408): stop reading only
                self._drop(handler, socket.SHUT_RD if handler._phase == "body" else socket.SHUT_RDWR)
            if self.dropped > reported and now - last_report > 60 and not self.quiet:  # one line a minute at most
                log("iotserver: dropped %d slow or surplus clients" % (self.dropped - reported))
                reported, last_report = self.dropped, now

    def stop(self):
        """Stop accepting, let requests being answered finish, hang up on everyone else."""
        self.stopping = True
        self.shutdown()
        with self._connections_lock:
            waiting = [h for h in self._connections if h._phase != "busy"]
        for handler in waiting:
            if handler._phase == "idle":
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RD)  # its readline returns: no request
            else:
                self._drop(handler)
        self._reaper_stop.set()
        self.notifier.stop()
        self.server_close()

    def url(self):
        """The address the server listens on, as a URL (http://0.0.0.0:8000/ when on all addresses)."""
        return _http_url(*self.server_address[:2])

    def urls(self):
        """Where stations and phones reach the server: on all addresses, this machine's network addresses."""
        host, port = self.server_address[:2]
        if not ipaddress.ip_address(host).is_unspecified:
            return [self.url()]
        return [_http_url(address, port) for address in lan_addresses(ipv6=":" in host)] or [_http_url("localhost", port)]


def _http_url(host, port):
    return "http://%s:%d/" % ("[%s]" % host if ":" in host else host, port)


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library, when it is glibc (whose malloc keeps freed memory); None elsewhere (looked up once)."""
    try:
        import ctypes  # lazily: only a server process needs it
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # glibc's, absent from musl and macOS
        return libc
    except (ImportError, OSError, AttributeError):
        return None


def give_back_memory():
    """Hand memory Python has freed back to the system (glibc keeps it otherwise).

    Compiling this file at every start (a script is never cached as .pyc) and a long
    answer each leave megabytes freed but still counted against the unit's MemoryMax.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def lan_addresses(ipv6=False):
    """This machine's addresses that others on the network can reach, the default route's first."""
    found = []
    for family, target in [(socket.AF_INET, "10.254.254.254")] + [(socket.AF_INET6, "fd00::1")] * ipv6:
        # connecting a UDP socket sends nothing; it picks the address a packet there would leave from
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            found.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)]
    usable = []
    for text in found:
        address = ipaddress.ip_address(text.split("%")[0])
        if (address.version == 4 or ipv6) and not (address.is_loopback or address.is_link_local
                                                   or address.is_unspecified) and text not in usable:
            usable.append(text)
    return usable


def serve(server, announce=None):
    """Serve until SIGTERM or SIGINT, then stop cleanly and close the database.

    ``announce()`` runs once the signal handlers are in place, so whoever reads what it
    prints (the key, the address) and signals at once finds the server ready to stop.
    """
    done = threading.Event()

    def on_signal(signum, frame):
        if not done.is_set():
            done.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, 2)  # M_ARENA_MAX: 2 malloc arenas, not 8 a core, however many threads serve
    give_back_memory()
    if announce:
        announce()
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        log("iotserver: stopping")
        server.stop()
        server.store.close()
    log("iotserver: stopped")


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


def _station_arg(text):
    """A station by MAC, or by the ThingSpeak channel id that --stations and --add-channel print."""
    if re.fullmatch(r"[0-9]{1,9}", text, re.ASCII):
        return int(text)
    try:
        return parse_mac(text)
    except ValueError:
        raise argparse.ArgumentTypeError("give a station's MAC (6c:ef:7a:3b:9d:e8) or its channel id "
                                         "(see --stations)") from None


def _name_arg(text):
    name = text.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise argparse.ArgumentTypeError("a name is 1 to 64 printable characters")
    return name


def _role_arg(text):
    role = text.lower()
    if role not in ROLES + ("none",):
        raise argparse.ArgumentTypeError("a role is indoor, outdoor or none")
    return role


def _key_arg(text):
    if not _KEY_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("must be 8 to 128 characters from A-Z a-z 0-9 . _ ~ -")
    return text


def _url_arg(text):
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must be an http:// or https:// address such as https://iot.example.org/")
    return text.rstrip("/") + "/"


def _not_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _comfort_arg(text):
    match = re.fullmatch(r"\s*([0-9]{1,2}(?:\.[0-9]+)?)\s*[-–]\s*([0-9]{1,2}(?:\.[0-9]+)?)\s*", text, re.ASCII)
    if not match or not float(match.group(1)) < float(match.group(2)):
        raise argparse.ArgumentTypeError("must be LOW-HIGH in °C with LOW below HIGH, e.g. 20-24")
    return float(match.group(1)), float(match.group(2))


def _quiet_arg(text):
    match = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])-([01]?[0-9]|2[0-3]):([0-5][0-9])", text.strip(), re.ASCII)
    if not match or match.group(1, 2) == match.group(3, 4):
        raise argparse.ArgumentTypeError("must be HH:MM-HH:MM, e.g. 22:00-07:00")
    hours = [int(g) for g in match.groups()]
    return hours[0] * 60 + hours[1], hours[2] * 60 + hours[3]


def _notify_arg(text):
    try:
        return parse_target(text)
    except ValueError as exc:  # the message never repeats the URL: it may hold a password or token
        raise argparse.ArgumentTypeError("the URL %s" % exc) from None


def _zone_arg(text):
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError("unknown time zone %r (try Europe/Berlin or UTC)" % text) from None


class _MacAnd(argparse.Action):
    """``--flag MAC VALUE``: the MAC and the value each checked once, stored as a (mac, value) pair."""

    def __init__(self, option_strings, dest, convert, **kwargs):
        self.convert = convert
        super().__init__(option_strings, dest, nargs=2, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            pair = (_mac_arg(values[0]), self.convert(values[1]))
        except argparse.ArgumentTypeError as exc:
            parser.error("argument %s: %s" % (option_string, exc))
        setattr(namespace, self.dest, pair)


class _FieldArg(argparse.Action):
    """``--field MAC N NAME UNIT``: each part checked once, stored as (mac, number, name, unit)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=4, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        mac, number, name, unit = values
        try:
            if not _FIELD_RE.fullmatch(number):
                raise ValueError("a field is a number from 1 to 8")
            name = _name_arg(name)
            setattr(namespace, self.dest, (_mac_arg(mac), int(number), name, field_unit(name, unit.strip())))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error("argument %s: %s" % (option_string, exc))


def _proxies(given):
    if not given:
        return ("127.0.0.1", "::1")
    if given == ["none"]:
        return ()
    for address in given:
        if not _plain_ip(address):
            raise SystemExit("iotserver: --trusted-proxy %r is not an IP address" % address)
    return given


def build_parser():
    """The command line: serving flags and the owner's admin actions (see COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="iotserver.py",
        description="Self-hosted server for sensor stations: stores readings, serves a page.",
        epilog="Stations post GET /update/API_key=KEY/mac=MAC/field=N/data=VALUE. "
               "Admin actions run against --db and exit; they are safe while the server runs.")
    serving = parser.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serving.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    serving.add_argument("--db", default="iotserver.db", help="SQLite database file (default: ./%(default)s)")
    serving.add_argument("--api-key", metavar="KEY", type=_key_arg, default=os.environ.get(KEY_ENV),
                         help="key stations must send, instead of the stored one; also read from $%s" % KEY_ENV)
    serving.add_argument("--rate", type=_positive(float), default=DEFAULT_RATE, metavar="PER_MINUTE",
                         help="readings per minute each station may post on average (default: %(default)g)")
    serving.add_argument("--burst", type=_positive(int), default=DEFAULT_BURST, metavar="N",
                         help="readings a station may post back to back (default: %(default)s)")
    serving.add_argument("--max-stations", type=_positive(int), default=DEFAULT_MAX_STATIONS, metavar="N",
                         help="stations registered at most (default: %(default)s)")
    serving.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                         help="drop clients idle this long (default: %(default)g)")
    serving.add_argument("--max-connections", type=_positive(int), default=MAX_CONNECTIONS, metavar="N",
                         help="connections (threads) served at once; past that the slowest client is dropped "
                              "(default: %(default)s)")
    serving.add_argument("--public-url", metavar="URL", type=_url_arg,
                         help="the address people and stations use, e.g. https://iot.example.org/ "
                              "(links in notifications, --show-key); default: the address served on")
    serving.add_argument("--quiet", action="store_true", help="do not log one line per request")
    serving.add_argument("--trusted-proxy", action="append", metavar="ADDR",
                         help="a reverse proxy whose X-Real-IP header names the client; repeat for more, "
                              "'none' for no proxy (default: 127.0.0.1 and ::1)")
    shown = parser.add_argument_group("page and read API")
    shown.add_argument("--unit", type=str.upper, choices=("F", "C"), default="F",
                       help="temperature unit on the page (default: %(default)s)")
    shown.add_argument("--tz", metavar="ZONE", type=_zone_arg, default=None,
                       help="time zone for the page, e.g. Europe/Berlin (default: the server's local zone)")
    shown.add_argument("--dead-band", type=_positive(float), default=DEAD_BAND_C, metavar="CELSIUS",
                       help="how much cooler or warmer (in °C) outside must be before the advice flips "
                            "(default: %(default)g)")
    shown.add_argument("--comfort", type=_comfort_arg, default=COMFORT_C, metavar="LOW-HIGH",
                       help="comfort band in °C the advice brings the inside toward (default: %g-%g)" % COMFORT_C)
    shown.add_argument("--max-dew-point", type=_positive(float), default=MAX_DEW_POINT_C, metavar="CELSIUS",
                       help="outside air with a higher dew point is muggy: the advice will not open for it "
                            "(default: %(default)g)")
    shown.add_argument("--refresh", type=_positive(int), default=DEFAULT_REFRESH, metavar="SECONDS",
                       help="how often the open page updates itself (default: %(default)s)")
    shown.add_argument("--private", action="store_true",
                       help="the page and read API need the API key (as HTTP password, or ?key=)")
    shown.add_argument("--metrics-token", metavar="TOKEN", type=_key_arg, default=os.environ.get(METRICS_TOKEN_ENV),
                       help="a bearer token that lets a scraper (Prometheus) read /metrics, also with --private; "
                            "also read from $%s" % METRICS_TOKEN_ENV)

    told = parser.add_argument_group("notifications")
    told.add_argument("--notify", action="append", type=_notify_arg, default=[], metavar="URL",
                      help="tell this target when the advice changes or a station goes offline: ntfy(s)://host/topic, "
                           "gotify(s)://host/token, mailto(s)://user:pass@smtp.host:587?to=you@example.org or "
                           "json(s)://host/path; repeatable; more in $%s, space-separated" % NOTIFY_ENV)
    told.add_argument("--notify-hold", type=_not_negative, default=NOTIFY_HOLD_MIN, metavar="MINUTES",
                      help="push a new advice only once it has held this long; 0 at once (default: %(default)g)")
    told.add_argument("--notify-quiet", type=_quiet_arg, metavar="HH:MM-HH:MM",
                      help="quiet hours (--tz): nothing is pushed then; what is still true after them is")

    admin = parser.add_argument_group("admin actions (run, print, exit)")
    actions = admin.add_mutually_exclusive_group()
    actions.add_argument("--stations", action="store_true", help="list stations and exit")
    actions.add_argument("--rename", action=_MacAnd, convert=_name_arg, metavar=("MAC", "NAME"),
                         help="give a station a name")
    actions.add_argument("--role", action=_MacAnd, convert=_role_arg, metavar=("MAC", "ROLE"),
                         help="mark a station indoor or outdoor (the page compares them), or none")
    actions.add_argument("--field", action=_FieldArg, metavar=("MAC", "N", "NAME", "UNIT"),
                         help="what a station's field N holds, e.g. --field MAC 1 temperature F: "
                              "temperature (C, F, K), pressure (hPa, Pa, kPa, mbar, inHg, mmHg) and humidity (%%) "
                              "are converted and checked; any other name is shown as sent, with UNIT")
    actions.add_argument("--forget", type=_mac_arg, metavar="MAC",
                         help="delete a station, its readings and their rollups")
    actions.add_argument("--show-key", action="store_true", help="print the API key and an example station URL")
    actions.add_argument("--rotate-key", action="store_true", help="replace the API key with a new random one")
    actions.add_argument("--lock", action="store_true", help="refuse stations not yet registered (403)")
    actions.add_argument("--unlock", action="store_true", help="register unknown stations again")
    actions.add_argument("--channel-key", type=_station_arg, metavar="STATION",
                         help="print a station's ThingSpeak channel id and write key (STATION: a MAC or channel id)")
    actions.add_argument("--rotate-channel-key", type=_station_arg, metavar="STATION",
                         help="give a station's ThingSpeak channel a new write key (a MAC or channel id)")
    actions.add_argument("--add-channel", type=_name_arg, metavar="NAME",
                         help="create a station for a ThingSpeak client that has no MAC; print its id and key")
    actions.add_argument("--backup", metavar="PATH",
                         help="write a consistent copy of the live database to PATH and exit")
    actions.add_argument("--notify-test", action="store_true",
                         help="send a test message to every --notify URL, print the result of each, and exit")
    actions.add_argument("--prune-days", type=_positive(float), metavar="DAYS",
                         help="delete readings older than DAYS days (for cron) and exit; "
                              "the hourly and daily rollups stay, so charts still reach back")
    actions.add_argument("--prune-rollups-days", type=_positive(float), metavar="DAYS",
                         help="delete the hourly and daily rollups older than DAYS days and exit")
    return parser


def _example_url(base, key):
    return "%supdate/API_key=%s/mac=6c:ef:7a:3b:9d:e8/field=1/data=21.4" % (base, key)


def _base_url(args, store):
    """The address examples use: --public-url, else the one the server announced at its last start."""
    return args.public_url or store.setting("url") or _http_url(args.host, args.port)


# -- admin actions: one function per flag, each (args, store, out) -> exit status --

def _cmd_stations(args, store, out):
    rows = store.stations()
    if not rows:
        print("no stations yet", file=out)
    for s in rows:
        seen = iso_utc(s["last_seen"]) if s["last_seen"] else "never"
        print("%s  channel %-3d  %-7s  %8d readings  last %s  %s" % (
            s["mac"], s["id"], s["role"] or "-", s["readings"], seen, s["name"]), file=out)


def _cmd_rename(args, store, out):
    mac, name = args.rename
    store.rename(mac, name)
    print("renamed %s to %s" % (mac, name), file=out)


def _cmd_role(args, store, out):
    mac, role = args.role
    before = store.set_role(mac, role)
    print("%s is now %s%s" % (mac, role if role != "none" else "without a role",
                              " (%s was, and now has no role)" % before if before else ""), file=out)


def _cmd_field(args, store, out):
    mac, number, name, unit = args.field
    store.set_field(mac, number, name, unit)
    field = Field(number, name, unit)
    how = "converted to %s" % field.base_unit if field.quantity else "shown as sent"
    print("%s field %d is %s in %s (%s)" % (mac, number, name, unit or "no unit", how), file=out)
    if not field.quantity:
        print("note: %r is none of %s: not converted, not checked, and not used by the advice"
              % (name, ", ".join(QUANTITIES)), file=out)


def _cmd_forget(args, store, out):
    count = store.forget(args.forget)
    print("forgot %s and %d readings" % (args.forget, count), file=out)


def _cmd_show_key(args, store, out):
    key = store.ensure_key()[0]
    print("API key: %s" % key, file=out)
    print("example: %s" % _example_url(_base_url(args, store), key), file=out)


def _cmd_rotate_key(args, store, out):
    key = store.rotate_key()
    print("API key: %s" % key, file=out)
    print("example: %s" % _example_url(_base_url(args, store), key), file=out)
    print("every station must now send the new key", file=out)


def _cmd_lock(args, store, out):
    store.set_setting("locked", "1")
    print("registration locked: unknown stations get 403", file=out)


def _cmd_unlock(args, store, out):
    store.set_setting("locked", "0")
    print("registration open", file=out)


def _print_channel(args, store, out, channel, label, key):
    print("channel %d (%s) write key: %s" % (channel, label, key), file=out)
    print("example: %supdate?api_key=%s&field1=21.4" % (_base_url(args, store), key), file=out)


def _cmd_channel_key(args, store, out, rotate=False):
    channel, mac, key = store.write_key(args.rotate_channel_key if rotate else args.channel_key, rotate=rotate)
    _print_channel(args, store, out, channel, mac, key)


def _cmd_rotate_channel_key(args, store, out):
    _cmd_channel_key(args, store, out, rotate=True)


def _cmd_add_channel(args, store, out):
    channel, _, key = store.write_key(store.add_channel(args.add_channel))
    _print_channel(args, store, out, channel, args.add_channel, key)


def _cmd_backup(args, store, out):
    pages = store.backup(args.backup)
    print("backed up %s to %s (%d pages)" % (store.path, os.path.abspath(args.backup), pages), file=out)


def _cmd_prune_days(args, store, out):
    count = store.prune(args.prune_days)
    print("pruned %d readings older than %g days" % (count, args.prune_days), file=out)


def _cmd_notify_test(args, store, out):
    if not args.notify:
        print("no notification URL: give --notify URL or set $%s" % NOTIFY_ENV, file=out)
        return 2
    message = Message("test", "test", "iotserver test", "A test from iotserver: the window advice will reach "
                      "you like this.", 3, ["white_check_mark"])
    failed = 0
    for target in args.notify:
        try:
            deliver(target, message, args.public_url)
            print("%s: sent" % target.label, file=out)
        except Exception as exc:  # whatever the target or the network did, reported per target
            failed += 1
            print("%s: failed (%s)" % (target.label, describe_failure(target, exc)), file=out)
    return 1 if failed else 0
def _cmd_prune_rollups_days(args, store, out):
    count = store.prune(args.prune_rollups_days, rollups=True)
    print("pruned %d hourly and daily rollups older than %g days" % (count, args.prune_rollups_days), file=out)


#: Every admin action: the flag's dest -> the function that runs it. Flags not named
#: here serve (or configure serving).
COMMANDS = {
    "stations": _cmd_stations, "rename": _cmd_rename, "role": _cmd_role, "field": _cmd_field, "forget": _cmd_forget,
    "show_key": _cmd_show_key, "rotate_key": _cmd_rotate_key, "lock": _cmd_lock, "unlock": _cmd_unlock,
    "channel_key": _cmd_channel_key, "rotate_channel_key": _cmd_rotate_channel_key,
    "add_channel": _cmd_add_channel, "backup": _cmd_backup, "prune_days": _cmd_prune_days,
    "notify_test": _cmd_notify_test,
    "prune_rollups_days": _cmd_prune_rollups_days,
}


def main(argv=None):
    """Parse the command line; run an admin action or serve."""
    # a name or path given as bytes that are not UTF-8 prints escaped, not as a traceback
    sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    command = next((COMMANDS[name] for name in COMMANDS if getattr(args, name) not in (None, False)), None)
    if command in (None, _cmd_notify_test):
        try:  # the environment's URLs first; like the flags, never repeated in a message
            args.notify = [parse_target(url) for url in os.environ.get(NOTIFY_ENV, "").split()] + args.notify
        except ValueError as exc:
            log("iotserver: a URL in $%s %s" % (NOTIFY_ENV, exc))
            return 2
    if command is _cmd_notify_test:  # reaches out, touches no database
        return command(args, None, sys.stdout)
    try:
        store = Store(args.db, create=command is None)
    except StoreError as exc:
        log("iotserver: %s" % exc)
        return 2
    if command is not None:
        try:
            return command(args, store, sys.stdout) or 0
        except (StoreError, sqlite3.Error, OSError) as exc:
            log("iotserver: %s" % exc)
            return 1
        finally:
            store.close()
    try:
        key, created = store.ensure_key()
        server = Server((args.host, args.port), store, api_key=args.api_key, rate=args.rate,
                        burst=args.burst, client_timeout=args.timeout, quiet=args.quiet,
                        max_stations=args.max_stations,
                        view=View(args.unit, args.tz, args.dead_band, args.comfort, args.max_dew_point),
                        refresh=args.refresh, private=args.private, trusted_proxies=_proxies(args.trusted_proxy),
                        max_connections=args.max_connections, public_url=args.public_url,
                        metrics_token=args.metrics_token, notify=args.notify, notify_hold=args.notify_hold,
                        quiet_hours=args.notify_quiet)
        urls = [server.public_url] if server.public_url else server.urls()
        store.set_setting("url", urls[0])  # where --show-key's example points
    except (OSError, sqlite3.Error) as exc:
        in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
        hint = " (is another server on port %d? pick another with --port)" % args.port if in_use else ""
        log("iotserver: cannot start on %s:%d: %s%s" % (args.host, args.port, exc, hint))
        store.close()
        return 1

    def announce():
        log("iotserver %s listening on %s (database %s)" % (__version__, server.url(), store.path))
        if urls != [server.url()]:
            log("iotserver: stations and phones reach it at %s" % " or ".join(urls))
        if args.notify:
            log("iotserver: notifying %s when the advice changes (after holding %g min) or a station goes offline%s"
                % (", ".join(t.label for t in args.notify), args.notify_hold,
                   "" if args.public_url else "; without --public-url the messages carry no link"))
        if created and not args.api_key:
            if sys.stdout.isatty():
                # shown once, on a terminal only: a journal or log file must never hold the key
                print("New API key (shown once; --show-key prints it again): %s" % key)
                print("Point a station at: %s" % _example_url(urls[0], key), flush=True)
            else:
                log("iotserver: generated an API key; print it with: python3 iotserver.py --db %s --show-key"
                    % store.path)

    serve(server, announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
