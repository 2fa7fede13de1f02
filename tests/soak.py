#!/usr/bin/env python3
"""Soak harness: the real server under load, faults and hostile input, on loopback only.

    python3 tests/soak.py --stations 500 --seconds 300       # the long run (README figures)
    python3 tests/soak.py --stations 100 --seconds 25        # the short one pytest runs

While hundreds of simulated stations post (a new connection per request, as an
ESP8266 does), readers load the page and APIs and a few heavy readers export the
read API's largest answer (100,000 rows) again and again, it sends hostile traffic
(idle and slow connections, a key brute-forcer, a flood of invented MACs, malformed
and oversized requests, injection attempts) and injects faults (SIGTERM, kill -9 and
restart, another process holding the database's write lock past the server's busy
timeout, a prune in a second process). Then it checks that every reading answered
200 is stored exactly once, that no 5xx came but the deliberate 503s, that no
station was starved, that every export came whole, the server's peak memory
(VmHWM) against the unit's MemoryMax, the database's integrity and that the key
is in no log.
Prints the figures; exits 1 if any check fails.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

from launcher import IOTSERVER, RunningServer

KEY = "soak-key-%s" % os.urandom(6).hex()
HOST = "127.0.0.1"
#: Client addresses (all loopback): legitimate stations and each kind of hostile client.
STATIONS_FROM, BRUTE_FROM, FLOOD_FROM, MALFORMED_FROM, READERS_FROM, SLOW_FROM, HEAVY_FROM = (
    "127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8")
#: Rows a heavy reader asks for (the read API's largest answer) and how many recent readings there are to give.
EXPORT_ROWS = 100_000
#: The server's own wait for a busy database (iotserver.BUSY_TIMEOUT).
BUSY_TIMEOUT = 5.0


def stop(server, sig):
    """Signal the server and wait for it (60 s); the exit status, or how it failed to exit."""
    try:
        return server.stop(sig, timeout=60)
    except AssertionError:
        return server.exits[-1][1]


def peak_rss_watch(server, stop_event, peak):
    """The server's peak resident memory (VmHWM, and VmRSS sampled every 0.2 s) until ``stop_event``."""
    while not stop_event.is_set():
        peak[0] = max(peak[0], *server.rss_kb())
        stop_event.wait(0.2)


class Stats:
    def __init__(self):
        self.statuses = collections.defaultdict(collections.Counter)  # kind -> status -> count
        self.acked = []  # (mac, field, value) answered 200
        self.attempts = collections.Counter()  # mac -> attempts outside fault windows
        self.accepted = collections.Counter()  # mac -> accepted outside fault windows
        self.fault_windows = []  # (start, end, kind)
        self.bad_5xx = []  # (kind, status, when, what)
        self.failures = []  # (when, how long, status, mac) of station posts that failed outside faults
        self.exports = []  # (format, status, rows or None when cut off, seconds, in a fault window) of heavy reads
        self.started = time.monotonic()

    def in_fault(self, when, grace=1.0):
        return any(start - grace <= when <= end + grace + (BUSY_TIMEOUT + 5 if kind == "lock" else 0)
                   for start, end, kind in self.fault_windows)

    def in_lock(self, when):
        return any(start - 1 <= when <= end + BUSY_TIMEOUT + 5 for start, end, kind in self.fault_windows
                   if kind == "lock")


