"""Stand-in for firmware/httpc.py in the tests: the same get()/Response, over js.fetch."""
import js
import network

OPENED = 0
CLOSED = 0
URLS = []


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


async def get(url, timeout=10):
    global OPENED
    if not network.WLAN.up:
        raise OSError(113)  # EHOSTUNREACH: no link
    URLS.append(url)
    r = await js.fetch(url)
    body = await r.text()
    retry = r.headers.get("Retry-After")
    OPENED += 1
    return Response(r.status, int(retry) if retry else None, body)
