#!/usr/bin/env python3
"""Benchmark: the server's memory (RSS) while stations post, pages load and six 100k-row exports run at once.

    python3 bench/memory.py [--stations 300] [--exports 6] [--rows 120000] [--read-rate 1000000]

Fills a database the server created with ``--rows`` readings over the last 23 hours
(written directly with sqlite3), restarts the real server on it and then, all on
loopback: ``--stations`` simulated stations each post once per ``--interval`` on a new
connection (as an ESP8266 does) and ``--pages`` clients load ``/``; after ``--warmup``
seconds ``--exports`` clients at once ask for ``/api/readings?limit=100000&since=<24 h
ago>`` (half JSON, half CSV) and read each answer fully at ``--read-rate`` bytes/s.
Once the exports are done (or after ``--seconds``) everything stops. The server's
VmRSS is sampled every 50 ms from /proc; VmHWM gives the true peak. Prints figures;
asserts nothing.
"""

import argparse
import asyncio
import datetime
import http.client
import math
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from launcher import RunningServer  # noqa: E402

KEY = "bench-key-0123456789"
HOST = "127.0.0.1"
#: The two stations that hold the exported history.
HISTORY = (("6c:ef:7a:3b:9d:e8", 22, 7), ("6c:ef:7a:3b:9d:e9", 26, 1.5))


def fill(db, rows):
    """``rows`` readings over the last 23 hours, two stations, fields 1 and 2 (like bench/page.py)."""
    conn = sqlite3.connect(db)
    ids = [conn.execute("SELECT id FROM stations WHERE mac = ?", (mac,)).fetchone()[0] for mac, _, _ in HISTORY]
    now = int(time.time() * 1000)
    entries = rows // 4
    step = 23 * 3_600_000 // entries

    def readings():
        for m in range(entries, 0, -1):
            ts = now - m * step
            hours = ts / 3_600_000
            for sid, (_, base, swing) in zip(ids, HISTORY):
                yield sid, 1, round(base + swing * math.sin(hours * 2 * math.pi / 24), 2), ts
                yield sid, 2, round(1013 + 5 * math.sin(hours / 50), 1), ts + 1

    conn.execute("PRAGMA synchronous = OFF")
    with conn:
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)", readings())
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    conn.close()
    return count


class Sampler(threading.Thread):
    """VmRSS of the server every ``interval`` seconds, with the time of each sample."""

    def __init__(self, server, interval=0.05):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples = []  # (monotonic, VmRSS kB)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            rss, _ = self.server.rss_kb()
            if rss:
                self.samples.append((time.monotonic(), rss))
            self.stop.wait(self.interval)

    def between(self, start, end):
        return [kb for when, kb in self.samples if start <= when <= end]


async def station(i, args, stop, posts):
    """One station: a new connection per post, once per interval, until ``stop`` or ``--posts`` posts."""
    mac = "0a:00:00:00:%02x:%02x" % (i >> 8 & 255, i & 255)
    await asyncio.sleep(args.interval * i / args.stations)  # spread over the interval
    for n in range(args.posts):
        if stop.is_set():
            return
        cycle = time.monotonic()
        raw = ("GET /update/API_key=%s/mac=%s/field=1/data=%d.5 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
               % (KEY, mac, n % 40)).encode()
        writer, status = None, 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, args.port), 30)
            writer.write(raw)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
            match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
            status = int(match.group(1)) if match else -1
            await asyncio.wait_for(reader.read(), 30)  # the rest, until the server closes
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if writer is not None:
                writer.close()
        posts.append((cycle, time.monotonic() - cycle, status))
        await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - cycle)))


