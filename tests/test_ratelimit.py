"""Per-station rate limiting and the wrong-key throttle."""

import random
import sys
import threading
import time

from conftest import IOTSERVER, MAC, MAC2

sys.path.insert(0, str(IOTSERVER.parent))
import iotserver  # noqa: E402


def test_two_stations_posting_at_the_same_instant_both_store(start):
    # ThingSpeak's free plan dropped one of these; here each MAC has its own bucket
    server = start("--rate", "1", "--burst", "1")
    barrier = threading.Barrier(2)
    answers = {}

    def post(mac):
        barrier.wait()
        answers[mac] = server.update("20.5", mac=mac)[0]

    threads = [threading.Thread(target=post, args=(m,)) for m in (MAC, MAC2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {MAC: 200, MAC2: 200}
    assert sorted(r[0] for r in server.rows()) == [MAC, MAC2]


def test_burst_then_429_with_retry_after_and_nothing_stored(start):
    server = start("--rate", "6", "--burst", "3")  # one reading per 10 s after a burst of 3
    assert [server.update(str(i))[0] for i in range(3)] == [200, 200, 200]
    status, headers, body = server.update("99")
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 10
    assert "too often" in body
    assert [r[2] for r in server.rows()] == [0.0, 1.0, 2.0]
    # another station is not affected by the first one's excess
    assert server.update("5", mac=MAC2)[0] == 200
    # the same station under another spelling of its MAC shares its bucket
    assert server.update("7", mac="6C-EF-7A-3B-9D-E8")[0] == 429


def test_retry_after_is_honest(start):
    server = start("--rate", "60", "--burst", "1")  # one a second
    assert server.update("1")[0] == 200
    status, headers, _ = server.update("2")
    assert status == 429
    time.sleep(int(headers["retry-after"]))
    assert server.update("3")[0] == 200
    assert [r[2] for r in server.rows()] == [1.0, 3.0]


def test_default_limit_fits_a_station_posting_a_few_fields_a_minute(start):
    server = start()
    # a BMP280 station posts temperature and pressure; a retry of each must fit too
    answers = [server.update(v, field=f)[0] for v, f in [("21.5", 1), ("101325", 2), ("21.5", 1), ("101325", 2)]]
    assert answers == [200] * 4


def test_wrong_keys_are_throttled_per_client_address(server):
    answers = [server.update(key="guess-%04d" % i)[0] for i in range(iotserver.KEY_FAILURE_BURST)]
    assert answers == [401] * iotserver.KEY_FAILURE_BURST
    status, headers, body = server.update(key="guess-next")
    assert status == 429 and int(headers["retry-after"]) >= 1
    # even the right key is refused from that address, or the 429 would be an oracle
    assert server.update()[0] == 429
    # a station at another address is untouched by the brute-forcer
    assert server.update(source="127.0.0.2")[0] == 200
    assert len(server.rows()) == 1


def test_buckets_stay_bounded_under_a_flood_of_macs():
    buckets = iotserver.TokenBuckets(rate=1 / 60, burst=2, max_entries=1000)
    now = 1000.0
    for _ in range(50_000):
        mac = ":".join("%02x" % random.randrange(256) for _ in range(6))
        buckets.take(mac, now)
    assert len(buckets) == 1000
    # a station that keeps posting keeps its (drained) bucket: the flood cannot refill it
    buckets.take(MAC, now)
    buckets.take(MAC, now)
    for i in range(5000):
        buckets.take("flood-%d" % i, now)
        if i % 100 == 0:
            assert buckets.take(MAC, now) > 0
    assert buckets.take(MAC, now) > 0
