"""Test endpoints and probes that run *inside* a network namespace.

This module is executed as a subprocess through ``ip netns exec NS python -m
tests.support.podserver ...`` and therefore imports only the standard library
(start-up time matters: a probe is paid for on every ``connect_many`` call).

Three modes share one entry point:

``--name POD --tcp PORT --udp PORT ...``
    Serve HTTP/1.1 on every ``--tcp`` port and a datagram echo on every
    ``--udp`` port, all on the wildcard address of a dual-stack socket, so one
    server answers the pod's IPv4 and IPv6 addresses. Every reply is a JSON
    object naming the pod and the client address the server saw, which lets a
    test tell masqueraded from source-preserving paths. ``READY`` is printed on
    stdout once every socket listens.
``probe JSON``
    Make N connections (or datagram exchanges), each from a fresh socket, and
    print one JSON document with the outcome of every attempt.
``connect --fd N ... [--proto udp --source-port P]``
    Open one TCP connection (or one connected UDP socket) and hand it to the parent over
    the inherited Unix socket N (SCM_RIGHTS). A socket keeps the network
    namespace it was created in, so the parent test process can then talk over
    it directly for as long as it likes (long-lived connections).
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import socket
import sys
import threading
import time
from typing import Any

REPLY_MAX = 65536


def format_addr(host: str, port: int) -> str:
    """``ip:port`` / ``[ip6]:port``, with IPv4-mapped IPv6 shown as plain IPv4.

    A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``; tests compare
    against the addresses they assigned, so the mapping is undone here.
    """
    host = plain_ip(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def plain_ip(host: str) -> str:
    host = host.split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _reply(
    pod: str, proto: str, peer: tuple[Any, ...], local: tuple[Any, ...], **extra: Any
) -> bytes:
    body = {
        "pod": pod,
        "proto": proto,
        "client": format_addr(peer[0], peer[1]),
        "server": format_addr(local[0], local[1]),
        **extra,
    }
    return json.dumps(body, sort_keys=True).encode()


# --------------------------------------------------------------------- server


def _dual_stack_socket(kind: int) -> socket.socket:
    """A wildcard socket that accepts IPv4 and IPv6 (falls back to IPv4 only)."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:
        return socket.socket(socket.AF_INET, kind)
    # Explicit: the default comes from net.ipv6.bindv6only, which a host may set.
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def _wildcard(sock: socket.socket) -> str:
    return "::" if sock.family == socket.AF_INET6 else "0.0.0.0"


