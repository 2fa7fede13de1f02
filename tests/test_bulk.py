"""Bulk writes: ThingSpeak's bulk_update.json / .csv and the station's own form, at measurement time, once."""

import datetime
import json
import time
import urllib.parse

import pytest

from conftest import MAC, MAC2, start  # noqa: F401  (fixture)
from test_thingspeak import channel, channel_of  # noqa: F401  (fixture)

NOW = lambda: int(time.time())  # noqa: E731


def post_json(server, path, obj):
    body = json.dumps(obj)
    return server.request(path, method="POST", body=body, headers={"Content-Type": "application/json"})


def post_form(server, path, fields):
    body = urllib.parse.urlencode(fields)
    return server.request(path, method="POST", body=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})


def stored(server, mac=MAC):
    """(field, value, seconds) of a station's stored readings, in time order."""
    return server.rows("SELECT r.field, r.value, r.ts / 1000 FROM readings r JOIN stations s ON s.id = r.station_id "
                       "WHERE s.mac = ? ORDER BY r.ts, r.field", (mac,))


def test_json_bulk_write_stores_each_entry_at_its_own_time(server, channel):
    channel_id, key = channel
    t = NOW() - 3600
    local = datetime.datetime.fromtimestamp(t + 120, datetime.timezone(datetime.timedelta(hours=-5)))
    status, headers, body = post_json(server, "/channels/%d/bulk_update.json" % channel_id, {
        "write_api_key": key, "updates": [
            {"created_at": datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "field1": 18.5, "field3": "61", "status": "ok", "latitude": 52.1},
            {"created_at": t + 60, "field1": "18.25"},  # epoch seconds
            {"created_at": local.strftime("%Y-%m-%d %H:%M:%S %z"), "field1": 18.0},  # MySQL form with offset
        ]})
    assert status == 202 and json.loads(body) == {"success": True}
    assert headers["content-type"] == "application/json"
    rows = [r for r in stored(server) if r[2] < NOW() - 60]  # leave out the registering reading
    assert rows == [(1, 18.5, t), (3, 61.0, t), (1, 18.25, t + 60), (1, 18.0, t + 120)]
    # ThingSpeak reads see the back-dated entries in time order
    status, _, feed = server.request("/channels/%d/fields/1.json?results=4" % channel_id)
    assert [f["field1"] for f in json.loads(feed)["feeds"]][:3] == ["18.5", "18.25", "18"]


def test_csv_bulk_write_absolute_and_relative(server, channel):
    channel_id, key = channel
    t = NOW() - 7200
    status, _, body = post_form(server, "/channels/%d/bulk_update.csv" % channel_id, {
        "write_api_key": key, "time_format": "absolute",
        "updates": "%d,20.5,1001.5|%d,,1002|%d,21,,,,,,,,52.1,13.4,30,ok" % (t, t + 60, t + 120)})
    assert status == 202 and json.loads(body) == {"success": True}
    rows = [r for r in stored(server) if r[2] < NOW() - 60]
    assert rows == [(1, 20.5, t), (2, 1001.5, t), (2, 1002.0, t + 60), (1, 21.0, t + 120)]
    # relative: seconds since the entry before; the last one is placed when the call arrives
    before = NOW()
    status, _, _ = post_form(server, "/channels/%d/bulk_update.csv" % channel_id, {
        "write_api_key": key, "time_format": "relative", "updates": "0,30.1|60,30.2|90,30.3"})
    after = NOW()
    assert status == 202
    last3 = [r for r in stored(server) if 30 < r[1] < 31]
    assert [r[1] for r in last3] == [30.1, 30.2, 30.3]
    assert before <= last3[2][2] <= after
    assert last3[2][2] - last3[1][2] == 90 and last3[1][2] - last3[0][2] == 60


def test_a_retried_bulk_write_adds_nothing(server, channel):
    channel_id, key = channel
    t = NOW() - 600
    call = {"write_api_key": key, "updates": [{"created_at": t + i * 60, "field1": 20 + i} for i in range(5)]}
    assert post_json(server, "/channels/%d/bulk_update.json" % channel_id, call)[0] == 202
    first = stored(server)
    assert post_json(server, "/channels/%d/bulk_update.json" % channel_id, call)[0] == 202  # the answer was lost
    assert stored(server) == first
    # a retry that overlaps the next upload stores only what is new
    call["updates"] = call["updates"][3:] + [{"created_at": t + 300, "field1": 25}]
    assert post_json(server, "/channels/%d/bulk_update.json" % channel_id, call)[0] == 202
    assert sorted(stored(server)) == sorted(first + [(1, 25.0, t + 300)])


