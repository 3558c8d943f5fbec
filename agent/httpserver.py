"""A small threaded HTTP server shared by /metrics, /healthz and the
healthCheckNodePort servers: binds IPv4 or IPv6, serves from a daemon
thread, reports the port it got (tests bind port 0) and closes cleanly.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def split_host_port(address: str, flag: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:10249"``, ``"[::]:10256"`` or ``":10256"`` -> (host, port).

    Raises ValueError with a message naming ``flag``.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{flag}: expected HOST:PORT, got {address!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{flag}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # Go's net.Listen treats an empty host as "all addresses".
    return host or "0.0.0.0", port


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that writes whole replies and logs nothing: probes
    and scrapes every few seconds would drown the agent's own log."""

    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if content_type == "application/json":
            self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DualServer(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting the agent must not fail for a minute on TIME_WAIT sockets.
    allow_reuse_address = True


class ServerThread:
    """serve_forever() in a daemon thread; ``close()`` stops and unbinds."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], name: str):
        cls = type(
            "_Server",
            (_DualServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        self.httpd = cls((host, port), handler)  # raises OSError when the port is taken
        self.name = name
        # A short poll interval makes close() quick (shutdown waits for one poll).
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name=name, daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
