"""Pruning old readings from cron while the server keeps ingesting."""

import sqlite3
import threading
import time

from conftest import FAST, MAC, MAC2, cli

DAY_MS = 86_400_000


def _seed_history(db, count, age_days):
    """Readings of two stations, ``age_days`` old, as a year of history would leave them."""
    conn = sqlite3.connect(db)
    now = int(time.time() * 1000)
    with conn:
        ids = [conn.execute("SELECT id FROM stations WHERE mac = ?", (m,)).fetchone()[0] for m in (MAC, MAC2)]
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, 1, ?, ?)",
                         ((ids[i % 2], i * 0.01, now - age_days * DAY_MS - i) for i in range(count)))
    conn.close()


def test_prune_while_ingesting(start):
    server = start(*FAST)
    assert server.update(mac=MAC)[0] == 200 and server.update(mac=MAC2)[0] == 200
    _seed_history(server.db, 60_000, age_days=100)
    _seed_history(server.db, 1_000, age_days=30)  # younger than the cut: kept
    answers = []
    stop = threading.Event()

    def station(mac):
        while not stop.is_set():
            answers.append(server.update("21.0", mac=mac)[0])

    threads = [threading.Thread(target=station, args=(m,)) for m in (MAC, MAC2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    proc = cli(server.db, "--prune-days", "90")
    stop.set()
    for t in threads:
        t.join()
    assert proc.stdout.strip() == "pruned 60000 readings older than 90 days"
    assert set(answers) == {200}, "a station saw %s during the prune" % (set(answers) - {200})
    assert "locked" not in server.log
    cutoff = int(time.time() * 1000) - 90 * DAY_MS
    assert server.rows("SELECT count(*) FROM readings WHERE ts < ?", (cutoff,)) == [(0,)]
    kept = server.rows("SELECT count(*) FROM readings")[0][0]
    assert kept == 1_000 + 2 + len(answers)


def test_prune_with_nothing_old_prints_zero(server):
    assert server.update()[0] == 200
    assert cli(server.db, "--prune-days", "1").stdout.strip() == "pruned 0 readings older than 1 days"
    assert len(server.rows()) == 1


def test_prune_rejects_nonsense(server):
    for bad in ("0", "-5", "abc", "nan"):
        proc = cli(server.db, "--prune-days", bad, check=False)
        assert proc.returncode == 2, bad
    assert server.update()[0] == 200
