#!/usr/bin/env python3
"""Benchmark: page render time with 1,000 and with 10,000,000 stored readings.

    python3 bench/page.py [--sizes 1000 10000000] [--requests 300] [--cache DIR]

Builds a database per size (two stations, outdoor and indoor, temperature and
pressure once a minute going back as far as the size needs; a database too small
to fill a day is spread over the last 24 hours), starts the real
server on it, and times GET / over one keep-alive connection. Prints figures;
asserts nothing. A 10M database takes a minute to build; --cache keeps it (its readings then age: the
headline turns to "offline", which renders the same way).
"""

import argparse
import http.client
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import iotserver  # noqa: E402
from launcher import RunningServer  # noqa: E402


def build(path, size):
    """A database of ``size`` readings ending now, made through iotserver's own schema."""
    store = iotserver.Store(path)
    store.ensure_key()
    ids = []
    for mac, role in (("6c:ef:7a:3b:9d:e8", "outdoor"), ("6c:ef:7a:3b:9d:e9", "indoor")):
        store.add_reading(mac, 1, 20.0)
        store.set_role(mac, role)
    store.close()
    conn = sqlite3.connect(path)
    ids = [r[0] for r in conn.execute("SELECT id FROM stations ORDER BY id")]
    now = int(time.time() * 1000)
    # two stations, two fields, once a minute; a small database is spread over the last day
    # so both sizes fill the 24-hour chart and the comparison is about size alone
    entries = size // 4
    step = max(60_000, 86_400_000 // max(1, entries))

    def rows():
        for m in range(entries, 0, -1):
            ts = now - m * step
            hours = ts / 3_600_000
            for sid, base, swing in ((ids[0], 22, 7), (ids[1], 26, 1.5)):
                yield sid, 1, round(base + swing * math.sin(hours * 2 * math.pi / 24), 2), ts
                yield sid, 2, round(1013 + 5 * math.sin(hours / 50), 1), ts + 1

    conn.execute("PRAGMA synchronous = OFF")
    batch = []
    with conn:
        for row in rows():
            batch.append(row)
            if len(batch) == 100_000:
                conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)", batch)
                batch = []
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)", batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def measure(path, requests):
    server = RunningServer(path, ["--quiet"])
    try:
        conn = http.client.HTTPConnection(server.host, server.port)
        times, size = [], 0
        for i in range(requests + 20):
            started = time.perf_counter()
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - started
            assert resp.status == 200 and b'id="headline"' in body, body[:300]
            if i >= 20:  # warm-up first
                times.append(elapsed * 1000)
            size = len(body)
        conn.close()
        return times, size
    finally:
        server.stop(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000_000], help="readings per database")
    parser.add_argument("--requests", type=int, default=300, help="page loads timed per size")
    parser.add_argument("--cache", help="directory to keep the built databases in")
    args = parser.parse_args()
    print("machine: %s, %d cores, Python %s, SQLite %s" % (platform.platform(), os.cpu_count(),
                                                          platform.python_version(), sqlite3.sqlite_version))
    tmp = None if args.cache else tempfile.TemporaryDirectory()
    folder = args.cache or tmp.name
    os.makedirs(folder, exist_ok=True)
    results = {}
    for size in args.sizes:
        path = os.path.join(folder, "page-%d.db" % size)
        if not os.path.exists(path):
            started = time.perf_counter()
            build(path, size)
            print("built %s readings in %.0f s (%.0f MB)" % (format(size, ","), time.perf_counter() - started,
                                                             os.path.getsize(path) / 1e6))
        times, page = measure(path, args.requests)
        times.sort()
        results[size] = statistics.median(times)
        print("%12s readings: page p50 %.2f ms  p95 %.2f ms  max %.2f ms  (%d loads, %d bytes)"
              % (format(size, ","), results[size], times[int(len(times) * 0.95)], times[-1], len(times), page))
    if len(results) > 1:
        small, large = results[min(results)], results[max(results)]
        print("largest / smallest p50: %.2fx" % (large / small))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
