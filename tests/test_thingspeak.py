"""ThingSpeak's API: the real PyPI client, and the URL forms from ThingSpeak's documentation."""

import csv
import io
import json
import re
import urllib.parse

import pytest

from conftest import need_module, FAST, MAC, cli


def channel_of(server, mac=MAC):
    """(channel id, write key) the way an owner reads them: --channel-key."""
    out = cli(server.db, "--channel-key", mac).stdout
    match = re.search(r"channel (\d+) \(.*\) write key: ([0-9A-F]{16})", out)
    return int(match.group(1)), match.group(2)


@pytest.fixture
def channel(server):
    assert server.update("20.0")[0] == 200  # the station registers with its MAC, as in the field
    return channel_of(server)


def _parsed(text):
    # thingspeak 1.0.0 returns response text even for fmt="json" (its _fmt compares ".json" to "json")
    return json.loads(text) if isinstance(text, str) else text


def test_the_pypi_thingspeak_client(server, channel):
    thingspeak = need_module("thingspeak")
    channel_id, key = channel
    ch = thingspeak.Channel(channel_id, api_key=key, server_url=server.url)
    first = _parsed(ch.update({"field1": 21.4, "field2": 1013.25}))
    assert first["entry_id"] > 0 and first["field1"] == "21.4" and first["field2"] == "1013.25"
    assert first["channel_id"] == channel_id
    # ThingSpeak's free plan would drop this one (15 s); iotserver's own per-station limit allows it
    second = _parsed(ch.update({"field1": 22.5}))
    assert second["entry_id"] > first["entry_id"]
    feed = _parsed(ch.get({"results": 2}))
    assert feed["channel"]["id"] == channel_id and feed["channel"]["field1"] == "Temperature"
    assert [(f["field1"], f["field2"]) for f in feed["feeds"]] == [("21.4", "1013.25"), ("22.5", None)]
    assert feed["feeds"][-1]["entry_id"] == second["entry_id"]
    field = _parsed(ch.get_field(field=1, options={"results": 10}))
    assert [f["field1"] for f in field["feeds"]] == ["20", "21.4", "22.5"]
    assert "field2" not in field["feeds"][0]
    assert _parsed(ch.get_field_last(field=1)) == {"created_at": field["feeds"][-1]["created_at"],
                                          "entry_id": second["entry_id"], "field1": "22.5"}
    assert thingspeak.Channel(channel_id, fmt="txt", server_url=server.url).get_field_last(field=2) == "1013.25"
    assert int(_parsed(ch.get_last_data_age(field=1))["last_data_age"]) < 10
    assert _parsed(ch.view())["id"] == channel_id
    # both stored as ordinary readings of the station
    assert [(r[1], r[2]) for r in server.rows()] == [(1, 20.0), (1, 21.4), (2, 1013.25), (1, 22.5)]


def test_a_channel_for_a_client_without_a_mac(server):
    thingspeak = need_module("thingspeak")
    out = cli(server.db, "--add-channel", "Garden script").stdout
    channel_id, key = re.search(r"channel (\d+) \(Garden script\) write key: (\w{16})", out).groups()
    ch = thingspeak.Channel(int(channel_id), api_key=key, server_url=server.url)
    assert _parsed(ch.update({"field1": 18}))["entry_id"] > 0
    latest = json.loads(server.request("/api/latest")[2])["stations"]
    assert [(s["name"], s["fields"]["1"]["value"]) for s in latest] == [("Garden script", 18.0)]
    assert latest[0]["mac"].startswith("02:")


def _get(server, path, **kwargs):
    status, headers, body = server.request(path, **kwargs)
    return status, body


