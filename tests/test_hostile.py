"""Hostile and careless requests (issue #14): each test is named after what a user would notice."""

import http.client
import json
import re
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse

import pytest

from conftest import FAST, IOTSERVER, MAC, MAC2, cli

sys.path.insert(0, str(IOTSERVER.parent))
import iotserver  # noqa: E402

DAY_MS = 86_400_000
#: Times no measurement can have: year 0 in UTC (what 0001-01-01T00:00:00+01:00 is), 0001-01-02, 1969, year 10000.
BOGUS_MS = (-62_135_600_400_000, -62_135_510_400_000, -1_000, 253_402_300_800_000)


def _now_ms():
    return int(time.time() * 1000)


def _fill(server, rows, mac=MAC):
    """``rows`` readings of field 1 over the last 23 hours, written by another process (like an import)."""
    assert server.update("20.0", mac=mac)[0] == 200  # the station registers as in the field
    station = server.rows("SELECT id FROM stations WHERE mac = ?", (mac,))[0][0]
    now = _now_ms()
    step = 23 * 3_600_000 // rows
    with sqlite3.connect(str(server.db), timeout=10) as conn:
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, 1, ?, ?)",
                         ((station, i % 400 / 10, now - (rows - i) * step) for i in range(rows)))
    conn.close()
    return station


def _since():
    return urllib.parse.quote(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86_400)))


def _export_path(fmt="json", limit=100_000):
    return "/api/readings?limit=%d&since=%s&format=%s" % (limit, _since(), fmt)


def _read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _raw(server, data, timeout=15):
    """Send bytes on a new connection; return all the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_all(sock)


def _slow_reader(server, path):
    """A client that asks for ``path`` and then never reads: a tiny receive window, the status line only."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return sock, sock.recv(12)


