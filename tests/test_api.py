"""The read API: /api/latest and /api/readings as JSON and CSV."""

import csv
import io
import json
import re
import time
import urllib.parse

import pytest

from conftest import MAC, MAC2, ROOT, cli, need_module

MAC3 = "6c:ef:7a:3b:9d:ea"


def _iso(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def test_latest(server):
    assert server.update("21.4", mac=MAC)[0] == 200
    assert server.update("22.0", mac=MAC)[0] == 200
    assert server.update("1013.2", mac=MAC, field=2)[0] == 200
    assert server.update("25.5", mac=MAC2)[0] == 200
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--rename", MAC, "Window")
    status, headers, body = server.request("/api/latest")
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    window, other = data["stations"]
    assert window["mac"] == MAC and window["name"] == "Window" and window["role"] == "outdoor"
    assert window["online"] is True
    assert window["fields"]["1"]["value"] == 22.0 and window["fields"]["1"]["unit"] == "°C"
    assert window["fields"]["2"]["value"] == 1013.2 and window["fields"]["2"]["name"] == "pressure"
    assert window["last_seen"] == window["fields"]["2"]["time"]
    assert other["mac"] == MAC2 and other["role"] is None and list(other["fields"]) == ["1"]


def test_latest_times_are_utc_iso8601(server):
    before = time.time()
    assert server.update("21.4")[0] == 200
    stamp = json.loads(server.request("/api/latest")[2])["stations"][0]["last_seen"]
    parsed = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert stamp.endswith("Z") and abs(parsed - before) < 5


def test_readings_filters_and_order(server):
    for value, mac, field in [("1", MAC, 1), ("2", MAC, 2), ("3", MAC2, 1), ("4", MAC, 1)]:
        assert server.update(value, mac=mac, field=field)[0] == 200
        time.sleep(0.01)
    everything = json.loads(server.request("/api/readings")[2])
    assert [r["value"] for r in everything] == [1, 2, 3, 4]
    assert set(everything[0]) == {"time", "mac", "name", "field", "value", "unit"}
    one = json.loads(server.request("/api/readings?mac=%s&field=1" % MAC.upper())[2])
    assert [r["value"] for r in one] == [1, 4]
    assert [r["value"] for r in json.loads(server.request("/api/readings?limit=2")[2])] == [1, 2]
    middle = everything[1]["time"]
    after = json.loads(server.request("/api/readings?since=%s" % middle)[2])
    assert [r["value"] for r in after] == [2, 3, 4]
    before = json.loads(server.request("/api/readings?until=%s" % middle)[2])
    assert [r["value"] for r in before] == [1]
    old = json.loads(server.request("/api/readings?since=2020-01-01T00:00:00Z&until=2020-01-02")[2])
    assert old == []


def test_readings_csv(server):
    assert server.update("-7.5", mac=MAC)[0] == 200
    cli(server.db, "--rename", MAC, "=HYPERLINK(\"http://evil\")")
    for path in ("/api/readings.csv", "/api/readings?format=csv"):
        status, headers, body = server.request(path)
        assert status == 200 and headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(body)))
        assert rows[0] == ["time", "mac", "name", "field", "value", "unit"]
        assert rows[1][1:] == [MAC, "'=HYPERLINK(\"http://evil\")", "1", "-7.5", "°C"]
        assert rows[1][0].endswith("Z")


@pytest.mark.parametrize("query, word", [
    ("mac=zz", "mac"), ("field=9", "field"), ("field=", "field"), ("since=yesterday", "since"),
    ("until=2026-13-01", "until"), ("limit=0", "limit"), ("limit=abc", "limit"), ("limit=100001", "limit"),
    ("format=xml", "format"), ("color=red", "color"), ("field=1&field=2", "twice"),
    ("since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "since"),
])
def test_bad_parameters_are_400_naming_the_parameter(server, query, word):
    status, headers, body = server.request("/api/readings?" + query)
    assert status == 400 and word in body, body
    assert headers["content-type"].startswith("text/plain")


def test_unknown_station_is_404(server):
    assert server.request("/api/readings?mac=%s" % MAC)[0] == 404


def test_json_is_strict(server):
    assert server.update("1e9")[0] == 200
    assert server.update("-0.0625")[0] == 200
    body = server.request("/api/readings")[2]
    values = [r["value"] for r in json.loads(body, parse_constant=lambda c: pytest.fail("non-JSON " + c))]
    assert values == [1e9, -0.0625]


def test_latest_by_role_and_by_name(server):
    assert server.update("21.4", mac=MAC)[0] == 200
    assert server.update("1013.2", mac=MAC, field=2)[0] == 200
    assert server.update("25.5", mac=MAC2)[0] == 200
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--rename", MAC, "Window")
    data = json.loads(server.request("/api/latest")[2])
    assert list(data) == ["generated", "stations", "by_role", "by_name"]  # the old fields as they were
    outdoor = data["by_role"]["outdoor"]
    assert outdoor["temperature"] == 21.4 and outdoor["pressure"] == 1013.2 and outdoor["online"] is True
    assert outdoor["mac"] == MAC and outdoor["name"] == "Window" and outdoor["last_seen"] == data["stations"][0]["last_seen"]
    assert list(data["by_role"]) == ["outdoor"]
    assert data["by_name"]["Window"] == outdoor
    assert data["by_name"][MAC2]["temperature"] == 25.5  # a station never renamed is named by its MAC


def test_the_readmes_home_assistant_configuration_reads_the_live_json(server):
    yaml, jinja2 = need_module("yaml"), need_module("jinja2")
    block = re.search(r"^## Home Assistant\n.*?^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(),
                      re.S | re.M).group(1)
    rest = yaml.safe_load(block)["rest"][0]
    assert urllib.parse.urlsplit(rest["resource"]).path == "/api/latest"
    for value, mac, field in (("20.5", MAC, 1), ("1013.25", MAC, 2), ("23", MAC2, 1), ("64.5", MAC3, 3)):
        assert server.update(value, mac=mac, field=field)[0] == 200
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--role", MAC2, "indoor")
    cli(server.db, "--rename", MAC3, "Greenhouse")
    data = json.loads(server.request(urllib.parse.urlsplit(rest["resource"]).path)[2])
    # Home Assistant renders value_template with Jinja2, value_json being the parsed answer
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    shown = {}
    for sensor in rest["sensor"] + rest["binary_sensor"]:
        template = sensor["value_template"]
        assert re.fullmatch(r"\{\{ value_json(\.\w+|\['[^']+'\])+ \}\}", template), template  # one path each
        shown[sensor["name"]] = env.from_string(template).render(value_json=data)
    assert shown == {"Outside temperature": "20.5", "Inside temperature": "23.0", "Outside pressure": "1013.25",
                     "Greenhouse humidity": "64.5", "Outdoor station": "True"}
    assert all(s["unique_id"].startswith("iotserver_") for s in rest["sensor"] + rest["binary_sensor"])
