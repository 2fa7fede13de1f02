#!/usr/bin/env python3
"""Benchmark: ingest throughput and p99 latency of the real server, driven by wrk.

    python3 bench/ingest.py [--seconds 10] [--connections 32]

Starts iotserver.py on a free loopback port with a fresh database, posts one
station URL as fast as wrk can (keep-alive, then a new connection per request
like an ESP8266), and checks the database holds every reading answered 200.
Needs wrk (apt-get install wrk). Prints figures; asserts nothing.
"""

import argparse
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from launcher import RunningServer  # noqa: E402

KEY = "bench-key-0123456789"


def wrk(url, seconds, connections, close):
    cmd = ["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, "--latency", url]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1),
        "p99": re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1),
        "requests": requests,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "none",
    }


def count(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    finally:
        conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/ingest.py needs wrk: apt-get install wrk")
    print("machine: %s, %d cores, Python %s" % (platform.platform(), os.cpu_count(), platform.python_version()))
    for close in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "bench.db")
            server = RunningServer(db, ["--quiet", "--api-key", KEY, "--rate", "1e9", "--burst", "1000000000"])
            try:
                url = "%s/update/API_key=%s/mac=6c:ef:7a:3b:9d:e8/field=1/data=21.4" % (server.url, KEY)
                result = wrk(url, args.seconds, args.connections, close)
                time.sleep(0.5)
                stored = count(db)
            finally:
                server.stop(timeout=30)
            mode = "new connection per request" if close else "keep-alive"
            print("%-27s %2d clients: %7.0f stored readings/s  p50 %s  p99 %s  (%d answered, %d non-2xx, "
                  "%d in the database, socket errors: %s)"
                  % (mode, args.connections, result["rps"] * (1 - result["non2xx"] / max(1, result["requests"])),
                     result["p50"], result["p99"], result["requests"], result["non2xx"], stored,
                     result["socket_errors"]))


if __name__ == "__main__":
    main()
