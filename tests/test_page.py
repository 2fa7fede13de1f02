"""The phone page: the window advice, station cards, the chart, escaping, CSP, empty state."""

import base64
import html
import http.client
import json
import re
import sqlite3
import struct
import time
import zlib

import pytest

from conftest import FAST, MAC, MAC2, cli

OUT, IN = MAC, MAC2


def headline(server, path="/"):
    status, headers, body = server.request(path)
    assert status == 200
    match = re.search(r'<section class="headline (\w+)"[^>]*><h1>(.*?)</h1>', body)
    return match.group(1), html.unescape(match.group(2)).replace("\u00a0", " ")


def reason(server):
    """The line under the headline that says why."""
    body = server.request("/")[2]
    match = re.search(r'<section class="headline \w+"[^>]*><h1>.*?</h1><p>(.*?)</p>', body)
    return html.unescape(match.group(1)).replace("\u00a0", " ")


def _roles(server, out_c=None, in_c=None):
    if out_c is not None:
        assert server.update(str(out_c), mac=OUT)[0] == 200
    if in_c is not None:
        assert server.update(str(in_c), mac=IN)[0] == 200
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")


def _insert(server, mac, values):
    """Readings from the past, as a station that posted then would have left them: [(age s, field, value)]."""
    conn = sqlite3.connect(server.db)
    now = int(time.time() * 1000)
    with conn:
        sid = conn.execute("SELECT id FROM stations WHERE mac = ?", (mac,)).fetchone()[0]
        conn.executemany("INSERT INTO readings (station_id, field, value, ts) VALUES (?, ?, ?, ?)",
                         [(sid, f, v, now - int(age * 1000)) for age, f, v in values])
    conn.close()


def test_open_the_windows(server):
    _roles(server, out_c=20.0, in_c=25.0)
    assert headline(server) == ("open", "Open the windows — outside is 9.0 °F cooler")


def test_keep_them_closed(server):
    _roles(server, out_c=30.0, in_c=25.0)
    assert headline(server) == ("close", "Keep the windows closed — outside is 9.0 °F warmer")


def test_celsius_and_the_title_shows_outside(start):
    server = start("--unit", "c", *FAST)
    _roles(server, out_c=18.25, in_c=21.0)
    # 21 °C is inside the default comfort band (20-24 °C): cooler air outside is no reason to open
    assert headline(server) == ("close", "Keep the windows closed — inside is comfortable")
    assert reason(server) == "Inside 21.0 °C is within the comfort band (20.0–24.0 °C)."
    body = server.request("/")[2]
    assert "<title>18.2\u00a0°C outside · iotserver</title>" in body or "<title>18.3\u00a0°C outside" in body


def test_dead_band_keeps_the_advice_from_flipping(server):
    _roles(server, out_c=25.2, in_c=25.0)
    # inside is above the comfort band, but outside is not clearly cooler: no reason to open yet
    assert headline(server) == ("close", "Keep the windows closed — outside is about the same (0.4 °F warmer)")
    assert reason(server) == "Inside is above the comfort band, but outside is not clearly cooler yet."
    server.update("20.0", mac=OUT)  # clearly cooler: open
    assert headline(server)[0] == "open"
    server.update("25.3", mac=OUT)  # a fraction warmer than inside: still open
    kind, text = headline(server)
    assert kind == "open" and "about the same (0.5 °F warmer)" in text
    server.update("25.6", mac=OUT)  # past the band: close
    assert headline(server) == ("close", "Keep the windows closed — outside is 1.1 °F warmer")
    server.update("24.8", mac=OUT)  # a fraction cooler: stays closed
    kind, text = headline(server)
    assert kind == "close" and "about the same (0.4 °F cooler)" in text
    assert reason(server) == "Outside is not clearly cooler yet, and the house is warm."


def test_dead_band_flag(start):
    server = start("--dead-band", "3", "--unit", "C", *FAST)
    _roles(server, out_c=23.0, in_c=25.0)
    assert headline(server) == ("close", "Keep the windows closed — outside is about the same (2.0 °C cooler)")
    server.update("21.5", mac=OUT)
    assert headline(server) == ("open", "Open the windows — outside is 3.5 °C cooler")