async def request(raw, source, port, timeout=20.0):
    """Send raw bytes on a new connection; return the status (0 when no answer came)."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(source, 0)), timeout)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), timeout)
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
        if not match and os.environ.get("SOAK_VERBOSE"):
            print("no HTTP answer to %r: %r" % (raw[:60], data[:100]), file=sys.stderr)
        return int(match.group(1)) if match else -1
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return 0
    finally:
        if writer is not None:
            writer.close()


def get(path, extra=b""):
    return b"GET %s HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n%s\r\n" % (path.encode("latin-1"), extra)


async def station(i, args, server, stats, end):
    """A legitimate station: fields 1 and 2 every interval; every attempt carries a new value."""
    mac = "0a:00:%02x:%02x:%02x:%02x" % (i >> 24 & 255, i >> 16 & 255, i >> 8 & 255, i & 255)
    rng = random.Random(i)
    seq = 0
    await asyncio.sleep(rng.uniform(0, args.interval))
    while time.monotonic() < end:
        cycle = time.monotonic()
        for field in (1, 2):
            seq += 1
            value = "%d.%d" % (seq, field)
            sent = time.monotonic()
            status = await request(get("/update/API_key=%s/mac=%s/field=%d/data=%s" % (KEY, mac, field, value)),
                                   STATIONS_FROM, server.port)
            stats.statuses["station"][status] += 1
            if status == 200:
                stats.acked.append((mac, field, float(value)))
            if status >= 500 and not (status == 503 and stats.in_lock(sent)):
                stats.bad_5xx.append(("station", status, round(sent - stats.started, 1), value))
            if not stats.in_fault(sent) and not stats.in_fault(time.monotonic()):
                stats.attempts[mac] += 1
                stats.accepted[mac] += status == 200
                if status != 200:
                    stats.failures.append((round(sent - stats.started, 1), round(time.monotonic() - sent, 1),
                                           status, mac))
        await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - cycle)))


async def hostile(kind, source, make, per_second, server, stats, end):
    """A stream of hostile requests of one kind; any 4xx is fine, a 5xx is a finding."""
    while time.monotonic() < end:
        sent = time.monotonic()
        raw = make()
        status = await request(raw, source, server.port)
        stats.statuses[kind][status] += 1
        if status >= 500 and not (status == 503 and stats.in_lock(sent)):
            stats.bad_5xx.append((kind, status, round(sent - stats.started, 1), raw[:120]))
        await asyncio.sleep(max(0.0, 1.0 / per_second - (time.monotonic() - sent)))


def malformed_requests(rng):
    """Every way a client can send garbage, cycling."""
    mac = "6c:ef:7a:3b:9d:e8"
    segments = ["API_key=%s" % KEY, "mac=%s" % mac, "field=1", "data=1"]
    nasty = ["nan", "inf", "-inf", "1e309", "1_000", "%D9%A7%D9%A2", "%EF%BC%97", "%00", "%0d%0a", "%1b[31m",
             "'%20OR%201=1--", "%3Cscript%3Ealert(1)%3C/script%3E", "%252F..%252F", "..%2F..%2Fetc%2Fpasswd",
             "%ff%fe", "%", "%zz", "1" * 300, "", " ", "\x7f"]
    fixed = [
        b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/1.1 x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40),  # a TLS hello on the plain port
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % n for n in range(120)) + b"\r\n",
        b"POST /update HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nx",
        b"POST /update HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /update.json HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":[",
        b"GET /channels/99999999999/feeds.json HTTP/1.1\r\n\r\n",
        b"GET /api/readings?since=%00&limit=-1 HTTP/1.1\r\n\r\n",
        b"GET /update?api_key=" + b"k" * 5000 + b"&field1=1 HTTP/1.1\r\n\r\n",
        b"DELETE /update HTTP/1.1\r\n\r\n", b"BREW / HTCPCP/1.0\r\n\r\n",
        b"GET http://evil.example/update/x HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ]
    while True:
        for raw in fixed:
            yield raw
        for bad in nasty:
            parts = list(segments)
            idx = rng.randrange(4)
            parts[idx] = parts[idx].split("=")[0] + "=" + bad
            yield get("/update/" + "/".join(parts))
            yield get("/api/readings?mac=%s&field=%s" % (bad, bad))
            yield get("/channels/1/fields/1.json?results=%s&timezone=%s" % (bad, bad))
            yield get("/update?api_key=%s&field1=%s" % (bad, bad))


async def slowloris(count, server, stats, end):
    """Connections that send a header byte now and then and never finish the request."""
    async def one(n):
        while time.monotonic() < end:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(HOST, server.port, local_addr=(SLOW_FROM, 0))
                stats.statuses["slowloris"]["opened"] += 1
                writer.write(b"GET / HTTP/1.1\r\nHost: slow\r\n")
                while time.monotonic() < end:
                    await asyncio.sleep(2)
                    writer.write(b"X")
                    await writer.drain()
                    if reader.at_eof():
                        break
            except OSError:
                stats.statuses["slowloris"]["dropped by server"] += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writer.close()

    await asyncio.gather(*(one(n) for n in range(count)))


async def readers(server, stats, end):
    paths = ["/", "/api/latest", "/api/readings.csv?limit=500", "/channels/1/feeds.json?results=50",
             "/channels/1/fields/1/last.txt"]
    i = 0
    while time.monotonic() < end:
        sent = time.monotonic()
        status = await request(get(paths[i % len(paths)]), READERS_FROM, server.port)
        stats.statuses["reader"][status] += 1
        if status >= 500 and not (status == 503 and stats.in_lock(sent)):
            stats.bad_5xx.append(("reader", status, round(sent - stats.started, 1), paths[i % len(paths)]))
        i += 1
        await asyncio.sleep(0.1)


def _body(head, data):
    """The body of a whole HTTP answer, or None when it was cut off (by Content-Length or chunked framing)."""
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if length:
        return data if len(data) == int(length.group(1)) else None
    if not re.search(rb"\r\ntransfer-encoding: *chunked", head, re.I):
        return data  # delimited by the close: no way to tell
    out, pos = bytearray(), 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0] or b"x", 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2
        if pos > len(data):
            return None


async def heavy_reader(n, server, stats, end):
    """Export the largest /api/readings answer again and again (JSON and CSV in turn), reading it whole."""
    fmt = ("json", "csv")[n % 2]
    while time.monotonic() < end - 5:
        sent = time.monotonic()
        writer, status, rows = None, 0, None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, server.port, local_addr=(HEAVY_FROM, 0)), 20)
            writer.write(get("/api/readings?limit=%d&format=%s" % (EXPORT_ROWS, fmt)))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = int(re.match(rb"HTTP/1\.[01] (\d{3}) ", head).group(1))
            body = _body(head, await asyncio.wait_for(reader.read(), 120))
            if body is not None and status == 200:
                rows = body.count(b"\n") - 1 if fmt == "csv" else body.count(b'"mac"')
        except (OSError, AttributeError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            if writer is not None:
                writer.close()
        stats.statuses["heavy reader"][status] += 1
        if status >= 500 and not (status == 503 and stats.in_lock(sent)):
            stats.bad_5xx.append(("heavy reader", status, round(sent - stats.started, 1), fmt))
        stats.exports.append((fmt, status, rows, round(time.monotonic() - sent, 1),
                              stats.in_fault(sent) or stats.in_fault(time.monotonic())))
        await asyncio.sleep(1.0)
        fmt = "csv" if fmt == "json" else "json"


def hold_write_lock(db, seconds):
    """Another process holds the write lock longer than the server will wait for it."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


