"""A small HTTP GET client for the station: one request per connection, bounded waits.

    resp = await httpc.get("http://iot.example.org/update/...", timeout=10)
    try:
        resp.status, resp.retry_after, resp.reason()
    finally:
        resp.close()            # always: an unclosed socket ends in "LmacRxBlk" on the ESP8266

Only the status line, Retry-After and the first bytes of the body are read: the
server's answers are one short line, and the board has ~30 KB of RAM.
"""
import socket


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


def _split(url):
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    port = 443 if scheme == "https" else 80
    if ":" in host:
        host, port = host.rsplit(":", 1)
        port = int(port)
    return scheme, host, port, "/" + path


async def get(url, timeout=10):
    """GET ``url``; the caller must close() the Response. OSError on any network failure."""
    scheme, host, port, path = _split(url)
    address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(address[0], socket.SOCK_STREAM, address[2])
    resp = None
    try:
        sock.settimeout(timeout)
        sock.connect(address[-1])
        if scheme == "https":
            import ssl  # lazily: TLS costs RAM; the ESP8266 encrypts but does not verify the certificate

            sock = ssl.wrap_socket(sock, server_hostname=host)
        try:
            stream = sock.makefile("rwb", 0)
        except AttributeError:  # MicroPython's TLS socket is a stream already
            stream = sock
        stream.write(("GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode())
        resp = Response(sock, stream)
        line = stream.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise OSError("not an HTTP answer: %r" % line[:40])
        resp.status = int(parts[1])
        while True:
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