def test_stale_station_is_not_guessed_from(server):
    assert server.update("25.0", mac=IN)[0] == 200
    assert server.update("1", mac=OUT, field=2)[0] == 200  # registers the outdoor station
    server.rows()  # (the station exists now)
    _insert(server, OUT, [(7200 + 60 * i, 1, 18.0) for i in range(5)])
    conn = sqlite3.connect(server.db)
    with conn:
        conn.execute("DELETE FROM readings WHERE field = 2")
    conn.close()
    _roles(server)
    kind, text = headline(server)
    assert kind == "unknown"
    assert text.startswith("Can't compare: outside station %s is offline (last seen 2 h ago)" % OUT)
    body = server.request("/")[2]
    card = re.search(r'<section class="card offline" data-mac="%s">.*?</section>' % OUT, body).group(0)
    assert "Offline</span> · last seen 2 h ago" in card
    assert 'class="card offline" data-mac="%s"' % IN not in body


def test_missing_roles_say_what_to_do(server):
    assert server.update("25.0", mac=IN)[0] == 200
    kind, text = headline(server)
    assert (kind, text) == ("unknown", "Can't compare yet: no station is marked outdoor")
    assert "--role MAC outdoor" in re.sub(r"<[^>]*>", "", server.request("/")[2])  # the text as shown
    cli(server.db, "--role", IN, "outdoor")
    assert headline(server) == ("unknown", "Can't compare yet: no station is marked indoor")


def test_outdoor_without_temperature(server):
    assert server.update("1013", mac=OUT, field=2)[0] == 200
    _roles(server, in_c=25.0)
    assert headline(server) == ("unknown", "Can't compare yet: outside station %s has sent no temperature" % OUT)


def test_station_card_values_ago_and_todays_range(start):
    server = start("--tz", "UTC", *FAST)
    assert server.update("21.4", mac=OUT)[0] == 200
    assert server.update("1013.2", mac=OUT, field=2)[0] == 200
    cli(server.db, "--rename", OUT, "Window")
    now = time.gmtime()
    since_midnight = now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec
    if since_midnight > 600:  # readings from earlier today (and one from yesterday, not in today's range)
        _insert(server, OUT, [(300, 1, 15.0), (since_midnight - 1, 1, 30.0), (since_midnight + 5, 1, -40.0)])
    body = server.request("/")[2]
    card = re.search(r'<section class="card" data-mac="%s">.*?</section>' % OUT, body).group(0)
    assert '<h2><a href="/station/%s">Window</a></h2>' % OUT in card
    assert '<span class="value" data-field="1">70.5\u00a0°F</span>' in card
    assert '<span class="value" data-field="2">1013.2\u00a0hPa</span>' in card
    assert re.search(r'<p class="seen">(just now|\d+ s ago)</p>', card)
    if since_midnight > 600:
        assert "today 59.0\u00a0°F – 86.0\u00a0°F" in card
    assert "time (UTC)" in body


def _svg(body):
    return re.search(r"<svg.*?</svg>", body, re.S).group(0)


@pytest.mark.parametrize("count", [100, 100_000])
def test_chart_size_is_bounded(server, count):
    _roles(server, out_c=20.0, in_c=25.0)
    step = 86_000 / count
    _insert(server, OUT, [(i * step, 1, 15 + (i % 100) / 10) for i in range(count)])
    _insert(server, IN, [(i * step, 1, 24 + (i % 50) / 10) for i in range(count)])
    body = server.request("/")[2]
    svg = _svg(body)
    assert 'aria-label="Temperature in °F, last 24 hours"' in svg
    for css in ("outdoor", "indoor"):
        points = sum(len(p.split()) for p in re.findall(r'class="line %s" points="([^"]*)"' % css, svg))
        assert 0 < points <= 146, (css, points)
    assert len(svg) < 12_000
    assert len(body) < 30_000
    assert re.findall(r'text-anchor="middle">(\d\d:\d\d)</text>', svg)  # time axis labelled


def test_hostile_station_name_is_escaped(server):
    assert server.update("20", mac=OUT)[0] == 200
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    cli(server.db, "--rename", OUT, evil)
    body = server.request("/")[2]
    assert "<script>alert" not in body and "<img src=x" not in body
    assert html.escape(evil) in body