async def faults(args, server, stats, end, report):
    """SIGTERM and restart, a held write lock, a prune, kill -9 and restart: at seeded moments."""
    rng = random.Random(args.seed)
    await asyncio.sleep(args.interval + 1)  # after the stations registered
    span = end - time.monotonic()
    plan = sorted([(0.15 + 0.1 * rng.random(), "sigterm"), (0.35 + 0.05 * rng.random(), "lock"),
                   (0.55 + 0.05 * rng.random(), "prune"), (0.7 + 0.1 * rng.random(), "kill9")])
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    for at, kind in plan:
        await asyncio.sleep(max(0.0, start + at * span - time.monotonic()))
        began = time.monotonic()
        if kind in ("sigterm", "kill9"):
            window = [began, float("inf"), kind]  # open until the server is back
            stats.fault_windows.append(window)
        if kind == "sigterm":
            code = await loop.run_in_executor(None, stop, server, signal.SIGTERM)
            report["faults"].append("SIGTERM at %.0f s: exit %d" % (began - stats.started, code))
            await loop.run_in_executor(None, server.start)
        elif kind == "kill9":
            await loop.run_in_executor(None, stop, server, signal.SIGKILL)
            report["faults"].append("kill -9 at %.0f s" % (began - stats.started))
            await loop.run_in_executor(None, server.start)
        elif kind == "lock":
            held = BUSY_TIMEOUT + 2
            stats.fault_windows.append((began, began + held, "lock"))
            await loop.run_in_executor(None, hold_write_lock, server.db, held)
            report["faults"].append("write lock held by another process for %.0f s at %.0f s"
                                    % (held, began - stats.started))
        elif kind == "prune":
            proc = await loop.run_in_executor(None, lambda: subprocess.run(
                [sys.executable, IOTSERVER, "--db", server.db, "--prune-days", "30"], capture_output=True, text=True))
            report["prune"] = (proc.returncode, proc.stdout.strip(), proc.stderr.strip())
            report["faults"].append("prune in a second process at %.0f s: %s"
                                    % (began - stats.started, proc.stdout.strip() or proc.stderr.strip()))
        if kind in ("sigterm", "kill9"):
            window[1] = time.monotonic()


