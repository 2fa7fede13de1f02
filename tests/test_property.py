"""Property-based: arbitrary paths only ever get 2xx/4xx, and only finite numbers are stored."""

import math
import string
import urllib.parse

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import MAC

SEGMENT_ALPHABET = string.ascii_letters + string.digits + "%:-._~=+eE/\\'\"<>;,&?# \t" + "\u0662\uff17\u00e9\x00\x1b"


def _path_text(text):
    # what a client can put on the wire: percent-encode what http.client would refuse
    return urllib.parse.quote(text, safe="/%=:;,+&?'\"<>\\-._~")


segments = st.one_of(
    st.text(SEGMENT_ALPHABET, max_size=40),
    st.builds("data={}".format, st.one_of(st.text(SEGMENT_ALPHABET, max_size=30),
                                          st.floats(allow_nan=True, allow_infinity=True).map(repr),
                                          st.integers().map(str))),
    st.builds("mac={}".format, st.text("0123456789abcdefABCDEF:-%", max_size=20)),
    st.builds("field={}".format, st.text(string.digits + "-+.", max_size=3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_arbitrary_update_paths(server, data):
    key = server.key
    base = ["API_key=%s" % key, "mac=%s" % MAC, "field=1", "data=1"]
    parts = data.draw(st.lists(st.one_of(st.sampled_from(base), segments), max_size=6))
    path = "/update/" + "/".join(_path_text(p) for p in parts)
    before = server.rows("SELECT count(*) FROM readings")[0][0]
    status, _, body = server.request(path)
    assert status == 200 or 400 <= status < 500, (path, status, body)
    after = server.rows("SELECT count(*) FROM readings")[0][0]
    assert after == before + (1 if status == 200 else 0)
    if status == 200:
        [(value,)] = server.rows("SELECT value FROM readings ORDER BY id DESC LIMIT 1")
        assert isinstance(value, float) and math.isfinite(value) and abs(value) <= 1e9


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(string.printable, min_size=0, max_size=24))
def test_every_data_value_is_stored_exactly_or_refused(server, text):
    status, _, body = server.update(urllib.parse.quote(text, safe=""))
    if status == 200:
        [(value,)] = server.rows("SELECT value FROM readings ORDER BY id DESC LIMIT 1")
        assert value == float(text) and math.isfinite(value)
        assert text.strip() == text and "_" not in text
    else:
        assert status == 400 and "data" in body, (text, status, body)


query_values = st.text(SEGMENT_ALPHABET + "&=;+", max_size=30)
query_names = st.sampled_from(["api_key", "key", "field1", "field2", "field9", "created_at", "timezone", "mac",
                               "field", "since", "until", "limit", "format", "results", "days", "minutes", "start",
                               "end", "status", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["/update", "/update.json", "/api/readings", "/api/readings.csv", "/api/latest", "/",
                        "/channels/1/feeds.json", "/channels/1/fields/1.csv", "/channels/1/fields/1/last.txt",
                        "/channels/1/feeds/last.json", "/channels/1/fields/1/last_data_age.json"]),
       st.lists(st.tuples(query_names, query_values), max_size=5), st.booleans(), st.booleans())
def test_arbitrary_queries_never_get_a_5xx(server, path, pairs, post, with_key):
    if not server.rows("SELECT 1 FROM stations"):
        assert server.update("1")[0] == 200  # channel 1 exists
    if with_key:  # the channel's real write key, so writes get past the key check
        [(key,)] = server.rows("SELECT write_key FROM stations WHERE id = 1")
        pairs = [("api_key", key)] + [p for p in pairs if p[0] != "api_key"]
    query = "&".join("%s=%s" % (urllib.parse.quote(n), urllib.parse.quote(v)) for n, v in pairs)
    # guessed keys come from another address, so their throttle does not hold back the real key
    source = "127.0.0.1" if with_key else "127.0.0.2"
    if post and path.startswith("/update"):
        status, _, body = server.request(path, method="POST", body=query, source=source,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        status, _, body = server.request(path + ("?" + query if query else ""), source=source)
    assert 200 <= status < 500, (path, query, status, body)
    [(bad,)] = server.rows("SELECT count(*) FROM readings WHERE NOT (abs(value) <= 1e9)")
    assert bad == 0
