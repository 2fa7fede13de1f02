"""The owner's command line: key, stations, roles, and the documentation of every flag."""

import http.client
import ipaddress
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from conftest import IOTSERVER, MAC, MAC2, ROOT, cli

sys.path.insert(0, str(ROOT))
import iotserver  # noqa: E402


def _flags():
    return sorted(opt for action in iotserver.build_parser()._actions for opt in action.option_strings
                  if opt.startswith("--"))


def test_help_lists_every_flag_and_readme_documents_it():
    out = subprocess.run([sys.executable, str(IOTSERVER), "--help"], capture_output=True, text=True).stdout
    readme = (ROOT / "README.md").read_text()
    for flag in _flags():
        assert flag in out, flag
        assert re.search(r"`[^`\n]*%s(?![\w-])" % re.escape(flag), readme), "README does not document %s" % flag
    for action in iotserver.build_parser()._actions:
        assert action.help, action.option_strings


def _read_until(fd, marker, timeout=20):
    """Bytes read from ``fd`` up to the end of the line that holds ``marker``."""
    shown, deadline = b"", time.monotonic() + timeout
    while marker not in shown or not shown.endswith(b"\n"):
        assert time.monotonic() < deadline, shown
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, shown  # the server exited
            shown += chunk
    return shown


def test_first_start_on_a_terminal_prints_the_key_once_with_an_example_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != iotserver.KEY_ENV}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--port", "0", "--db", str(tmp_path / "a.db")],
                            stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    shown = _read_until(master, b"Point a station at")
    # what prints the key runs once the SIGTERM handler is in place: a signal now stops it cleanly
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    stderr = proc.stderr.read().decode()
    os.close(master)
    key = re.search(rb"New API key[^:]*: (\S+)", shown).group(1).decode()
    url = re.search(rb"Point a station at: (\S+)", shown).group(1).decode()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/update/API_key=%s/mac=[0-9a-f:]{17}/field=1/data=21\.4"
                        % re.escape(key), url)
    assert key not in stderr  # the log (journal) never holds it
    assert key in cli(tmp_path / "a.db", "--show-key").stdout
    # a second start does not print it again: read until it is serving (the key would come before)
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--port", "0", "--db", str(tmp_path / "a.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    started = _read_until(proc.stderr.fileno(), b"listening on")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"listening on" in started and key.encode() not in started + out + err


def test_without_a_terminal_the_key_is_not_printed(start):
    server = start()
    line = server.wait_for_log("generated an API key")
    assert "--show-key" in line.string
    assert server.key not in server.log


def test_api_key_flag_and_environment_override_the_stored_key(start, tmp_path):
    server = start("--api-key", "my-own-key-123")
    stored = server.key
    assert server.update(key="my-own-key-123")[0] == 200
    assert server.update(key=stored)[0] == 401
    server.stop()
    env = dict(os.environ, IOTSERVER_API_KEY="from-environment-456")
    server = start(env=env, db=tmp_path / "iotserver.db")
    assert server.update(key="from-environment-456")[0] == 200
    assert "from-environment-456" not in server.log


def test_bad_api_key_flag_is_refused(tmp_path):
    proc = cli(tmp_path / "x.db", "--api-key", "short", check=False)
    assert proc.returncode == 2 and "--api-key" in proc.stderr


def test_rotate_key_takes_effect_while_running(start):
    server = start()
    old = server.key
    assert server.update(key=old)[0] == 200
    out = cli(server.db, "--rotate-key").stdout
    new = re.search(r"API key: (\S+)", out).group(1)
    assert new != old
    assert server.update(key=old)[0] == 401
    assert server.update(key=new, mac=MAC2)[0] == 200


def test_station_management(start):
    server = start()
    assert server.update(mac=MAC)[0] == 200
    assert server.update(mac=MAC2, data="30")[0] == 200
    listing = cli(server.db, "--stations").stdout
    assert MAC in listing and MAC2 in listing
    cli(server.db, "--rename", MAC, "Window <outside>")
    cli(server.db, "--role", MAC, "outdoor")
    cli(server.db, "--role", MAC2.upper(), "indoor")
    listing = cli(server.db, "--stations").stdout
    assert re.search(r"%s\s+channel \d+\s+outdoor.*Window <outside>" % MAC, listing)
    assert re.search(r"%s\s+channel \d+\s+indoor" % MAC2, listing)
    # one outdoor station at a time: marking another moves the role
    cli(server.db, "--role", MAC2, "outdoor")
    roles = dict(server.rows("SELECT mac, role FROM stations"))
    assert roles == {MAC: None, MAC2: "outdoor"}
    out = cli(server.db, "--forget", MAC).stdout
    assert "1 readings" in out
    assert MAC not in cli(server.db, "--stations").stdout
    assert [r[0] for r in server.rows()] == [MAC2]


def test_admin_errors_are_clear(server):
    proc = cli(server.db, "--rename", MAC, "x", check=False)
    assert proc.returncode == 1 and "no station" in proc.stderr
    proc = cli(server.db, "--role", MAC, "attic", check=False)
    assert proc.returncode == 2 and "indoor, outdoor or none" in proc.stderr
    proc = cli(server.db, "--forget", "not-a-mac", check=False)
    assert proc.returncode == 2 and "mac" in proc.stderr


