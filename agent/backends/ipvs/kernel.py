"""The kernel side of IPVS mode, over pyroute2 (pinned 0.9.7): the IPVS table,
the kube-ipvs0 dummy link and its addresses, and the sysctls IPVS mode needs.

Everything is per network namespace: IPVS tables, links, ipsets and sysctls
all belong to the namespace the process runs in (tests use `ip netns exec`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from agent.backends.ipvs.model import (
    FWD_MASQ,
    PROTOCOL_NAMES,
    PROTOCOLS,
    CurrentRealServer,
    CurrentService,
    RealServer,
    VirtualServer,
    VSKey,
)

log = logging.getLogger("sliceproxy.ipvs")

NO_IPVS_MESSAGE = (
    "IPVS is not available in this kernel (no 'IPVS' generic netlink family; "
    "is the ip_vs module built and loadable?). Use --proxy-mode iptables, or run "
    "on a kernel with ip_vs."
)


class NoIPVSError(OSError):
    """The running kernel has no IPVS (an OSError: the commands report those
    as plain messages, never as tracebacks)."""


def open_ipvs() -> IPVS:
    """An IPVS netlink socket, or NoIPVSError when the kernel has none.

    Binding the generic netlink family makes the kernel try to load ip_vs
    (it has a family alias), so a loadable module is enough.
    """
    # pyroute2 0.9.7: an IPVS() whose constructor fails leaves its socket and
    # asyncio loop open (a ResourceWarning / "Exception ignored" at garbage
    # collection), and the caller never gets the object to close. Build it in
    # two steps so a failure can be cleaned up.
    sock = IPVS.__new__(IPVS)
    try:
        sock.__init__()  # type: ignore[misc]
    except NetlinkError as err:
        with contextlib.suppress(Exception):
            sock.close()
            sock.asyncore.event_loop.close()
        if err.code in (errno.ENOENT, errno.EOPNOTSUPP):
            raise NoIPVSError(NO_IPVS_MESSAGE) from None
        raise
    return sock


def ipvs_available() -> bool:
    try:
        open_ipvs().close()
    except NoIPVSError:
        return False
    return True


# -- IPVS table ------------------------------------------------------------


def _attr(msg, *path):
    node = msg
    for name in path:
        if node is None:
            return None
        node = node.get_attr(name)
    return node


def _service_spec(vs: VirtualServer, with_settings: bool = True) -> IPVSService:
    spec: dict = {
        "addr": vs.address,
        "port": vs.port,
        "protocol": PROTOCOLS[vs.protocol],
    }
    if vs.family == 6:
        spec["af"] = socket.AF_INET6
        # For IPv6 the kernel reads the netmask attribute as a host-order
        # prefix length (1..128), as ipvsadm sends it; pyroute2 types it as an
        # IPv4 address: bytes 128.0.0.0 are 128 on a little-endian host.
        spec["netmask"] = "128.0.0.0" if sys.byteorder == "little" else "0.0.0.128"
    if with_settings:
        spec["sched_name"] = vs.scheduler
        spec["flags"] = {"flags": vs.flags, "mask": 0xFFFF}
        spec["timeout"] = vs.timeout
    return IPVSService(**spec)


def _dest_spec(rs: RealServer) -> IPVSDest:
    # pyroute2 defaults to direct routing (3); pods need masquerade (NAT).
    return IPVSDest(addr=rs.address, port=rs.port, weight=rs.weight, fwd_method=FWD_MASQ)


class IPVSKernel:
    """Thin, typed wrapper over pyroute2's IPVS socket."""

    def __init__(self) -> None:
        self.sock = open_ipvs()

    def close(self) -> None:
        self.sock.close()

    def dump(self) -> dict[VSKey, CurrentService]:
        out: dict[VSKey, CurrentService] = {}
        for msg in self.sock.service("dump"):
            svc = _attr(msg, "IPVS_CMD_ATTR_SERVICE")
            proto = PROTOCOL_NAMES.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
            addr = svc.get_attr("IPVS_SVC_ATTR_ADDR")
            if proto is None or addr is None:
                continue  # fwmark services are never ours
            flags_attr = svc.get_attr("IPVS_SVC_ATTR_FLAGS")
            flags = flags_attr["flags"] if flags_attr is not None else 0
            vs = VirtualServer(
                proto,
                str(addr),
                int(svc.get_attr("IPVS_SVC_ATTR_PORT")),
                svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
                int(flags),
                int(svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0),
            )
            out[vs.key] = CurrentService(vs, tuple(self.dests(vs)))
        return out

    def dests(self, vs: VirtualServer) -> list[CurrentRealServer]:
        reals = []
        for msg in self.sock.dest("dump", service=_service_spec(vs, with_settings=False)):
            d = _attr(msg, "IPVS_CMD_ATTR_DEST")
            reals.append(
                CurrentRealServer(
                    str(d.get_attr("IPVS_DEST_ATTR_ADDR")),
                    int(d.get_attr("IPVS_DEST_ATTR_PORT")),
                    int(d.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0),
                    int(d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0),
                    int(d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0),
                )
            )
        return sorted(reals)

    def add_service(self, vs: VirtualServer) -> None:
        self.sock.service("add", service=_service_spec(vs))

    def update_service(self, vs: VirtualServer) -> None:
        self.sock.service("set", service=_service_spec(vs))

    def del_service(self, vs: VirtualServer) -> None:
        self.sock.service("del", service=_service_spec(vs, with_settings=False))

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.sock.dest("add", service=_service_spec(vs, False), dest=_dest_spec(rs))

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.sock.dest("set", service=_service_spec(vs, False), dest=_dest_spec(rs))

    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.sock.dest("del", service=_service_spec(vs, False), dest=_dest_spec(rs))


