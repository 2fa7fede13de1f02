"""Notifications: ntfy, Gotify and JSON request shapes (loopback receivers), e-mail (a real SMTP server),
--notify-test, holding and quiet hours, a hanging target, restarts, stations going offline and back."""

import base64
import email
import email.header
import email.policy
import json
import math
import os
import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import FAST, MAC, MAC2, cli, need_module, need_tool
from test_advice import MINUTE, advice, bulk, weather

OUT, IN = MAC, MAC2
PUBLIC = "https://iot.example.org/"


class Receiver:
    """A loopback HTTP server standing in for ntfy, Gotify or a webhook: records each POST, answers 200."""

    def __init__(self):
        self.requests, self.changed = [], threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.changed:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, count, timeout=20.0):
        """The first ``count`` requests, once they have arrived."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                assert left > 0, "got %d of %d requests: %r" % (len(self.requests), count, self.requests)
                self.changed.wait(left)
            return list(self.requests[:count])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Silent:
    """A target that accepts connections and reads, and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbsp(text):
    return text.replace("\u00a0", " ")


# -- the request shapes --

def test_ntfy_request_shape_and_no_secret_in_the_log(start, receiver):
    url = "ntfy://127.0.0.1:%d/window-topic?token=tk_s3cretvalue" % receiver.port
    server = start("--unit", "C", "--notify", url, "--notify-hold", "0", "--public-url", PUBLIC, *FAST)
    weather(server, inside=(27.0, 45), outside=(19.0, 55))
    advice(server)  # roles were set by another process: the server notices on its next read
    path, headers, body = receiver.wait(1)[0]
    assert path == "/window-topic"
    assert headers["title"] == "Open the windows" and headers["priority"] == "4" and headers["tags"] == "window"
    assert headers["click"] == PUBLIC and headers["authorization"] == "Bearer tk_s3cretvalue"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert nbsp(body.decode()) == ("Open the windows — outside is 8.0 °C cooler. Inside is above the comfort band "
                                   "(20.0–24.0 °C): let the cooler air in.")
    server.wait_for_log(r"notified ntfy://127\.0\.0\.1:%d/…: Open the windows" % receiver.port)
    assert "tk_s3cretvalue" not in server.log and "window-topic" not in server.log
    assert "window-topic" not in server.request("/")[2]


def test_gotify_request_shape(start, receiver):
    urls = ["gotify://127.0.0.1:%d/AbCdEf.Token1" % receiver.port,
            "gotify://127.0.0.1:%d/gotify/AbCdEf.Token2" % receiver.port]  # Gotify under a sub-path
    server = start("--unit", "C", "--notify", urls[0], "--notify", urls[1], "--notify-hold", "0",
                   "--public-url", PUBLIC, *FAST)
    weather(server, inside=(28.0, 40), outside=(35.0, 25))
    advice(server)
    got = sorted(receiver.wait(2))
    assert [(p, h["x-gotify-key"]) for p, h, _ in got] == [("/gotify/message", "AbCdEf.Token2"),
                                                           ("/message", "AbCdEf.Token1")]
    for _, headers, body in got:
        assert headers["content-type"] == "application/json"
        message = json.loads(body)
        assert message["title"] == "Keep the windows closed" and message["priority"] == 5
        assert nbsp(message["message"]) == ("Keep the windows closed — outside is 7.0 °C warmer. "
                                            "Outside is warmer and the house is already warm.")
        assert message["extras"] == {"client::notification": {"click": {"url": PUBLIC}}}
    assert "AbCdEf" not in server.log


def test_json_webhook_from_the_environment(start, receiver, tmp_path):
    env = dict(os.environ, IOTSERVER_NOTIFY="json://hook:pa55word@127.0.0.1:%d/hooks/abc123?+X-Trace=on  "
                                            "ntfy://127.0.0.1:%d/second-topic" % (receiver.port, receiver.port))
    server = start("--unit", "C", "--notify-hold", "0", *FAST, env=env)
    weather(server, inside=(17.5, 50), outside=(22.0, 45))
    advice(server)
    got = {path: (headers, body) for path, headers, body in receiver.wait(2)}
    headers, body = got["/hooks/abc123"]
    assert headers["authorization"] == "Basic " + base64.b64encode(b"hook:pa55word").decode()
    assert headers["x-trace"] == "on" and headers["content-type"] == "application/json"
    message = json.loads(body)
    assert message["version"] == "1.0" and message["type"] == "info" and message["attachments"] == []
    assert message["title"] == "Open the windows"
    assert nbsp(message["message"]).startswith("Open the windows — outside is 4.5 °C warmer. Inside is below")
    assert "\n" not in message["message"]  # one line; no --public-url, so no link after it
    assert "/second-topic" in got
    assert "pa55word" not in server.log and "abc123" not in server.log