def pages(port, stop, loads, every=0.5):
    """Load / on a new connection every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        started = time.monotonic()
        status = 0
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            conn.close()
        except OSError:
            pass
        loads.append((started, time.monotonic() - started, status))
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def export(port, fmt, since, read_rate, gate, results):
    """One 100k-row export, read fully at ``read_rate`` bytes/s; appends (format, status, bytes, rows, seconds)."""
    gate.wait()
    started = time.monotonic()
    status, body = 0, bytearray()
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        conn.request("GET", "/api/readings?limit=100000&since=%s&format=%s" % (since, fmt))
        resp = conn.getresponse()
        status = resp.status
        chunk = 64 * 1024
        while True:
            part = resp.read(chunk)
            if not part:
                break
            body += part
            # read no faster than read_rate: a phone on a slow link, a spreadsheet import
            time.sleep(max(0.0, len(body) / read_rate - (time.monotonic() - started)))
        conn.close()
    except OSError as exc:
        status = "%s after %d bytes" % (type(exc).__name__, len(body))
    rows = body.count(b"\n") - 1 if fmt == "csv" else body.count(b'"mac"')
    results.append((fmt, status, len(body), rows, time.monotonic() - started))


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def latency_line(name, records):
    ok = [took for _, took, status in records if status == 200]
    failed = len(records) - len(ok)
    return "%-34s %5d  p50 %6.1f ms  p99 %7.1f ms  max %7.1f ms  failed %d" % (
        name, len(records), 1000 * percentile(ok, 0.5), 1000 * percentile(ok, 0.99),
        1000 * max(ok, default=float("nan")), failed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=300, help="simulated stations, each its own connection loop")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a station's posts")
    parser.add_argument("--posts", type=int, default=200, help="most posts per station")
    parser.add_argument("--pages", type=int, default=2, help="clients loading / every 0.5 s")
    parser.add_argument("--exports", type=int, default=6, help="concurrent 100k-row exports (half JSON, half CSV)")
    parser.add_argument("--rows", type=int, default=120_000, help="readings in the last 24 h (>= 100,000)")
    parser.add_argument("--read-rate", type=float, default=1_000_000, help="bytes/s each export is read at")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of stations and pages before the exports")
    parser.add_argument("--seconds", type=float, default=120.0, help="longest run; everything stops by then")
    parser.add_argument("--script", action="store_true",
                        help="run python3 iotserver.py instead of python3 -m iotserver (the systemd unit's way)")
    args = parser.parse_args()
    print("machine: %s, %d cores, Python %s, SQLite %s" % (platform.platform(), os.cpu_count(),
                                                          platform.python_version(), sqlite3.sqlite_version))
    print("server: %s" % ("python3 iotserver.py" if args.script else "python3 -m iotserver (as the systemd unit runs it)"))
    flags = ["--quiet", "--api-key", KEY, "--rate", "1e9", "--burst", "1000000000",
             "--max-stations", str(args.stations + 10)]
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "memory.db")
        server = RunningServer(db, flags, module=not args.script)  # creates the schema; the history stations register by posting
        for mac, _, _ in HISTORY:
            server.update(key=KEY, mac=mac)
        server.stop()
        started = time.perf_counter()
        stored = fill(db, args.rows)
        print("database: %s readings (%s in the last 23 h), built in %.0f s, %.0f MB"
              % (format(stored, ","), format(args.rows, ","), time.perf_counter() - started,
                 os.path.getsize(db) / 1e6))
        server.start()
        try:
            run(server, args)
        finally:
            server.stop()


def run(server, args):
    args.port = server.port
    time.sleep(1.0)
    idle_rss, _ = server.rss_kb()
    sampler = Sampler(server)
    sampler.start()
    stop, gate = threading.Event(), threading.Event()
    posts, loads, exported = [], [], []
    since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%SZ")
    readers = [threading.Thread(target=pages, args=(server.port, stop, loads), daemon=True)
               for _ in range(args.pages)]
    exporters = [threading.Thread(target=export, args=(server.port, ("json", "csv")[n % 2], since, args.read_rate,
                                                       gate, exported), daemon=True) for n in range(args.exports)]
    for thread in readers + exporters:
        thread.start()
    marks = {}

    async def load():
        deadline = time.monotonic() + args.seconds
        tasks = [asyncio.create_task(station(i, args, stop, posts)) for i in range(args.stations)]
        await asyncio.sleep(args.warmup)
        marks["exports"] = time.monotonic()
        gate.set()
        while any(t.is_alive() for t in exporters) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        marks["exported"] = time.monotonic()
        await asyncio.sleep(2.0)  # the stations once the exports are over
        stop.set()
        await asyncio.wait(tasks, timeout=35)

    asyncio.run(load())
    for thread in readers:
        thread.join(65)
    time.sleep(1.0)
    after_rss, hwm = server.rss_kb()
    sampler.stop.set()
    sampler.join()

    warm = sampler.between(marks["exports"] - args.warmup + 1, marks["exports"])
    during = sampler.between(marks["exports"], marks["exported"])
    print("load: %d stations posting every %g s on new connections, %d page clients, %d exports of 100,000 rows "
          "read at %.1f MB/s each" % (args.stations, args.interval, args.pages, args.exports, args.read_rate / 1e6))
    print("RSS idle after start:              %6.1f MB" % (idle_rss / 1024))
    print("RSS baseline (stations and pages): %6.1f MB  (median of %d samples before the exports)"
          % (statistics.median(warm) / 1024 if warm else float("nan"), len(warm)))
    print("RSS peak sampled during exports:   %6.1f MB  (%d samples every 50 ms)"
          % (max(during, default=0) / 1024, len(during)))
    print("RSS peak (VmHWM):                  %6.1f MB" % (hwm / 1024))
    print("RSS after the exports:             %6.1f MB" % (after_rss / 1024))
    for fmt, status, size, rows, took in sorted(exported, key=str):
        print("export %-4s status %s  %6.1f MB  %6s rows  %5.1f s" % (fmt, status, size / 1e6, format(rows, ","), took))
    if len(exported) < args.exports:
        print("exports not finished within --seconds: %d" % (args.exports - len(exported)))
    before = [p for p in posts if p[0] < marks["exports"]]
    while_exporting = [p for p in posts if marks["exports"] <= p[0] < marks["exported"]]
    print(latency_line("station posts before the exports", before))
    print(latency_line("station posts during the exports", while_exporting))
    print(latency_line("station posts, whole run", posts))
    print(latency_line("page loads, whole run", loads))


if __name__ == "__main__":
    main()
