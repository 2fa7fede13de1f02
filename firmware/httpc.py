"""A small HTTP client for the station: one POST per connection, its body written in pieces.

    def body(write):            # called once; writes exactly `length` bytes, in pieces
        write("time_format=absolute&updates=")
        write("1767225600,21.4375")
    resp = await httpc.post(url, body, 47, "application/x-www-form-urlencoded", timeout=10)
    try:
        resp.status, resp.retry_after, resp.reason()
    finally:
        resp.close()            # always: an unclosed socket ends in "LmacRxBlk" on the ESP8266

The body never exists as one string: pieces go through a 512-byte buffer to the socket, so a
request of 960 entries (about 30 KB) costs the same RAM as one of a single entry. The whole
exchange is bounded by ``timeout``: each blocking step gets what is left of it. Only the
status line, Retry-After and the first bytes of the body are read: the server's answers are
one short line, and the board has ~30 KB of RAM.
"""
import socket

try:
    from time import ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython, where the tests run this module too
    from time import monotonic

    def ticks_ms():
        return int(monotonic() * 1000)

    def ticks_add(t, delta):
        return t + delta

    def ticks_diff(a, b):
        return a - b


class Response:
    def __init__(self, sock, stream):
        self._sock = sock
        self._stream = stream
        self.status = 0
        self.retry_after = None

    def reason(self, limit=80):
        """The start of the body: iotserver's one-line reason for a refusal."""
        data = self._stream.read(limit) or b""
        return data.decode("utf-8", "replace").strip()

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = self._stream = None


class _Writer:
    """Collects pieces into a fixed buffer and writes it to the stream when full."""

    def __init__(self, stream, size=512):
        self._stream = stream
        self._buf = bytearray(size)
        self._n = 0
        self.count = 0

    def write(self, piece):
        data = piece.encode() if isinstance(piece, str) else piece
        self.count += len(data)
        if self._n + len(data) > len(self._buf):
            self.flush()
            if len(data) > len(self._buf):
                self._out(data)
                return
        self._buf[self._n:self._n + len(data)] = data
        self._n += len(data)

    def flush(self):
        if self._n:
            self._out(memoryview(self._buf)[:self._n])
            self._n = 0

    def _out(self, data):
        data = memoryview(data)
        while len(data):
            n = self._stream.write(data)
            data = data[n or 0:]


def _split(url):
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    port = 443 if scheme == "https" else 80
    if ":" in host:
        host, port = host.rsplit(":", 1)
        port = int(port)
    return scheme, host, port, "/" + path


async def post(url, body, length, content_type, timeout=10):
    """POST; ``body(write)`` writes ``length`` bytes. The caller must close() the Response. OSError on failure."""
    deadline = ticks_add(ticks_ms(), int(timeout * 1000))

    def bounded(sock):
        left = ticks_diff(deadline, ticks_ms())
        if left <= 0:
            raise OSError(110)  # ETIMEDOUT: the whole exchange took longer than timeout
        sock.settimeout(left / 1000)

    scheme, host, port, path = _split(url)
    address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(address[0], socket.SOCK_STREAM, address[2])
    raw = sock
    resp = None
    try:
        bounded(raw)
        sock.connect(address[-1])
        if scheme == "https":
            import ssl  # lazily: TLS costs RAM; the ESP8266 encrypts but does not verify the certificate

            sock = ssl.wrap_socket(sock, server_hostname=host)
        try:
            stream = sock.makefile("rwb", 0)
        except AttributeError:  # MicroPython's TLS socket is a stream already
            stream = sock
        out = _Writer(stream)
        bounded(raw)
        out.write("POST %s HTTP/1.0\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (path, host, content_type, length))
        head = out.count
        body(out.write)
        out.flush()
        if out.count - head != length:
            raise ValueError("body was %d bytes, Content-Length %d" % (out.count - head, length))
        resp = Response(sock, stream)
        bounded(raw)
        line = stream.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise OSError("not an HTTP answer: %r" % line[:40])
        resp.status = int(parts[1])
        while True:
            bounded(raw)
            line = stream.readline()
            if not line or line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"retry-after":
                try:
                    resp.retry_after = int(value.strip())
                except ValueError:
                    pass
        return resp
    except BaseException:
        if resp is not None:
            resp.close()
        else:
            sock.close()
        raise
