"""History that lasts: rollups, pruning that keeps them, the compact schema and its migration, /api/series."""

import datetime
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FAST, IOTSERVER, MAC, MAC2, cli
from test_bulk import post_json
from test_thingspeak import channel_of

HOUR, DAY = 3_600_000, 86_400_000
RANGES = {"7d": (7 * DAY, HOUR), "30d": (30 * DAY, 6 * HOUR), "1y": (365 * DAY, DAY)}


def series(server, mac=MAC, field=1, range_name="24h"):
    status, headers, body = server.request("/api/series?mac=%s&field=%d&range=%s" % (mac, field, range_name))
    assert status == 200 and headers["content-type"] == "application/json", body
    return json.loads(body)


def expected_points(server, mac, field, range_name):
    """The chart's points recomputed from the raw readings: {bucket start ms: (min, mean, max, count)}."""
    span, bucket = RANGES[range_name]
    first = (int(time.time() * 1000) - span) // bucket * bucket
    buckets = {}
    for ts, value in server.rows("SELECT r.ts, r.value FROM readings r JOIN stations s ON s.id = r.station_id "
                                 "WHERE s.mac = ? AND r.field = ?", (mac, field)):
        if ts >= first:
            buckets.setdefault(ts // bucket * bucket, []).append(value)
    return {start: (min(v), math.fsum(v) / len(v), max(v), len(v)) for start, v in buckets.items()}


def shown_points(answer):
    return {_ms(p["time"]): (p["min"], p["mean"], p["max"], p["count"]) for p in answer["points"]}


def _ms(iso):
    return round(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def assert_same(shown, expected):
    assert shown.keys() == expected.keys()
    for start, (low, mean, high, count) in expected.items():
        got = shown[start]
        assert (got[0], got[2], got[3]) == (low, high, count), start
        assert math.isclose(got[1], mean, rel_tol=1e-9, abs_tol=1e-9), start


values = st.one_of(st.integers(-40, 1050).map(str), st.decimals(-50, 1100, places=2).map(str),
                   st.floats(-100, 1100, allow_nan=False).map(repr), st.sampled_from(["21.4375", "-0.0", "0", "1e-05"]))
ops = st.lists(st.one_of(
    st.tuples(st.just("station"), st.sampled_from([MAC, MAC2]), st.integers(1, 3), values),
    st.tuples(st.just("bulk"), st.sampled_from([MAC, MAC2]),
              st.lists(st.tuples(st.integers(60, 364 * 86400), st.dictionaries(st.integers(1, 3), values, min_size=1)),
                       min_size=1, max_size=8)),
    st.tuples(st.just("backdated"), st.sampled_from([MAC, MAC2]), st.integers(60, 40 * 86400), st.integers(1, 3), values),
), min_size=1, max_size=5)


@pytest.fixture
def history_server(start):
    """A server (°C on the page) with two stations and their ThingSpeak channels."""
    server = start("--unit", "C", *FAST)
    for mac in (MAC, MAC2):
        assert server.update("20", mac=mac)[0] == 200
    server.channels = {mac: channel_of(server, mac) for mac in (MAC, MAC2)}
    return server


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_rollups_equal_a_recomputation_from_the_raw_readings(history_server, steps):
    server = history_server
    now = int(time.time())
    for step in steps:
        if step[0] == "station":
            _, mac, field, value = step
            assert server.update(value, mac=mac, field=field)[0] == 200
        elif step[0] == "bulk":  # buffered entries, back-dated up to a year; sent twice, as after a lost answer
            _, mac, entries = step
            channel, key = server.channels[mac]
            call = {"write_api_key": key, "updates": [
                dict({"created_at": now - age}, **{"field%d" % f: v for f, v in fields.items()}) for age, fields in entries]}
            for _ in range(2):
                assert post_json(server, "/channels/%d/bulk_update.json" % channel, call)[0] == 202
        else:  # one ThingSpeak write with its measurement time
            _, mac, age, field, value = step
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - age))
            status, _, body = server.request("/update?api_key=%s&field%d=%s&created_at=%s"
                                             % (server.channels[mac][1], field, value, stamp))
            assert status == 200 and int(body) > 0
    for mac in (MAC, MAC2):
        for field in (1, 2, 3):
            for range_name in RANGES:
                assert_same(shown_points(series(server, mac, field, range_name)),
                            expected_points(server, mac, field, range_name))


def _bulk(server, mac, updates):
    channel, key = server.channels[mac]
    status, _, body = post_json(server, "/channels/%d/bulk_update.json" % channel, {"write_api_key": key, "updates": updates})
    assert status == 202, body