def test_content_security_policy(server):
    assert server.update("20", mac=OUT)[0] == 200
    status, headers, body = server.request("/")
    csp = headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([\w-]+)'", csp).group(1)
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert re.findall(r"<script[^>]*>", body) == ['<script nonce="%s" data-refresh="30">' % nonce]
    assert re.findall(r"<style[^>]*>", body) == ['<style nonce="%s">' % nonce]
    assert " style=" not in body and "onload=" not in body  # nothing inline the policy would block
    assert nonce != re.search(r"'nonce-([\w-]+)'", server.request("/")[1]["content-security-policy"]).group(1)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in body
    assert '<noscript><meta http-equiv="refresh" content="30"></noscript>' in body
    assert "prefers-color-scheme:dark" in body


def test_empty_state_shows_how_to_point_a_station(server):
    status, _, body = server.request("/", headers={"Host": "weather.example.org"})
    assert status == 200
    assert "No readings yet" in body
    # the URL as the phone shows it (<wbr> marks where a long URL may wrap: after a slash)
    assert "http://weather.example.org/update/API_key=KEY/mac=" in body.replace("<wbr>", "")
    assert server.key[:4] not in body  # anyone may see this page: no part of the key
    assert "--show-key" in body


def test_private_page_and_api_need_the_key(start):
    server = start("--private", *FAST)
    assert server.update("20")[0] == 200  # stations post as always
    for path in ("/", "/api/latest", "/api/readings", "/api/readings.csv"):
        status, headers, body = server.request(path)
        assert status == 401 and headers["www-authenticate"].startswith("Basic"), path
        assert "20" not in body
    auth = {"Authorization": "Basic " + base64.b64encode(b"me:" + server.key.encode()).decode()}
    assert server.request("/", headers=auth)[0] == 200
    assert server.request("/api/latest?key=%s" % server.key)[0] == 200
    assert server.request("/api/readings?key=%s&field=1" % server.key)[0] == 200
    assert server.request("/", method="HEAD")[0] == 200  # uptime monitors
    assert server.key not in server.log


def test_chart_forgets_what_another_process_pruned(server):
    _roles(server, out_c=20.0, in_c=25.0)
    _insert(server, OUT, [(20 * 3600 + 60 * i, 1, 10.0) for i in range(30)])  # 20 h ago, 50 °F
    first = _svg(server.request("/")[2])
    assert ">50</text>" in first  # the y axis reaches down to the old cold readings
    assert "pruned 30 readings" in cli(server.db, "--prune-days", "0.5").stdout
    second = _svg(server.request("/")[2])
    assert ">50</text>" not in second
    assert len(re.findall(r'class="line outdoor"', second)) == 1  # just the fresh reading left


def test_todays_range_follows_new_readings(server):
    assert server.update("20", mac=OUT)[0] == 200
    server.request("/")  # the page has read the station once: later readings update it in memory
    for value in ("25", "18"):
        assert server.update(value, mac=OUT)[0] == 200
        server.request("/")
    card = re.search(r'<section class="card[^"]*" data-mac="%s">.*?</section>' % OUT, server.request("/")[2]).group(0)
    assert "64.4\u00a0°F</span>" in card  # 18 °C is the latest
    assert "today 64.4\u00a0°F – 77.0\u00a0°F" in card
    cli(server.db, "--forget", OUT)  # another process changes the database: the page follows
    assert 'data-mac="%s"' % OUT not in server.request("/")[2]


def test_many_stations_keep_the_page_short(start):
    # found by tests/soak.py: 500 stations made every page load run thousands of queries and draw 500 cards
    server = start(*FAST)
    for i in range(40):
        assert server.update(str(i), mac="02:00:00:00:01:%02x" % i)[0] == 200
    body = server.request("/")[2]
    assert body.count('<section class="card') == 24
    assert "… and 16 more stations" in body
    cards = re.findall(r'<section class="card[^"]*" data-mac="([^"]+)"', body)
    assert cards == ["02:00:00:00:01:%02x" % i for i in range(24)]  # by name: the same cards at every post
    assert len(json.loads(server.request("/api/latest")[2])["stations"]) == 40


