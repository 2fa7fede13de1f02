"""Stand-in for firmware/httpc.py in the tests: the same post()/Response, over js.fetch to the real server.

It checks what httpc would send: the pieces the firmware writes must add up to the Content-Length
it announced. LOSE_ANSWERS makes the next requests reach the server and then fail as if the answer
was lost on the way back (a timeout), so the firmware retries what the server already stored.
"""
import json

import js
import network
import simclock

OPENED = 0
CLOSED = 0
URLS = []
ENTRIES = []  # entries per request sent
ANSWERS = []  # (world ms when sent, status, Retry-After) of each request answered
BODIES = []  # the bodies, when KEEP_BODIES
KEEP_BODIES = False
PIECES_MAX = 0  # the largest piece the firmware wrote
LOSE_ANSWERS = 0
LOST = 0
LOST_AT = None  # index in ENTRIES of the (last) request whose answer was lost
SERVER_DOWN = False  # the link is up but the server does not answer
LATENCY_MS = 40  # simulated time a request takes


class Response:
    def __init__(self, status, retry_after, body):
        self.status = status
        self.retry_after = retry_after
        self._body = body
        self._open = True

    def reason(self, limit=80):
        return self._body[:limit].strip()

    def close(self):
        global CLOSED
        if self._open:
            self._open = False
            CLOSED += 1


async def post(url, body, length, content_type, timeout=10):
    global OPENED, PIECES_MAX, LOSE_ANSWERS, LOST, LOST_AT
    if not network.online():
        raise OSError(113)  # EHOSTUNREACH: no link
    if SERVER_DOWN:
        simclock.advance(timeout * 1000)
        raise OSError(110)
    pieces = []
    body(pieces.append)
    data = "".join(pieces)
    PIECES_MAX = max([PIECES_MAX] + [len(p) for p in pieces])
    if len(data.encode()) != length:
        raise AssertionError("body of %d bytes, Content-Length %d" % (len(data.encode()), length))
    URLS.append(url)
    sent = simclock.now_ms()
    ENTRIES.append(data.count("|") + 1)
    if KEEP_BODIES:
        BODIES.append(data)
    options = js.JSON.parse(json.dumps({"method": "POST", "body": data, "headers": {"Content-Type": content_type}}))
    r = await js.fetch(url, options)
    text = await r.text()
    simclock.advance(LATENCY_MS)
    if LOSE_ANSWERS > 0:
        LOSE_ANSWERS -= 1
        LOST += 1
        LOST_AT = len(ENTRIES) - 1
        simclock.advance(timeout * 1000)
        raise OSError(110)  # ETIMEDOUT: stored by the server, the answer never came
    retry = r.headers.get("Retry-After")
    ANSWERS.append((sent, r.status, int(retry) if retry else None))
    OPENED += 1
    return Response(r.status, int(retry) if retry else None, text)
