"""Network-namespace topologies for end-to-end tests (root only).

Layout built by :class:`Topology` (every name carries the run prefix
``sp<pid>-<n>-`` so a crashed run's leftovers can be found and swept)::

    client ns            node ns                                pod ns
    eth0 192.168.100.10  veth-c0 192.168.100.1/32 (node IP)     eth0 10.244.1.2/32
         fd00:100::10             fd00:100::1/128     veth-p0 ──     fd00:10:244::2/128
      default via node IP         (node IP on every veth)            default via node IP
                         uplink 198.18.0.1/30 ── gw ns (drops everything)

Design choices, and why:

* **Point-to-point /32 (/128) routing, no bridge.** Each pod and client gets
  its own veth pair; the node holds its node IP on every node-side veth and a
  host route to each pod/client IP. Callers choose any pod IP (to match
  EndpointSlice addresses) without fitting it into a subnet, and no bridge
  means no ``br_netfilter`` surprises. Pods and clients route everything via
  the node IP, so traffic to ClusterIPs, external IPs and LB IPs always
  crosses the node's netfilter hooks, and node-originated traffic to a pod
  leaves with the node IP as source (what a masquerade test expects).
* **A silent upstream ("gw" namespace).** The node needs a default route:
  locally generated packets to a ClusterIP are routed *before* nat OUTPUT
  runs, and with no matching route (or a blackhole/unreachable route)
  ``connect()`` fails before any DNAT could happen. The gateway has
  forwarding off, so it drops whatever the node forwards to it, and a VIP
  without rules *times out*, like a real node whose router does not know the
  service CIDR.
* **IPv6 without DAD.** ``accept_dad=0`` is set before links are created and
  addresses carry ``nodad``: tentative addresses cannot be used as sources,
  and DAD would add a second or more to every topology.
* **No ICMP rate limit** in any namespace: REJECT answers with ICMP errors,
  and the kernel's per-peer limit would turn all but the first few refused
  attempts of a probe into timeouts.
* **Sysctls kube-proxy relies on** are set on the node: ``ip_forward``,
  ``ipv6 forwarding``, ``route_localnet`` (NodePorts on 127.0.0.1), and
  ``rp_filter=0`` explicitly, because a new namespace may inherit the host's
  value (``net.core.devconf_inherit_init_net``) and strict reverse-path
  filtering drops asymmetric NodePort paths.

Nothing here touches the root namespace: links are created inside the node
namespace and their peers are moved straight into the pod namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sp"
# Names look like "sp1234-0-node": the owning pid lets sweep_stale tell a
# crashed run from a concurrent one.
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-\d+-")

NODE_IPV4 = "192.168.100.1"
NODE_IPV6 = "fd00:100::1"
GW_NODE_IPV4, GW_IPV4 = "198.18.0.1", "198.18.0.2"
GW_NODE_IPV6, GW_IPV6 = "fd00:ffff::1", "fd00:ffff::2"

Backend = Literal["legacy", "nft"]
Family = Literal[4, 6]
Proto = Literal["tcp", "udp"]


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(
            f"{' '.join(argv)} exited {returncode}: {stderr.strip() or stdout.strip()}"
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    # The helpers run as "python -m tests.support.podserver" from any cwd.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace_processes(name: str) -> None:
    """Kill what still runs inside a namespace: deleting it would not."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespace(name: str) -> None:
    _kill_namespace_processes(name)
    run(["ip", "netns", "delete", name], check=False)


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by crashed runs; return their names.

    Only names of our scheme whose owning pid is gone are touched, so a
    concurrent run (another engineer's pytest) keeps its namespaces.
    """
    swept = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if not name.startswith(prefix) or not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        delete_namespace(name)
        swept.append(name)
    return swept


# ------------------------------------------------------------------- results


@dataclass
class ProbeResult:
    """Outcome of :func:`connect_many`: who answered, who failed and how."""

    pods: Counter[str] = field(default_factory=Counter)
    # refused / timeout / unreachable / reset / other
    failures: Counter[str] = field(default_factory=Counter)
    # Client IPs as reported by the servers (masquerade shows the node IP).
    client_ips: Counter[str] = field(default_factory=Counter)
    # Local source IPs the probe used, to compare against client_ips.
    source_ips: Counter[str] = field(default_factory=Counter)
    replies: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return sum(self.pods.values())

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())


def _ip_of(addr: str) -> str:
    return addr.rpartition(":")[0].strip("[]")


def connect_many(
    ns: Namespace,
    dest_ip: str,
    port: int,
    proto: Proto = "tcp",
    *,
    attempts: int = 20,
    timeout: float = 1.0,
    source: str | None = None,
) -> ProbeResult:
    """Make ``attempts`` fresh connections from inside ``ns``; count answers.

    All attempts run in one Python subprocess inside the namespace (one
    process per attempt would cost ~50 ms each). Each attempt uses a new
    socket and source port, so ``-m statistic`` rules re-balance every time.
    """
    if not 1 <= attempts <= 5000:
        raise ValueError("attempts must be within 1..5000")
    if not 0 < timeout <= 30:
        raise ValueError("timeout must be within (0, 30] seconds")
    spec = {
        "ip": dest_ip,
        "port": port,
        "proto": proto,
        "attempts": attempts,
        "timeout": timeout,
        "source": source,
    }
    started = time.monotonic()
    proc = ns.python(
        ["-m", "tests.support.podserver", "probe", json.dumps(spec)],
        timeout=attempts * (timeout + 1.0) + 15.0,
    )
    result = ProbeResult(elapsed=time.monotonic() - started)
    for reply in json.loads(proc.stdout)["results"]:
        if reply["ok"]:
            result.pods[reply["pod"]] += 1
            result.client_ips[_ip_of(reply["client"])] += 1
            result.source_ips[_ip_of(reply["source"])] += 1
            result.replies.append(reply)
        else:
            result.failures[reply["error"]] += 1
            result.errors.append(reply)
    return result


class PersistentConnection:
    """One TCP connection opened inside a namespace, used from this process.

    The socket is created by a helper inside the namespace and passed back
    over SCM_RIGHTS; a socket stays in the namespace it was created in, so no
    helper process has to live as long as the connection.
    """

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self.sock = sock
        self._http = HTTPConnection(host, port, timeout=None)
        self._http.sock = sock

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def request(self, path: str = "/", timeout: float = 5.0) -> dict[str, Any]:
        """Send one GET over the same connection and return the JSON reply.

        Raises ``OSError``/``http.client`` errors when the connection broke,
        which is what graceful-termination tests look for.
        """
        self.sock.settimeout(timeout)
        self._http.request("GET", path, headers={"Host": "persistent"})
        response = self._http.getresponse()
        return json.loads(response.read())

    def close(self) -> None:
        self._http.close()
        self.sock.close()

    def __enter__(self) -> PersistentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_persistent(
    ns: Namespace, ip: str, port: int, *, timeout: float = 5.0
) -> PersistentConnection:
    sock = _socket_from(ns, ip, port, timeout=timeout)
    return PersistentConnection(sock, ip, port)


def open_udp(ns: Namespace, ip: str, port: int, *, source_port: int = 0) -> UdpClient:
    """A connected UDP socket created inside ``ns`` (fixed source port if given)."""
    return UdpClient(_socket_from(ns, ip, port, timeout=5.0, proto="udp", source_port=source_port))


class UdpClient:
    """One UDP socket that keeps its source port: a long-lived UDP "flow"
    (a DNS resolver's socket), which conntrack pins to its first NAT decision."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def exchange(self, timeout: float = 1.0) -> str:
        """Send one datagram; the answering pod's name, else "refused"/"timeout"/..."""
        self.sock.settimeout(timeout)
        try:
            self.sock.send(b"ping")
            reply: dict[str, Any] = json.loads(self.sock.recv(65536))
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                return "timeout"
            if isinstance(exc, ConnectionRefusedError):
                return "refused"
            return f"error:{exc.errno}"
        return str(reply["pod"])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_from(
    ns: Namespace,
    ip: str,
    port: int,
    *,
    timeout: float,
    proto: str = "tcp",
    source_port: int = 0,
) -> socket.socket:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent, child:
        argv = ns.exec_argv(
            [
                sys.executable,
                "-m",
                "tests.support.podserver",
                "connect",
                "--fd",
                str(child.fileno()),
                "--ip",
                ip,
                "--port",
                str(port),
                "--timeout",
                str(timeout),
                "--proto",
                proto,
                "--source-port",
                str(source_port),
            ]
        )
        proc = subprocess.Popen(
            argv,
            pass_fds=[child.fileno()],
            env=_python_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        child.close()
        parent.settimeout(timeout + 10.0)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(parent, 4096, 1)
        finally:
            _, stderr = proc.communicate(timeout=timeout + 10.0)
    if not fds:
        status = json.loads(msg) if msg else {"error": "other", "detail": stderr}
        raise ConnectionError(f"opening a {proto} socket to {ip}:{port} failed: {status}")
    return socket.socket(fileno=fds[0])


# ---------------------------------------------------------------- namespaces


class Namespace:
    """A named network namespace and ways to run things inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (``ip netns exec``)."""
        return run(self.exec_argv(argv), input=input, check=check, timeout=timeout)

    def python(
        self,
        args: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the project's Python inside the namespace (repo on the path)."""
        argv = self.exec_argv([sys.executable, *args])
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_python_env(),
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_batch(self, commands: Iterable[str]) -> None:
        """Run many ``ip`` commands in one process (much faster than one each)."""
        text = "\n".join(commands) + "\n"
        run(["ip", "-n", self.name, "-batch", "-"], input=text)

    def sysctl(self, values: dict[str, str | int]) -> None:
        # /proc/sys/net resolves to the namespace of the process writing it.
        args = [f"{key}={value}" for key, value in values.items()]
        self.run(["sysctl", "-q", "-w", *args])

    def read_sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    # -- iptables ------------------------------------------------------------

    @staticmethod
    def iptables_binary(tool: str, family: Family = 4, backend: Backend = "nft") -> str:
        """``iptables-nft-restore``, ``ip6tables-legacy-save``, ..."""
        if family not in (4, 6) or backend not in ("legacy", "nft"):
            raise ValueError(f"bad family/backend {family}/{backend}")
        return f"{'ip6' if family == 6 else 'ip'}tables-{backend}-{tool}"

    def iptables_restore(
        self,
        text: str,
        *,
        family: Family = 4,
        backend: Backend = "nft",
        noflush: bool = True,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Feed ``iptables-restore`` text to the namespace's tables.

        With ``check=False`` the completed process is returned as is, so a
        test can assert on ``returncode`` and ``stderr``; otherwise a failure
        raises :class:`CommandError` carrying stderr.
        """
        argv = [self.iptables_binary("restore", family, backend)]
        # The xtables lock file lives in /run, shared by all namespaces: wait
        # for it instead of failing when another test applies rules.
        argv.append("--wait=10")
        if noflush:
            argv.append("--noflush")
        return self.run(argv, input=text, check=check)

    def iptables_save(
        self, *, family: Family = 4, backend: Backend = "nft", table: str | None = None
    ) -> str:
        argv = [self.iptables_binary("save", family, backend)]
        if table:
            argv += ["-t", table]
        return self.run(argv).stdout

    # -- conntrack ------------------------------------------------------------

    def conntrack_flush(self) -> None:
        # conntrack exits 1 with "0 flow entries" on an empty table in some
        # versions; an empty table is the goal, not an error.
        self.run(["conntrack", "-F"], check=False)

    def conntrack_entries(self, *args: str) -> list[str]:
        out = self.run(["conntrack", "-L", *args], check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    # -- traffic ---------------------------------------------------------------

    def connect_many(self, dest_ip: str, port: int, proto: Proto = "tcp", **kw: Any) -> ProbeResult:
        return connect_many(self, dest_ip, port, proto, **kw)

    def open_persistent(self, ip: str, port: int, **kw: Any) -> PersistentConnection:
        return open_persistent(self, ip, port, **kw)

    def open_udp(self, ip: str, port: int, **kw: Any) -> UdpClient:
        return open_udp(self, ip, port, **kw)


class PodServer:
    """A :mod:`tests.support.podserver` process running inside a pod."""

    def __init__(self, ns: Namespace, name: str, tcp: Sequence[int], udp: Sequence[int]) -> None:
        self.tcp, self.udp = list(tcp), list(udp)
        argv = [sys.executable, "-m", "tests.support.podserver", "--name", name]
        argv += [arg for port in self.tcp for arg in ("--tcp", str(port))]
        argv += [arg for port in self.udp for arg in ("--udp", str(port))]
        # stderr goes to a file: a pipe nobody drains could fill and block
        # the server, but a start-up traceback must still be readable.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives with the server
        # "ip netns exec" execs the command (no fork), so this pid is the
        # server itself and killing it leaves nothing behind.
        self.proc = subprocess.Popen(
            ns.exec_argv(argv),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=_python_env(),
            text=True,
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.strip() == "READY":
                    return
                if not line:
                    break
        self._stderr.seek(0)
        stderr = self._stderr.read()[-2000:]
        self.stop()
        raise RuntimeError(f"pod server did not start: {stderr}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()


class Endpoint(Namespace):
    """A pod or client namespace: one veth to the node, addresses, routes."""

    def __init__(self, name: str, label: str, ipv4: str | None, ipv6: str | None) -> None:
        super().__init__(name)
        self.label = label
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.node_link = ""

    def ip_for(self, family: Family) -> str:
        ip = self.ipv4 if family == 4 else self.ipv6
        if ip is None:
            raise ValueError(f"{self.label} has no IPv{family} address")
        return ip


class Pod(Endpoint):
    server: PodServer | None = None

    def start_server(
        self, tcp: Sequence[int] = (8080,), udp: Sequence[int] = (), *, timeout: float = 10.0
    ) -> PodServer:
        """Start the pod server (named after the pod) and wait until it listens."""
        if self.server is not None:
            raise RuntimeError(f"{self.label} already runs a server")
        server = PodServer(self, self.label, tcp, udp)
        server.wait_ready(timeout)
        self.server = server
        return server

    def stop_server(self, sig: int = signal.SIGKILL) -> None:
        if self.server is not None:
            self.server.stop(sig)
            self.server = None


class Client(Endpoint):
    pass


_LIVE: set[Topology] = set()
_LIVE_LOCK = threading.Lock()
_COUNTER = iter(range(1 << 30))


def _close_live() -> None:
    for topo in list(_LIVE):
        topo.close()


atexit.register(_close_live)


class Topology:
    """A node namespace with pods and external clients around it.

    Use as a context manager (or call :meth:`close`); everything created is
    removed even when the body raises. Example::

        with Topology() as topo:
            a = topo.add_pod("pod-a", ipv4="10.244.1.2", tcp=[8080], udp=[5353])
            c = topo.add_client("client", ipv4="192.168.100.10")
            topo.node.iptables_restore(rules, backend="nft")
            result = c.connect_many("10.96.0.10", 80, attempts=20)
    """

    def __init__(
        self,
        *,
        node_ipv4: str = NODE_IPV4,
        node_ipv6: str = NODE_IPV6,
        prefix: str | None = None,
    ) -> None:
        self.prefix = prefix or f"{PREFIX}{os.getpid()}-{next(_COUNTER)}-"
        if not _NAME_RE.match(self.prefix):
            # sweep_stale relies on the scheme; refuse names it cannot sweep.
            raise ValueError(f"prefix {self.prefix!r} must look like 'sp<pid>-<n>-'")
        self.node_ipv4 = node_ipv4
        self.node_ipv6 = node_ipv6
        self.node = Namespace(self.prefix + "node")
        self.gw = Namespace(self.prefix + "gw")
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Client] = {}
        self._namespaces: list[Namespace] = []
        self._closed = False
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._build_node()
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------

    def _add_namespace(self, ns: Namespace) -> None:
        # Registered before creation so close() also removes half-built ones.
        self._namespaces.append(ns)
        run(["ip", "netns", "add", ns.name])
        # Links created later inherit "default"; DAD off so addresses are
        # usable immediately (see module docstring).
        ns.sysctl(
            {
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
                # ICMP errors are rate limited per peer (a burst of ~6, then
                # one a second), so a REJECT or a closed UDP port would answer
                # only the first few probe attempts and the rest would look
                # like timeouts.
                "net.ipv4.icmp_ratelimit": 0,
                "net.ipv6.icmp.ratelimit": 0,
            }
        )
        ns.ip("link", "set", "lo", "up")

    def _build_node(self) -> None:
        self._add_namespace(self.node)
        self.node.sysctl(
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                "net.ipv4.conf.all.route_localnet": 1,
            }
        )
        self._add_namespace(self.gw)
        self.node.ip(
            "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", self.gw.name
        )
        self.gw.ip_batch(
            [
                "link set eth0 up",
                f"addr add {GW_IPV4}/30 dev eth0",
                f"addr add {GW_IPV6}/64 dev eth0 nodad",
            ]
        )
        self.node.ip_batch(
            [
                "link set uplink up",
                f"addr add {GW_NODE_IPV4}/30 dev uplink",
                f"addr add {GW_NODE_IPV6}/64 dev uplink nodad",
                # The node IP lives on the uplink too and is the preferred
                # source: node-originated VIP traffic is routed (and its
                # source chosen) before DNAT, via this default route, and a
                # real node's default-route address is its node IP.
                f"addr add {self.node_ipv4}/32 dev uplink",
                f"addr add {self.node_ipv6}/128 dev uplink nodad",
                f"route add default via {GW_IPV4} dev uplink src {self.node_ipv4}",
                f"route add default via {GW_IPV6} dev uplink src {self.node_ipv6}",
            ]
        )

    def _attach(self, ep: Endpoint, link: str) -> None:
        self._add_namespace(ep)
        ep.node_link = link
        self.node.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ep.name)
        ep_cmds = ["link set eth0 up"]
        node_cmds = [f"link set {link} up"]
        if ep.ipv4:
            ep_cmds += [
                f"addr add {ep.ipv4}/32 dev eth0",
                f"route add {self.node_ipv4}/32 dev eth0 scope link",
                f"route add default via {self.node_ipv4} dev eth0",
            ]
            node_cmds += [
                f"addr add {self.node_ipv4}/32 dev {link}",
                f"route add {ep.ipv4}/32 dev {link} src {self.node_ipv4}",
            ]
        if ep.ipv6:
            ep_cmds += [
                f"addr add {ep.ipv6}/128 dev eth0 nodad",
                f"route add {self.node_ipv6}/128 dev eth0",
                f"route add default via {self.node_ipv6} dev eth0",
            ]
            node_cmds += [
                f"addr add {self.node_ipv6}/128 dev {link} nodad",
                f"route add {ep.ipv6}/128 dev {link} src {self.node_ipv6}",
            ]
        ep.ip_batch(ep_cmds)
        self.node.ip_batch(node_cmds)

    def add_pod(
        self,
        label: str,
        ipv4: str | None = None,
        ipv6: str | None = None,
        *,
        tcp: Sequence[int] = (),
        udp: Sequence[int] = (),
    ) -> Pod:
        """Add a pod at the given IPs; start its server when ports are given."""
        if not ipv4 and not ipv6:
            raise ValueError("a pod needs an IPv4 or IPv6 address")
        if label in self.pods:
            raise ValueError(f"pod {label!r} exists")
        idx = len(self.pods)
        pod = Pod(f"{self.prefix}p{idx}", label, ipv4, ipv6)
        self.pods[label] = pod
        self._attach(pod, f"veth-p{idx}")
        if tcp or udp:
            pod.start_server(tcp, udp)
        return pod

    def add_client(
        self, label: str = "client", ipv4: str | None = None, ipv6: str | None = None
    ) -> Client:
        """Add an external client; default IPs 192.168.100.1x / fd00:100::1x."""
        if label in self.clients:
            raise ValueError(f"client {label!r} exists")
        idx = len(self.clients)
        if ipv4 is None and ipv6 is None:
            ipv4, ipv6 = f"192.168.100.{10 + idx}", f"fd00:100::{10 + idx:x}"
        client = Client(f"{self.prefix}c{idx}", label, ipv4, ipv6)
        self.clients[label] = client
        self._attach(client, f"veth-c{idx}")
        return client

    def node_ip(self, family: Family = 4) -> str:
        return self.node_ipv4 if family == 4 else self.node_ipv6

    # -- teardown --------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [ns.name for ns in self._namespaces]

    def close(self) -> None:
        """Stop servers and delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for pod in self.pods.values():
            # Keep going on errors: a namespace left behind is worse than a
            # server that already died.
            with contextlib.suppress(Exception):
                pod.stop_server()
        # Pods first, node last: deleting the node namespace destroys the
        # node-side veths and with them their peers.
        for ns in reversed(self._namespaces):
            delete_namespace(ns.name)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