def _png_size(data):
    """(width, height) of a PNG, after checking its chunks' CRCs and that its pixels inflate to that size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">2I2B", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)  # 8-bit RGB: no transparency, which iOS would fill with black
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    assert b"IEND" in chunks
    return width, height


def _raw(server, path):
    """(status, content type, body bytes) of a GET."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def test_home_screen_manifest_and_icons_need_no_key(start):
    server = start("--private", *FAST)
    assert server.update("20")[0] == 200
    status, headers, body = server.request("/manifest.webmanifest")
    assert status == 200 and headers["content-type"] == "application/manifest+json"
    manifest = json.loads(body)
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/" and manifest["short_name"]
    assert "20" not in body  # no data in it
    pngs = [i for i in manifest["icons"] if i["type"] == "image/png"]
    assert {i["sizes"] for i in pngs} == {"192x192", "512x512"}
    assert any(i.get("purpose") == "maskable" for i in pngs)
    for icon in manifest["icons"]:
        status, kind, data = _raw(server, icon["src"])
        assert status == 200 and kind == icon["type"], icon
        if kind == "image/png":
            assert "%dx%d" % _png_size(data) == icon["sizes"]
    assert _png_size(_raw(server, "/apple-touch-icon.png")[2]) == (180, 180)
    ico = _raw(server, "/favicon.ico")[2]
    count, = struct.unpack("<4xH", ico[:6])
    size, offset = struct.unpack("<8xII", ico[6:22])
    assert count == 1 and _png_size(ico[offset:offset + size]) == (32, 32)  # an ICO holding one PNG
    assert "<svg" in server.request("/icon.svg")[2]
    # the page links them, and its policy lets the browser fetch the manifest
    auth = {"Authorization": "Basic " + base64.b64encode(b"me:" + server.key.encode()).decode()}
    status, headers, body = server.request("/", headers=auth)
    assert '<link rel="manifest" href="/manifest.webmanifest">' in body
    assert '<link rel="apple-touch-icon" href="/apple-touch-icon.png">' in body
    assert re.search(r'<link rel="icon" href="/icon.svg"', body) and '<meta name="theme-color"' in body
    assert "manifest-src 'self'" in headers["content-security-policy"]
    assert server.request("/api/latest")[0] == 401  # the rest stays private


def _bulk(server, mac, rows):
    body = "time_format=absolute&updates=" + "|".join(rows)
    status = server.request("/update/API_key=%s/mac=%s" % (server.key, mac), method="POST", body=body,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})[0]
    assert status == 202


def test_card_and_headline_show_the_same_dew_point(start):
    server = start("--unit", "C", *FAST)
    now = int(time.time())
    # humidity sent ten minutes before the latest temperature (in separate posts, as older stations do)
    for mac, celsius, rh in ((MAC, 18.0, 60), (MAC2, 26.0, 50)):
        _bulk(server, mac, ["%d,,,%d" % (now - 600, rh), "%d,%.1f" % (now - 30, celsius)])
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--role", MAC2, "indoor")
    advice = json.loads(server.request("/api/advice")[2])
    page = server.request("/")[2]
    for where, mac in (("outside", MAC), ("inside", MAC2)):
        dew = "%.1f\u00a0°C" % advice[where]["dew_point"]
        card = re.search(r'<section class="card[^"]*" data-mac="%s">.*?</section>' % mac, page, re.S).group(0)
        assert 'data-field="dew">%s<' % dew in card, (where, dew)
        assert dew in page.split('<div class="cards">')[0]  # and in the headline
    # a station's own page draws its temperature in the colour the main page gives it
    assert 'class="line outdoor"' in server.request("/station/%s" % MAC)[2]


def test_wide_axis_labels_are_not_cut_off(server):
    now = int(time.time())
    _bulk(server, MAC, ["%d,,%.2f" % (now - 3600 + i * 600, 1006.3 + i / 10) for i in range(6)])
    page = server.request("/station/%s" % MAC)[2]
    chart = [svg for svg in re.findall(r"<svg.*?</svg>", page, re.S) if "Pressure" in svg][0]
    labels = re.findall(r'<text class="tick" x="(\d+)" y="[\d.]+" text-anchor="end">(\d[\d.]*)</text>', chart)
    assert any(len(text) >= 6 for _, text in labels), labels
    for x, text in labels:  # right-aligned at x, 10 px glyphs about 5.6 px wide: the first one starts inside
        assert int(x) - 5.6 * len(text) >= 0, (x, text)


def test_series_values_carry_no_float_noise(server):
    now = int(time.time())
    bucket = (now - 1800) // 600 * 600  # both in one 10-minute bucket: (22.1 + 22.3) / 2 in °F is 71.96000000000001
    _bulk(server, MAC, ["%d,22.1" % (bucket + 60), "%d,22.3" % (bucket + 180)])
    points = json.loads(server.request("/api/series?mac=%s&field=1" % MAC)[2])["points"]
    assert [p["mean"] for p in points] == [71.96], points