def startup_faults(tmp):
    """A missing directory and a corrupt file: a clear message, an exit status, nothing replaced."""
    results = []
    missing = subprocess.run([sys.executable, IOTSERVER, "--db", os.path.join(tmp, "no", "dir", "x.db"),
                              "--port", "0"], capture_output=True, text=True, timeout=30)
    results.append(("missing directory", missing.returncode != 0 and "does not exist" in missing.stderr,
                    missing.stderr.strip()))
    corrupt = os.path.join(tmp, "corrupt.db")
    with open(corrupt, "wb") as f:
        f.write(b"SQLite format 3\x00" + os.urandom(8192))
    before = open(corrupt, "rb").read()
    proc = subprocess.run([sys.executable, IOTSERVER, "--db", corrupt, "--port", "0"], capture_output=True,
                          text=True, timeout=30)
    results.append(("corrupt database", proc.returncode != 0 and "iotserver:" in proc.stderr
                    and open(corrupt, "rb").read() == before, proc.stderr.strip()))
    return results


def seed_history(db, count):
    """Old readings (40 days) for the prune to remove."""
    conn = sqlite3.connect(db)
    old = int(time.time() * 1000) - 40 * 86_400_000
    with conn:
        conn.execute("INSERT INTO stations (mac, name, created_at, write_key) VALUES "
                     "('02:00:00:00:00:01', 'history', 0, 'AAAABBBBCCCCDDDD')")
        sid = conn.execute("SELECT id FROM stations WHERE mac = '02:00:00:00:00:01'").fetchone()[0]
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, 1, ?, ?)",
                         ((sid, i * 0.5, old + i) for i in range(count)))
    conn.close()


