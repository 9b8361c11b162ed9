"""A real S3 server for tests: moto's standalone server on loopback, plus a fault-injecting
HTTP proxy in front of it. Nothing here is mocked at the Python level: s3fs/botocore talk HTTP.

- :class:`S3Server` runs ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (a free port).
- :class:`FaultProxy` forwards every request to the server and records it. With ``faults=True``
  it answers a deterministic subset with ``503 SlowDown`` / ``500 InternalError`` XML or resets
  the connection before answering (at most two failures in a row for one request key, so
  botocore's retries always get through); ``deny`` keys always get ``403 AccessDenied``.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import socket
import struct
import threading
import zlib
from collections import Counter

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>hubert-ray-test</RequestId></Error>"
)
FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class S3Server:
    """moto's S3 server on loopback; ``url`` is its endpoint."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


def fault_for(key: str, n: int) -> str | None:
    """The fault for the ``n``-th request (0-based) with this key, or None to forward it.

    About a third of keys fail their first request once; every seventh key fails its first two
    (never more than two in a row). The kind rotates through SlowDown, InternalError, reset.
    """
    h = zlib.crc32(key.encode())
    if h % 7 == 0:
        failing = n < 2
    else:
        failing = n == 0 and h % 3 == 0
    if not failing:
        return None
    return ("slowdown", "internal", "reset")[(h // 7 + n) % 3]


class FaultProxy:
    """Threaded HTTP proxy to ``upstream`` that records requests and injects faults."""

    def __init__(self, upstream: str, faults: bool = False, deny: tuple[str, ...] = ()):
        self.upstream = upstream.split("://", 1)[1]
        self.faults = faults
        self.deny = set(deny)  # request paths ("/bucket/key") always answered 403 AccessDenied
        self.lock = threading.Lock()
        self.seen: Counter = Counter()  # request key -> requests so far
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome: status or fault)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                key = f"{self.command} {self.path}"
                with proxy.lock:
                    n = proxy.seen[key]
                    proxy.seen[key] += 1
                    fault = fault_for(key, n) if proxy.faults else None
                    if path in proxy.deny:
                        fault = "deny"
                    proxy.log.append((self.command, path, fault or "forward"))
                if fault == "reset":
                    # RST without an answer: what a dropped connection looks like to the client.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    return
                if fault == "deny":
                    self._reply(403, "AccessDenied", "Access Denied")
                    return
                if fault is not None:
                    self._reply(*FAULTS[fault])
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP:
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                        self.end_headers()
                    else:
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _reply(self, status: int, code: str, message: str):
                data = (
                    b""
                    if self.command == "HEAD"
                    else _ERROR_XML.format(code=code, message=message).encode()
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def injected(self, kinds: tuple[str, ...] = (*FAULTS, "reset")) -> int:
        """Transient faults of these kinds injected so far (``deny`` answers are not faults)."""
        with self.lock:
            return sum(1 for _, _, outcome in self.log if outcome in kinds)

    def requests(self, path: str | None = None, method: str | None = None) -> list[str]:
        """Outcomes of the requests recorded for ``path`` / ``method`` (all if None)."""
        with self.lock:
            return [
                outcome
                for m, p, outcome in self.log
                if (path is None or p == path) and (method is None or m == method)
            ]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def upload_dir(fs, local_dir: str, remote_dir: str) -> None:
    """Copy every file under ``local_dir`` to ``remote_dir`` (``bucket/prefix``)."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            fs.put_file(full, f"{remote_dir.rstrip('/')}/{rel}")