def _at_once(server, requests, source="127.0.0.1"):
    """Send each raw request on its own connection, all finished at the same moment; return the statuses."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(source, 0))
             for _ in requests]
    for sock, request in zip(socks, requests):
        sock.sendall(request[:-2])  # everything but the blank line's end
    for sock in socks:
        sock.sendall(b"\r\n")
    statuses = []
    for sock in socks:
        statuses.append(int(sock.recv(64).split(b" ")[1]))
        sock.close()
    return statuses


def _channel(server, mac=MAC):
    out = cli(server.db, "--channel-key", mac).stdout
    channel, key = re.search(r"channel (\d+) \(.*\) write key: ([0-9A-F]{16})", out).groups()
    return int(channel), key


# -- 1. big reads: answers streamed, memory bounded ---------------------------------------------------------


def test_a_100k_row_export_arrives_whole_and_streamed_as_json_and_csv(server):
    _fill(server, 100_000)
    for fmt in ("json", "csv"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", _export_path(fmt))
        resp = conn.getresponse()
        # sent as it is read (chunked), not built whole in memory first
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked", fmt
        assert resp.getheader("Content-Length") is None
        body = resp.read().decode()
        conn.close()
        if fmt == "json":
            rows = json.loads(body)
            assert len(rows) == 100_000 and rows[0]["mac"] == MAC and rows[-1]["value"] == 39.9
        else:
            lines = body.splitlines()
            assert lines[0] == "time,mac,name,field,value,unit" and len(lines) == 100_001
    # an HTTP/1.0 client gets the answer delimited by the end of the connection
    answer = _raw(server, b"GET %s HTTP/1.0\r\n\r\n" % _export_path("csv").encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length" not in head and b"chunked" not in head
    assert len(body.splitlines()) == 100_001
    # small answers keep their Content-Length (simple clients such as a microcontroller's need it)
    status, headers, body = server.request("/api/readings?limit=10")
    assert status == 200 and int(headers["content-length"]) == len(body.encode()) and len(json.loads(body)) == 10


def test_too_many_exports_at_once_get_503_but_stations_and_small_reads_go_on(start):
    server = start("--timeout", "5", *FAST)
    _fill(server, 100_000)
    readers = [_slow_reader(server, _export_path()) for _ in range(iotserver.HEAVY_READS)]
    assert [first for _, first in readers] == [b"HTTP/1.1 200"] * iotserver.HEAVY_READS
    status, headers, body = server.request(_export_path("csv"))
    assert status == 503 and int(headers["retry-after"]) >= 1 and "busy" in body
    assert server.request("/api/readings?limit=10")[0] == 200  # a small answer is never held up
    assert server.update("21.5", mac=MAC2)[0] == 200
    # readers that stop reading are let go after --timeout, and their places with them
    deadline = time.monotonic() + 30
    while server.request(_export_path("csv"))[0] != 200:
        assert time.monotonic() < deadline, "stalled readers still hold the export slots"
        time.sleep(0.5)
    for sock, _ in readers:
        sock.close()


def test_a_client_that_hangs_up_mid_export_leaves_no_read_open(server):
    _fill(server, 100_000)
    for _ in range(iotserver.HEAVY_READS + 2):
        sock, first = _slow_reader(server, _export_path())
        assert first == b"HTTP/1.1 200"
        sock.recv(1000)
        sock.close()  # the server finds out at its next write
    # nothing holds a read transaction: a checkpoint in another process can finish, an export can start
    deadline = time.monotonic() + 20
    while True:
        with sqlite3.connect(str(server.db), timeout=10) as conn:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        conn.close()
        if not busy:
            break
        assert time.monotonic() < deadline, "an abandoned export still holds its read snapshot"
        time.sleep(0.2)
    status, _, body = server.request(_export_path("csv", 1000))
    assert status == 200 and len(body.splitlines()) == 1001


def test_a_big_thingspeak_feed_arrives_whole_and_streamed(server):
    station = _fill(server, 30_000)
    channel, _ = _channel(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/channels/%d/feeds.json?results=8000" % channel)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    feed = json.loads(resp.read())
    conn.close()
    newest = server.rows("SELECT ts, value FROM readings WHERE station_id = ? ORDER BY ts DESC LIMIT 8000",
                         (station,))[::-1]  # an entry is known by its time
    assert [(f["entry_id"], f["field1"]) for f in feed["feeds"]] == [(ts, iotserver._ts_value(v)) for ts, v in newest]
    assert feed["channel"]["id"] == channel
    status, _, body = server.request("/channels/%d/fields/1.csv?results=8000" % channel)
    assert status == 200 and len(body.splitlines()) == 8001


# -- 2. and 11. the wrong-key throttle cannot be raced, and counts an IPv6 /64 as one client ----------------


def test_150_wrong_keys_sent_at_once_are_not_all_checked(server):
    request = b"GET /update/API_key=guess-%03d/mac=" + MAC.encode() + b"/field=1/data=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    statuses = _at_once(server, [request % i for i in range(150)])
    assert statuses.count(401) <= iotserver.KEY_FAILURE_BURST and statuses.count(429) >= 150 - iotserver.KEY_FAILURE_BURST
    assert server.rows() == []


def test_150_wrong_write_keys_sent_at_once_are_not_all_checked(start):
    server = start("--api-key", "station-key-123", *FAST)
    assert server.update("20", key="station-key-123")[0] == 200
    request = b"GET /update?api_key=%016X&field1=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    statuses = _at_once(server, [request % i for i in range(150)])
    assert statuses.count(401) <= iotserver.KEY_FAILURE_BURST and statuses.count(429) >= 150 - iotserver.KEY_FAILURE_BURST
    assert len(server.rows()) == 1


def test_a_station_posting_often_with_the_right_key_is_never_throttled(server):
    answers = _at_once(server, [b"GET /update/API_key=%s/mac=%s/field=1/data=%d HTTP/1.1\r\nHost: x\r\n\r\n"
                                % (server.key.encode(), MAC.encode(), i) for i in range(40)])
    assert answers == [200] * 40 and len(server.rows()) == 40


def test_one_ipv6_network_gets_the_guesses_of_one_client(server):
    # behind nginx (a trusted proxy), X-Real-IP names the client; a /64 is one customer's network
    def guess(address, i):
        return server.update(key="guess-%04d" % i, headers={"X-Real-IP": address})[0]

    answers = [guess("2001:db8:0:7::%x" % (i + 1), i) for i in range(iotserver.KEY_FAILURE_BURST)]
    assert answers == [401] * iotserver.KEY_FAILURE_BURST
    assert guess("2001:db8:0:7:ffff:ffff:ffff:ffff", 99) == 429
    assert guess("2001:db8:0:8::1", 99) == 401  # the next /64 is someone else
    assert guess("192.0.2.7", 99) == 401


# -- 3. measurement times that cannot be stored or shown -------------------------------------------------------

_BAD_TIMES = ("0001-01-01T00:00:00+01:00", "0001-01-01 00:00:00", "0001-01-01", "0000-12-31T23:00:00Z",
              "1969-12-31T23:59:59Z", "1970-01-01", "2019-12-30 23:59:59", "9999-12-31T23:59:59-12:00",
              "9999-12-31 23:59:59", "2999-01-01", "1700000000", "2026-02-30T00:00:00Z", "")
_ZONES = (None, "UTC", "Pacific/Kiritimati", "Etc/GMT+12", "Asia/Kathmandu")


def test_impossible_created_at_is_400_in_every_form_and_nothing_is_stored(server):
    assert server.update("20")[0] == 200
    channel, key = _channel(server)
    for text in _BAD_TIMES[:-1]:
        for zone in _ZONES:
            params = {"api_key": key, "field1": "1", "created_at": text}
            if zone:
                params["timezone"] = zone
            query = urllib.parse.urlencode(params)
            for path, method, body, content_type in (
                    ("/update?" + query, "GET", None, None),
                    ("/update.json?" + query, "GET", None, None),
                    ("/update", "POST", query, "application/x-www-form-urlencoded"),
                    ("/update.json", "POST", json.dumps(params), "application/json")):
                status, _, answer = server.request(path, method=method, body=body,
                                                   headers={"Content-Type": content_type} if content_type else {})
                assert status == 400 and "created_at" in answer, (text, zone, path, method, answer)
    assert len(server.rows()) == 1


def test_impossible_read_times_are_400_or_an_empty_answer_never_500(server):
    assert server.update("20")[0] == 200
    channel, _ = _channel(server)
    for text in _BAD_TIMES:
        quoted = urllib.parse.quote(text)
        for path in ("/api/readings?since=%s" % quoted, "/api/readings.csv?until=%s" % quoted,
                     "/api/readings?since=%s&until=%s" % (quoted, quoted)):
            assert server.request(path)[0] in (200, 400), path
        for zone in _ZONES:
            tz = "&timezone=%s" % urllib.parse.quote(zone) if zone else ""
            for name in ("start", "end"):
                for path in ("/channels/%d/feeds.json?%s=%s%s" % (channel, name, quoted, tz),
                             "/channels/%d/fields/1.csv?%s=%s%s" % (channel, name, quoted, tz),
                             "/channels/%d/fields/1/last.txt?%s=%s%s" % (channel, name, quoted, tz)):
                    assert server.request(path)[0] in (200, 400, 404), path
    assert "Traceback" not in server.log


def test_a_back_dated_row_already_in_the_database_breaks_no_read(start):
    server = start(*FAST)
    assert server.update("20")[0] == 200
    channel, _ = _channel(server)
    with sqlite3.connect(str(server.db)) as conn:  # written by an older iotserver, or by hand
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, 5, ?)",
                         [(channel, 1, ms) for ms in BOGUS_MS] + [(channel, 3, BOGUS_MS[0])])
    conn.close()
    everything = "since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59-12:00"
    paths = ("/", "/?fragment=1", "/?range=1y", "/station/%s?range=30d" % MAC, "/api/series?mac=%s&range=1y" % MAC,
             "/api/latest", "/api/advice", "/metrics", "/api/readings?" + everything, "/api/readings.csv?" + everything,
             "/channels/%d.json" % channel, "/channels/%d/feeds.json" % channel, "/channels/%d/feeds.csv" % channel,
             "/channels/%d/feeds.json?start=0001-01-02&timezone=Pacific/Kiritimati" % channel,
             "/channels/%d/fields/3.json?timezone=Etc/GMT%%2B12" % channel,
             "/channels/%d/fields/1/last.txt" % channel, "/channels/%d/feeds/last.json" % channel,
             "/channels/%d/fields/3/last_data_age.json" % channel)
    logs = []
    for restarted in (False, True):  # the finding: /api/latest stayed broken even after a restart
        if restarted:
            server.stop()
            server = start(*FAST, db=server.db)
        for path in paths:
            status, _, body = server.request(path)
            assert status in (200, 404), (path, status, body)
        latest = json.loads(server.request("/api/latest")[2])["stations"][0]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", f["time"])
                   for f in latest["fields"].values())
        times = [r["time"] for r in json.loads(server.request("/api/readings?" + everything)[2])]
        assert times[0] == "0001-01-02T00:00:00.000Z" and times[1] == "1969-12-31T23:59:59.000Z"
        assert times[-1] == "9999-12-30T00:00:00.000Z"  # year 10000 shown as the last day a date can hold
        logs.append(server.log)
    assert "Traceback" not in "".join(logs)
    assert cli(server.db, "--stations").returncode == 0


# -- 4. admin commands and a long read (sqlite3 ".backup") -----------------------------------------------------


def test_admin_commands_do_not_stall_stations_while_a_long_read_is_open(server):
    assert server.update("1")[0] == 200
    reader = sqlite3.connect(str(server.db), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM readings").fetchone()  # what sqlite3's .backup holds for its whole copy
    assert server.update("2")[0] == 200  # the WAL now has frames the reader does not see
    done = threading.Event()

    def admin():
        for args in (("--rename", MAC, "Garden"), ("--lock",), ("--stations",)):
            cli(server.db, *args)
        done.set()

    thread = threading.Thread(target=admin)
    thread.start()
    posts = []
    while not done.is_set():
        started = time.monotonic()
        posts.append((server.update("3")[0], time.monotonic() - started))
        time.sleep(0.05)
    thread.join()
    reader.execute("ROLLBACK")
    reader.close()
    assert {status for status, _ in posts} == {200}
    # a checkpoint waiting for the reader used to hold the write lock for 5 s at the end of every command
    assert max(took for _, took in posts) < 2.5, posts


# -- 5. input that used to raise inside the server -----------------------------------------------------------


@pytest.mark.parametrize("private", [False, True])
def test_twenty_one_query_parameters_are_400_not_500_on_every_read_path(start, private):
    server = start(*(("--private",) if private else ()), *FAST)
    assert server.update("20")[0] == 200
    query = "&".join("a=%d" % i for i in range(21))
    for path in ("/", "/api/latest", "/api/readings", "/api/readings.json", "/api/readings.csv",
                 "/channels/1.json", "/channels/1/feeds.json", "/channels/1/fields/1/last.txt"):
        for method in ("GET", "HEAD"):
            status, _, body = server.request("%s?%s" % (path, query), method=method)
            assert status < 500, (path, method, status, body)
            parses_query = path == "/" or path.startswith("/api/readings") or private and path == "/api/latest"
            if method == "GET" and parses_query:
                assert status == 400, (path, status, body)
    assert "Traceback" not in server.log


def test_a_json_body_nested_5000_deep_is_400(server):
    for path in ("/update", "/update.json"):
        status, _, body = server.request(path, method="POST", body="[" * 5000 + "]" * 5000,
                                         headers={"Content-Type": "application/json"})
        assert status == 400, body
        status, _, body = server.request(path, method="POST", body='{"field1":' * 1400 + "1" + "}" * 1400,
                                         headers={"Content-Type": "application/json; charset=utf-8"})
        assert status == 400, body
    assert "Traceback" not in server.log and server.rows() == []


# -- 6. request framing: one body length, or none ---------------------------------------------------------------


def test_a_second_content_length_cannot_smuggle_a_reading(server):
    smuggled = (b"GET /update/API_key=%s/mac=%s/field=1/data=99 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                % (server.key.encode(), MAC.encode()))
    answer = _raw(server, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(smuggled), smuggled))
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1
    assert server.rows() == []


@pytest.mark.parametrize("framing", [
    b"Content-Length: %(n)d\r\nContent-Length: %(n)d",
    b"Content-Length: %(n)d, %(n)d",
    b"Content-Length: %(n)d\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nContent-Length: %(n)d",
    b"Content-Length: +%(n)d",
    b"Content-Length: -%(n)d",
    b"Content-Length: 0%(n)d 0",
    b"Content-Length: 99999999999999999999999999999999999999999",
    b"Content-Length:\r\n %(n)d",
    b"Content-Length: %(n)d\r\nX-Folded: a\r\n\tb",
])
def test_ambiguous_body_framing_is_400_and_the_connection_closed(server, framing):
    assert server.update("20")[0] == 200
    _, key = _channel(server)
    body = b"api_key=%s&field1=7" % key.encode()
    answer = _raw(server, b"POST /update HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                          b"%s\r\n\r\n%s" % (framing % {b"n": len(body)}, body))
    assert re.match(rb"HTTP/1.1 4\d\d ", answer) and answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer
    assert [r[2] for r in server.rows()] == [20.0]


# -- 7. slow readers cannot take every connection ----------------------------------------------------------------


def test_clients_that_never_read_a_big_answer_do_not_lock_stations_out(start):
    server = start("--max-connections", "5", "--timeout", "60", *FAST)
    _fill(server, 100_000)
    readers = [_slow_reader(server, _export_path("csv")) for _ in range(5)]
    time.sleep(0.5)
    assert server.update("21.5", mac=MAC2)[0] == 200
    for sock, _ in readers:
        sock.close()


# -- 8., 9. and 10. what a stranger can learn -------------------------------------------------------------------


def test_head_on_a_private_page_answers_without_rendering_it(start):
    server = start("--private", *FAST)
    status, headers, body = server.request("/", method="HEAD")
    assert status == 200 and body == ""
    empty = headers["content-length"]
    for i in range(5):
        assert server.update("2%d" % i, mac="02:00:00:00:00:%02x" % i)[0] == 200
    cli(server.db, "--rename", "02:00:00:00:00:01", "Bedroom of someone")
    status, headers, _ = server.request("/", method="HEAD")
    assert status == 200 and headers["content-length"] == empty  # the length tells nothing about the data
    assert server.request("/", method="GET")[0] == 401


def test_the_empty_page_shows_no_part_of_the_key(start):
    server = start("--api-key", "Zq9xW7vK3mTt")
    status, _, body = server.request("/")
    assert status == 200 and "No readings yet" in body and "/update/API_key=KEY/" in body.replace("<wbr>", "")
    assert not any("Zq9xW7vK3mTt"[i:i + 3] in body for i in range(10))


def test_percent_encoded_key_names_are_redacted_in_the_log(start):
    server = start("--private", *FAST)
    assert server.update("20")[0] == 200
    _, write_key = _channel(server)
    server.request("/?k%65y=SecretGuess1")
    server.request("/api/latest?%6B%65%79=SecretGuess2")
    assert server.request("/update?api_ke%%79=%s&field1=21" % write_key)[0] == 200
    server.request("/update?%%61pi%%5Fkey=%s&field1=22" % write_key)
    server.request("/channels/1/feeds.json?API_KEY=SecretGuess3")
    server.wait_for_log("API_KEY=")
    assert "SecretGuess" not in server.log and write_key not in server.log


def test_c1_control_bytes_are_escaped_in_the_log(server):
    _raw(server, b"GET /\x85next\x9b31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    server.wait_for_log(r"\\x85next\\x9b31m")
    assert "\x85" not in server.log and "\x9b" not in server.log


# -- 12. a retried ThingSpeak write -----------------------------------------------------------------------------


def test_a_retried_thingspeak_write_is_stored_once_with_the_same_entry_id(server):
    assert server.update("20")[0] == 200
    _, key = _channel(server)
    query = "/update?api_key=%s&field1=21.5&field2=1000&created_at=2026-01-02T03:04:05Z" % key
    first, second = server.request(query)[2], server.request(query)[2]
    assert first == second and int(first) > 0
    again = json.loads(server.request(query.replace("/update?", "/update.json?"))[2])
    assert again["entry_id"] == int(first)
    assert server.rows("SELECT field, value FROM readings WHERE ts = ?", (1767323045000,)) == [(1, 21.5), (2, 1000.0)]


# -- 13. the chart in every time zone ---------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Asia/Kathmandu", "Australia/Eucla", "Pacific/Chatham", "Asia/Kolkata", "UTC"])
def test_chart_hour_labels_show_in_zones_offset_by_quarter_hours(start, zone):
    server = start("--tz", zone, *FAST)
    assert server.update("20")[0] == 200
    svg = re.search(r"<svg.*</svg>", server.request("/")[2]).group(0)
    labels = re.findall(r'text-anchor="middle">(\d\d):(\d\d)</text>', svg)
    assert len(labels) >= 3 and all(m == "00" and int(h) % 6 == 0 for h, m in labels), labels


# -- 14. the command line and text that cannot be printed -------------------------------------------------------


def test_unprintable_names_are_refused_and_odd_paths_are_printed(server, tmp_path):
    assert server.update("20")[0] == 200
    for args in (("--rename", MAC, b"\xff"), ("--rename", MAC, "a\u202eb"), ("--add-channel", b"\xff\xfe")):
        proc = cli(server.db, *args, check=False)
        assert proc.returncode == 2 and "printable" in proc.stderr and "Traceback" not in proc.stderr
    target = bytes(tmp_path) + b"/copy-\xff.db"
    proc = cli(server.db, "--backup", target, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "copy-" in proc.stdout
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT count(*) FROM readings").fetchone()[0] == 1
    copy.close()
