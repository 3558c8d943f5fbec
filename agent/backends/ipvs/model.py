"""Frozen values describing IPVS mode's data plane: virtual servers, real
servers, ipsets and the few iptables rules around them.

The renderer builds a DesiredState from the plan; the kernel wrapper reads a
CurrentState back; diff.py compares the two. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.backends.iptables.rules import Jump

# kube-proxy's --ipvs-scheduler default.
DEFAULT_SCHEDULER = "rr"

# Schedulers the Linux kernel ships (net/netfilter/ipvs/ip_vs_*.c). Anything
# else cannot be loaded, and a typo must fail at start, not at the first
# virtual server.
KNOWN_SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
)

# IPVS service flags (include/uapi/linux/ip_vs.h).
FLAG_PERSISTENT = 0x0001
# IP_VS_SVC_F_SCHED2: for sh/mh, hash the source port too. kube-proxy sets it
# for "mh" so that clients behind one NAT address still spread.
FLAG_SCHED_PORT = 0x0010
# The kernel adds IP_VS_SVC_F_HASHED to every service it reports; it is not
# something we set, so it is masked away when comparing.
FLAG_HASHED = 0x0002
FLAGS_WE_MANAGE = FLAG_PERSISTENT | FLAG_SCHED_PORT

# IP_VS_CONN_F_MASQ: NAT forwarding, the only method that works for pods.
FWD_MASQ = 0

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


class SchedulerError(ValueError):
    """An --ipvs-scheduler value the kernel does not have."""


def check_scheduler(name: str) -> str:
    """The scheduler name to use, or SchedulerError with the valid names."""
    name = (name or DEFAULT_SCHEDULER).strip()
    if name not in KNOWN_SCHEDULERS:
        known = ", ".join(sorted(KNOWN_SCHEDULERS))
        raise SchedulerError(f"--ipvs-scheduler: unknown IPVS scheduler {name!r} (known: {known})")
    return name


def graceful_termination_needed(protocol: str) -> bool:
    """TCP real servers drain; UDP and SCTP ones go at once (upstream's rule:
    with expire_nodest_conn=1 their flows are dropped on the next packet)."""
    return protocol.upper() not in ("UDP", "SCTP")


VSKey = tuple[str, str, int]  # (protocol, address, port)
RSKey = tuple[str, int]  # (address, port)


def addr_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True, order=True)
class VirtualServer:
    """One IPVS service: address:port/protocol plus how it schedules."""

    protocol: str
    address: str
    port: int
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    # Persistence timeout in seconds (ClientIP affinity); 0 when not persistent.
    timeout: int = 0

    @property
    def key(self) -> VSKey:
        return (self.protocol, self.address, self.port)

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)

    def same_settings(self, other: VirtualServer) -> bool:
        return (
            self.scheduler == other.scheduler
            and (self.flags & FLAGS_WE_MANAGE) == (other.flags & FLAGS_WE_MANAGE)
            and self.timeout == other.timeout
        )

    def __str__(self) -> str:
        return f"{self.protocol}/{addr_port(self.address, self.port)}"


@dataclass(frozen=True, order=True)
class RealServer:
    """A real server as we want it: always masquerade, weight 1 when in use."""

    address: str
    port: int
    weight: int = 1

    @property
    def key(self) -> RSKey:
        return (self.address, self.port)

    def __str__(self) -> str:
        return addr_port(self.address, self.port)


@dataclass(frozen=True, order=True)
class CurrentRealServer:
    """A real server as the kernel reports it, with its connection counts."""

    address: str
    port: int
    weight: int = 1
    active: int = 0
    inactive: int = 0

    @property
    def key(self) -> RSKey:
        return (self.address, self.port)

    @property
    def connections(self) -> int:
        return self.active + self.inactive

    def __str__(self) -> str:
        return addr_port(self.address, self.port)


@dataclass(frozen=True)
class DesiredService:
    vs: VirtualServer
    reals: tuple[RealServer, ...]
    # Which service port this virtual server serves (for logs and render).
    owner: str = ""
    # Why these real servers (cluster set, local set, fallback...).
    source: str = ""


@dataclass(frozen=True)
class CurrentService:
    vs: VirtualServer
    reals: tuple[CurrentRealServer, ...] = ()


@dataclass(frozen=True, order=True)
class IPSet:
    """One ipset with the complete member list we want in it."""

    name: str
    set_type: str  # hash:ip,port | hash:ip,port,ip | hash:ip,port,net | bitmap:port | hash:ip
    family: int
    comment: str
    entries: tuple[str, ...] = ()

    def create_line(self) -> str:
        if self.set_type.startswith("bitmap:"):
            opts = "range 0-65535"
        else:
            opts = f"family {'inet6' if self.family == 6 else 'inet'} hashsize 1024 maxelem 65536"
        return f"create {self.name} {self.set_type} {opts}"


@dataclass(frozen=True)
class DesiredState:
    """Everything IPVS mode programs for one plan."""

    services: Mapping[VSKey, DesiredService]
    # Addresses to bind to kube-ipvs0 (service IPs that are not node addresses).
    bind_addresses: frozenset[str]
    ipsets: tuple[IPSet, ...]
    # family -> iptables-restore input (our chains only, to be restored with --noflush).
    iptables: Mapping[int, str]
    # Rules in the built-in chains that lead into ours, the same in every
    # family: shared with everybody, so only the missing ones are inserted
    # (agent/backends/ipvs/iptables.py), in the same restore as our chains.
    jumps: tuple[Jump, ...]
    families: tuple[int, ...] = (4, 6)
    # Real servers per service port that were left out, with why (render notes).
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class CurrentState:
    services: Mapping[VSKey, CurrentService]
    bound_addresses: frozenset[str] = frozenset()