def _chart(body):
    return re.search(r'<svg class="chart".*?</svg>', body, re.S).group(0)


def _drawn(svg):
    """Points of the lines drawn in a chart."""
    return sum(len(points.split()) for points in re.findall(r'<polyline class="line [^"]+" points="([^"]*)"', svg))


def test_pruned_readings_stay_on_the_long_charts(history_server):
    server = history_server
    now = int(time.time())
    _bulk(server, MAC, [{"created_at": now - days * 86400, "field1": 10 + days / 10} for days in range(60, 240, 3)])
    year = series(server, MAC, 1, "1y")
    assert sum(p["count"] for p in year["points"]) == 61 and len(year["points"]) == 61
    before = _drawn(_chart(server.request("/?range=1y")[2]))
    assert before == 60  # the old months as one line (the fresh reading stands apart, as a dot)
    assert cli(server.db, "--prune-days", "30").stdout.strip() == "pruned 60 readings older than 30 days"
    raw = json.loads(server.request("/api/readings?mac=%s&since=2020-01-01T00:00:00Z" % MAC)[2])
    assert [r["value"] for r in raw] == [20.0]  # the readings are gone
    assert series(server, MAC, 1, "1y") == year  # their days are not
    page = server.request("/?range=1y")[2]
    assert _drawn(_chart(page)) == before and "Last year" in page
    assert 'class="band c0"' in _chart(page)  # the min–max band of the long ranges
    out = cli(server.db, "--prune-rollups-days", "30").stdout.strip()
    assert re.fullmatch(r"pruned \d+ hourly and daily rollups older than 30 days", out)
    assert [p["count"] for p in series(server, MAC, 1, "1y")["points"]] == [1]


def test_forget_removes_the_rollups_too(history_server):
    server = history_server
    _bulk(server, MAC, [{"created_at": int(time.time()) - 86400 * 50, "field1": 3}])
    assert server.rows("SELECT count(*) FROM rollups") == [(6,)]  # an hour and a day of each reading
    assert "forgot %s and 2 readings" % MAC in cli(server.db, "--forget", MAC).stdout
    assert server.rows("SELECT count(*) FROM rollups") == [(2,)]  # MAC2's only
    assert server.update("21", mac=MAC)[0] == 200  # registers anew, with an empty history
    assert [p["count"] for p in series(server, MAC, 1, "1y")["points"]] == [1]


def test_series_api(start):
    server = start("--unit", "F", *FAST)
    for value in ("20", "22", "24"):
        assert server.update(value)[0] == 200
    answer = series(server)
    assert (answer["mac"], answer["field"], answer["name"], answer["unit"], answer["range"]) == (MAC, 1, "Temperature", "°F", "24h")
    assert answer["bucket_seconds"] == 600
    [point] = answer["points"]
    assert (point["min"], point["mean"], point["max"], point["count"]) == (68.0, 71.6, 75.2, 3)
    assert point["time"].endswith("0:00.000Z")
    assert series(server, range_name="7d")["bucket_seconds"] == 3600
    for query, status, word in (("", 400, "mac"), ("mac=%s&range=2w" % MAC, 400, "range"), ("mac=%s&field=9" % MAC, 400, "field"),
                                ("mac=%s&colour=red" % MAC, 400, "colour"), ("mac=02:00:00:00:00:01", 404, "no station")):
        code, _, body = server.request("/api/series?" + query)
        assert code == status and word in body, (query, body)


def test_series_api_is_private_like_the_read_api(start):
    server = start("--private", *FAST)
    assert server.update("20")[0] == 200
    assert server.request("/api/series?mac=%s" % MAC)[0] == 401
    assert server.request("/station/%s" % MAC)[0] == 401
    status, _, body = server.request("/api/series?mac=%s&key=%s" % (MAC, server.key))
    assert status == 200 and json.loads(body)["points"][0]["count"] == 1


def _version_2(db, readings, stations=(MAC, MAC2)):
    """A database as iotserver 0.1 (schema 2) left it: [(station id, field, value, ts, entry)] readings."""
    sys.path.insert(0, str(IOTSERVER.parent))
    import iotserver
    conn = sqlite3.connect(db)
    with conn:
        for statements in iotserver.MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.executemany("INSERT INTO stations (mac, name, created_at, write_key) VALUES (?, ?, 0, ?)",
                         [(mac, "Station %d" % i, "%016X" % i) for i, mac in enumerate(stations)])
        conn.execute("INSERT INTO settings VALUES ('api_key', 'the-old-key-1234')")
        conn.executemany("INSERT INTO readings (station_id, field, value, ts, entry) VALUES (?, ?, ?, ?, ?)", readings)
    conn.close()


