"""Deployment: the systemd units checked by systemd-analyze, and real nginx in front of iotserver."""

import http.client
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import FAST, MAC, ROOT, cli, need_tool

sys.path.insert(0, str(ROOT))
import iotserver  # noqa: E402

UNITS = ROOT / "systemd"
SITE = UNITS / "nginx-iotserver.conf"


# -- systemd ----------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["iotserver.service", "iotserver-prune.service", "iotserver-prune.timer"])
def test_unit_verifies_without_a_single_warning(unit):
    tool = need_tool("systemd-analyze")
    proc = subprocess.run([tool, "verify", "--man=no", str(UNITS / unit)], capture_output=True, text=True,
                          cwd=UNITS, timeout=60)
    # verify exits 0 on unknown keys and bad values, and only says so on stderr
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("unit", ["iotserver.service", "iotserver-prune.service"])
def test_service_exposure_is_at_most_2(unit):
    tool = need_tool("systemd-analyze")
    proc = subprocess.run([tool, "security", "--offline=true", "--threshold=20", str(UNITS / unit)],
                          capture_output=True, text=True, cwd=UNITS, timeout=60)
    score = float(re.search(r"Overall exposure level for %s: ([\d.]+)" % re.escape(unit), proc.stdout).group(1))
    print("%s exposure: %.1f" % (unit, score))
    assert proc.returncode == 0 and score <= 2.0


def _unit(name):
    return (UNITS / name).read_text()


def _exec_args(name):
    line = re.search(r"^ExecStart=(.*)$", _unit(name), re.M).group(1)
    return shlex.split(line)


def test_units_run_iotserver_with_flags_it_knows():
    serve = _exec_args("iotserver.service")
    prune = _exec_args("iotserver-prune.service")
    # the server runs as a module found on PYTHONPATH (less memory than a script), the prune job as the script
    assert serve[:3] == ["/usr/bin/python3", "-m", "iotserver"]
    assert "Environment=PYTHONPATH=/opt/iotserver\n" in _unit("iotserver.service")
    assert prune[:2] == ["/usr/bin/python3", "/opt/iotserver/iotserver.py"]
    parser = iotserver.build_parser()
    served, pruned = parser.parse_args(serve[3:]), parser.parse_args(prune[2:])
    assert served.host == "127.0.0.1" and served.db == pruned.db == "/var/lib/iotserver/iotserver.db"
    assert pruned.prune_days == 90
    for name in ("iotserver.service", "iotserver-prune.service"):
        text = _unit(name)
        assert "User=iotserver" in text and "StateDirectory=iotserver" in text and "ProtectSystem=strict" in text
        assert "API_KEY=" not in text.replace("IOTSERVER_API_KEY=...", "")
        # a one-line reason above every hardening directive
        lines = text.split("[Install]")[0].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("User="))
        for i in range(start, len(lines)):
            if not lines[i] or lines[i].startswith("#"):
                continue
            j = i - 1
            while lines[j] and not lines[j].startswith("#"):  # directives may share one reason
                j -= 1
            assert lines[j].startswith("#"), "%s: no reason above %s" % (name, lines[i])
    timer = _unit("iotserver-prune.timer")
    for setting in ("OnCalendar=daily", "RandomizedDelaySec=", "Persistent=true"):
        assert setting in timer


def test_readme_deploy_steps_use_the_shipped_files():
    readme = (ROOT / "README.md").read_text()
    for name in ("iotserver.service", "iotserver-prune.service", "iotserver-prune.timer", "nginx-iotserver.conf"):
        assert "systemd/" + name in readme
    assert "journalctl -u iotserver" in readme and "--backup" in readme and "certbot" in readme
    assert re.search(r"^\s+\d+ \d+ \* \* \* /usr/bin/python3 /opt/iotserver/iotserver\.py --db /var/lib/iotserver/iotserver\.db "
                     r"--prune-days 90$", readme, re.M)


