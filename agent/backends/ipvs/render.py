"""IPVS mode renderer (pure): NodePlan -> DesiredState -> readable text.

Follows kube-proxy's IPVS proxier (pkg/proxy/ipvs/proxier.go):

- one virtual server per service IP (cluster, external, load-balancer, and
  each node address for a NodePort) x port x protocol, real servers in
  masquerade forwarding, session affinity ClientIP = persistence;
- service IPs bound to the dummy link kube-ipvs0 (except external/LB IPs that
  already are node addresses);
- ipsets naming service IP:ports by purpose, matched from a fixed handful of
  iptables rules (masquerade, NodePort/LB filtering, access filter).

Endpoint choice per virtual server is upstream's syncEndpoint(): the plan's
local set when the traffic policy that applies to that kind of virtual server
is Local and the local set is not empty, otherwise the plan's cluster set
(kubernetes PR #97081: with no local endpoint a Local-policy virtual server
falls back to the cluster set so that pods on this node can still reach the
service; external traffic then goes unmasqueraded and its replies are lost,
as upstream). No topology is decided here: only the plan's sets are used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.backends.iptables.rules import Jump
from agent.backends.ipvs.model import (
    DEFAULT_SCHEDULER,
    FLAG_PERSISTENT,
    FLAG_SCHED_PORT,
    PROTOCOLS,
    DesiredService,
    DesiredState,
    IPSet,
    RealServer,
    VirtualServer,
    VSKey,
    addr_port,
    check_scheduler,
)
from agent.model import Endpoint, ip_family
from agent.nodeports import NodePortAddresses, primary_ip
from agent.plan import NodePlan, ServicePortPlan

DUMMY_LINK = "kube-ipvs0"

# ipset base names (IPv4 spelling) with type and purpose, as upstream's ipset.go.
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

SET_INFO: dict[str, tuple[str, str]] = {
    LOOP_BACK: ("hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for hairpin"),
    CLUSTER_IP: ("hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    EXTERNAL_IP: (
        "hash:ip,port",
        "Kubernetes service external ip + port for masquerade and filter",
    ),
    EXTERNAL_IP_LOCAL: ("hash:ip,port", "Kubernetes service external ip + port with eTP=Local"),
    LOAD_BALANCER: ("hash:ip,port", "Kubernetes service lb portal"),
    LOAD_BALANCER_LOCAL: ("hash:ip,port", "Kubernetes service lb ip + port with eTP=Local"),
    LOAD_BALANCER_FW: ("hash:ip,port", "Kubernetes service lb ip + port with sourceRanges"),
    LOAD_BALANCER_SOURCE_IP: ("hash:ip,port,ip", "Kubernetes service lb ip + port + source IP"),
    LOAD_BALANCER_SOURCE_CIDR: (
        "hash:ip,port,net",
        "Kubernetes service lb ip + port + source cidr",
    ),
    NODE_PORT_TCP: ("bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    NODE_PORT_LOCAL_TCP: ("bitmap:port", "Kubernetes nodeport TCP port with eTP=Local"),
    NODE_PORT_UDP: ("bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    NODE_PORT_LOCAL_UDP: ("bitmap:port", "Kubernetes nodeport UDP port with eTP=Local"),
    NODE_PORT_SCTP: ("hash:ip,port", "Kubernetes nodeport SCTP ip + port for masquerade purpose"),
    NODE_PORT_LOCAL_SCTP: ("hash:ip,port", "Kubernetes nodeport SCTP ip + port with eTP=Local"),
    HEALTH_CHECK_NODE_PORT: ("bitmap:port", "Kubernetes health check node port"),
    IPVS_IPS: ("hash:ip", "Kubernetes service IPs bound to kube-ipvs0"),
}

# ipset names are limited to 31 characters: two IPv6 spellings would be 32,
# so they are shortened (the source CIDR one as later upstream releases do).
_V6_NAMES = {
    LOAD_BALANCER_SOURCE_CIDR: "KUBE-6-LOAD-BALANCER-SRC-CIDR",
    NODE_PORT_LOCAL_SCTP: "KUBE-6-NODE-PORT-LOCAL-SCTP",
}


def set_name(base: str, family: int) -> str:
    """The kernel name of an ipset in one family (upstream prefixes KUBE-6-)."""
    if family == 4:
        return base
    return _V6_NAMES.get(base, "KUBE-6-" + base.removeprefix("KUBE-"))


# (base set, table, from chain, target, match type, protocol match): upstream's
# ipsetWithIptablesChain; a rule is written only when its set is not empty.
SET_RULES: tuple[tuple[str, str, str, str, str, str], ...] = (
    (LOOP_BACK, "nat", "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
    (
        LOAD_BALANCER_FW,
        "filter",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "dst,dst",
        "",
    ),
    (
        LOAD_BALANCER_SOURCE_CIDR,
        "filter",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "RETURN",
        "dst,dst,src",
        "",
    ),
    (LOAD_BALANCER_SOURCE_IP, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
)

NAT_CHAINS = (
    "KUBE-SERVICES",
    "KUBE-POSTROUTING",
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-MARK-MASQ",
)
FILTER_CHAINS = (
    "KUBE-FORWARD",
    "KUBE-NODE-PORT",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
)

# Upstream's iptablesJumpChain for IPVS mode: (table, built-in chain, our
# chain, comment), each inserted at the top of its built-in chain.
JUMPS: tuple[Jump, ...] = (
    Jump("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    Jump("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    Jump("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    Jump("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    Jump("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)


@dataclass(frozen=True)
class IPVSOptions:
    """kube-proxy's IPVS-mode settings that change what is rendered."""

    scheduler: str = DEFAULT_SCHEDULER
    # --masquerade-all: masquerade every packet to a cluster IP.
    masquerade_all: bool = False
    # --cluster-cidr (the local traffic detector): masquerade only traffic to
    # cluster IPs from outside these. Empty = upstream's fallback, which
    # masquerades node-originated traffic whose source is a service IP.
    cluster_cidrs: tuple[str, ...] = ()
    # Addresses NodePorts are served on (--node-ip); None = the local
    # addresses the applier passes to render_state (upstream: every address
    # of the node but kube-ipvs0's), else the plan's node addresses.
    nodeport_addresses: tuple[str, ...] | None = None
    # --nodeport-addresses: serve NodePorts only on addresses in these CIDRs
    # ("primary" = the node's first address of each family, as upstream);
    # a family with no CIDR (or a zero one) serves on all its addresses.
    nodeport_cidrs: tuple[str, ...] = ()
    # --iptables-masquerade-bit: the fwmark bit of "masquerade this".
    masquerade_bit: int = 14
    # Families to program; None = those the plan and the node have.
    families: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler", check_scheduler(self.scheduler))
        # Refuse a bad --nodeport-addresses up front (ConfigError), as
        # RenderOptions does, rather than at the first render.
        NodePortAddresses.parse(self.nodeport_cidrs)

    @property
    def mark(self) -> str:
        return hex(1 << self.masquerade_bit)


