"""The owner's command line: key, stations, roles, and the documentation of every flag."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

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


def test_first_start_on_a_terminal_prints_the_key_once_with_an_example_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != iotserver.KEY_ENV}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--port", "0", "--db", str(tmp_path / "a.db")],
                            stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 20
    while b"Point a station at" not in shown or not shown.endswith(b"\n"):
        assert time.monotonic() < deadline, shown
        if select.select([master], [], [], 0.5)[0]:
            shown += os.read(master, 4096)
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
    # a second start does not print it again
    proc = subprocess.Popen([sys.executable, str(IOTSERVER), "--port", "0", "--db", str(tmp_path / "a.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert key.encode() not in out + err


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