# -- nginx ------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """The project's site file, in a test http {} block, on loopback ports, with a self-signed cert."""

    def __init__(self, tmp, upstream_port, http_stations=False):
        self.nginx = need_tool("nginx")
        openssl = need_tool("openssl")
        self.tmp = tmp
        (tmp / "logs").mkdir(parents=True)
        (tmp / "www").mkdir()
        self.cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=iot.example.org", "-addext", "subjectAltName=DNS:iot.example.org,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.cert)], check=True, capture_output=True)
        self.http_port, self.https_port = _free_port(), _free_port()
        site = SITE.read_text()
        swaps = [
            ("listen 80;", "listen 127.0.0.1:%d;" % self.http_port),
            ("listen [::]:80;", ""),
            ("listen 443 ssl http2;", "listen 127.0.0.1:%d ssl http2;" % self.https_port),
            ("listen [::]:443 ssl http2;", ""),
            ("/etc/letsencrypt/live/iot.example.org/fullchain.pem", str(self.cert)),
            ("/etc/letsencrypt/live/iot.example.org/privkey.pem", str(key)),
            ("/var/log/nginx/", str(tmp / "logs") + "/"),
            ("/var/www/html", str(tmp / "www")),
            ("server 127.0.0.1:8000;", "server 127.0.0.1:%d;" % upstream_port),
        ]
        if http_stations:
            swaps.append(("#http-stations ", ""))
        for old, new in swaps:
            assert old in site, "the site file no longer has %r" % old
            site = site.replace(old, new)
        (tmp / "site.conf").write_text(site)
        conf = tmp / "nginx.conf"
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "".join("%s_temp_path %s;\n" % (kind, tmp / kind) for kind in
                       ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text("%sdaemon off;\nworker_processes 1;\npid %s;\nerror_log %s warn;\n"
                        "events { worker_connections 512; }\n"
                        "http {\n%s\ninclude %s;\n}\n"
                        % (user, tmp / "nginx.pid", tmp / "logs" / "main-error.log", temp, tmp / "site.conf"))
        self.args = [self.nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "logs" / "main-error.log")]
        check = subprocess.run(self.args + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.https_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, self.proc.stderr.read()
                time.sleep(0.05)

    def request(self, path, https=True, source="127.0.0.2", headers=None):
        """One request from ``source`` (a loopback address of its own, like a station's public IP)."""
        if https:
            context = ssl.create_default_context(cafile=str(self.cert))
            conn = http.client.HTTPSConnection("127.0.0.1", self.https_port, context=context, timeout=15,
                                               source_address=(source, 0))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=15, source_address=(source, 0))
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def logs(self):
        time.sleep(0.3)  # nginx writes its logs as requests end
        return "\n".join(p.read_text() for p in sorted((self.tmp / "logs").iterdir()))

    def stop(self):
        self.proc.send_signal(15)
        self.proc.wait(15)


@pytest.fixture
def proxied(start, tmp_path):
    server = start(*FAST)
    web = Nginx(tmp_path / "nginx", server.port)
    yield server, web
    web.stop()


def test_station_post_and_page_through_nginx_https(proxied):
    server, web = proxied
    status, _, body = web.request("/update/API_key=%s/mac=%s/field=1/data=21.4" % (server.key, MAC))
    assert (status, body) == (200, "stored\n")
    assert [r[:3] for r in server.rows()] == [(MAC, 1, 21.4)]
    status, headers, body = web.request("/")
    assert status == 200 and 'class="card' in body
    assert "content-security-policy" in headers and "strict-transport-security" in headers
    assert json_ok(web.request("/api/latest"))


def json_ok(answer):
    import json
    status, _, body = answer
    return status == 200 and json.loads(body)["stations"][0]["mac"] == MAC


def test_iotserver_logs_the_address_nginx_passed_and_ignores_spoofing(proxied):
    server, web = proxied
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.7"}
    assert web.request("/update/API_key=%s/mac=%s/field=1/data=1" % (server.key, MAC), headers=spoof)[0] == 200
    assert web.request("/nothing", source="127.0.0.3", headers=spoof)[0] == 404
    line = server.wait_for_log(r"GET /update/.* 200")
    assert line.string.split()[2] == "127.0.0.2"
    assert server.wait_for_log(r"GET /nothing").string.split()[2] == "127.0.0.3"
    assert "203.0.113" not in server.log


def test_wrong_keys_through_nginx_are_throttled_per_real_client(proxied):
    server, web = proxied
    answers = [web.request("/update/API_key=guess%02d/mac=%s/field=1/data=1" % (i, MAC), source="127.0.0.4")[0]
               for i in range(iotserver.KEY_FAILURE_BURST + 1)]
    assert answers == [401] * iotserver.KEY_FAILURE_BURST + [429]
    # a station elsewhere is not locked out by the brute-forcer, though both arrive via nginx
    assert web.request("/update/API_key=%s/mac=%s/field=1/data=2" % (server.key, MAC), source="127.0.0.5")[0] == 200


