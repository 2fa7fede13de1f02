"""The window advice through the seasons: comfort band, humidity, hysteresis, the crossover estimate, /api/advice."""

import datetime
import html
import json
import math
import random
import re
import time

import pytest

from conftest import FAST, MAC, MAC2, cli

OUT, IN = MAC, MAC2
MINUTE = 60_000


def iso(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


def bulk(server, mac, entries):
    """Post [(ms, {field: value})] as the station's own bulk upload (measurement times given)."""
    for i in range(0, len(entries), 900):
        updates = [dict({"created_at": iso(ms)}, **{"field%d" % f: v for f, v in values.items()})
                   for ms, values in entries[i:i + 900]]
        status, _, body = server.request("/update/API_key=%s/mac=%s" % (server.key, mac), method="POST",
                                         body=json.dumps({"updates": updates}),
                                         headers={"Content-Type": "application/json"})
        assert status == 202, body


def weather(server, inside, outside, minutes=30):
    """Both stations, marked, with a steady half hour (one reading a minute) of (°C, %RH or None) ending now."""
    now = int(time.time() * 1000) - 1000
    for mac, (celsius, rh) in ((IN, inside), (OUT, outside)):
        values = {1: celsius} if rh is None else {1: celsius, 3: rh}
        bulk(server, mac, [(now - m * MINUTE, values) for m in range(minutes, -1, -1)])
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")


def advice(server):
    status, headers, body = server.request("/api/advice")
    assert status == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def page_headline(server):
    body = server.request("/")[2]
    section = re.search(r'<section class="headline (\w+)" id="headline">(.*?)</section>', body, re.S)
    texts = [html.unescape(t).replace("\u00a0", " ") for t in re.findall(r"<(?:h1|p)[^>]*>(.*?)</", section.group(2))]
    return section.group(1), texts


@pytest.fixture
def celsius(start):
    return start("--unit", "C", "--tz", "UTC", *FAST)


def say(a):
    return a["action"], a["headline"].replace("\u00a0", " "), a["reason"].replace("\u00a0", " ")


# -- the seasons --

def test_winter_a_warm_house_stays_closed(celsius):
    weather(celsius, inside=(21.0, 45), outside=(-5.0, 80))
    assert say(advice(celsius)) == ("close", "Keep the windows closed — inside is comfortable",
                                    "Inside 21.0 °C is within the comfort band (20.0–24.0 °C).")


def test_winter_a_cool_house_stays_closed_too(celsius):
    weather(celsius, inside=(18.5, 45), outside=(-5.0, 80))
    assert say(advice(celsius)) == ("close", "Keep the windows closed — outside is 23.5 °C colder",
                                    "Outside is colder and the house is already cool.")


def test_heat_wave_keeps_the_heat_out(celsius):
    weather(celsius, inside=(28.0, 40), outside=(35.0, 25))
    assert say(advice(celsius)) == ("close", "Keep the windows closed — outside is 7.0 °C warmer",
                                    "Outside is warmer and the house is already warm.")


def test_summer_evening_lets_the_cool_in(celsius):
    weather(celsius, inside=(27.0, 45), outside=(19.0, 55))
    assert say(advice(celsius)) == ("open", "Open the windows — outside is 8.0 °C cooler",
                                    "Inside is above the comfort band (20.0–24.0 °C): let the cooler air in.")


def test_spring_lets_the_warm_in(celsius):
    weather(celsius, inside=(17.5, 50), outside=(22.0, 45))
    assert say(advice(celsius)) == ("open", "Open the windows — outside is 4.5 °C warmer",
                                    "Inside is below the comfort band (20.0–24.0 °C): let the warmer air in.")


def test_comfortable_inside_needs_nothing(celsius):
    weather(celsius, inside=(22.5, 50), outside=(16.0, 60))
    assert say(advice(celsius))[:2] == ("close", "Keep the windows closed — inside is comfortable")


def test_comfort_band_flag(start):
    server = start("--unit", "C", "--comfort", "18-21", *FAST)
    weather(server, inside=(22.5, 50), outside=(16.0, 60))
    a = say(advice(server))
    assert a[:2] == ("open", "Open the windows — outside is 6.5 °C cooler") and "(18.0–21.0 °C)" in a[2]
    assert advice(server)["comfort"] == [18.0, 21.0]


def test_fahrenheit_page_says_it_in_fahrenheit(server):
    weather(server, inside=(27.0, None), outside=(19.0, None))
    kind, texts = page_headline(server)
    assert kind == "open"
    assert texts == ["Open the windows — outside is 14.4 °F cooler",
                     "Inside is above the comfort band (68.0–75.2 °F): let the cooler air in.",
                     "Outside 66.2 °F · inside 80.6 °F"]  # no humidity sent: no dew points


# -- humidity --

def test_muggy_evening_is_no_reason_to_open(celsius):
    weather(celsius, inside=(27.0, 50), outside=(24.0, 85))  # outside dew point 21.3 °C
    action, headline, reason = say(advice(celsius))
    assert (action, headline) == ("close", "Keep the windows closed — cooler outside, but muggy: dew point 21.3 °C")
    assert reason == "Air with a dew point above 18.0 °C feels sticky and would bring damp into the house."
    kind, texts = page_headline(celsius)
    assert kind == "close" and texts[2] == "Outside 24.0 °C, dew point 21.3 °C · inside 27.0 °C, dew point 15.7 °C"


def test_the_same_evening_when_dry_opens(celsius):
    weather(celsius, inside=(27.0, 50), outside=(24.0, 45))  # outside dew point 11.3 °C
    assert say(advice(celsius))[:2] == ("open", "Open the windows — outside is 3.0 °C cooler")


def test_max_dew_point_flag(start):
    server = start("--unit", "C", "--max-dew-point", "22", *FAST)
    weather(server, inside=(27.0, 50), outside=(24.0, 85))
    assert say(advice(server))[0] == "open"  # 21.3 °C is below this owner's limit


def test_humid_inside_airs_out_even_in_winter(celsius):
    weather(celsius, inside=(21.0, 72), outside=(2.0, 85))
    action, headline, reason = say(advice(celsius))
    assert (action, headline) == ("open", "Open for a few minutes: outside air is drier")
    assert reason == "Inside is humid (72 %); a cubic metre of outside air holds 4.7 g of water, inside air 13.2 g."
    a = advice(celsius)
    assert a["inside"]["dew_point"] == pytest.approx(15.8, abs=0.1)
    assert a["inside"]["absolute_humidity"] == pytest.approx(13.2, abs=0.1)
    assert a["outside"]["dew_point"] == pytest.approx(-0.2, abs=0.1)


def test_humid_inside_but_wetter_outside_stays_closed(celsius):
    weather(celsius, inside=(23.0, 65), outside=(21.0, 90))  # outside holds more water: airing brings it in
    assert say(advice(celsius))[:2] == ("close", "Keep the windows closed — inside is comfortable")


def test_cards_show_dew_point_and_water(celsius):
    weather(celsius, inside=(21.0, 72), outside=(2.0, 85))
    body = celsius.request("/")[2]
    card = re.search(r'<section class="card" data-mac="%s">.*?</section>' % IN, body).group(0)
    assert '<b data-field="dew">15.8\u00a0°C</b>' in card and "water 13.2\u00a0g/m³ of air" in card


# -- no flapping --

def test_no_flapping_at_the_edge_of_the_comfort_band(celsius):
    weather(celsius, inside=(24.3, None), outside=(18.0, None), minutes=5)
    assert advice(celsius)["action"] == "open"
    for value in (23.8, 24.1, 23.6, 24.0):  # in the band, but not by more than the dead band: stays open
        assert celsius.update(str(value), mac=IN)[0] == 200
        assert advice(celsius)["action"] == "open", value
    assert celsius.update("23.4", mac=IN)[0] == 200
    assert say(advice(celsius))[:2] == ("close", "Keep the windows closed — inside is comfortable")
    for value in (23.9, 24.0):  # and back up a little: stays closed
        assert celsius.update(str(value), mac=IN)[0] == 200
        assert advice(celsius)["action"] == "close", value


def test_since_says_when_the_advice_changed(celsius):
    weather(celsius, inside=(26.0, None), outside=(28.0, None), minutes=10)
    first = advice(celsius)
    assert first["action"] == "close"
    before = int(time.time() * 1000)
    assert celsius.update("20.0", mac=OUT)[0] == 200
    second = advice(celsius)
    changed = datetime.datetime.fromisoformat(second["since"].replace("Z", "+00:00")).timestamp() * 1000
    assert second["action"] == "open" and changed >= before - 1000 and second["since"] != first["since"]
    assert advice(celsius)["since"] == second["since"]  # asking again changes nothing


def test_advice_memory_survives_a_restart(start):
    server = start("--unit", "C", *FAST)
    now = int(time.time() * 1000) - 1000
    for mac, celsius in ((IN, 24.3), (OUT, 18.0)):  # inside above the band: open
        bulk(server, mac, [(now - 3 * MINUTE, {1: celsius})])
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")
    assert advice(server)["action"] == "open"
    # then just inside the band, by less than the dead band, for more readings than the advice
    # reads back: only its memory (kept in the database) still knows the windows are open
    for mac, celsius in ((IN, 23.8), (OUT, 18.0)):
        bulk(server, mac, [(now - 2 * MINUTE + i * 800, {1: celsius}) for i in range(136)])
    assert advice(server)["action"] == "open"
    time.sleep(2)  # the background check stores the memory
    assert server.stop() == 0
    again = start("--unit", "C", *FAST, db=server.db)
    assert say(advice(again)) == ("open", "Open the windows — outside is 5.8 °C cooler",
                                  "Inside is still at the top of the comfort band (20.0–24.0 °C): let the cooler air in.")


# -- the crossover estimate --

def evening(server, now, cross_in_min, noise, seed, minutes=150):
    """A summer evening: outside cooling along a day's curve, inside slowly; crossing ``cross_in_min`` from now."""
    rng = random.Random(seed)

    def outside(h):
        return 22 + 6 * math.cos(2 * math.pi * (h - 15) / 24)

    def inside(h):
        return 24.5 - 0.3 * (h - 15)

    lo, hi = 17.0, 23.0  # the hour outside crosses inside
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if outside(mid) > inside(mid) else (lo, mid)
    cross_h = lo
    ins, outs = [], []
    for m in range(minutes, -1, -1):
        ms = now - m * MINUTE
        h = cross_h + (ms - now) / 3_600_000 - cross_in_min / 60
        ins.append((ms, {1: round(inside(h) + rng.uniform(-noise, noise), 2)}))
        outs.append((ms + 20_000, {1: round(outside(h + 20 / 3600) + rng.uniform(-noise, noise), 2)}))
    bulk(server, IN, ins)
    bulk(server, OUT, [e for e in outs if e[0] <= now])
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")
    return now + cross_in_min * MINUTE


def test_crossover_on_an_evening_is_within_15_minutes(celsius):
    now = int(time.time() * 1000) - 30_000
    truth = evening(celsius, now, cross_in_min=25, noise=0.1, seed=7)  # ±0.1 °C: an MCP9808's scatter
    a = advice(celsius)
    assert a["action"] == "close"  # still warmer outside
    estimate = datetime.datetime.fromisoformat(a["crossover"].replace("Z", "+00:00")).timestamp() * 1000
    assert abs(estimate - truth) <= 15 * MINUTE, (estimate - truth) / MINUTE
    said = re.fullmatch(r"Outside should be cooler than inside around (\d\d):(\d\d)\.", a["outlook"])
    shown = datetime.datetime.fromtimestamp(estimate / 1000, datetime.timezone.utc).replace(
        hour=int(said.group(1)), minute=int(said.group(2)), second=0, microsecond=0)
    assert abs(shown.timestamp() * 1000 - estimate) <= 3 * MINUTE  # rounded to five minutes (--tz UTC)
    assert page_headline(celsius)[1][-1] == a["outlook"]


@pytest.mark.parametrize("case", ["flat", "noisy", "far"])
def test_no_crossover_from_a_flat_noisy_or_distant_trend(celsius, case):
    now = int(time.time() * 1000) - 30_000
    if case == "far":  # a clear trend, but the crossing is 2 hours away: further than a line can be trusted
        evening(celsius, now, cross_in_min=120, noise=0.05, seed=3)
    else:
        rng = random.Random(11)
        spread = 0.05 if case == "flat" else 2.0
        for mac, base in ((IN, 25.0), (OUT, 26.0)):
            bulk(celsius, mac, [(now - m * MINUTE, {1: round(base + rng.uniform(-spread, spread), 2)})
                                for m in range(120, -1, -1)])
        cli(celsius.db, "--role", OUT, "outdoor")
        cli(celsius.db, "--role", IN, "indoor")
    a = advice(celsius)
    assert a["action"] in ("open", "close")  # the advice itself is there
    assert a["crossover"] is None and a["outlook"] is None
    assert "should be" not in celsius.request("/")[2]


# -- /api/advice --

def test_api_advice_shape(celsius):
    weather(celsius, inside=(26.0, 50), outside=(18.0, 60))
    a = advice(celsius)
    assert set(a) >= {"action", "headline", "reason", "since", "crossover", "inside", "outside"}
    assert a["action"] == "open" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["since"])
    assert a["inside"]["mac"] == IN and a["inside"]["temperature"] == 26.0 and a["inside"]["humidity"] == 50.0
    assert a["outside"]["temperature"] == 18.0 and a["outside"]["dew_point"] == pytest.approx(10.1, abs=0.1)
    assert celsius.request("/api/advice", method="HEAD")[0] == 200


def test_api_advice_unknown_without_stations(celsius):
    a = advice(celsius)
    assert a["action"] == "unknown" and a["inside"] is None and a["since"] is None and a["crossover"] is None
    assert a["headline"] == "Can't compare yet: no station is marked outdoor"


def test_api_advice_is_private_with_the_page(start):
    server = start("--private", *FAST)
    assert server.request("/api/advice")[0] == 401
    assert server.request("/api/advice?key=%s" % server.key)[0] == 200
