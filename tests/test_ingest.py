"""A station's update URL: what is stored, and every way a request is refused."""

import socket
import time

import pytest

from conftest import MAC, MAC2, cli


def test_reading_is_stored_with_a_short_answer(server):
    before = time.time()
    status, headers, body = server.update("21.4")
    assert status == 200
    assert body == "stored\n"
    assert int(headers["content-length"]) < 64  # the ESP8266 has ~30 KB of RAM
    [(mac, field, value, ts)] = server.rows()
    assert (mac, field, value) == (MAC, 1, 21.4)
    assert before - 1 <= ts / 1000 <= time.time() + 1  # server-set UTC epoch time


def test_negative_exponent_and_signed_values(server):
    for text, value in [("-7.5", -7.5), ("+3", 3.0), ("1.5e3", 1500.0), ("101325", 101325.0), (".5", 0.5),
                        ("-0.0625", -0.0625)]:
        assert server.update(text)[0] == 200, text
        assert server.rows()[-1][2] == value


@pytest.mark.parametrize("form", ["6C:EF:7A:3B:9D:E8", "6c-ef-7a-3b-9d-e8", "6cef7a3b9de8", "6C%3AEF%3A7a%3A3b%3A9d%3Ae8"])
def test_mac_forms_are_one_station(server, form):
    assert server.update("20", mac=MAC)[0] == 200
    assert server.update("21", mac=form)[0] == 200
    assert [r[0] for r in server.rows()] == [MAC, MAC]
    listing = cli(server.db, "--stations").stdout
    assert listing.count("6c:ef:7a:3b:9d:e8") == 2  # one line: the MAC and its default name
    assert len(listing.strip().splitlines()) == 1


REFUSED_DATA = [
    "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "1_000", "%D9%A7%D9%A2.%D9%A3",  # ٧٢.٣
    "%EF%BC%97%EF%BC%92",  # ７２ full-width
    "", "1" * 40, "%2021.4", "21.4%20", "21.4%0A", "0x10", "1e", ".", "+", "-", "1.2.3", "21,4", "2e10",
    "21.4%00", "%zz", "21%", "1%2F2", "1'%20OR%20'1'='1", "%3Cscript%3E",
]


@pytest.mark.parametrize("data", REFUSED_DATA)
def test_bad_data_is_refused_naming_data(server, data):
    status, headers, body = server.update(data)
    assert status == 400, body
    assert "data" in body
    assert headers["content-type"].startswith("text/plain")
    assert len(body) < 120 and body.count("\n") == 1
    assert server.rows() == []


@pytest.mark.parametrize("mac", ["6c:ef:7a:3b:9d", "6c:ef:7a:3b:9d:e8:00", "zz:ef:7a:3b:9d:e8", "6c:ef-7a:3b:9d:e8",
                                 "6c%253Aef%253A7a%253A3b%253A9d%253Ae8", "", "6c:ef:7a:3b:9d:e%C3%A8",
                                 "%EF%BC%96c:ef:7a:3b:9d:e8", "6cef7a3b9de"])
def test_bad_mac_is_refused(server, mac):
    status, _, body = server.update(mac=mac)
    assert status == 400 and "mac" in body
    assert server.rows() == []


@pytest.mark.parametrize("field", ["0", "9", "01", "1.0", "one", "", "-1", "%EF%BC%91"])
def test_bad_field_is_refused(server, field):
    status, _, body = server.update(field=field)
    assert status == 400 and "field" in body
    assert server.rows() == []


def test_malformed_paths(server):
    key = server.key
    cases = {
        "/update/API_key=%s/mac=%s/field=1" % (key, MAC): "missing data",
        "/update/API_key=%s/mac=%s/field=1/data=1/data=2" % (key, MAC): "twice",
        "/update/API_key=%s/mac=%s/field=1/data=1/extra=2" % (key, MAC): "unknown path segment",
        "/update/API_key=%s//mac=%s/field=1/data=1" % (key, MAC): "unknown path segment",
        "/update/API_key=%s/mac=%s/field=1/data" % (key, MAC): "unknown path segment",
    }
    for path, words in cases.items():
        status, _, body = server.request(path)
        assert status == 400 and words in body, (path, body)
    assert server.request("/update")[0] == 401  # ThingSpeak's write form, without a key
    # one trailing slash and a query string are harmless
    assert server.request("/update/API_key=%s/mac=%s/field=1/data=1/?x=1" % (key, MAC))[0] == 200
    # names are case-insensitive, like ThingSpeak's
    assert server.request("/update/api_key=%s/MAC=%s/Field=2/DATA=2" % (key, MAC))[0] == 200
    assert len(server.rows()) == 2


def test_wrong_key_is_401_and_stores_nothing(server):
    status, _, body = server.update(key="not-the-key-123")
    assert status == 401 and "key" in body
    assert server.update(key=server.key[:-1])[0] == 401
    assert server.update(key=server.key + "x")[0] == 401
    assert server.rows() == []


def test_other_paths_and_methods(server):
    assert server.request("/nothing")[0] == 404
    assert server.request("/update.php")[0] == 404
    assert server.request("/")[0] == 200
    status, headers, body = server.request("/", method="HEAD")
    assert status == 200 and body == ""  # uptime monitors
    path = "/update/API_key=%s/mac=%s/field=1/data=1" % (server.key, MAC)
    for method in ("POST", "PUT", "DELETE", "PATCH", "FOO"):
        status, headers, body = server.request(path, method=method)
        assert status == 405, method
        assert headers["allow"] == "GET"
    assert server.rows() == []


def test_overlong_path_is_414(server):
    status, _, body = server.update("1" + "0" * 600)
    assert status == 414 and body.startswith("414")
    status, _, _ = server.request("/update/" + "a" * 70000)
    assert status in (414, 400)
    assert server.rows() == []


def _raw(server, data):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("latin-1")


@pytest.mark.parametrize("raw", [
    b"GET\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET /update/API_key=x\x00/mac=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /update/API_key=\xff\xfe/mac=%s/field=1/data=1 HTTP/1.1\r\nConnection: close\r\n\r\n" % MAC.encode(),
    b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
])
def test_malformed_http_gets_a_4xx(server, raw):
    answer = _raw(server, raw)
    status = int(answer.split(" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert "text/plain" in answer
    assert server.rows() == []


def test_request_body_does_not_become_a_request(server):
    path = "/update/API_key=%s/mac=%s/field=1/data=5" % (server.key, MAC)
    smuggled = b"GET " + path.replace("data=5", "data=6").encode() + b" HTTP/1.1\r\n\r\n"
    answer = _raw(server, b"GET %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(smuggled), smuggled))
    assert answer.count("HTTP/1.1 ") == 1
    assert [r[2] for r in server.rows()] == [5.0]


def test_locked_registration(server):
    assert server.update(mac=MAC)[0] == 200
    assert "locked" in cli(server.db, "--lock").stdout
    status, _, body = server.update(mac=MAC2)
    assert status == 403 and "locked" in body
    assert server.update(mac=MAC)[0] == 200  # known stations keep posting
    cli(server.db, "--unlock")
    assert server.update(mac=MAC2)[0] == 200
    assert sorted({r[0] for r in server.rows()}) == [MAC, MAC2]


def test_station_limit_refuses_a_flood_of_macs(start):
    server = start("--max-stations", "3")
    macs = ["02:00:00:00:00:%02x" % i for i in range(6)]
    answers = [server.update(mac=m)[0] for m in macs]
    assert answers == [200, 200, 200, 403, 403, 403]
    assert len(server.rows("SELECT * FROM stations")) == 3
