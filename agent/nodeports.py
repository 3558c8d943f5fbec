"""--nodeport-addresses, resolved one way for every backend and the
healthCheckNodePort servers.

Upstream splits the job in two: cmd/kube-proxy/app/server.go turns the
keyword ``primary`` into the node's primary IP of each family as a host CIDR
(/32, /128; skipped when that IP is loopback or unknown), and
pkg/proxy/util/nodeport_addresses.go (``NewNodePortAddresses``) keeps, per
family, the CIDRs of that family; none of them, or a zero CIDR
(``0.0.0.0/0``, ``::/0``), means "match all" (``MatchAll()``), otherwise
``GetNodeIPs`` keeps the interface addresses inside them. Both halves live
here; what counts as a candidate address (node IPs, the kernel's local
addresses, loopback) stays with each caller.

Upstream's validation refuses ``primary`` mixed with CIDRs; `sliceproxy run`
has always accepted the mix, so it means the union here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import ConfigError

PRIMARY = "primary"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NodePortAddresses:
    """The parsed flag: canonical CIDRs (both families mixed) and whether
    ``primary`` was given. Empty (the default): every address."""

    cidrs: tuple[str, ...] = ()
    primary: bool = False

    @classmethod
    def parse(cls, values: Iterable[str], flag: str = "--nodeport-addresses") -> NodePortAddresses:
        """ConfigError for anything that is neither a CIDR nor ``primary``."""
        cidrs: list[str] = []
        primary = False
        for raw in values:
            item = raw.strip()
            if not item:
                continue
            if item == PRIMARY:
                primary = True
                continue
            try:
                # strict=False: upstream's ParseCIDRSloppy accepts host bits.
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(f"{flag}: {item!r} is not a CIDR (nor {PRIMARY!r})") from None
            cidrs.append(str(net))
        return cls(tuple(dict.fromkeys(cidrs)), primary)

    @property
    def is_set(self) -> bool:
        return bool(self.cidrs or self.primary)

    def networks(
        self, family: int, primary_ips: Iterable[str] = ()
    ) -> tuple[IPNetwork, ...] | None:
        """This family's CIDRs (``primary`` as a host CIDR), or None for
        "match all": no CIDR of the family, or a zero CIDR among them."""
        nets: list[IPNetwork] = [
            net for net in (ipaddress.ip_network(c) for c in self.cidrs) if net.version == family
        ]
        if self.primary:
            ip = primary_ip(primary_ips, family)
            if ip is not None:
                nets.append(ipaddress.ip_network(ip))
        if not nets or any(net.prefixlen == 0 for net in nets):
            return None
        return tuple(nets)

    def match_all(self, family: int, primary_ips: Iterable[str] = ()) -> bool:
        return self.networks(family, primary_ips) is None

    def select(
        self, candidates: Iterable[str], primary_ips: Iterable[str], family: int
    ) -> tuple[str, ...]:
        """The candidates of ``family`` that accept NodePorts, in their order
        (upstream GetNodeIPs over the interface addresses). Non-addresses
        are skipped."""
        nets = self.networks(family, primary_ips)
        out: list[str] = []
        for text in candidates:
            addr = _address(text)
            if addr is None or addr.version != family:
                continue
            if nets is None or any(addr in net for net in nets):
                out.append(text)
        return tuple(dict.fromkeys(out))


def primary_ip(addresses: Iterable[str], family: int) -> str | None:
    """The node's primary IP of ``family``: its first address of that
    family (the Node object lists the primary first, as does --node-ip);
    None when there is none or it is loopback (server.go skips those)."""
    for text in addresses:
        addr = _address(text)
        if addr is not None and addr.version == family:
            return None if addr.is_loopback else str(addr)
    return None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
