#!/usr/bin/env python3
"""Benchmark: history at scale: bytes per reading, and the 1-year page and /api/series with 10M readings.

    python3 bench/history.py [--sizes 1000 10000000] [--requests 300] [--cache DIR]

Storage: 1,000,000 readings of 4 stations (fields 1 and 2, one entry a minute) written
through iotserver's own write path (Store.add_entries: packed values, rollups), then
VACUUM; the bytes per reading are printed next to the same readings in schema 2 (the
table iotserver 0.1 kept), and the time migration 3 takes to convert that schema-2 file.

Pages: a database per size (two stations, outdoor and indoor, temperature and pressure once
a minute going back as far as the size needs; a database too small to fill a day is spread
over the last 24 hours), written through the same write path; the real server started on
it; GET /, /?range=1y and /api/series?range=1y timed over one keep-alive connection.
Prints figures; asserts nothing. The 10M database takes about two minutes to build;
--cache keeps it.
"""

import argparse
import contextlib
import http.client
import math
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import iotserver  # noqa: E402

OUTDOOR, INDOOR = "6c:ef:7a:3b:9d:e8", "6c:ef:7a:3b:9d:e9"


def _values(ts, station):
    """A day's swing of temperature (2 decimals) and a slow one of pressure (1 decimal)."""
    hours = ts / 3_600_000
    return [(1, round(22 + 4 * station + (7 - 5 * station) * math.sin(hours * 2 * math.pi / 24), 2)),
            (2, round(1013 + 5 * math.sin(hours / 50), 1))]


def build(path, macs, entries, step, now):
    """``entries`` entries a station, ``step`` ms apart and ending now, through iotserver's write path."""
    store = iotserver.Store(path)
    store.ensure_key()
    for first in range(entries, 0, -iotserver.MAX_BULK_ENTRIES):
        for station, mac in enumerate(macs):
            batch = [(now - m * step, _values(now - m * step, station))
                     for m in range(first, max(first - iotserver.MAX_BULK_ENTRIES, 0), -1)]
            store.add_entries(mac, batch, max_stations=len(macs))
    store.close()


def vacuumed_size(path):
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("VACUUM")
    conn.close()
    return os.path.getsize(path)


def storage(folder):
    """Bytes per reading in schema 3 and in schema 2, and how long converting the latter takes."""
    size, macs = 1_000_000, ["02:00:00:00:00:%02x" % i for i in range(4)]
    now = int(time.time() * 1000)
    new, old = os.path.join(folder, "bytes-3.db"), os.path.join(folder, "bytes-2.db")
    for path in (new, old):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    build(new, macs, size // 8, 60_000, now)
    with sqlite3.connect(old) as conn:  # the same readings as iotserver 0.1 stored them
        for statements in iotserver.MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.executemany("INSERT INTO stations (mac, name, created_at, write_key) VALUES (?, ?, 0, ?)",
                         [(mac, mac, "%016X" % i) for i, mac in enumerate(macs)])
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)",
                         ((station + 1, field, value, now - m * 60_000) for m in range(size // 8, 0, -1)
                          for station in range(4) for field, value in _values(now - m * 60_000, station)))
    conn.close()
    sizes = {3: vacuumed_size(new), 2: vacuumed_size(old)}
    for version in (2, 3):
        print("schema %d: %s readings (4 stations, fields 1 and 2, one entry a minute) after VACUUM: %.1f MB, "
              "%.1f bytes a reading" % (version, format(size, ","), sizes[version] / 1e6, sizes[version] / size))
    started = time.perf_counter()
    iotserver.Store(old).close()  # migration 3, VACUUM included
    print("converting that schema-2 file to schema 3 took %.1f s (%.1f bytes a reading after)"
          % (time.perf_counter() - started, os.path.getsize(old) / size))


def serve(path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "iotserver.py"), "--db", path, "--port", "0",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"listening on http://[^:]+:(\d+)/", line)
        if match:
            return proc, int(match.group(1))
    raise SystemExit("the server did not start")


def timings(port, path, requests):
    """p50 and p95 (ms) of ``requests`` GETs of ``path`` over one keep-alive connection, after a warm-up."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(requests + 20):
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        assert resp.status == 200, body[:300]
        if i >= 20:
            times.append(elapsed * 1000)
    conn.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)], len(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000_000], help="readings per database")
    parser.add_argument("--requests", type=int, default=300, help="requests timed per URL and size")
    parser.add_argument("--cache", help="directory to keep the built databases in")
    parser.add_argument("--skip-storage", action="store_true", help="only the pages")
    args = parser.parse_args()
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    print("machine: %s, %d cores, %s, Python %s, SQLite %s" % (
        platform.platform(), os.cpu_count(), cpu, platform.python_version(), sqlite3.sqlite_version))
    tmp = None if args.cache else tempfile.TemporaryDirectory()
    folder = args.cache or tmp.name
    os.makedirs(folder, exist_ok=True)
    if not args.skip_storage:
        storage(folder)
    pages = {}
    for size in args.sizes:
        path = os.path.join(folder, "history-%d.db" % size)
        if not os.path.exists(path):
            started = time.perf_counter()
            entries = size // 4
            build(path, (OUTDOOR, INDOOR), entries, max(60_000, 86_400_000 // max(1, entries)), int(time.time() * 1000))
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE stations SET role = CASE mac WHEN ? THEN 'outdoor' ELSE 'indoor' END", (OUTDOOR,))
            conn.close()
            print("built %s readings in %.0f s (%.0f MB)" % (format(size, ","), time.perf_counter() - started,
                                                             os.path.getsize(path) / 1e6))
        proc, port = serve(path)
        try:
            for name, url in (("24 h page", "/"), ("1 y page", "/?range=1y"),
                              ("/api/series 1 y", "/api/series?mac=%s&range=1y" % OUTDOOR)):
                p50, p95, length = timings(port, url, args.requests)
                pages[(size, name)] = p50
                print("%12s readings: %-16s p50 %6.2f ms  p95 %6.2f ms  (%d bytes)"
                      % (format(size, ","), name, p50, p95, length))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        print("24 h page, largest / smallest p50: %.2fx" % (pages[(large, "24 h page")] / pages[(small, "24 h page")]))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