def test_add_channel_prints_a_working_example_and_its_id_finds_it_again(start):
    server = start()
    out = cli(server.db, "--add-channel", "Garden script").stdout
    channel, key = re.search(r"channel (\d+) \(Garden script\) write key: (\w{16})", out).groups()
    example = re.search(r"example: (\S+)", out).group(1)
    assert example == "%s/update?api_key=%s&field1=21.4" % (server.url, key)
    status, _, body = server.request(example[len(server.url):])  # works as printed
    assert status == 200 and int(body) > 0
    # the channel id it printed is accepted wherever a station is asked for
    again = cli(server.db, "--channel-key", channel).stdout
    assert re.search(r"channel %s \(02:[0-9a-f:]{14}\) write key: %s" % (channel, key), again)
    new_key = re.search(r"write key: (\w+)", cli(server.db, "--rotate-channel-key", channel).stdout).group(1)
    assert new_key != key and server.request("/update?api_key=%s&field1=1" % new_key)[0] == 200
    proc = cli(server.db, "--channel-key", "999", check=False)
    assert proc.returncode == 1 and "no station with channel id 999" in proc.stderr
    proc = cli(server.db, "--channel-key", "garden", check=False)
    assert proc.returncode == 2 and "MAC" in proc.stderr and "channel id" in proc.stderr


def _answers(url):
    """A URL printed for the LAN is this machine's own address, and the server answers on its port.

    Tests send traffic to loopback only: binding a socket to the address (no packet is
    sent) proves it is one of this machine's, and the port is asked over loopback.
    """
    parts = urllib.parse.urlsplit(url)
    family, _, _, _, sockaddr = socket.getaddrinfo(parts.hostname, None, type=socket.SOCK_DGRAM)[0]
    address = ipaddress.ip_address(sockaddr[0])
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((sockaddr[0], 0))  # OSError unless the address is this machine's
    conn = http.client.HTTPConnection("::1" if address.version == 6 else "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("HEAD", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def test_on_all_addresses_it_prints_urls_that_stations_can_use(start):
    server = start(host="0.0.0.0")
    urls = server.wait_for_log(r"stations and phones reach it at (.+)").group(1).split(" or ")
    for url in urls:
        assert re.fullmatch(r"http://[^/]+:%d/" % server.port, url), url
        host = urllib.parse.urlsplit(url).hostname
        assert host != "localhost" or urls == [url]  # only when the machine has no network address
        assert not ipaddress.ip_address(socket.gethostbyname(host)).is_unspecified, url
        assert _answers(url) == 200, url
    # --show-key points at the address the server last started on, not 127.0.0.1 or 0.0.0.0
    example = re.search(r"example: (\S+)", cli(server.db, "--show-key").stdout).group(1)
    assert example.startswith(urls[0] + "update/API_key=")


def test_on_all_ipv6_addresses_too(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--host", "::", "--port", "0", "--db",
                             str(tmp_path / "a.db")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        shown = _read_until(proc.stderr.fileno(), b"reach it at").decode()
        port = int(re.search(r"listening on http://\[::\]:(\d+)/", shown).group(1))
        urls = re.search(r"reach it at (.+)", shown).group(1).split(" or ")
        for url in urls:
            assert urllib.parse.urlsplit(url).port == port and "[::]" not in url
            assert _answers(url) == 200, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_show_key_uses_the_public_url(start):
    server = start("--public-url", "https://iot.example.org")
    assert "reach it at https://iot.example.org/" in server.wait_for_log("reach it at").string
    out = cli(server.db, "--show-key").stdout
    assert "example: https://iot.example.org/update/API_key=%s/mac=" % server.key in out
    # given on the command line, it wins over the stored one
    out = cli(server.db, "--show-key", "--public-url", "http://pi.local:8000/").stdout
    assert "example: http://pi.local:8000/update/API_key=" in out


def test_what_a_newcomer_got_wrong_is_answered_clearly(server, tmp_path):
    assert server.update(mac=MAC)[0] == 200 and server.update(mac=MAC2)[0] == 200
    cli(server.db, "--rename", MAC, "Living room")
    # two stations of one name could not be told apart on the page, in by_name and in /metrics
    proc = cli(server.db, "--rename", MAC2, "Living room", check=False)
    assert proc.returncode == 1 and "named Living room already" in proc.stderr
    # a role moves from one station to another: say so
    cli(server.db, "--role", MAC, "outdoor")
    out = cli(server.db, "--role", MAC2, "outdoor").stdout
    assert "%s is now outdoor (%s was, and now has no role)" % (MAC2, MAC) in out
    # a backup into a directory that is not there is about the target, not the live database
    proc = cli(server.db, "--backup", str(tmp_path / "missing" / "b.db"), check=False)
    assert proc.returncode == 1 and "directory" in proc.stderr and str(tmp_path / "missing") in proc.stderr
    # a field name the server does not know: said, not silently taken as a temperature
    out = cli(server.db, "--field", MAC, "1", "temp", "F").stdout
    assert "not used by the advice" in out
    out = cli(server.db, "--field", MAC, "1", "temperature", "F").stdout
    assert "converted to °C" in out
