"""Operation: request log, redaction, idle clients, SIGTERM."""

import select
import signal
import socket
import sqlite3
import threading
import time

import pytest

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


def _hold_write_lock(db, seconds):
    """Another process (here: this test) holds the database's write lock for a while."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    ready = threading.Event()

    def release():
        ready.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=release)
    thread.start()
    ready.wait()
    return thread


def test_sigterm_finishes_the_request_in_flight_and_exits_0(start):
    server = start()
    server.update("1")  # creates the station and the database's tables
    path = "/update/API_key=%s/mac=%s/field=1/data=12.5" % (server.key, MAC)
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # keep-alive, no request
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    lock = _hold_write_lock(server.db, 1.5)  # the reading below waits for the lock: in flight
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    busy.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert server.proc.poll() is None  # still finishing the busy request
    answer = busy.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    assert idle.recv(1) == b""  # the idle keep-alive client was let go
    assert slow.recv(1) == b""  # and so was the one that never finished its request
    assert server.proc.wait(10) == 0
    lock.join()
    assert "stopped" in server.log
    assert [r[2] for r in server.rows()] == [1.0, 12.5]


# -- found by tests/soak.py --------------------------------------------------------------------

def test_a_client_trickling_its_headers_is_dropped(start):
    # the socket timeout bounds each read, not the request: one byte every 0.3 s used to hold a thread for ever
    server = start("--timeout", "1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    started = time.monotonic()
    with pytest.raises(OSError):
        while time.monotonic() - started < 5:
            sock.sendall(b"X")
            time.sleep(0.3)
            if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                raise ConnectionResetError("closed by the server")
    assert time.monotonic() - started < 4
    sock.close()
    assert server.update()[0] == 200


def test_sigterm_does_not_wait_for_slow_clients(start):
    server = start("--timeout", "20")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    time.sleep(0.3)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5  # not the 20 s the slow clients would take


def test_a_body_that_never_arrives_is_408_not_500(start):
    server = start("--timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /update HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 50\r\n\r\napi_key=x")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
    assert "Traceback" not in server.log and " 500 " not in server.log


def test_past_the_connection_limit_the_slowest_client_makes_room(start):
    server = start("--max-connections", "5", "--timeout", "30")
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(5)]
    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(0.05)
    time.sleep(0.3)
    assert server.update()[0] == 200  # a station still gets in
    assert slow[0].recv(1) == b""  # the longest-waiting slow client was dropped for it
    for sock in slow:
        sock.close()


def test_a_database_that_refuses_writes_answers_503_fast_and_recovers(server):
    assert server.update("1")[0] == 200
    lock = _hold_write_lock(server.db, 8)
    started = time.monotonic()
    status, headers, body = server.update("2")
    waited = time.monotonic() - started
    assert status == 503 and "nothing stored" in body and int(headers["retry-after"]) > 0
    assert waited < 7  # before a station's own 10 s timeout
    started = time.monotonic()
    assert server.update("3")[0] == 503
    assert time.monotonic() - started < 1.5 or server.update("4")[0] == 503  # no pile-up behind the lock
    lock.join()
    time.sleep(1.1)
    assert server.update("5")[0] == 200  # recovered without a restart
    assert [r[2] for r in server.rows()] == [1.0, 5.0]
    assert "Traceback" not in server.log


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


def test_a_request_cut_off_before_its_blank_line_is_not_carried_out(server):
    # found by tests/soak.py: slow clients giving up all at once became as many page renders
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /update/API_key=%s/mac=%s/field=1/data=7 HTTP/1.1\r\nHost: x\r\n"
                     % (server.key.encode(), MAC.encode()))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""
    assert server.rows() == []
    assert server.update("8")[0] == 200
    assert [r[2] for r in server.rows()] == [8.0]
