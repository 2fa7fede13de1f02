"""/metrics: Prometheus's text format, checked by promtool and scraped by a real Prometheus."""

import http.client
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

from conftest import FAST, MAC, MAC2, ROOT, cli, need_tool

sys.path.insert(0, str(ROOT))
import iotserver  # noqa: E402

TOKEN = "scraper-token-0123456789"
_SAMPLE_RE = re.compile(r'([a-z_]+)(?:\{(.*)\})? (\S+)')
_LABEL_RE = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(metric name, frozenset of (label, value)): value} from the text format, label values unescaped."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, labels, value = _SAMPLE_RE.fullmatch(line).groups()
        pairs = [(k, re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v))
                 for k, v in _LABEL_RE.findall(labels or "")]
        samples[(name, frozenset(pairs))] = float(value)
    return samples


def promtool_check(text):
    promtool = need_tool("promtool")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def metrics(server, **kwargs):
    status, headers, body = server.request("/metrics", **kwargs)
    assert status == 200, body
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return body


def test_station_values_and_counters_pass_promtool(server):
    assert server.update("21.4", mac=MAC)[0] == 200
    assert server.update("1013.25", mac=MAC, field=2)[0] == 200
    assert server.update("23.5", mac=MAC2)[0] == 200
    assert server.update("23.5", mac=MAC2, field=4)[0] == 200
    cli(server.db, "--rename", MAC, 'Window "north" \\ side')
    cli(server.db, "--role", MAC, "outdoor")
    assert server.update("nan", mac=MAC)[0] == 400
    assert server.update("1", mac=MAC, key="wrong-key-123")[0] == 401
    status, _, body = server.request("/update?api_key=%s&field1=19.5&field3=40" % _write_key(server, MAC))
    assert status == 200 and int(body) > 0
    text = metrics(server)
    promtool_check(text)
    m = parse(text)
    window = {("station", 'Window "north" \\ side'), ("mac", MAC)}
    assert m[("iotserver_station_value", frozenset(window | {("field", "1"), ("quantity", "temperature"),
                                                             ("unit", "°C")}))] == 19.5
    assert m[("iotserver_station_value", frozenset(window | {("field", "2"), ("quantity", "pressure"),
                                                             ("unit", "hPa")}))] == 1013.25
    assert m[("iotserver_station_value", frozenset(window | {("field", "3"), ("quantity", "humidity"),
                                                             ("unit", "%")}))] == 40
    other = {("station", MAC2), ("mac", MAC2)}
    assert m[("iotserver_station_value", frozenset(other | {("field", "4"), ("quantity", "field4"),
                                                            ("unit", "")}))] == 23.5
    assert m[("iotserver_station_online", frozenset(window))] == 1
    assert 0 <= m[("iotserver_station_last_seen_age_seconds", frozenset(window))] < 30
    assert m[("iotserver_stations", frozenset())] == 2
    assert m[("iotserver_readings_stored_total", frozenset({("api", "station")}))] == 4
    assert m[("iotserver_readings_stored_total", frozenset({("api", "thingspeak")}))] == 2
    assert m[("iotserver_readings_refused_total", frozenset({("reason", "invalid")}))] == 1
    assert m[("iotserver_readings_refused_total", frozenset({("reason", "wrong_key")}))] == 1
    assert m[("iotserver_wrong_keys_total", frozenset())] == 1
    assert m[("iotserver_requests_total", frozenset({("route", "/update/*"), ("status", "200")}))] == 4
    assert m[("iotserver_requests_total", frozenset({("route", "/update"), ("status", "200")}))] == 1
    size = m[("iotserver_database_bytes", frozenset())]
    on_disk = sum(os.path.getsize(p) for p in (server.db, str(server.db) + "-wal") if os.path.exists(p))
    assert 0 < size and abs(size - on_disk) <= 64 * 1024  # the -wal grows between the two looks
    assert 0 < m[("iotserver_uptime_seconds", frozenset())] < 120
    # the page's and the API's requests are counted too, by their route
    server.request("/api/latest")
    server.request("/no/such/page")
    m = parse(metrics(server))
    assert m[("iotserver_requests_total", frozenset({("route", "/api/latest"), ("status", "200")}))] == 1
    assert m[("iotserver_requests_total", frozenset({("route", "other"), ("status", "404")}))] == 1
    assert m[("iotserver_requests_total", frozenset({("route", "/metrics"), ("status", "200")}))] == 1
    # an offline station reads 0 (its last reading was long ago)
    conn = sqlite3.connect(server.db)
    with conn:  # as if MAC2 had posted an hour ago and fallen silent since
        conn.execute("UPDATE readings SET ts = ts - 3600000 WHERE station_id = "
                     "(SELECT id FROM stations WHERE mac = ?)", (MAC2,))
    conn.close()
    m = parse(metrics(server))
    assert m[("iotserver_station_online", frozenset(other))] == 0
    assert m[("iotserver_station_last_seen_age_seconds", frozenset(other))] >= 3600


def _write_key(server, mac):
    return re.search(r"write key: (\w+)", cli(server.db, "--channel-key", mac).stdout).group(1)