def seed_recent(db, count):
    """Readings of the last 23 hours, enough for the heavy readers' largest answer."""
    conn = sqlite3.connect(db)
    now = int(time.time() * 1000)
    step = 23 * 3_600_000 // count
    with conn:
        conn.execute("INSERT INTO stations (mac, name, created_at, write_key) VALUES "
                     "('02:00:00:00:00:02', 'recent', 0, 'EEEEFFFFGGGGHHHH')")
        sid = conn.execute("SELECT id FROM stations WHERE mac = '02:00:00:00:00:02'").fetchone()[0]
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, 1, ?, ?)",
                         ((sid, round(20 + (i % 100) / 10, 1), now - (count - i) * step) for i in range(count)))
    conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=200, help="legitimate stations simulated")
    parser.add_argument("--seconds", type=int, default=60, help="length of the run")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a station's posts")
    parser.add_argument("--slow", type=int, default=200, help="idle/slow (slowloris) connections held open")
    parser.add_argument("--heavy", type=int, default=3,
                        help="clients exporting %d readings (/api/readings) again and again" % EXPORT_ROWS)
    parser.add_argument("--seed", type=int, default=1, help="seed for the fault moments and hostile choices")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="iotserver-soak-")
    db, log_path = os.path.join(tmp, "soak.db"), os.path.join(tmp, "server.log")
    report = {"machine": "%s, %d cores" % (os.uname().sysname + " " + os.uname().release, os.cpu_count()),
              "stations": args.stations, "seconds": args.seconds, "faults": [], "checks": []}
    checks = report["checks"]

    for name, ok, message in startup_faults(tmp):
        checks.append(("start-up with a %s fails clearly" % name, ok, message.splitlines()[-1] if message else ""))

    # stations post 2 fields per interval; the per-station limit leaves room but not for a flood
    per_minute = 2 * 60 / args.interval
    server = RunningServer(db, ["--api-key", KEY, "--rate", "%g" % (per_minute * 2), "--burst", "6", "--timeout", "5",
                                "--max-stations", str(args.stations + 25)]
                           + ([] if os.environ.get("SOAK_VERBOSE") else ["--quiet"]), host=HOST, log_path=log_path)
    history = max(10_000, args.stations * 100)
    seed_history(db, history)
    if args.heavy:
        seed_recent(db, EXPORT_ROWS)
    stats = Stats()
    stop_rss, peak = threading.Event(), [0]
    threading.Thread(target=peak_rss_watch, args=(server, stop_rss, peak), daemon=True).start()
    rng = random.Random(args.seed)
    end = time.monotonic() + args.seconds
    malformed = malformed_requests(rng)

    async def run():
        hostile_end = end - 2
        tasks = [asyncio.create_task(station(i, args, server, stats, end)) for i in range(args.stations)]
        tasks.append(asyncio.create_task(faults(args, server, stats, end - 3, report)))
        # the stations have been registered for years; the hostile traffic starts once they have posted
        await asyncio.sleep(args.interval + 1)
        tasks += [
            hostile("brute-force key", BRUTE_FROM, lambda: get("/update/API_key=%s/mac=6c:ef:7a:3b:9d:e8/field=1/"
                                                                "data=1" % os.urandom(9).hex()), 40, server, stats,
                    hostile_end),
            hostile("random-MAC flood", FLOOD_FROM, lambda: get("/update/API_key=%s/mac=%s/field=1/data=1" % (
                KEY, ":".join("%02x" % rng.randrange(256) for _ in range(6)))), 60, server, stats, hostile_end),
            hostile("malformed", MALFORMED_FROM, lambda: next(malformed), 60, server, stats, hostile_end),
            slowloris(args.slow, server, stats, hostile_end),
            readers(server, stats, end),
        ] + [heavy_reader(n, server, stats, end) for n in range(args.heavy)]
        await asyncio.gather(*tasks)

    asyncio.run(run())
    time.sleep(0.5)
    report["sigterm_exit"] = stop(server, signal.SIGTERM)
    stop_rss.set()

    # -- checks --------------------------------------------------------------------------------
    conn = sqlite3.connect(db)
    stored = collections.Counter(conn.execute(
        "SELECT s.mac, r.field, r.value FROM readings r JOIN stations s ON s.id = r.station_id "
        "WHERE s.mac LIKE '0a:00:%'").fetchall())
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    acked = collections.Counter(stats.acked)
    lost = [r for r in acked if stored[r] == 0]
    twice = [r for r in acked if stored[r] > 1]
    unanswered = sum(n for r, n in stored.items() if r not in acked)
    # starved: fewer than 95 % of its posts accepted outside the fault windows (one unlucky miss forgiven,
    # which matters only in a short run where a station makes ten posts)
    starved = {mac: (stats.accepted[mac], n) for mac, n in stats.attempts.items()
               if stats.accepted[mac] < 0.95 * n - 1}
    log = server.log
    legit_429 = stats.statuses["station"][429]
    whole = [e for e in stats.exports if e[1] == 200 and e[2] == EXPORT_ROWS]
    short = [e[:4] for e in stats.exports if e[2] != EXPORT_ROWS and not e[4]]
    checks += [
        ("every reading answered 200 is stored", not lost, "%d lost" % len(lost)),
        ("no reading stored twice", not twice, "%d twice" % len(twice)),
        ("no 5xx but the deliberate 503s", not stats.bad_5xx, stats.bad_5xx[:5]),
        ("no station starved (>= 95% accepted outside fault windows, one miss forgiven)", not starved,
         "%d starved %s; failed posts (at s, took s, status, mac): %s"
         % (len(starved), list(starved.items())[:3], stats.failures[:8])),
        ("no station rate-limited by others' traffic", legit_429 == 0, "%d x 429" % legit_429),
        ("the prune removed the old readings", report.get("prune", (1,))[0] == 0
         and "pruned %d" % history in report.get("prune", ("", ""))[1], report.get("prune")),
        ("SIGTERM exits 0", all(code == 0 for name, code in server.exits if name == "SIGTERM"), server.exits),
        ("PRAGMA integrity_check", integrity == "ok", integrity),
        ("the key is in no log", KEY not in log, ""),
        ("no traceback in the log", "Traceback" not in log, ""),
        ("peak RSS under 256 MB (the unit's MemoryMax)", peak[0] < 256 * 1024, "%.1f MB" % (peak[0] / 1024)),
    ]
    if args.heavy:
        checks.append(("every export outside the fault windows answered 200, whole, %d rows" % EXPORT_ROWS,
                       whole and not short, "%d whole; not (format, status, rows, seconds): %s"
                       % (len(whole), short[:5])))
    report.update(
        acknowledged=len(stats.acked), verified=len(stats.acked) - len(lost), lost=len(lost),
        stored_without_answer=unanswered, peak_rss_mb=round(peak[0] / 1024, 1),
        requests={kind: dict(counter) for kind, counter in stats.statuses.items()},
        deliberate_503=stats.statuses["station"][503], heavy_readers=args.heavy,
        whole_exports=len(whole),
    )

    print("iotserver soak: %d stations for %d s on %s" % (args.stations, args.seconds, report["machine"]))
    print("  readings answered 200: %d, verified in the database: %d, lost: %d, stored without an answer "
          "(in flight at kill -9 / timeouts): %d" % (report["acknowledged"], report["verified"], report["lost"],
                                                     unanswered))
    print("  station answers: %s" % dict(stats.statuses["station"]))
    for kind in ("brute-force key", "random-MAC flood", "malformed", "slowloris", "reader", "heavy reader"):
        print("  %-17s %s" % (kind + ":", dict(stats.statuses[kind])))
    print("  faults: %s" % "; ".join(report["faults"]))
    print("  fault windows: %s" % ["%s %.1f-%.1f s" % (k, a - stats.started, b - stats.started)
                                   for a, b, k in stats.fault_windows])
    took = sorted(e[3] for e in whole)
    print("  exports of %d rows answered whole: %d%s" % (
        EXPORT_ROWS, len(took), ", %.1f-%.1f s each (median %.1f)" % (took[0], took[-1], took[len(took) // 2])
        if took else ""))
    print("  peak RSS of the server: %.1f MB (%d heavy readers)" % (peak[0] / 1024, args.heavy))
    failed = 0
    for name, ok, detail in checks:
        print("  [%s] %s%s" % ("ok" if ok else "FAIL", name, "" if ok else ": %s" % (detail,)))
        failed += not ok
    report["checks"] = [(name, bool(ok), str(detail)) for name, ok, detail in checks]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("%d passed, %d failed" % (len(checks) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