def test_a_version_2_database_is_converted_and_keeps_every_reading(start, tmp_path):
    db = tmp_path / "old.db"
    t = (int(time.time()) - 3 * 86400) * 1000
    odd = [21.4375, 1013.25, -3.0, 1e-07, 123456.789, 0.1 + 0.2, -12.5, 1e9, 2.5e-300]
    readings = [(1, 1, v, t + i * 60_000, None) for i, v in enumerate(odd)]
    readings += [(1, 1, 20.0, t + 3_600_000, None), (1, 1, 20.5, t + 3_600_000, None)]  # two in one millisecond
    readings += [(2, 1, 19.0 + i / 4, t + i * 600_000, None) for i in range(300)]  # two days, every 10 minutes
    _version_2(db, readings)
    with sqlite3.connect(db) as conn:  # a ThingSpeak entry of two fields: the second row points to the first
        first = conn.execute("INSERT INTO readings (station_id, field, value, ts) VALUES (2, 1, 7.5, ?)", (t + 5,)).lastrowid
        conn.execute("INSERT INTO readings (station_id, field, value, ts, entry) VALUES (2, 2, 990, ?, ?)", (t + 5, first))
    conn.close()
    server = start("--unit", "C", *FAST, db=db)
    assert "converting %s from schema 2 to 3" % db in server.log and "converted %s to schema 3" % db in server.log
    assert server.rows("PRAGMA user_version") == [(3,)] and server.rows("PRAGMA integrity_check") == [("ok",)]
    stored = json.loads(server.request("/api/readings?mac=%s&since=2020-01-01T00:00:00Z" % MAC)[2])
    assert [r["value"] for r in stored] == odd + [20.0, 20.5]  # every value exactly as posted, none lost
    assert stored[-1]["time"] == stored[-2]["time"]  # the pair of one millisecond, both at their time
    channel = server.rows("SELECT id FROM stations WHERE mac = ?", (MAC2,))[0][0]
    around = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t // 1000 + d)) for d in (0, 1)]
    feed = json.loads(server.request("/channels/%d/feeds.json?start=%s&end=%s" % ((channel,) + tuple(around)))[2])
    assert [(f["field1"], f["field2"]) for f in feed["feeds"]] == [("19", None), ("7.5", "990")]  # still one entry
    # the charts' rollups were built from the old readings
    assert_same(shown_points(series(server, MAC2, 1, "7d")), expected_points(server, MAC2, 1, "7d"))
    assert server.update("24.0", key="the-old-key-1234")[0] == 200  # and the server takes readings as before
    assert server.update("-0.0", key="the-old-key-1234")[0] == 200
    newest = json.loads(server.request("/api/readings?mac=%s" % MAC)[2])[-1]["value"]
    assert newest == 0 and math.copysign(1, newest) == -1  # stored as posted, sign and all (schema 2 lost it)
    assert server.stop() == 0


def test_an_interrupted_conversion_leaves_the_database_as_it_was(start, tmp_path):
    """Killed while converting: schema 2 and every reading are still there, the next start says so and converts."""
    db = tmp_path / "big.db"
    t = (int(time.time()) - 600_000) * 1000
    shape = [(s, f, round(20 + s + math.sin(m / 300), 2) if f == 1 else round(1013 + math.sin(m / 5000), 1), t + m * 60_000, None)
             for m in range(75_000) for s in (1, 2, 3, 4) for f in (1, 2)]  # 600k readings: 4 stations, 2 fields, a minute
    _version_2(db, shape, stations=(MAC, MAC2, "02:00:00:00:00:03", "02:00:00:00:00:04"))
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--db", str(db), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "converting %s from schema 2 to 3" % db in proc.stderr.readline()
        time.sleep(0.3)
    finally:
        proc.kill()  # mid-way: as a power cut or an OOM kill would
        proc.wait()
        proc.stderr.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    assert conn.execute("SELECT count(*) FROM readings").fetchone() == (len(shape),)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    server = start(db=db)
    assert re.search(r"the last conversion of \S+ did not finish; the database was left as it was \(schema 2\)", server.log)
    assert "converted" in server.log
    assert server.rows("SELECT count(*) FROM readings") == [(len(shape),)]
    assert server.stop() == 0
    per_reading = os.path.getsize(db) / len(shape)
    assert per_reading <= 24, per_reading  # the compact schema, rollups included