def test_rate_limited_and_refusals_by_reason(start):
    server = start("--rate", "1", "--burst", "1")
    assert server.update("20")[0] == 200
    assert server.update("21")[0] == 429
    status, _, body = server.request("/update?key=%s&field1=22" % _write_key(server, MAC))
    assert (status, body) == (200, "0")  # ThingSpeak's "not inserted"
    bulk = json.dumps({"updates": [{"delta_t": 0, "field1": 23.5, "field2": 1000}]})
    for status in (202, 429):  # a station's buffered readings, then too soon again
        assert server.request("/update/API_key=%s/mac=%s" % (server.key, MAC2), method="POST", body=bulk,
                              headers={"Content-Type": "application/json"})[0] == status
    cli(server.db, "--lock")
    assert server.update("20", mac="6c:ef:7a:3b:9d:ea")[0] == 403
    m = parse(metrics(server))
    assert m[("iotserver_rate_limited_total", frozenset({("api", "station")}))] == 1
    assert m[("iotserver_rate_limited_total", frozenset({("api", "thingspeak")}))] == 1
    assert m[("iotserver_rate_limited_total", frozenset({("api", "bulk")}))] == 1
    assert m[("iotserver_readings_refused_total", frozenset({("reason", "rate_limited")}))] == 3
    assert m[("iotserver_readings_refused_total", frozenset({("reason", "locked")}))] == 1
    assert m[("iotserver_readings_stored_total", frozenset({("api", "station")}))] == 1
    assert m[("iotserver_readings_stored_total", frozenset({("api", "bulk")}))] == 2


def test_private_metrics_take_the_key_or_a_bearer_token(start, tmp_path):
    server = start("--private", "--metrics-token", TOKEN, *FAST)
    assert server.update("20")[0] == 200
    status, headers, body = server.request("/metrics")
    assert status == 401 and "iotserver_station_value" not in body
    assert "iotserver_station_value" in metrics(server, headers={"Authorization": "Bearer " + TOKEN})
    assert "iotserver_station_value" in server.request("/metrics?key=" + server.key)[2]
    status, _, body = server.request("/metrics", headers={"Authorization": "Bearer wrong-token-123"})
    assert status == 401 and "iotserver_station" not in body
    m = parse(metrics(server, headers={"Authorization": "Bearer " + TOKEN}))
    assert m[("iotserver_wrong_keys_total", frozenset())] == 1
    assert TOKEN not in server.log
    # the token only opens /metrics, not the page or the API
    assert server.request("/api/latest", headers={"Authorization": "Bearer " + TOKEN})[0] == 401
    server.stop()
    # from the environment, so systemd can pass it from a file
    env = dict(os.environ, IOTSERVER_METRICS_TOKEN=TOKEN)
    server = start("--private", env=env, db=tmp_path / "iotserver.db")
    assert server.request("/metrics", headers={"Authorization": "Bearer " + TOKEN})[0] == 200
    assert server.request("/metrics")[0] == 401


def test_a_new_counter_appears_without_changes(tmp_path):
    store = iotserver.Store(str(tmp_path / "x.db"))
    server = iotserver.Server(("127.0.0.1", 0), store, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        server.count("notifications", result="sent", kind="ntfy")
        server.count("notifications", result="failed", kind="email")
        server.count("notifications", result="sent", kind="ntfy")
        server.count("made_up_events", color='say "hi"\n')
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    finally:
        server.stop()
        thread.join(10)
        store.close()
    promtool_check(text)
    m = parse(text)
    assert m[("iotserver_notifications_total", frozenset({("result", "sent"), ("kind", "ntfy")}))] == 2
    assert m[("iotserver_notifications_total", frozenset({("result", "failed"), ("kind", "email")}))] == 1
    assert m[("iotserver_made_up_events_total", frozenset({("color", 'say "hi"\n')}))] == 1
    assert "# TYPE iotserver_made_up_events_total counter" in text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_it(start, tmp_path):
    prometheus = need_tool("prometheus")
    server = start("--private", "--metrics-token", TOKEN, *FAST)
    assert server.update("21.4", mac=MAC)[0] == 200
    cli(server.db, "--rename", MAC, "Window")
    config = tmp_path / "prometheus.yml"
    config.write_text("""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: iotserver
    authorization:
      credentials: %s
    static_configs:
      - targets: ["127.0.0.1:%d"]
""" % (TOKEN, server.port))
    port = _free_port()
    proc = subprocess.Popen([prometheus, "--config.file=%s" % config, "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                             "--web.listen-address=127.0.0.1:%d" % port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        query = 'iotserver_station_value{mac="%s",field="1"}' % MAC
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (port, urllib.parse.urlencode({"query": query}))
        deadline = time.monotonic() + 60
        result = []
        while not result:
            assert time.monotonic() < deadline and proc.poll() is None, "Prometheus found no value"
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    result = json.load(resp)["data"]["result"]
            except OSError:
                continue  # not listening yet
        assert result[0]["value"][1] == "21.4"
        assert result[0]["metric"]["station"] == "Window" and result[0]["metric"]["unit"] == "°C"
        assert result[0]["metric"]["job"] == "iotserver"
    finally:
        proc.terminate()
        proc.wait(30)
    assert TOKEN not in server.log
