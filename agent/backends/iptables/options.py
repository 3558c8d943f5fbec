"""What the iptables renderer needs besides the plan (kube-proxy's flags)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.config import ConfigError
from agent.model import ip_family
from agent.nodeports import NodePortAddresses

# kube-proxy's default --iptables-masquerade-bit: 1 << 14 = 0x4000.
DEFAULT_MASQUERADE_BIT = 14

# Above this many endpoint chains (per family) comments are dropped from
# the SVC/SVL/SEP rules: kube-proxy's "large cluster mode"
# (largeClusterEndpointsThreshold in proxier.go).
LARGE_CLUSTER_ENDPOINTS = 1000


@dataclass(frozen=True)
class RenderOptions:
    """Renderer settings; one value per node, shared by both families.

    Addresses and CIDRs of both families may be mixed: each family's
    rendering picks its own.
    """

    # --cluster-cidr: traffic from outside these is masqueraded on its way to
    # a ClusterIP (kube-proxy's LocalTrafficDetector, mode ClusterCIDR). Like
    # kube-proxy, at most one CIDR per family. Empty: no such masquerade.
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = DEFAULT_MASQUERADE_BIT
    # --nodeport-addresses: NodePorts answer only on node addresses inside
    # these CIDRs, or on the node's primary IP of each family for "primary"
    # (empty: every local address, via -m addrtype LOCAL).
    nodeport_addresses: tuple[str, ...] = ()
    # This node's addresses: the FW chain lets the node reach its own LB IP
    # when a source range covers the node IP; nodeport_addresses are
    # resolved against them.
    node_ips: tuple[str, ...] = ()
    # MASQUERADE --random-fully (the applier probes support once).
    random_fully: bool = True
    # --iptables-localhost-nodeports (IPv4 only, as upstream).
    localhost_nodeports: bool = True
    # False when nf_conntrack_tcp_be_liberal is set: kube-proxy then skips the
    # INVALID drop rule in KUBE-FORWARD.
    drop_invalid: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.masquerade_bit <= 31:
            raise ConfigError(
                f"--iptables-masquerade-bit must be within 0..31, got {self.masquerade_bit}"
            )
        seen: dict[int, str] = {}
        for cidr in self.cluster_cidrs:
            _network(cidr, "--cluster-cidr")
            fam = ip_family(cidr)
            if fam in seen:
                raise ConfigError(
                    f"--cluster-cidr: at most one CIDR per IP family ({seen[fam]}, {cidr})"
                )
            seen[fam] = cidr
        NodePortAddresses.parse(self.nodeport_addresses)
        for ip in self.node_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"--node-ip: {ip!r} is not an IP address") from None

    @property
    def mark(self) -> str:
        """The masquerade mark as iptables-save prints it, e.g. ``0x4000``."""
        return f"{1 << self.masquerade_bit:#x}"

    def cluster_cidr(self, family: int) -> str | None:
        return next((c for c in self.cluster_cidrs if ip_family(c) == family), None)

    def node_ips_of(self, family: int) -> tuple[str, ...]:
        return tuple(ip for ip in self.node_ips if ip_family(ip) == family)

    def nodeport_ips(self, family: int) -> tuple[str, ...] | None:
        """Node addresses that accept NodePorts, or None for "every local address".

        kube-proxy matches --nodeport-addresses against the interfaces'
        addresses; the node's addresses stand in for them here, and the
        first of each family is the primary one. Loopback is kept only where
        localhost NodePorts work (IPv4 with the option on).
        """
        npa = NodePortAddresses.parse(self.nodeport_addresses)
        # No CIDR of this family, or a zero CIDR: every local address
        # (NodePortAddresses.MatchAll upstream).
        if npa.match_all(family, self.node_ips):
            return None
        candidates = list(self.node_ips_of(family))
        loopback = "127.0.0.1" if family == 4 else "::1"
        if loopback not in candidates:
            candidates.append(loopback)
        out = [
            ip
            for ip in npa.select(candidates, self.node_ips, family)
            if not (
                ipaddress.ip_address(ip).is_loopback
                and (family == 6 or not self.localhost_nodeports)
            )
        ]
        return tuple(sorted(set(out), key=ipaddress.ip_address))


def _network(cidr: str, flag: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ConfigError(f"{flag}: {cidr!r} is not a CIDR") from None