def _serve_tcp(pod: str, port: int) -> threading.Thread:
    # Imported lazily: only servers need it, and probes should start fast.
    import socketserver
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections open by default, which is what a
        # long-lived-connection test needs; the client ends them with
        # "Connection: close".
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.requests_on_connection = 0

        def do_GET(self) -> None:
            self.requests_on_connection += 1
            body = _reply(
                pod,
                "tcp",
                self.client_address,
                self.connection.getsockname(),
                request=self.requests_on_connection,
                path=self.path,
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Nobody reads the server's stderr during a run; a full pipe or a
            # large file would only slow the server down.
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True
        allow_reuse_address = True
        # The default backlog of 5 drops SYNs when a probe opens connections
        # back to back, which would show up as spurious timeouts.
        request_queue_size = 256

        def __init__(self) -> None:
            # TCPServer would create its own IPv4 socket; build ours first.
            super().__init__(("", port), Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = _dual_stack_socket(socket.SOCK_STREAM)
            self.address_family = self.socket.family
            self.server_address = (_wildcard(self.socket), port)
            # Deliberately not http.server.HTTPServer: its server_bind calls
            # socket.getfqdn(), a DNS lookup that can hang for seconds in a
            # namespace without a working resolver.
            self.server_bind()
            self.server_activate()

    server = Server()
    thread = threading.Thread(target=server.serve_forever, name=f"tcp-{port}", daemon=True)
    thread.start()
    return thread


def _serve_udp(pod: str, port: int) -> threading.Thread:
    sock = _dual_stack_socket(socket.SOCK_DGRAM)
    sock.bind((_wildcard(sock), port))
    local = (_wildcard(sock), port)

    def loop() -> None:
        while True:
            data, peer = sock.recvfrom(REPLY_MAX)
            # The server socket is bound to the wildcard, so its own name says
            # nothing useful; echo the request size instead.
            sock.sendto(_reply(pod, "udp", peer, local, received=len(data)), peer)

    thread = threading.Thread(target=loop, name=f"udp-{port}", daemon=True)
    thread.start()
    return thread


def serve(pod: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    for port in tcp_ports:
        _serve_tcp(pod, port)
    for port in udp_ports:
        _serve_udp(pod, port)
    # Every socket is bound and listening at this point: the parent waits for
    # this line, so a test never races the server's start-up.
    print("READY", flush=True)
    threading.Event().wait()


# ---------------------------------------------------------------------- probe


def classify(exc: BaseException) -> str:
    """Map a socket error to the classes tests assert on."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "other"


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _read_http_body(sock: socket.socket) -> bytes:
    """Read a ``Connection: close`` response to EOF and return its body."""
    chunks = []
    while True:
        chunk = sock.recv(REPLY_MAX)
        if not chunk:
            break
        chunks.append(chunk)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"bad HTTP response: {raw[:200]!r}")
    return body


def _attempt_tcp(ip: str, port: int, timeout: float, source: str | None) -> dict[str, Any]:
    with socket.socket(_family(ip), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((ip, port))
        local = sock.getsockname()
        sock.sendall(b"GET /probe HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        reply = json.loads(_read_http_body(sock))
    reply["source"] = format_addr(local[0], local[1])
    return reply


def _attempt_udp(
    ip: str, port: int, timeout: float, source: str | None, source_port: int
) -> dict[str, Any]:
    with socket.socket(_family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.bind((source or "", source_port))
        except OSError:
            sock.bind((source or "", 0))
        # A connected datagram socket receives the ICMP port-unreachable that
        # a REJECT (or a closed port) sends, as ECONNREFUSED; an unconnected
        # one would only time out.
        sock.connect((ip, port))
        local = sock.getsockname()
        sock.send(b"probe")
        reply = json.loads(sock.recv(REPLY_MAX))
    reply["source"] = format_addr(local[0], local[1])
    return reply


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    ip, port, proto = spec["ip"], int(spec["port"]), spec["proto"]
    attempts, timeout = int(spec["attempts"]), float(spec["timeout"])
    source = spec.get("source")
    # Distinct source ports per attempt: conntrack keys UDP "connections" on
    # the 5-tuple, so a reused port would follow the first attempt's DNAT
    # choice (or its missing DNAT) instead of being balanced afresh. The
    # kernel picks UDP ports at random, which repeats often enough to matter.
    ports = random.sample(range(20000, 60000), attempts) if proto == "udp" else []
    results = []
    for i in range(attempts):
        started = time.monotonic()
        try:
            if proto == "tcp":
                reply = _attempt_tcp(ip, port, timeout, source)
            else:
                reply = _attempt_udp(ip, port, timeout, source, ports[i])
            reply["ok"] = True
        except Exception as exc:
            reply = {"ok": False, "error": classify(exc), "detail": repr(exc)}
        reply["elapsed"] = time.monotonic() - started
        results.append(reply)
    return {"results": results}


def connect_and_send(
    fd: int, ip: str, port: int, timeout: float, proto: str = "tcp", source_port: int = 0
) -> int:
    channel = socket.socket(fileno=fd)
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    sock = socket.socket(_family(ip), kind)
    sock.settimeout(timeout)
    try:
        if source_port:
            sock.bind(("", source_port))
        # UDP: connect() only fixes the peer (and the source port), so that
        # every datagram of the socket is one conntrack flow and ICMP errors
        # come back as ECONNREFUSED.
        sock.connect((ip, port))
    except Exception as exc:
        status = {"ok": False, "error": classify(exc), "detail": repr(exc)}
        channel.sendall(json.dumps(status).encode())
        return 1
    sock.settimeout(None)
    socket.send_fds(channel, [json.dumps({"ok": True}).encode()], [sock.fileno()])
    return 0


# ----------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "probe":
        json.dump(probe(json.loads(argv[1])), sys.stdout)
        return 0
    if argv and argv[0] == "connect":
        parser = argparse.ArgumentParser(prog="podserver connect")
        parser.add_argument("--fd", type=int, required=True)
        parser.add_argument("--ip", required=True)
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--timeout", type=float, default=5.0)
        parser.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
        parser.add_argument("--source-port", type=int, default=0)
        args = parser.parse_args(argv[1:])
        return connect_and_send(
            args.fd, args.ip, args.port, args.timeout, args.proto, args.source_port
        )
    parser = argparse.ArgumentParser(prog="podserver")
    parser.add_argument("--name", required=True, help="pod name put in every reply")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="HTTP port")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP echo port")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    serve(args.name, args.tcp, args.udp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