# -- e-mail, at a real SMTP server --

class Mailbox:
    """An aiosmtpd handler and authenticator that keep what arrives."""

    def __init__(self):
        self.messages, self.logins, self.changed = [], [], threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        with self.changed:
            self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
            self.changed.notify_all()
        return "250 OK"

    def __call__(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult
        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret-pw")

    def wait(self, count=1, timeout=20.0):
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.messages) < count:
                assert self.changed.wait(max(0.01, deadline - time.monotonic())) or time.monotonic() < deadline, \
                    "no mail arrived"
            return self.messages[:count]


def smtp_server(mailbox, **kwargs):
    need_module("aiosmtpd")
    from aiosmtpd.controller import Controller
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), authenticator=mailbox, **kwargs)
    controller.start()
    return controller


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # plain mailto:// on loopback
def test_email_arrives_at_a_real_smtp_server(start):
    mailbox = Mailbox()
    controller = smtp_server(mailbox, auth_require_tls=False, auth_required=True)
    try:
        url = "mailto://me%%40example.org:s3cret-pw@127.0.0.1:%d?to=you@example.org" % controller.port
        server = start("--unit", "C", "--notify", url, "--notify-hold", "0", "--public-url", PUBLIC, *FAST)
        weather(server, inside=(21.0, 72), outside=(2.0, 85))
        advice(server)
        mail = mailbox.wait()[0]
    finally:
        controller.stop()
    assert mailbox.logins == [(b"me@example.org", b"s3cret-pw")]
    assert mail["Subject"] == "Open for a few minutes" and mail["From"] == "me@example.org"
    assert mail["To"] == "you@example.org"
    text = nbsp(mail.get_content()).replace("\r\n", "\n")
    assert text.startswith("Open for a few minutes: outside air is drier. Inside is humid (72 %)")
    assert text.rstrip().endswith("\n\n" + PUBLIC)
    assert "s3cret-pw" not in server.log


def test_email_over_starttls_with_notify_test(tmp_path):
    openssl = need_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    mailbox = Mailbox()
    controller = smtp_server(mailbox, tls_context=context, require_starttls=True, auth_required=True)
    try:
        url = "mailtos://me%%40example.org:s3cret-pw@127.0.0.1:%d?to=you@example.org,them@example.org" % controller.port
        env = dict(os.environ, SSL_CERT_FILE=str(tmp_path / "cert.pem"))  # trust this test's certificate
        proc = cli(tmp_path / "x.db", "--notify", url, "--notify-test", check=False, env=env)
        untrusted = cli(tmp_path / "x.db", "--notify", url, "--notify-test", check=False)  # the system's trust store
        mail = mailbox.wait()[0]
    finally:
        controller.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "mailtos://127.0.0.1:%d: sent\n" % controller.port
    assert mail["Subject"] == "iotserver test" and mail["To"] == "you@example.org, them@example.org"
    assert untrusted.returncode == 1 and "failed (SSLCertVerificationError" in untrusted.stdout
    assert len(mailbox.messages) == 1 and "s3cret-pw" not in untrusted.stdout + untrusted.stderr


# -- --notify-test and bad URLs --

def test_notify_test_reports_each_url(tmp_path, receiver):
    db = tmp_path / "x.db"  # none there: a test message needs no database
    good = "ntfy://127.0.0.1:%d/test-topic" % receiver.port
    dead = "gotify://127.0.0.1:%d/Tok3nSecret" % free_port()
    proc = cli(db, "--notify", good, "--notify", dead, "--notify-test", "--public-url", PUBLIC, check=False)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == "ntfy://127.0.0.1:%d/…: sent" % receiver.port
    assert lines[1].startswith("gotify://127.0.0.1:%s/…: failed (ConnectionRefusedError" % dead.split(":")[2][:-12])
    assert "Tok3nSecret" not in proc.stdout + proc.stderr and "test-topic" not in proc.stdout
    assert not db.exists()
    path, headers, body = receiver.wait(1)[0]
    assert path == "/test-topic" and headers["title"] == "iotserver test" and headers["click"] == PUBLIC
    assert cli(db, "--notify", good, "--notify-test").stdout.endswith(": sent\n")
    nothing = cli(db, "--notify-test", check=False, env={k: v for k, v in os.environ.items() if k != "IOTSERVER_NOTIFY"})
    assert nothing.returncode == 2 and "no notification URL" in nothing.stdout