def _ip_key(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip)
    return (a.version, int(a))


def _pick(spp: ServicePortPlan, local_policy: bool) -> tuple[tuple[Endpoint, ...], str]:
    """upstream syncEndpoint(onlyNodeLocalEndpoints): which plan set a virtual
    server gets, and a word on why."""
    d = spp.decision
    if local_policy:
        if d.local:
            return d.local, "local endpoints"
        return d.cluster or (), "no local endpoint: cluster endpoints (upstream #97081)"
    return d.cluster or (), "cluster endpoints"


def _reals(endpoints: Iterable[Endpoint]) -> tuple[RealServer, ...]:
    keyed = {(e.ip, e.port): RealServer(e.ip, e.port) for e in endpoints}
    return tuple(sorted(keyed.values(), key=lambda r: (_ip_key(r.address), r.port)))


def _entry(ip: str, proto: str, port: int, extra: str = "") -> str:
    base = f"{ip},{proto}:{port}"
    return f"{base},{extra}" if extra else base


def _norm_net(cidr: str) -> str:
    """CIDR as the kernel lists it in a hash:ip,port,net set (no /32, /128)."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


class _Builder:
    def __init__(
        self, plan: NodePlan, opts: IPVSOptions, local_addresses: Sequence[str] | None
    ) -> None:
        self.plan = plan
        self.opts = opts
        self.services: dict[VSKey, DesiredService] = {}
        self.order: list[VSKey] = []
        self.entries: dict[tuple[str, int], set[str]] = {}
        self.bind: set[str] = set()
        self.out_drops: dict[int, list[tuple[str, str, int]]] = {}
        self.notes: list[str] = []
        # The node's own addresses (--node-ip, else the Node object's): the
        # LB source-range check asks whether *the node* is covered.
        own = plan.node.addresses if opts.nodeport_addresses is None else opts.nodeport_addresses
        self.own_addresses = tuple(a for a in own if _is_ip(a))
        addrs = own
        if opts.nodeport_addresses is None and local_addresses is not None:
            addrs = tuple(local_addresses)
        # External/LB IPs that already are addresses of the node need no
        # binding to kube-ipvs0, whatever --nodeport-addresses says.
        self.local = frozenset(a for a in addrs if _is_ip(a)) | frozenset(self.own_addresses)
        # --nodeport-addresses per family, as upstream's one proxier per
        # family does (agent/nodeports.py). The primary IPs count as
        # candidates even when the kernel's list lacks them (e.g. --node-ip
        # names an address of another interface, or no list was read).
        npa = NodePortAddresses.parse(opts.nodeport_cidrs)
        primary = (
            tuple(ip for fam in (4, 6) if (ip := primary_ip(self.own_addresses, fam)))
            if npa.primary
            else ()
        )
        candidates = tuple(a for a in dict.fromkeys((*addrs, *primary)) if _nodeport_capable(a))
        chosen = {a for fam in (4, 6) for a in npa.select(candidates, self.own_addresses, fam)}
        self.node_addresses = tuple(a for a in candidates if a in chosen)

    def add_entry(self, base: str, family: int, entry: str) -> None:
        self.entries.setdefault((base, family), set()).add(entry)

    def add_vs(
        self, spp: ServicePortPlan, address: str, port: int, local: bool, bind: bool
    ) -> None:
        svc = spp.service
        flags, timeout = 0, 0
        if svc.affinity_timeout is not None:
            flags |= FLAG_PERSISTENT
            timeout = svc.affinity_timeout
        if self.opts.scheduler == "mh":
            flags |= FLAG_SCHED_PORT
        vs = VirtualServer(svc.protocol, address, port, self.opts.scheduler, flags, timeout)
        if vs.key in self.services:
            # Two service ports claiming one IP:port (e.g. a shared external
            # IP): the first in plan order keeps it, as upstream's map would
            # keep one of them.
            self.notes.append(f"{vs} claimed by {self.services[vs.key].owner} and {spp.name}")
            return
        endpoints, why = _pick(spp, local)
        self.services[vs.key] = DesiredService(vs, _reals(endpoints), str(spp.name), why)
        self.order.append(vs.key)
        if bind:
            self.bind.add(address)

    def service_port(self, spp: ServicePortPlan) -> None:
        svc, fam = spp.service, spp.family
        proto = svc.protocol.lower()
        cluster_ip = svc.cluster_ip(fam)
        if cluster_ip is None or svc.protocol not in PROTOCOLS:
            return
        # Hairpin: a local endpoint reaching itself through the service needs SNAT.
        for ep in spp.decision.all_reachable + (spp.decision.local or ()):
            if ep.is_local:
                self.add_entry(LOOP_BACK, fam, _entry(ep.ip, proto, ep.port, ep.ip))

        self.add_entry(CLUSTER_IP, fam, _entry(cluster_ip, proto, svc.port))
        self.add_vs(spp, cluster_ip, svc.port, svc.internal_policy_local, bind=True)

        for ip in svc.external_ips_of(fam):
            base = EXTERNAL_IP_LOCAL if svc.external_policy_local else EXTERNAL_IP
            self.add_entry(base, fam, _entry(ip, proto, svc.port))
            self.add_vs(spp, ip, svc.port, svc.external_policy_local, bind=ip not in self.local)

        ranges = svc.source_ranges_of(fam)
        node_ip = next((a for a in self.own_addresses if ip_family(a) == fam), None)
        for ip in svc.load_balancer_ips_of(fam):
            entry = _entry(ip, proto, svc.port)
            self.add_entry(LOAD_BALANCER, fam, entry)
            if svc.external_policy_local:
                self.add_entry(LOAD_BALANCER_LOCAL, fam, entry)
            if ranges:
                self.add_entry(LOAD_BALANCER_FW, fam, entry)
                allow_node = False
                for cidr in ranges:
                    self.add_entry(
                        LOAD_BALANCER_SOURCE_CIDR, fam, _entry(ip, proto, svc.port, _norm_net(cidr))
                    )
                    net = ipaddress.ip_network(cidr, strict=False)
                    if node_ip is not None and ipaddress.ip_address(node_ip) in net:
                        allow_node = True
                if allow_node:
                    # The node reaches the LB IP straight through kube-ipvs0,
                    # with the LB IP as source: let that through.
                    self.add_entry(LOAD_BALANCER_SOURCE_IP, fam, _entry(ip, proto, svc.port, ip))
                else:
                    # Source ranges do not cover the node: block node -> LB IP
                    # (kubernetes #119656), where source and VIP are both the LB IP.
                    self.out_drops.setdefault(fam, []).append((ip, proto, svc.port))
            self.add_vs(spp, ip, svc.port, svc.external_policy_local, bind=ip not in self.local)

        if svc.node_port:
            node_ips = [a for a in self.node_addresses if ip_family(a) == fam]
            local = svc.external_policy_local
            if svc.protocol == "SCTP":
                for a in node_ips:
                    self.add_entry(NODE_PORT_SCTP, fam, _entry(a, proto, svc.node_port))
                    if local:
                        self.add_entry(NODE_PORT_LOCAL_SCTP, fam, _entry(a, proto, svc.node_port))
            else:
                base, lbase = (
                    (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP)
                    if svc.protocol == "TCP"
                    else (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP)
                )
                self.add_entry(base, fam, str(svc.node_port))
                if local:
                    self.add_entry(lbase, fam, str(svc.node_port))
            for a in node_ips:
                # Node addresses are already local: never bound to kube-ipvs0.
                self.add_vs(spp, a, svc.node_port, local, bind=False)

        if svc.health_check_node_port:
            self.add_entry(HEALTH_CHECK_NODE_PORT, fam, str(svc.health_check_node_port))

    def ipsets(self, families: Sequence[int]) -> tuple[IPSet, ...]:
        sets = []
        for fam in families:
            for addr in self.bind:
                if ip_family(addr) == fam:
                    self.add_entry(IPVS_IPS, fam, addr)
            for base, (stype, comment) in SET_INFO.items():
                entries = self.entries.get((base, fam), set())
                sets.append(
                    IPSet(
                        set_name(base, fam),
                        stype,
                        fam,
                        comment,
                        tuple(sorted(entries, key=_entry_key)),
                    )
                )
        return tuple(sets)


def _entry_key(entry: str) -> tuple:
    head, _, rest = entry.partition(",")
    if _is_ip(head):
        return (0, _ip_key(head), rest)
    return (1, int(head) if head.isdigit() else 0, entry)


def _nodeport_capable(text: str) -> bool:
    """Upstream's filter on node addresses for NodePorts: no loopback, no
    IPv6 link-local (a virtual server there would need a zone)."""
    if not _is_ip(text):
        return False
    a = ipaddress.ip_address(text)
    return not a.is_loopback and not (a.version == 6 and a.is_link_local)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _families(plan: NodePlan, node_addresses: Sequence[str]) -> tuple[int, ...]:
    fams = {4} | {k[1] for k in plan.entries} | {ip_family(a) for a in node_addresses}
    return tuple(sorted(fams))


def render_state(
    plan: NodePlan,
    opts: IPVSOptions | None = None,
    local_addresses: Sequence[str] | None = None,
) -> DesiredState:
    """The complete desired IPVS-mode state for a plan.

    ``local_addresses``: the node's addresses as the kernel lists them (the
    applier reads them; kube-ipvs0's excluded). NodePorts are served on them
    unless ``opts.nodeport_addresses`` names the addresses; without either,
    on the plan's node addresses (what `render` and dry-run show).
    """
    opts = opts or IPVSOptions()
    b = _Builder(plan, opts, local_addresses)
    families = opts.families or _families(plan, b.node_addresses)
    for key in sorted(plan.entries):
        if key[1] in families:
            b.service_port(plan.entries[key])
    ipsets = b.ipsets(families)
    by_name = {(s.name, s.family): s for s in ipsets}
    iptables = {fam: _iptables(fam, by_name, b.out_drops.get(fam, []), opts) for fam in families}
    services = {k: b.services[k] for k in b.order}
    return DesiredState(
        services, frozenset(b.bind), ipsets, iptables, JUMPS, families, tuple(b.notes)
    )


def _iptables(
    fam: int,
    sets: dict[tuple[str, int], IPSet],
    out_drops: Sequence[tuple[str, str, int]],
    opts: IPVSOptions,
) -> str:
    """iptables-restore input for our chains in one family (upstream's
    writeIptablesRules), grouped by chain; restored with --noflush so that
    only these chains are replaced."""

    def s(base: str) -> IPSet:
        return sets[(set_name(base, fam), fam)]

    rules: dict[tuple[str, str], list[str]] = {}

    def add(table: str, chain: str, rule: str) -> None:
        rules.setdefault((table, chain), []).append(rule)

    lo = "127.0.0.0/8" if fam == 4 else "::1/128"
    # Node-local traffic from loopback never goes through a service here.
    add("nat", "KUBE-SERVICES", f"-s {lo} -j RETURN")
    for base, table, chain, target, match, proto in SET_RULES:
        st = s(base)
        if st.entries:
            p = f"-p {proto} " if proto else ""
            add(
                table,
                chain,
                f'{p}-m comment --comment "{st.comment}" '
                f"-m set --match-set {st.name} {match} -j {target}",
            )

    cip = s(CLUSTER_IP)
    if cip.entries:
        head = f'-m comment --comment "{cip.comment}" -m set --match-set {cip.name}'
        cidrs = [c for c in opts.cluster_cidrs if ip_family(c) == fam]
        if opts.masquerade_all:
            add("nat", "KUBE-SERVICES", f"{head} dst,dst -j KUBE-MARK-MASQ")
        elif cidrs:
            # Traffic to a service IP from outside the pod network may have
            # been routed here from elsewhere: masquerade it so replies return.
            for c in cidrs:
                add("nat", "KUBE-SERVICES", f"{head} dst,dst ! -s {c} -j KUBE-MARK-MASQ")
        else:
            # Without a pod CIDR, catch the node's own connections that picked
            # a service IP on kube-ipvs0 as source (VIP:x -> VIP:port).
            add("nat", "KUBE-SERVICES", f"{head} src,dst -j KUBE-MARK-MASQ")

    for base, masq in ((EXTERNAL_IP, True), (EXTERNAL_IP_LOCAL, False)):
        st = s(base)
        if not st.entries:
            continue
        head = f'-m comment --comment "{st.comment}" -m set --match-set {st.name} dst,dst'
        if masq:
            add("nat", "KUBE-SERVICES", f"{head} -j KUBE-MARK-MASQ")
        # Accept off-machine traffic (not from a bridge port, not local) and
        # traffic to external IPs that happen to be local addresses.
        add(
            "nat",
            "KUBE-SERVICES",
            f"{head} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
        )
        add("nat", "KUBE-SERVICES", f"{head} -m addrtype --dst-type LOCAL -j ACCEPT")

    add("nat", "KUBE-SERVICES", "-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    add("nat", "KUBE-LOAD-BALANCER", "-j KUBE-MARK-MASQ")
    add("filter", "KUBE-SOURCE-RANGES-FIREWALL", "-j DROP")
    for ip, proto, port in out_drops:
        add(
            "filter",
            "KUBE-IPVS-OUT-FILTER",
            f"-s {ip} -m ipvs --vaddr {ip} --vproto {proto} --vport {port} -j DROP",
        )
    # Accept IPVS traffic last in KUBE-SERVICES, so later rules of others
    # cannot break it.
    for base in (CLUSTER_IP, LOAD_BALANCER):
        st = s(base)
        if st.entries:
            add("nat", "KUBE-SERVICES", f"-m set --match-set {st.name} dst,dst -j ACCEPT")

    mark = f"{opts.mark}/{opts.mark}"
    add(
        "filter",
        "KUBE-FORWARD",
        f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark} -j ACCEPT',
    )
    add(
        "filter",
        "KUBE-FORWARD",
        '-m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    )
    hc = s(HEALTH_CHECK_NODE_PORT)
    add(
        "filter",
        "KUBE-NODE-PORT",
        f'-m comment --comment "{hc.comment}" -m set --match-set {hc.name} dst -j ACCEPT',
    )
    # A packet to a service IP bound on kube-ipvs0 whose port is no service
    # would otherwise reach host sockets (kubernetes #72236): reject it.
    for base, match in (
        (LOAD_BALANCER, "dst,dst"),
        (CLUSTER_IP, "dst,dst"),
        (EXTERNAL_IP, "dst,dst"),
        (EXTERNAL_IP_LOCAL, "dst,dst"),
        (HEALTH_CHECK_NODE_PORT, "dst"),
    ):
        add("filter", "KUBE-IPVS-FILTER", f"-m set --match-set {s(base).name} {match} -j RETURN")
    add(
        "filter",
        "KUBE-IPVS-FILTER",
        f"-m conntrack --ctstate NEW -m set --match-set {s(IPVS_IPS).name} dst -j REJECT",
    )

    add("nat", "KUBE-POSTROUTING", f"-m mark ! --mark {mark} -j RETURN")
    # Clear the mark so a packet that loops through the stack again is not
    # masqueraded twice.
    add("nat", "KUBE-POSTROUTING", f"-j MARK --xor-mark {opts.mark}")
    add(
        "nat",
        "KUBE-POSTROUTING",
        '-m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    )
    add("nat", "KUBE-MARK-MASQ", f"-j MARK --or-mark {opts.mark}")

    lines: list[str] = []
    for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
        lines.append(f"*{table}")
        lines.extend(f":{c} - [0:0]" for c in chains)
        for c in chains:
            lines.extend(f"-A {c} {r}" for r in rules.get((table, c), []))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


_PROTO_FLAG = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def vs_lines(ds: DesiredService) -> list[str]:
    """ipvsadm -Sn style lines for one virtual server and its real servers."""
    vs = ds.vs
    target = f"{_PROTO_FLAG[vs.protocol]} {addr_port(vs.address, vs.port)}"
    head = f"-A {target} -s {vs.scheduler}"
    if vs.flags & FLAG_SCHED_PORT:
        head += " -b flag-2"
    if vs.persistent:
        head += f" -p {vs.timeout}"
    out = [head]
    out.extend(f"-a {target} -r {r} -m -w {r.weight}" for r in ds.reals)
    return out


def render_text(state: DesiredState) -> str:
    """Everything, readable and deterministic: IPVS, addresses, ipsets, iptables."""
    out = ["# IPVS virtual servers (ipvsadm -Sn); real servers in masquerade mode"]
    last_owner = None
    for ds in state.services.values():
        if ds.owner != last_owner:
            out.append(f"# {ds.owner}")
            last_owner = ds.owner
        out.append(f"#   {ds.vs}: {ds.source}, {len(ds.reals)} real server(s)")
        out.extend(vs_lines(ds))
    for note in state.notes:
        out.append(f"# note: {note}")
    out.append("")
    out.append(f"# addresses on {DUMMY_LINK}")
    for a in sorted(state.bind_addresses, key=_ip_key):
        out.append(f"{a}/{32 if ip_family(a) == 4 else 128}")
    out.append("")
    out.append("# ipsets (ipset restore)")
    for st in state.ipsets:
        out.append(st.create_line())
        out.extend(f"add {st.name} {e}" for e in st.entries)
    for fam in state.families:
        out.append("")
        tool = "iptables" if fam == 4 else "ip6tables"
        out.append(f"# {tool}-restore --noflush (IPv{fam})")
        out.append(state.iptables[fam].rstrip("\n"))
        out.append(f"# IPv{fam} jumps from built-in chains (when missing: -I in that restore)")
        out.extend(f"*{j.table} -I {j.source} {j.spec}" for j in state.jumps)
    return "\n".join(out) + "\n"


def render(plan: NodePlan, opts: IPVSOptions | None = None) -> str:
    return render_text(render_state(plan, opts))
