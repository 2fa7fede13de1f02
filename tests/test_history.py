"""History that lasts: rollups, pruning that keeps them, the compact schema and its migration, /api/series."""

import datetime
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FAST, MAC, MAC2
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
