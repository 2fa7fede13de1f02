"""Fields and units: what a station's field holds (--field), conversion for the page and the advice,
and implausible values flagged instead of used."""

import json
import re

from conftest import FAST, MAC, MAC2, cli
from test_page import headline

OUT, IN = MAC, MAC2


def _card(body, mac):
    return re.search(r'<section class="card[^"]*" data-mac="%s">.*?</section>' % mac, body, re.S).group(0)


def _latest(server, mac):
    return next(s for s in json.loads(server.request("/api/latest")[2])["stations"] if s["mac"] == mac)


def test_a_fahrenheit_station_is_shown_and_compared_right(start):
    server = start("--unit", "C", *FAST)
    assert server.update("72", mac=OUT)[0] == 200  # a station that posts °F, taken for °C
    assert server.update("25.0", mac=IN)[0] == 200
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")
    # 72 °C outside: not believed, not compared, and the card says why
    assert headline(server) == ("unknown", "Can't compare: outside station %s sends an implausible temperature" % OUT)
    card = _card(server.request("/")[2], OUT)
    assert "72.0\u00a0°C" in card and "Implausible for a temperature: check the sensor, or its unit (now °C; see --field)" in card
    assert _latest(server, OUT)["fields"]["1"]["implausible"] is True
    assert "<title>iotserver</title>" in server.request("/")[2]  # nor in the tab title
    # the owner says what the station sends
    out = cli(server.db, "--field", OUT, "1", "temperature", "f").stdout
    assert out.strip() == "%s field 1 is temperature in °F (converted to °C)" % OUT
    assert headline(server) == ("open", "Open the windows — outside is 2.8 °C cooler")  # 72 °F is 22.2 °C
    card = _card(server.request("/")[2], OUT)
    assert '<span class="value" data-field="1">22.2\u00a0°C</span>' in card and "Implausible" not in card
    field = _latest(server, OUT)["fields"]["1"]
    assert (field["value"], field["unit"], field["implausible"]) == (72.0, "°F", False)  # the API: as posted, and in what
    [reading] = json.loads(server.request("/api/readings?mac=%s" % OUT)[2])
    assert (reading["value"], reading["unit"]) == (72.0, "°F")
    series = json.loads(server.request("/api/series?mac=%s" % OUT)[2])
    assert series["unit"] == "°C" and round(series["points"][0]["mean"], 2) == 22.22  # what the chart draws


def test_the_page_unit_applies_to_every_temperature(start):
    server = start("--unit", "F", *FAST)
    assert server.update("300", mac=OUT)[0] == 200
    cli(server.db, "--field", OUT, "1", "Temperature", "K")
    card = _card(server.request("/")[2], OUT)
    assert '<span class="value" data-field="1">80.3\u00a0°F</span>' in card  # 300 K = 26.85 °C


def test_other_quantities_and_fields(start):
    server = start(*FAST)
    assert server.update("101325", mac=OUT, field=2)[0] == 200  # pressure in Pa
    assert server.update("120", mac=OUT, field=3)[0] == 200  # a humidity no air has
    assert server.update("3.71", mac=OUT, field=4)[0] == 200
    card = _card(server.request("/")[2], OUT)
    assert card.count("Implausible for a") == 2 and "Implausible for a pressure" in card and "Implausible for a humidity" in card
    cli(server.db, "--field", OUT, "2", "pressure", "Pa")
    cli(server.db, "--field", OUT, "4", "Battery", "V")
    card = _card(server.request("/")[2], OUT)
    assert '<span class="value" data-field="2">1013.2\u00a0hPa</span>' in card
    assert "<dt>Battery</dt>" in card and '<span class="value" data-field="4">3.7\u00a0V</span>' in card
    assert card.count("Implausible for a") == 1  # the humidity is still wrong
    fields = _latest(server, OUT)["fields"]
    assert (fields["4"]["name"], fields["4"]["unit"]) == ("battery", "V")
    status, _, body = server.request("/channels/%d.json" % server.rows("SELECT id FROM stations")[0][0])
    assert json.loads(body)["field4"] == "Battery"  # ThingSpeak's channel names its fields so


def test_field_flag_refuses_nonsense(server):
    assert server.update("20")[0] == 200
    for args, word in ((["1", "temperature", "X"], "temperature is posted in C, F, K"),
                       (["9", "temperature", "C"], "field"), (["1", "", "C"], "name"),
                       (["1", "pressure", "psi"], "pressure is posted in hPa, mbar, Pa, kPa, inHg, mmHg")):
        proc = cli(server.db, "--field", MAC, *args, check=False)
        assert proc.returncode == 2 and word in proc.stderr, (args, proc.stderr)
    proc = cli(server.db, "--field", "02:00:00:00:00:99", "1", "temperature", "C", check=False)
    assert proc.returncode == 1 and "no station" in proc.stderr


def test_an_implausible_reading_is_left_out_of_the_advice_memory(start):
    server = start("--unit", "C", *FAST)
    cli_roles = False
    for out_c, in_c in (("20", "25"), ("99", "25"), ("25.3", "25")):
        assert server.update(out_c, mac=OUT)[0] == 200
        assert server.update(in_c, mac=IN)[0] == 200
        if not cli_roles:
            cli(server.db, "--role", OUT, "outdoor")
            cli(server.db, "--role", IN, "indoor")
            cli_roles = True
    # 20 (open), then 99 (implausible: not "warmer, close"), now 25.3: about the same, still open
    kind, text = headline(server)
    assert kind == "open" and "about the same" in text