def test_range_links_and_the_long_charts(start):
    server = start("--tz", "UTC", *FAST)
    assert server.update("20", mac=MAC)[0] == 200
    body = server.request("/")[2]
    links = re.findall(r'<a href="(/\?range=\w+)"( aria-current="page")?>([^<]+)</a>', body)
    assert [(href, text) for href, _, text in links] == [("/?range=24h", "24 h"), ("/?range=7d", "7 d"),
                                                          ("/?range=30d", "30 d"), ("/?range=1y", "1 y")]
    assert [text for _, current, text in links if current] == ["24 h"]
    for range_name, title, date in (("7d", "Last 7 days", r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \d{1,2}"),
                                    ("30d", "Last 30 days", r"[A-Z][a-z]{2} \d{1,2}"),
                                    ("1y", "Last year", r"([A-Z][a-z]{2}|20\d\d)")):
        status, _, page = server.request("/?range=" + range_name)
        assert status == 200 and "<h2>%s</h2>" % title in page
        assert re.search(r'aria-current="page">%s<' % range_name.replace("d", " d").replace("y", " y"), page)
        assert re.search(r'text-anchor="middle">%s</text>' % date, _chart(page))  # dates on the time axis
    assert "Last year" in server.request("/?range=1y&fragment=1")[2]
    status, _, body = server.request("/?range=2w")
    assert status == 400 and "range must be 24h, 7d, 30d, 1y" in body


def test_every_station_is_charted_in_its_own_colour(server):
    macs = ["02:00:00:00:00:%02x" % i for i in range(12)]
    for i, mac in enumerate(macs):
        assert server.update(str(10 + i), mac=mac)[0] == 200
    cli(server.db, "--role", macs[5], "outdoor")
    cli(server.db, "--role", macs[7], "indoor")
    body = server.request("/")[2]
    chart = _chart(body)
    lines = re.findall(r'class="line ([^"]+)"', chart)  # one reading each: a dot each
    legend = re.findall(r'<b class="([^"]+)">━</b> ([^<·]+?)(?: ·|</p>)', body)
    assert len(lines) == 12 and [css for css, _ in legend] == lines  # each line has its key, in its colour
    assert [name for _, name in legend] == [macs[5], macs[7]] + [m for m in macs if m not in (macs[5], macs[7])]
    assert lines[:2] == ["outdoor", "indoor"] and lines[2:10] == ["c%d" % i for i in range(8)]
    css = re.search(r"<style[^>]*>(.*?)</style>", body, re.S).group(1)
    for name in set(lines):
        assert re.search(r"\.%s\{--c:[^}]+\}" % name, css), name  # a colour for every line
    cards = re.findall(r'<section class="card[^"]*" data-mac="([^"]+)"', body)
    assert cards == [macs[5], macs[7]] + [m for m in macs if m not in (macs[5], macs[7])]
    assert server.update("30", mac=macs[11])[0] == 200  # a post does not reshuffle the cards
    assert re.findall(r'<section class="card[^"]*" data-mac="([^"]+)"', server.request("/")[2]) == cards


def test_a_page_per_station(start):
    server = start("--unit", "C", "--tz", "UTC", *FAST)
    for field, value in ((1, "21.5"), (2, "1008.25"), (3, "48"), (5, "3.3")):
        assert server.update(value, field=field)[0] == 200
    cli(server.db, "--rename", MAC, "Balcony")
    body = server.request("/")[2]
    assert '<a href="/station/%s">Balcony</a>' % MAC in body
    status, headers, page = server.request("/station/%s?range=7d" % MAC)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<title>Balcony · iotserver</title>" in page and "Content-Security-Policy" not in page
    assert "content-security-policy" in headers
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings == ["Temperature, last 7 days", "Pressure, last 7 days", "Humidity, last 7 days", "Field 5, last 7 days"]
    labels = re.findall(r'aria-label="([^"]+)"', page)
    assert labels == ["Temperature in °C, last 7 days", "Pressure in hPa, last 7 days", "Humidity in %, last 7 days",
                      "Field 5 in , last 7 days"]
    assert re.findall(r'<a href="(/station/[^"]+\?range=\w+)"', page)[:2] == ["/station/%s?range=%s" % (MAC, r)
                                                                          for r in ("24h", "7d")]
    assert server.request("/station/%s" % MAC.replace(":", "-").upper())[0] == 200  # any way of writing the MAC
    for path in ("/station/02:00:00:00:00:99", "/station/not-a-mac", "/station/%s?range=5y" % MAC):
        status, _, body = server.request(path)
        assert status in (400, 404) and ("no station" in body or "mac" in body or "range" in body), (path, body)
