"""What is on disk: durability across kill -9, the key across restarts, the schema, bad databases."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from conftest import FAST, IOTSERVER, MAC, MAC2, cli


def test_every_200_survives_kill_9(start, tmp_path):
    server = start(*FAST)
    acknowledged = []
    stop = threading.Event()

    def station(mac, base):
        i = 0
        while not stop.is_set() and i < 2000:
            try:
                if server.update("%d.5" % (base + i), mac=mac)[0] == 200:
                    acknowledged.append((mac, float("%d.5" % (base + i))))
            except OSError:
                return  # the server died under us: that answer never came
            i += 1

    threads = [threading.Thread(target=station, args=(m, b)) for m, b in ((MAC, 0), (MAC2, 10000))]
    for t in threads:
        t.start()
    while len(acknowledged) < 200:
        threads[0].join(0.01)
    server.proc.send_signal(signal.SIGKILL)  # mid-stream, requests in flight
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    restarted = start(db=tmp_path / "iotserver.db")
    stored = [(m, v) for m, _, v, _ in restarted.rows()]
    missing = set(acknowledged) - set(stored)
    assert not missing, "answered 200 but lost: %s" % sorted(missing)[:5]
    assert len(stored) == len(set(stored))  # nothing twice
    assert restarted.update("1.0")[0] == 200


def test_restart_keeps_the_key(start, tmp_path):
    server = start()
    key = server.key
    assert server.update()[0] == 200
    assert server.stop() == 0
    again = start(db=tmp_path / "iotserver.db")
    assert again.key == key
    assert again.update(key=key)[0] == 200
    assert len(again.rows()) == 2


def test_schema_is_versioned_and_in_wal_mode(server):
    assert server.update()[0] == 200
    assert server.rows("PRAGMA user_version") == [(3,)]
    assert server.rows("PRAGMA journal_mode") == [("wal",)]
    plan = " ".join(str(r) for r in server.rows(
        "EXPLAIN QUERY PLAN SELECT value FROM readings WHERE station_id = 1 AND field = 1 ORDER BY ts DESC LIMIT 1"))
    assert "SEARCH samples USING PRIMARY KEY (station_id=? AND field=?)" in plan


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(db), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "schema 99" in proc.stderr


def test_corrupt_database_is_refused_not_replaced(tmp_path):
    db = tmp_path / "iotserver.db"
    db.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(db), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "not a database" in proc.stderr
    assert db.read_bytes().startswith(b"this is not a database")


def test_missing_directory_is_a_clear_error(tmp_path):
    db = tmp_path / "no" / "such" / "dir" / "iotserver.db"
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(db), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr
    assert not db.parent.exists()


def test_admin_action_on_missing_database_does_not_create_one(tmp_path):
    proc = cli(tmp_path / "typo.db", "--stations", check=False)
    assert proc.returncode != 0 and "no database" in proc.stderr
    assert not (tmp_path / "typo.db").exists()


def test_port_in_use_is_a_clear_error(server, tmp_path):
    proc = subprocess.run([sys.executable, str(IOTSERVER), "--db", str(tmp_path / "other.db"),
                           "--port", str(server.port)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "cannot start" in proc.stderr and "in use" in proc.stderr
    assert "--port" in proc.stderr and str(server.port) in proc.stderr  # which port, and what to do


def test_default_database_is_created_in_the_working_directory(tmp_path):
    env = dict(os.environ)
    env.pop("IOTSERVER_API_KEY", None)
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--port", "0"], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        first = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in first
        assert str(tmp_path / "iotserver.db") in first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert (tmp_path / "iotserver.db").exists()


def test_a_version_1_database_migrates_on_start_and_keeps_its_readings(start, tmp_path):
    sys.path.insert(0, str(IOTSERVER.parent))
    import iotserver
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    with conn:
        for statement in iotserver.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO stations (mac, name, created_at) VALUES (?, 'Old one', 0)", (MAC,))
        conn.execute("INSERT INTO settings VALUES ('api_key', 'the-old-key-1234')")
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (1, 1, ?, ?)",
                         [(20.0 + i, 1_700_000_000_000 + i) for i in range(3)])
    conn.close()
    server = start(*FAST, db=db)
    assert server.rows("PRAGMA user_version") == [(3,)]
    [(key,)] = server.rows("SELECT write_key FROM stations")
    assert len(key) == 16 and key.isalnum() and key.upper() == key
    assert server.update("24.0", key="the-old-key-1234")[0] == 200
    assert [r[2] for r in server.rows()] == [20.0, 21.0, 22.0, 24.0]
    assert server.rows("PRAGMA integrity_check") == [("ok",)]


def test_a_full_disk_answers_503_loses_nothing_and_recovers(start, tmp_path):
    """The database on a tiny file system that fills up (a tmpfs; needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI runs as root and must be able to mount a tmpfs: %s" % mounted.stderr)
        import pytest
        pytest.skip("cannot mount a tmpfs here (not root): %s" % mounted.stderr.strip())
    try:
        server = start(*FAST, db=disk / "iotserver.db")
        assert server.update("0")[0] == 200
        with open(disk / "filler", "wb") as filler:  # take every free block
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        answered, refused = [], 0
        for i in range(1, 5000):
            status, headers, body = server.update("%d" % i)
            assert status in (200, 503), (status, body)
            if status == 200:
                answered.append(float(i))
            else:
                refused += 1
                assert "nothing stored" in body and int(headers["retry-after"]) > 0
                if refused >= 3:
                    break
        assert refused >= 3, "the full disk never refused a write"
        assert server.proc.poll() is None  # still up
        os.unlink(disk / "filler")
        time.sleep(1.2)  # past the fail-fast second
        assert server.update("99999")[0] == 200  # recovered without a restart
        assert server.stop() == 0
        stored = [v for _, _, v, _ in server.rows()]
        assert stored == [0.0] + answered + [99999.0]  # every 200 on disk, nothing refused stored
        assert server.rows("PRAGMA integrity_check") == [("ok",)]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