def test_the_key_is_in_no_log(proxied):
    server, web = proxied
    key = server.key
    web.request("/update/API_key=%s/mac=%s/field=1/data=3" % (key, MAC))
    web.request("/update/API_key=%s/mac=bad/field=1/data=3" % key)
    web.request("/?key=%s" % key)
    web.request("/update/API_key=%s/mac=%s/field=1/data=3" % (key, MAC), https=False)
    for _ in range(40):  # past limit_req's burst: nginx rejects and would log the request line
        web.request("/update/API_key=%s/mac=%s/field=1/data=4" % (key, MAC), source="127.0.0.6")
    logs = web.logs()
    assert "/update/API_key=[redacted]/mac=%s/field=1/data=3" % MAC in logs
    assert "/?key=[redacted]" in logs
    assert key not in logs
    assert key not in server.log


def test_limit_req_answers_429(proxied):
    server, web = proxied
    answers = [web.request("/nothing", source="127.0.0.7")[0] for _ in range(40)]
    assert answers.count(404) >= 20 and answers.count(429) >= 5
    assert set(answers) == {404, 429}
    assert web.request("/nothing", source="127.0.0.8")[0] == 404  # another address is unaffected


def test_http_redirects_browsers_to_https(proxied):
    server, web = proxied
    status, headers, _ = web.request("/?x=1", https=False)
    assert status == 301 and headers["location"] == "https://127.0.0.1/?x=1"
    status, headers, _ = web.request("/update/API_key=%s/mac=%s/field=1/data=1" % (server.key, MAC), https=False)
    assert status == 301  # stations too, unless the plain-HTTP option is on
    assert server.rows() == []


def test_plain_http_option_for_stations(start, tmp_path):
    server = start(*FAST)
    web = Nginx(tmp_path / "nginx", server.port, http_stations=True)
    try:
        status, _, body = web.request("/update/API_key=%s/mac=%s/field=1/data=5" % (server.key, MAC), https=False)
        assert (status, body) == (200, "stored\n")
        assert web.request("/", https=False)[0] == 301  # browsers still go to HTTPS
        assert server.wait_for_log(r"GET /update/.* 200").string.split()[2] == "127.0.0.2"
    finally:
        web.stop()


# -- without nginx: headers are trusted only from the proxy -------------------------------------

def test_x_real_ip_is_ignored_unless_the_peer_is_a_trusted_proxy(start):
    server = start(*FAST)
    spoof = {"X-Real-IP": "203.0.113.7"}
    assert server.request("/nothing", source="127.0.0.9", headers=spoof)[0] == 404
    assert server.wait_for_log("GET /nothing").string.split()[2] == "127.0.0.9"
    assert server.request("/other", headers=spoof)[0] == 404  # from 127.0.0.1: the default proxy
    assert server.wait_for_log("GET /other").string.split()[2] == "203.0.113.7"
    server.stop()
    strict = start("--trusted-proxy", "none", *FAST)
    assert strict.request("/third", headers=spoof)[0] == 404
    assert strict.wait_for_log("GET /third").string.split()[2] == "127.0.0.1"


def test_backup_of_the_live_database(server, tmp_path):
    for i in range(50):
        assert server.update(str(i))[0] == 200
    out = cli(server.db, "--backup", str(tmp_path / "copy.db")).stdout
    assert "backed up" in out
    import sqlite3
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM readings").fetchone()[0] == 50
    copy.close()
    assert server.update("51")[0] == 200  # the server kept going
    restored = cli(tmp_path / "copy.db", "--stations").stdout
    assert MAC in restored
    proc = cli(server.db, "--backup", str(tmp_path / "no" / "dir" / "x.db"), check=False)
    assert proc.returncode == 1 and "iotserver:" in proc.stderr


def test_the_units_way_of_starting_it_serves(tmp_path):
    # Environment=PYTHONPATH=/opt/iotserver + python3 -m iotserver, with this checkout as /opt/iotserver
    from launcher import RunningServer
    server = RunningServer(tmp_path / "unit.db", ["--quiet"], module=True)
    try:
        assert server.update("21.5")[0] == 200
        assert [row[2] for row in server.rows()] == [21.5]
    finally:
        assert server.stop() == 0
