"""Operation: request log, redaction, idle clients, SIGTERM."""

import signal
import socket
import threading
import time

from conftest import MAC


def test_log_has_one_line_per_request_with_the_key_redacted(server):
    key = server.key
    server.update()
    server.update(key="wrong-key-guess")
    server.request("/update/API_key=%s/mac=bad/field=1/data=1" % key)
    server.request("/update/API_key=%s" % key, method="POST")
    server.wait_for_log(r'"POST /update/API_key=\[redacted\] HTTP/1.1" 405')
    log = server.log
    assert key not in log and "wrong-key-guess" not in log
    assert len([line for line in log.splitlines() if '"GET /update/' in line]) == 3
    assert '"GET /update/API_key=[redacted]/mac=6c:ef:7a:3b:9d:e8/field=1/data=21.4 HTTP/1.1" 200' in log


def test_key_is_redacted_from_malformed_request_lines_too(server):
    key = server.key
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /update/API_key=%s/x HTTP/1.1 junk\r\n\r\n" % key.encode())
        assert sock.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    server.wait_for_log("400")
    assert key not in server.log


def test_control_characters_are_escaped_in_the_log(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /\x1b[31mred\x07 HTTP/1.1\r\nConnection: close\r\n\r\n")
        sock.recv(4096)
    server.wait_for_log(r"\\x1b\[31mred\\x07")
    assert "\x1b" not in server.log and "\x07" not in server.log


def test_quiet_drops_request_lines_but_not_startup(start):
    server = start("--quiet")
    server.update()
    server.request("/nothing")
    time.sleep(0.3)
    assert "listening on" in server.log
    assert "GET" not in server.log


def test_idle_client_is_dropped_after_the_timeout(start):
    server = start("--timeout", "1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    assert sock.recv(1) == b""  # the server hung up
    assert time.monotonic() - started < 5
    sock.close()
    assert server.update()[0] == 200


def test_sigterm_finishes_the_request_in_flight_and_exits_0(start):
    server = start()
    path = "/update/API_key=%s/mac=%s/field=1/data=12.5" % (server.key, MAC)
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # keep-alive, no request
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    busy.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n" % path.encode())  # headers not finished yet
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None  # still finishing the busy request
    busy.sendall(b"\r\n")
    answer = busy.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    assert idle.recv(1) == b""  # the idle keep-alive client was let go
    assert server.proc.wait(10) == 0
    assert "stopped" in server.log
    assert [r[2] for r in server.rows()] == [12.5]


def test_many_concurrent_clients_all_answered(server):
    results = []

    def client(i):
        results.append(server.update(str(i), mac="02:00:00:00:00:%02x" % (i % 50))[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 100
    assert sorted(r[2] for r in server.rows()) == sorted(float(i) for i in range(100))