def test_documented_write_forms(server, channel):
    channel_id, key = channel
    # GET https://api.thingspeak.com/update?api_key=KEY&field1=73
    status, body = _get(server, "/update?api_key=%s&field1=73" % key)
    assert status == 200 and body.isdigit() and int(body) > 0
    status, body = _get(server, "/update.json?api_key=%s&field1=74&field3=55.5" % key)
    entry = json.loads(body)
    assert entry["field1"] == "74" and entry["field3"] == "55.5" and entry["field2"] is None
    # the key as a header, both spellings
    for header in ("THINGSPEAKAPIKEY", "X-THINGSPEAKAPIKEY"):
        assert _get(server, "/update?field1=75", headers={header: key})[0] == 200
    # a POST form body, and a JSON body
    form = urllib.parse.urlencode({"api_key": key, "field1": "76", "field2": "1009"})
    status, body = _get(server, "/update", method="POST", body=form,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and int(body) > 0
    status, body = _get(server, "/update.json", method="POST", body=json.dumps({"api_key": key, "field1": 77}),
                        headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["field1"] == "77"
    # ThingSpeak's own optional parameters are accepted
    assert _get(server, "/update?api_key=%s&field1=78&status=hello&lat=1&long=2" % key)[0] == 200
    values = [r[2] for r in server.rows()]
    assert values == [20.0, 73.0, 74.0, 55.5, 75.0, 75.0, 76.0, 1009.0, 77.0, 78.0]
    # one write, one timestamp, one entry for all its fields
    feed = json.loads(_get(server, "/channels/%d/feeds.json?results=8000" % channel_id)[1])["feeds"]
    assert {"field1": "76", "field2": "1009"}.items() <= feed[-3].items()


def test_created_at_and_timezone(server, channel):
    channel_id, key = channel
    assert _get(server, "/update?api_key=%s&field1=1&created_at=2026-01-02%%2003:04:05" % key)[0] == 200
    assert _get(server, "/update?api_key=%s&field1=2&created_at=2026-01-02T05:00:00%%2B01:00" % key)[0] == 200
    assert _get(server, "/update?api_key=%s&field1=3&created_at=2026-01-02%%2003:30:00&timezone=Europe/Berlin"
                % key)[0] == 200
    feed = json.loads(_get(server, "/channels/%d/fields/1.json?start=2026-01-01&end=2026-01-03" % channel_id)[1])
    assert [(f["created_at"], f["field1"]) for f in feed["feeds"]] == [
        ("2026-01-02T02:30:00Z", "3"), ("2026-01-02T03:04:05Z", "1"), ("2026-01-02T04:00:00Z", "2")]
    berlin = json.loads(_get(server, "/channels/%d/fields/1.json?start=2026-01-01&end=2026-01-03"
                                     "&timezone=Europe/Berlin" % channel_id)[1])
    assert berlin["feeds"][0]["created_at"] == "2026-01-02T03:30:00+01:00"
    status, body = _get(server, "/update?api_key=%s&field1=1&created_at=2999-01-01" % key)
    assert status == 400 and "future" in body


def test_documented_read_forms(server, channel):
    channel_id, key = channel
    for value in ("21", "22.5", "-3.25"):
        assert _get(server, "/update?api_key=%s&field1=%s&field2=1000" % (key, value))[0] == 200
    # GET https://api.thingspeak.com/channels/254616/fields/1/last.txt, host swapped
    assert _get(server, "/channels/%d/fields/1/last.txt" % channel_id) == (200, "-3.25")
    assert _get(server, "/channels/%d/fields/1/last" % channel_id) == (200, "-3.25")
    last = json.loads(_get(server, "/channels/%d/feeds/last.json" % channel_id)[1])
    assert last["field1"] == "-3.25" and last["field2"] == "1000"
    feed = json.loads(_get(server, "/channels/%d/feeds.json?results=2" % channel_id)[1])
    assert [f["field1"] for f in feed["feeds"]] == ["22.5", "-3.25"]
    assert feed["channel"]["last_entry_id"] == feed["feeds"][-1]["entry_id"]
    assert len(json.loads(_get(server, "/channels/%d/feeds.json?minutes=5" % channel_id)[1])["feeds"]) == 4
    assert len(json.loads(_get(server, "/channels/%d/feeds.json?days=1" % channel_id)[1])["feeds"]) == 4
    status, body = _get(server, "/channels/%d/fields/1.csv" % channel_id)
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == ["created_at", "entry_id", "field1"]
    assert [r[2] for r in rows[1:]] == ["20", "21", "22.5", "-3.25"]
    assert rows[1][0].endswith(" UTC")
    rows = list(csv.reader(io.StringIO(_get(server, "/channels/%d/feeds.csv" % channel_id)[1])))
    assert rows[0] == ["created_at", "entry_id", "field1", "field2"] and rows[-1][2:] == ["-3.25", "1000"]


def test_read_errors(server, channel):
    channel_id, key = channel
    assert _get(server, "/channels/999/feeds.json")[0] == 404
    assert _get(server, "/channels/%d/fields/9.json" % channel_id)[0] == 404
    status, body = _get(server, "/channels/%d/fields/3/last.txt" % channel_id)
    assert status == 404 and "-1" in body  # no field 3 yet: ThingSpeak's -1, but not a 200
    for query, word in (("results=9000", "results"), ("days=abc", "days"), ("start=noon", "start"),
                        ("timezone=Mars/Olympus", "timezone")):
        status, body = _get(server, "/channels/%d/feeds.json?%s" % (channel_id, query))
        assert status == 400 and word in body, (query, body)


def test_write_errors_and_key_handling(server, channel):
    channel_id, key = channel
    assert _get(server, "/update?field1=1")[0] == 401
    assert _get(server, "/update?api_key=WRONGWRONGWRONG1&field1=1")[0] == 401
    assert _get(server, "/update?api_key=%s&field1=1" % server.key)[0] == 401  # the station-URL key is not a write key
    for query, word in (("field1=nan", "field1"), ("field2=1e309", "field2"), ("field1=%D9%A7", "field1"),
                        ("status=only", "field"), ("field9=1", "field")):
        status, body = _get(server, "/update?api_key=%s&%s" % (key, query))
        assert status == 400 and word in body, (query, body)
    assert _get(server, "/update", method="PUT")[1].startswith("405")
    status, body = _get(server, "/update", method="POST", body="x" * 20000,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413
    new_key = re.search(r"write key: (\w+)", cli(server.db, "--rotate-channel-key", MAC).stdout).group(1)
    assert _get(server, "/update?api_key=%s&field1=1" % key)[0] == 401
    assert _get(server, "/update?api_key=%s&field1=1" % new_key)[0] == 200
    assert [r[2] for r in server.rows()] == [20.0, 1.0]
    assert key not in server.log and new_key not in server.log


def test_rate_limited_write_answers_0(start):
    server = start("--rate", "1", "--burst", "1")
    thingspeak = need_module("thingspeak")
    cli(server.db, "--add-channel", "Slow")
    channel_id, key = channel_of(server, _mac_of(server, "Slow"))
    assert _get(server, "/update?api_key=%s&field1=1" % key)[0] == 200
    status, body = _get(server, "/update?api_key=%s&field1=2" % key)
    assert (status, body) == (200, "0")  # "not inserted", as ThingSpeak's clients expect
    assert thingspeak.Channel(channel_id, api_key=key, server_url=server.url).update({"field1": 3}) in (0, "0")
    assert [r[2] for r in server.rows()] == [1.0]


def _mac_of(server, name):
    return server.rows("SELECT mac FROM stations WHERE name = ?", (name,))[0][0]


def test_private_channels_need_a_key(start):
    server = start("--private", *FAST)
    assert server.update("20")[0] == 200
    channel_id, key = channel_of(server)
    assert _get(server, "/channels/%d/feeds.json" % channel_id)[0] == 401
    assert _get(server, "/channels/%d/fields/1/last.txt?api_key=%s" % (channel_id, key)) == (200, "20")
    assert _get(server, "/channels/%d/fields/1/last.txt?api_key=%s" % (channel_id, server.key)) == (200, "20")
    assert key not in server.log


def test_older_sketches_send_key_and_thingspeaks_own_time_format(server, channel):
    channel_id, key = channel
    # older ThingSpeak sketches write /update?key=KEY
    status, body = _get(server, "/update?key=%s&field1=18.5" % key)
    assert status == 200 and int(body) > 0
    assert _get(server, "/update?key=WRONGWRONGWRONG1&field1=1")[0] == 401
    # ThingSpeak's documented example: a one-digit second and a space before the offset; and the
    # "... UTC" form its own CSV feeds write
    when = urllib.parse.quote("2026-01-21 10:26:2 -0500")
    assert _get(server, "/update?api_key=%s&field1=1&created_at=%s" % (key, when))[0] == 200
    when = urllib.parse.quote("2026-01-21 16:00:00 UTC")
    assert _get(server, "/update?api_key=%s&field1=2&created_at=%s" % (key, when))[0] == 200
    feed = json.loads(_get(server, "/channels/%d/fields/1.json?start=2026-01-21&end=2026-01-22" % channel_id)[1])
    assert [(f["created_at"], f["field1"]) for f in feed["feeds"]] == [
        ("2026-01-21T15:26:02Z", "1"), ("2026-01-21T16:00:00Z", "2")]
    assert [r[2] for r in server.rows()] == [1.0, 2.0, 20.0, 18.5]  # in time order
    assert key not in server.log


def test_aggregated_reads_as_thingspeak_documents_them(server, channel):
    """average, median, sum, timescale (10 ... 1440 minutes or daily) and round, on a morning of entries."""
    channel_id, key = channel
    t = 1741600800  # 2025-03-10T10:00:00Z
    minutes = [(0, {"field1": 10, "field2": 1000}), (5, {"field1": 11}), (12, {"field1": 13, "field2": 1002}),
               (25, {"field1": 20}), (61, {"field1": 5.5})]
    body = json.dumps({"write_api_key": key, "updates": [dict(v, created_at=t + m * 60) for m, v in minutes]})
    assert server.request("/channels/%d/bulk_update.json" % channel_id, method="POST", body=body,
                          headers={"Content-Type": "application/json"})[0] == 202
    span = "start=2025-03-10%2000:00:00&end=2025-03-10%2023:59:59"

    def feeds(query, path="feeds"):
        status, body = _get(server, "/channels/%d/%s.json?%s&%s" % (channel_id, path, span, query))
        assert status == 200, body
        return [(f["created_at"][11:16], f["entry_id"], f.get("field1"), f.get("field2")) for f in json.loads(body)["feeds"]]

    # a period is written at its start; a computed one has no entry id; a field missing from an entry is left out
    assert feeds("average=10") == [("10:00", None, "10.5", "1000.0"), ("10:10", None, "13.0", "1002.0"),
                                   ("10:20", None, "20.0", None), ("11:00", None, "5.5", None)]
    assert feeds("sum=30") == [("10:00", None, "54.0", "2002.0"), ("11:00", None, "5.5", None)]
    assert feeds("median=60") == [("10:00", None, "12.0", "1001.0"), ("11:00", None, "5.5", None)]
    assert feeds("sum=daily") == [("00:00", None, "59.5", "2002.0")]
    assert feeds("median=1440&timezone=Asia/Tokyo")[0][0] == "09:00"  # 1440 minutes count from 00:00 UTC
    assert feeds("sum=daily&timezone=Asia/Tokyo")[0][0] == "00:00"  # a day is the zone's day
    # timescale: the first entry of each period, as it was stored
    first = feeds("timescale=10")
    assert [(f[0], f[2], f[3]) for f in first] == [("10:00", "10", "1000"), ("10:10", "13", "1002"),
                                                   ("10:20", "20", None), ("11:00", "5.5", None)]
    assert all(f[1] > 0 for f in first)
    # round: decimal places of every value, computed or stored
    assert feeds("average=60&round=1") == [("10:00", None, "13.5", "1001.0"), ("11:00", None, "5.5", None)]
    assert feeds("round=2")[:2] == [("10:00", first[0][1], "10.00", "1000.00"), ("10:05", feeds("")[1][1], "11.00", None)]
    assert _get(server, "/channels/%d/fields/2/last.txt?round=3" % channel_id) == (200, "1002.000")
    # results limits the entries read, not the periods returned (ThingSpeak's own example: results=120&sum=60)
    assert feeds("results=2&average=60") == [("10:00", None, "20.0", None), ("11:00", None, "5.5", None)]
    assert [f[:3] for f in feeds("average=60", path="fields/1")] == [("10:00", None, "13.5"), ("11:00", None, "5.5")]
    rows = list(csv.reader(io.StringIO(_get(server, "/channels/%d/feeds.csv?%s&sum=60" % (channel_id, span))[1])))
    assert rows[1][1:] == ["", "54.0", "2002.0"]
    for query, word in (("average=7", "average"), ("median=hourly", "median"), ("round=x", "round")):
        status, body = _get(server, "/channels/%d/feeds.json?%s" % (channel_id, query))
        assert status == 400 and word in body, (query, body)