# -- kube-ipvs0 ------------------------------------------------------------


class DummyLink:
    """The dummy link that holds service IPs, so the node accepts packets to them."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _index(self, ipr: IPRoute) -> int | None:
        found = ipr.link_lookup(ifname=self.name)
        return found[0] if found else None

    def ensure(self) -> int:
        with IPRoute() as ipr:
            idx = self._index(ipr)
            if idx is None:
                # Left down, as upstream does: addresses on it still get local
                # routes, and a down link never answers ARP for them.
                ipr.link("add", ifname=self.name, kind="dummy")
                idx = self._index(ipr)
                log.info("created dummy link %s", self.name)
            assert idx is not None
            return idx

    def addresses(self) -> set[str]:
        with IPRoute() as ipr:
            idx = self._index(ipr)
            if idx is None:
                return set()
            return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}

    def sync(self, wanted: Iterable[str]) -> tuple[int, int]:
        """Bind the wanted addresses, unbind the rest; (added, removed)."""
        wanted = set(wanted)
        idx = self.ensure()
        have = self.addresses()
        added = removed = 0
        with IPRoute() as ipr:
            for a in sorted(wanted - have):
                ipr.addr("add", index=idx, address=a, prefixlen=128 if ":" in a else 32)
                added += 1
            for a in sorted(have - wanted):
                ipr.addr("del", index=idx, address=a, prefixlen=128 if ":" in a else 32)
                removed += 1
        return added, removed

    def delete(self) -> bool:
        with IPRoute() as ipr:
            idx = self._index(ipr)
            if idx is None:
                return False
            ipr.link("del", index=idx)
            return True


def local_addresses(exclude_link: str) -> list[str]:
    """Every address on this node except those on ``exclude_link``."""
    with IPRoute() as ipr:
        skip = set(ipr.link_lookup(ifname=exclude_link))
        return sorted(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr() if a["index"] not in skip)


# -- sysctls ---------------------------------------------------------------

# Upstream (ipvs/proxier.go NewProxier): conntrack so iptables' nat sees IPVS
# traffic (masquerade), expire_nodest_conn so flows to deleted real servers
# are dropped instead of hanging, expire_quiescent_template so persistence
# templates of weight-0 real servers expire, ip_forward to route to pods.
SYSCTLS = (
    ("net/ipv4/vs/conntrack", 1),
    ("net/ipv4/vs/expire_nodest_conn", 1),
    ("net/ipv4/vs/expire_quiescent_template", 1),
    ("net/ipv4/ip_forward", 1),
)
CONN_REUSE = "net/ipv4/vs/conn_reuse_mode"


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def ensure_sysctls(root: Path = Path("/proc/sys")) -> list[str]:
    """Set IPVS mode's sysctls; return what was changed, for the log."""
    changed = []
    wanted = list(SYSCTLS)
    # conn_reuse_mode: kernels before 5.9 need 0 (else a reused source port
    # hits a 1 s delay, kubernetes #81775); from 5.9 the kernel's default is
    # right and upstream leaves it as-is (kubernetes #93297). Below 4.1 the
    # sysctl does not exist.
    version = _kernel_version()
    if (4, 1) <= version < (5, 9):
        wanted.append((CONN_REUSE, 0))
    for name, value in wanted:
        path = root / name
        try:
            current = path.read_text().strip()
        except OSError as err:
            log.warning("sysctl %s: cannot read: %s", name.replace("/", "."), err)
            continue
        if current != str(value):
            path.write_text(f"{value}\n")
            changed.append(f"{name.replace('/', '.')}={value} (was {current})")
    for item in changed:
        log.info("set sysctl %s", item)
    if not changed:
        log.info("IPVS sysctls already set")
    return changed