@pytest.mark.parametrize("url, complaint", [
    ("ntfx://user:hunter2secret@host/topic", "unknown scheme 'ntfx'"),
    ("gotify://host", "needs the application token"),
    ("mailto://user:hunter2secret@smtp.example.org", "needs ?to="),
    ("ntfy://host/topic?prio=hunter2secret", "unknown parameter 'prio'"),
    ("mailto://u:hunter2secret@smtp.example.org?to=me@example.org&mode=ssl", "mode 'ssl'"),
])
def test_a_bad_url_is_refused_without_repeating_it(tmp_path, url, complaint):
    proc = cli(tmp_path / "x.db", "--notify", url, check=False)
    assert proc.returncode == 2 and complaint in proc.stderr and "hunter2secret" not in proc.stderr
    env = dict(os.environ, IOTSERVER_NOTIFY=url)
    proc = cli(tmp_path / "x.db", "--port", "0", check=False, env=env)
    assert proc.returncode == 2 and complaint in proc.stderr and "hunter2secret" not in proc.stderr
    helped = cli(tmp_path / "x.db", "--help", env=env)
    assert "hunter2secret" not in helped.stdout and "IOTSERVER_NOTIFY" in helped.stdout


# -- when messages are sent --

def evening_part(server, now, first_min, last_min, noise, rng, cross_ago=45):
    """Minutes ``first_min``..``last_min`` before now of a hot day's evening; outside crossed inside ``cross_ago`` ago."""

    def outside(h):
        return 25 + 6 * math.cos(2 * math.pi * (h - 15) / 24)

    def inside(h):
        return 27.5 - 0.3 * (h - 15)

    lo, hi = 17.0, 23.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if outside(mid) > inside(mid) else (lo, mid)
    for mac, curve, shift in ((IN, inside, 0), (OUT, outside, 20_000)):
        entries = []
        for m in range(first_min, last_min - 1, -1):
            ms = now - m * MINUTE + shift
            h = lo + (ms - now) / 3_600_000 + cross_ago / 60
            entries.append((ms, {1: round(curve(h) + rng.uniform(-noise, noise), 2)}))
        bulk(server, mac, [e for e in entries if e[0] <= now])


def test_a_noisy_evening_pushes_open_exactly_once(start, receiver):
    server = start("--unit", "C", "--notify", "json://127.0.0.1:%d/hook" % receiver.port, *FAST)  # default hold
    now, rng = int(time.time() * 1000) - 30_000, random.Random(5)
    evening_part(server, now, 150, 61, 0.3, rng)  # outside still warmer ...
    for mac in (IN, OUT):  # ... the rest of the temperatures are still in the stations' buffers
        assert server.update("1013", mac=mac, field=2)[0] == 200
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")
    assert advice(server)["action"] == "close"
    first = json.loads(receiver.wait(1)[0][2])
    assert first["title"] == "Keep the windows closed"
    evening_part(server, now, 60, 0, 0.3, rng)  # outside cooled through inside 45 minutes ago
    assert advice(server)["action"] == "open"
    second = json.loads(receiver.wait(2)[1][2])
    assert second["title"] == "Open the windows"
    for value in ("20.2", "20.0", "20.3"):  # the evening goes on, noisily
        assert server.update(value, mac=OUT)[0] == 200
        time.sleep(1.2)
    time.sleep(2)
    titles = [json.loads(body)["title"] for _, _, body in receiver.requests]
    assert titles.count("Open the windows") == 1, titles


def test_a_short_swing_is_held_back(start, receiver):
    server = start("--unit", "C", "--notify", "json://127.0.0.1:%d/hook" % receiver.port, "--notify-hold", "1", *FAST)
    weather(server, inside=(26.0, None), outside=(29.0, None), minutes=10)
    advice(server)
    assert json.loads(receiver.wait(1)[0][2])["title"] == "Keep the windows closed"  # held for ten minutes
    assert server.update("20.0", mac=OUT)[0] == 200  # a gust of cool air ...
    assert advice(server)["action"] == "open"
    time.sleep(3)
    assert server.update("29.0", mac=OUT)[0] == 200  # ... gone again within the minute
    assert advice(server)["action"] == "close"
    time.sleep(3)
    assert len(receiver.requests) == 1


def test_restart_between_a_change_and_its_delivery_delivers_once(start, receiver):
    flags = ("--unit", "C", "--notify", "json://127.0.0.1:%d/hook" % receiver.port, "--notify-hold", "0.25", *FAST)
    first = start(*flags)
    weather(first, inside=(26.0, None), outside=(29.0, None), minutes=10)
    advice(first)
    assert json.loads(receiver.wait(1)[0][2])["title"] == "Keep the windows closed"
    assert first.update("19.0", mac=OUT)[0] == 200
    assert first.update("26.0", mac=IN)[0] == 200
    assert advice(first)["action"] == "open"  # held for 15 s before it is pushed
    time.sleep(2)
    first.stop(signal.SIGKILL)
    assert len(receiver.requests) == 1
    second = start(*flags, db=first.db)
    got = receiver.wait(2, timeout=30)
    assert json.loads(got[1][2])["title"] == "Open the windows"
    second.stop()
    start(*flags, db=first.db)
    time.sleep(4)
    assert len(receiver.requests) == 2  # told once: a restart does not repeat it