def test_a_retried_single_thingspeak_write_with_created_at_is_stored_once(server, channel):
    channel_id, key = channel
    stamp = datetime.datetime.fromtimestamp(NOW() - 300, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = "/update.json?api_key=%s&field1=19.5&created_at=%s" % (key, stamp)
    status, _, first = server.request(query)
    status2, _, second = server.request(query)
    assert status == status2 == 200
    assert json.loads(first)["entry_id"] == json.loads(second)["entry_id"]
    assert len([r for r in stored(server) if r[1] == 19.5]) == 1
    # another field at the same time joins the same entry
    status, _, third = server.request("/update.json?api_key=%s&field2=1003&created_at=%s" % (key, stamp))
    assert json.loads(third)["entry_id"] == json.loads(first)["entry_id"]
    assert len([r for r in stored(server) if r[0] == 2]) == 1


@pytest.mark.parametrize("updates, reason", [
    ([{"created_at": "NOW", "field1": 1}, {"created_at": "FUTURE", "field1": 2}], "entry 2: created_at is in the future"),
    ([{"created_at": "NOW", "field1": 1}, {"created_at": "2019-12-31T23:59:59Z", "field1": 2}], "entry 2: created_at is before 2020-01-01"),
    ([{"created_at": "NOW", "field1": "warm"}], "entry 1: field1: must be a plain decimal number"),
    ([{"created_at": "NOW", "field1": "nan"}], "entry 1: field1: must be a plain decimal number"),
    ([{"created_at": "NOW", "field1": 1, "feild2": 3}], "entry 1: unknown member 'feild2'"),
    ([{"created_at": "NOW", "field1": 1}, {"created_at": "NOW"}], "entry 2: no field1 ... field8 with a value"),
    ([{"created_at": "NOW", "delta_t": 5, "field1": 1}], "entry 1: give created_at or delta_t"),
    ([{"field1": 1}], "entry 1: give created_at or delta_t"),
    ([{"created_at": "yesterday", "field1": 1}], "entry 1: created_at must be an ISO-8601 time"),
    ([{"delta_t": -5, "field1": 1}], "entry 1: delta_t must be a number of seconds"),
    ([], "updates is empty"),
    ([[1, 2]], "entry 1: must be an object"),
])
def test_a_bad_entry_is_named_and_nothing_of_the_call_is_stored(server, channel, updates, reason):
    channel_id, key = channel
    before = stored(server)
    times = {"NOW": NOW() - 60, "FUTURE": NOW() + 3600}
    for u in updates:
        if isinstance(u, dict) and u.get("created_at") in times:
            u["created_at"] = times[u["created_at"]]
    status, _, body = post_json(server, "/channels/%d/bulk_update.json" % channel_id,
                                {"write_api_key": key, "updates": updates})
    assert status == 400 and body.startswith("400 " + reason), body
    assert stored(server) == before


def test_bulk_limits_and_malformed_bodies(server, channel):
    channel_id, key = channel
    path = "/channels/%d/bulk_update.json" % channel_id
    t = NOW() - 86400
    too_many = {"write_api_key": key, "updates": [{"created_at": t + i, "field1": 1} for i in range(961)]}
    status, _, body = post_json(server, path, too_many)
    assert status == 413 and "960 entries" in body
    status, _, body = server.request(path, method="POST", body="x" * (128 * 1024 + 1),
                                     headers={"Content-Type": "application/json"})
    assert status == 413 and "larger than" in body
    for text in ("{", "[1, 2]", "[" * 5000 + "]" * 5000, '{"updates": {}}', "\xff"):
        status, _, body = server.request(path, method="POST", body=text.encode("latin-1"),
                                         headers={"Content-Type": "application/json"})
        assert status == 400, (text[:20], body)
    status, _, body = post_form(server, "/channels/%d/bulk_update.csv" % channel_id,
                                {"write_api_key": key, "updates": "%d,1" % t})
    assert status == 400 and "time_format" in body
    status, _, body = post_form(server, "/channels/%d/bulk_update.csv" % channel_id,
                                {"write_api_key": key, "time_format": "absolute", "updates": "%d,1|%d,x" % (t, t + 1)})
    assert status == 400 and body.startswith("400 entry 2: field1")
    assert len(stored(server)) == 1  # only the registering reading
    assert server.request("/channels/%d/bulk_update.json" % channel_id)[0] == 405


def test_bulk_write_keys(server, channel):
    channel_id, key = channel
    call = {"updates": [{"created_at": NOW() - 60, "field1": 1}]}
    path = "/channels/%d/bulk_update.json" % channel_id
    status, _, body = post_json(server, path, call)
    assert status == 401 and "write_api_key" in body
    status, _, body = post_json(server, path, dict(call, write_api_key="0123456789ABCDEF"))
    assert status == 401
    # a write key is good for its own channel only
    assert server.update(mac=MAC2)[0] == 200
    other_id, other_key = channel_of(server, MAC2)
    status, _, body = post_json(server, path, dict(call, write_api_key=other_key))
    assert status == 401 and "channel %d" % channel_id in body
    assert post_json(server, "/channels/%d/bulk_update.json" % other_id, dict(call, write_api_key=other_key))[0] == 202
    assert len(stored(server)) == 1 and len(stored(server, MAC2)) == 2
    assert key not in server.log and other_key not in server.log


def test_the_station_form_needs_only_the_server_key_and_the_mac(server):
    path = "/update/API_key=%s/mac=%s" % (server.key, MAC)
    t = NOW() - 1800
    updates = "|".join("%d,%.2f,,55" % (t + i * 60, 20 + i / 10) for i in range(30))
    status, _, body = post_form(server, path, {"time_format": "absolute", "updates": updates})
    assert status == 202 and json.loads(body) == {"success": True}
    rows = stored(server)
    assert len(rows) == 60 and rows[0] == (1, 20.0, t) and rows[-1] == (3, 55.0, t + 29 * 60)
    # the same upload again (its answer was lost): nothing new
    assert post_form(server, path, {"time_format": "absolute", "updates": updates})[0] == 202
    assert len(stored(server)) == 60
    # JSON works too; a wrong key does not; the single-reading URL still takes only GET
    status, _, _ = post_json(server, path, {"updates": [{"delta_t": 0, "field1": 22}]})
    assert status == 202 and len(stored(server)) == 61
    status, _, _ = post_json(server, "/update/API_key=wrong-key-1/mac=%s" % MAC, {"updates": [{"delta_t": 0, "field1": 1}]})
    assert status == 401
    status, headers, _ = server.request(path + "/field=1/data=1", method="POST")
    assert status == 405 and headers["allow"] == "GET"
    status, _, body = post_json(server, "/update/API_key=%s/mac=nonsense" % server.key, {"updates": []})
    assert status == 400 and "mac" in body
    assert server.key not in server.log


def test_a_bulk_call_costs_one_token_of_the_station_rate_limit(start):
    server = start("--rate", "1", "--burst", "2")
    path = "/update/API_key=%s/mac=%s" % (server.key, MAC)
    t = NOW() - 3600
    answers = [post_form(server, path, {"time_format": "absolute",
                                        "updates": "|".join("%d,%d" % (t + n * 600 + i, i) for i in range(100))})
               for n in range(3)]
    assert [a[0] for a in answers] == [202, 202, 429]
    assert int(answers[2][1]["retry-after"]) >= 1
    assert len(stored(server)) == 200


def test_a_station_that_leaves_out_time_format_is_told_so(server):
    status, _, body = post_form(server, "/update/API_key=%s/mac=%s" % (server.key, MAC),
                                {"updates": "%d,21.4" % (NOW() - 60)})
    assert status == 400 and "time_format" in body and "write_api_key" not in body
    assert stored(server) == []


def test_station_url_parts_sent_as_a_query_string_get_a_hint(server):
    status, _, body = server.request("/update?API_key=%s&mac=%s&field=1&data=21.4" % (server.key, MAC))
    assert status == 400 and "/update/API_key=KEY/mac=MAC/field=N/data=VALUE" in body
    # the server key is not a channel's write key, and the answer says which key is wanted
    status, _, body = server.request("/update?api_key=%s&field1=21.4" % server.key)
    assert status == 401 and "--channel-key" in body
    assert server.rows() == []