def test_quiet_hours_hold_messages_back(start, receiver):
    hour = time.gmtime().tm_hour
    quiet = "%02d:00-%02d:00" % ((hour - 1) % 24, (hour + 1) % 24)
    server = start("--unit", "C", "--tz", "UTC", "--notify", "ntfy://127.0.0.1:%d/t0pic" % receiver.port,
                   "--notify-hold", "0", "--notify-quiet", quiet, *FAST)
    weather(server, inside=(27.0, 45), outside=(19.0, 55))
    assert advice(server)["action"] == "open"
    time.sleep(4)
    assert receiver.requests == []


def test_a_station_offline_and_back(start, receiver):
    server = start("--unit", "C", "--tz", "UTC", "--notify", "ntfy://127.0.0.1:%d/st4tions" % receiver.port,
                   "--notify-hold", "0", *FAST)
    now = int(time.time() * 1000) - 1000
    bulk(server, IN, [(now - m * MINUTE, {1: 22.0}) for m in range(20, -1, -1)])
    bulk(server, OUT, [(now - m * MINUTE, {1: 15.0}) for m in range(20, 9, -1)])  # silent for ten minutes
    cli(server.db, "--role", OUT, "outdoor")
    cli(server.db, "--role", IN, "indoor")
    cli(server.db, "--rename", OUT, "Garten-Fühler")
    assert advice(server)["action"] == "unknown"
    path, headers, body = receiver.wait(1)[0]
    assert email.header.make_header(email.header.decode_header(headers["title"])).__str__() == "Garten-Fühler is offline"
    assert headers["tags"] == "warning"
    since = time.strftime("%H:%M", time.gmtime((now - 10 * MINUTE) / 1000))
    assert body.decode() == ("Outside station Garten-Fühler has sent nothing since %s: the window advice waits "
                             "until it is back. Check its power and Wi-Fi." % since)
    assert server.update("16.0", mac=OUT)[0] == 200
    got = receiver.wait(3)
    titles = sorted(str(email.header.make_header(email.header.decode_header(h["title"]))) for _, h, _ in got[1:])
    assert titles == ["Garten-Fühler is back", "Keep the windows closed"]  # and the advice, known again


def test_the_servers_own_downtime_is_no_outage(start, receiver, tmp_path):
    db = tmp_path / "iotserver.db"
    before = start("--unit", "C", *FAST, db=db)
    now = int(time.time() * 1000) - 1000
    bulk(before, IN, [(now - m * MINUTE, {1: 22.0}) for m in range(30, -1, -1)])
    bulk(before, OUT, [(now - m * MINUTE, {1: 15.0}) for m in range(30, 11, -1)])  # until 12 minutes ago ...
    cli(db, "--role", OUT, "outdoor")
    cli(db, "--role", IN, "indoor")
    assert before.stop() == 0
    conn = sqlite3.connect(db)
    with conn:  # ... when this server went down (it last noted being up 11 minutes ago)
        conn.execute("INSERT OR REPLACE INTO settings (name, value) VALUES ('alive', ?)", (str(now - 11 * MINUTE),))
    conn.close()
    server = start("--unit", "C", "--notify", "ntfy://127.0.0.1:%d/st4tions" % receiver.port,
                   "--notify-hold", "0", *FAST, db=db)
    assert advice(server)["action"] == "unknown"  # the page still says the outside station is silent
    time.sleep(4)
    assert receiver.requests == []  # but its silence was the server's own downtime: no outage pushed


# -- delivery never slows a station --

def test_a_target_that_never_answers_does_not_slow_stations(start):
    silent = Silent()
    try:
        server = start("--unit", "C", "--notify", "ntfy://127.0.0.1:%d/hang1ng" % silent.port,
                       "--notify-hold", "0", *FAST)
        weather(server, inside=(27.0, 45), outside=(19.0, 55))
        advice(server)
        deadline = time.monotonic() + 10
        while not silent.accepted:  # the sender is connected and waiting for an answer that never comes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        for i in range(100):
            status, _, body = server.update("%.1f" % (19 + i / 100), mac=OUT)  # client timeout: 30 s
            assert status == 200, body
        posting = time.monotonic() - started
        assert server.request("/")[0] == 200 and advice(server)["action"] == "open"
        stored = server.rows("SELECT count(*) FROM readings r JOIN stations s ON s.id = r.station_id WHERE s.mac = ?",
                             (OUT,))[0][0]
        assert stored == 2 * 31 + 100  # the half hour of temperature and humidity, and every post
        server.wait_for_log(r"notifying ntfy://127\.0\.0\.1:%d/… failed \(TimeoutError" % silent.port, timeout=25)
        print("100 station posts while the target hung: %.2f s" % posting)
    finally:
        silent.close()
