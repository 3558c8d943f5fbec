"""NodePlan -> iptables-restore text, per IP family. Pure: no I/O, deterministic.

The layout is kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go,
syncProxyRules): same chains, same hashes, same rule shapes and comments, so
that what people know about kube-proxy's rules holds for ours. Differences:
services are written in sorted order (upstream iterates a map), and each
service's output is a separate :class:`ServiceRules` value so that the
applier can send only what changed.

The renderer never decides which endpoints to use: it writes
``decision.cluster`` / ``decision.local`` / ``decision.all_reachable`` and
``decision.has_any_endpoints`` as the plan says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.backends.iptables import chains as c
from agent.backends.iptables.options import LARGE_CLUSTER_ENDPOINTS, RenderOptions
from agent.backends.iptables.rules import (
    FILTER,
    FIXED_CHAINS,
    JUMPS,
    KUBELET_JUMPS,
    NAT,
    Jump,
    Ref,
    ServiceKey,
    ServiceRules,
    chain_line,
    comment,
)
from agent.model import Endpoint
from agent.plan import NodePlan, PlanKey, ServicePortPlan

FAMILIES = (4, 6)
_NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


def service_key(entry: ServicePortPlan) -> ServiceKey:
    n = entry.name
    return (n.namespace, n.name, n.port, n.protocol)


def probability(n: int) -> str:
    """computeProbability upstream: 1/n with 10 decimals."""
    return f"{1.0 / n:0.10f}"


def large_cluster_mode(entries: Iterable[ServicePortPlan]) -> bool:
    """kube-proxy drops SVC/SEP comments above 1000 endpoint chains per family.

    Upstream counts every endpoint of every service; the plan holds the
    endpoints this node can reach, i.e. exactly the SEP chains written.
    """
    return sum(len(e.decision.all_reachable) for e in entries) > LARGE_CLUSTER_ENDPOINTS


# --------------------------------------------------------------------------- one service


def render_service(entry: ServicePortPlan, options: RenderOptions, large: bool) -> ServiceRules:
    """The chains, rules and dispatch lines of one service port in one family.

    Follows the per-service-port body of syncProxyRules step by step.
    """
    svc, family, decision = entry.service, entry.family, entry.decision
    name = str(svc.name)
    proto = svc.protocol.lower()
    match = f"-m {proto} -p {proto}"
    cluster_ip = svc.cluster_ip(family)
    external_ips = svc.external_ips_of(family)
    lb_ips = svc.load_balancer_ips_of(family)
    source_ranges = svc.source_ranges_of(family)
    cluster_cidr = options.cluster_cidr(family)

    svc_chain = c.svc_chain(name, proto)
    svl_chain = c.svl_chain(name, proto)
    ext_chain = c.ext_chain(name, proto)
    fw_chain = c.fw_chain(name, proto)

    cluster_eps = decision.cluster or ()
    local_eps = decision.local or ()
    has_endpoints = decision.has_any_endpoints

    # Internal (ClusterIP) traffic goes to the cluster- or local-policy chain.
    internal_chain, has_internal = svc_chain, has_endpoints
    if svc.internal_policy_local:
        internal_chain, has_internal = svl_chain, has_endpoints and bool(local_eps)
    # External (NodePort / external IP / LB IP) traffic enters KUBE-EXT, which
    # ends in the external policy chain.
    external_policy_local = svc.external_traffic_policy == "Local"
    external_chain, has_external = svc_chain, has_endpoints
    if external_policy_local:
        external_chain, has_external = svl_chain, has_endpoints and bool(local_eps)
    externally_accessible = bool(svc.node_port or external_ips or lb_ips)
    # Based on has_endpoints, not has_external: the short-circuit rules for
    # traffic from this node and its pods are needed even with no local
    # endpoint (proxier.go: usesExternalTrafficChain).
    uses_ext = has_endpoints and externally_accessible
    uses_fw = has_endpoints and bool(lb_ips) and bool(source_ranges)
    lb_chain = fw_chain if uses_fw else ext_chain

    internal_target = external_target = ""
    internal_comment = external_comment = ""
    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f"{name} has no endpoints"
    else:
        if not has_internal:
            internal_target, internal_comment = "DROP", f"{name} has no local endpoints"
        if not has_external:
            external_target, external_comment = "DROP", f"{name} has no local endpoints"

    dispatch: list[tuple[Ref, str]] = []

    def nat(chain: str, spec: str) -> None:
        dispatch.append(((NAT, chain), spec))

    def filt(chain: str, spec: str) -> None:
        dispatch.append(((FILTER, chain), spec))

    port = svc.port
    # Capture the cluster IP.
    if cluster_ip is not None:
        dst = f"-d {cluster_ip} --dport {port}"
        if has_internal:
            nat(
                c.KUBE_SERVICES,
                f"{comment(name + ' cluster IP')} {match} {dst} -j {internal_chain}",
            )
        else:
            filt(
                c.KUBE_SERVICES,
                f"{comment(internal_comment)} {match} {dst} -j {internal_target}",
            )
    # Capture external IPs.
    for ip in external_ips:
        dst = f"-d {ip} --dport {port}"
        if has_endpoints:
            nat(c.KUBE_SERVICES, f"{comment(name + ' external IP')} {match} {dst} -j {ext_chain}")
        if not has_external:
            filt(
                c.KUBE_EXTERNAL_SERVICES,
                f"{comment(external_comment)} {match} {dst} -j {external_target}",
            )
    # Capture load-balancer ingress IPs.
    for ip in lb_ips:
        dst = f"-d {ip} --dport {port}"
        if has_endpoints:
            nat(
                c.KUBE_SERVICES,
                f"{comment(name + ' loadbalancer IP')} {match} {dst} -j {lb_chain}",
            )
        if uses_fw:
            # Whatever KUBE-FW did not DNAT reaches filter and is dropped here.
            filt(
                c.KUBE_PROXY_FIREWALL,
                f"{comment(f'{name} traffic not accepted by {fw_chain}')} {match} {dst} -j DROP",
            )
    if not has_external:
        for ip in lb_ips:
            filt(
                c.KUBE_EXTERNAL_SERVICES,
                f"{comment(external_comment)} {match} -d {ip} --dport {port} -j {external_target}",
            )
    # Capture the NodePort. NodePorts ignore loadBalancerSourceRanges, as upstream.
    if svc.node_port:
        if has_endpoints:
            nat(
                c.KUBE_NODEPORTS,
                f"{comment(name)} {match} --dport {svc.node_port} -j {ext_chain}",
            )
        if not has_external:
            filt(
                c.KUBE_EXTERNAL_SERVICES,
                f"{comment(external_comment)} -m addrtype --dst-type LOCAL {match} "
                f"--dport {svc.node_port} -j {external_target}",
            )
    # The health check NodePort is accepted whether or not there are local endpoints.
    if svc.health_check_node_port:
        filt(
            c.KUBE_NODEPORTS,
            f"{comment(name + ' health check node port')} -m tcp -p tcp "
            f"--dport {svc.health_check_node_port} -j ACCEPT",
        )

    owned: list[str] = []
    rules: list[str] = []

    def declare(chain: str) -> None:
        if chain not in owned:
            owned.append(chain)

    # Masquerade off-cluster traffic to the cluster IP: a static route to the
    # service range through any node works, and the reply must come back
    # through this node.
    if has_internal and cluster_ip is not None:
        declare(internal_chain)
        head = (
            f"-A {internal_chain} {comment(name + ' cluster IP')} {match} "
            f"-d {cluster_ip} --dport {port}"
        )
        if options.masquerade_all:
            rules.append(f"{head} -j {c.KUBE_MARK_MASQ}")
        elif cluster_cidr:
            rules.append(f"{head} ! -s {cluster_cidr} -j {c.KUBE_MARK_MASQ}")

    if uses_ext:
        declare(ext_chain)
        if not external_policy_local:
            # Cluster policy may cross nodes: masquerade so replies come back here.
            rules.append(
                f"-A {ext_chain} "
                f"{comment(f'masquerade traffic for {name} external destinations')} "
                f"-j {c.KUBE_MARK_MASQ}"
            )
        else:
            if cluster_cidr:
                # Pod -> external IP of a Local service behaves as if it went out
                # to the load balancer and came back: any endpoint, no policy.
                rules.append(
                    f"-A {ext_chain} "
                    f"{comment(f'pod traffic for {name} external destinations')} "
                    f"-s {cluster_cidr} -j {svc_chain}"
                )
                declare(svc_chain)
            # The node itself: its source would be the (local) external IP,
            # so masquerade, and use any endpoint.
            rules.append(
                f"-A {ext_chain} "
                f"{comment(f'masquerade LOCAL traffic for {name} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {c.KUBE_MARK_MASQ}"
            )
            rules.append(
                f"-A {ext_chain} "
                f"{comment(f'route LOCAL traffic for {name} external destinations')} "
                f"-m addrtype --src-type LOCAL -j {svc_chain}"
            )
            declare(svc_chain)
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_chain}")
            declare(external_chain)

    if uses_fw:
        declare(fw_chain)
        fw_head = f"-A {fw_chain} {comment(name + ' loadbalancer IP')}"
        allow_from_node = False
        node_ips = options.node_ips_of(family)
        for cidr in source_ranges:
            rules.append(f"{fw_head} -s {cidr} -j {ext_chain}")
            allow_from_node = allow_from_node or any(_in_cidr(ip, cidr) for ip in node_ips)
        if allow_from_node:
            # A VIP routed locally loops back with the VIP as source.
            for ip in lb_ips:
                rules.append(f"{fw_head} -s {ip} -j {ext_chain}")
        rules.append(
            f"-A {fw_chain} "
            f"{comment(f'other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL')}"
        )

    if cluster_eps:
        declare(svc_chain)
        rules.extend(_balance(svc_chain, name, proto, cluster_eps, svc.affinity_timeout, large))
    local_referenced = svc.internal_policy_local or (external_policy_local and uses_ext)
    if local_eps and local_referenced:
        declare(svl_chain)
        rules.extend(_balance(svl_chain, name, proto, local_eps, svc.affinity_timeout, large))

    for ep in decision.all_reachable:
        sep = c.sep_chain(name, proto, ep.key)
        declare(sep)
        head = f"-A {sep}" + ("" if large else f" {comment(name)}")
        # Hairpin: an endpoint reaching itself through the service must be
        # masqueraded or its reply would bypass the DNAT.
        rules.append(f"{head} -s {ep.ip} -j {c.KUBE_MARK_MASQ}")
        recent = f" -m recent --name {sep} --set" if svc.affinity_timeout is not None else ""
        rules.append(f"{head}{recent} {match} -j DNAT --to-destination {ep.key}")

    return ServiceRules(
        key=service_key(entry),
        chains=tuple(owned),
        rules=tuple(rules),
        dispatch=tuple(dispatch),
        endpoint_chains=len(decision.all_reachable),
    )


def _balance(
    chain: str,
    name: str,
    proto: str,
    endpoints: Sequence[Endpoint],
    affinity: int | None,
    large: bool,
) -> list[str]:
    """writeServiceToEndpointRules: affinity checks, then random balancing."""
    out: list[str] = []
    seps = [(ep, c.sep_chain(name, proto, ep.key)) for ep in endpoints]

    def head(ep: Endpoint) -> str:
        return f"-A {chain}" + ("" if large else f" {comment(f'{name} -> {ep.key}')}")

    if affinity is not None:
        for ep, sep in seps:
            out.append(
                f"{head(ep)} -m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}"
            )
    n = len(seps)
    for i, (ep, sep) in enumerate(seps):
        # Rule i of n matches with probability 1/(n-i): uniform overall; the
        # last one is unconditional.
        stat = (
            f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        )
        out.append(f"{head(ep)}{stat} -j {sep}")
    return out


def _in_cidr(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


# --------------------------------------------------------------------------- fixed part


@dataclass(frozen=True)
class FixedRules:
    """The part of a family's rules that does not depend on any service."""

    filter_chains: tuple[str, ...]
    filter_rules: tuple[str, ...]  # before the services' filter lines
    filter_tail: tuple[str, ...]  # after them (KUBE-FORWARD)
    nat_chains: tuple[str, ...]
    nat_rules: tuple[str, ...]
    nat_tail: tuple[str, ...]  # the KUBE-NODEPORTS jump, last in KUBE-SERVICES
    jumps: tuple[Jump, ...]


def fixed_rules(family: int, options: RenderOptions) -> FixedRules:
    mark = options.mark
    filter_chains = list(FIXED_CHAINS[FILTER])
    filter_rules: list[str] = []
    jumps = list(JUMPS)
    if family == 4 and options.localhost_nodeports:
        # route_localnet (needed for 127.0.0.1 NodePorts) opens a hole that
        # kubelet's identical rule closes (https://issue.k8s.io/90259).
        filter_chains.append(c.KUBELET_FIREWALL)
        filter_rules.append(
            f"-A {c.KUBELET_FIREWALL} {comment('block incoming localnet connections')} "
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP"
        )
        jumps.extend(KUBELET_JUMPS)

    forward: list[str] = []
    if options.drop_invalid:
        # INVALID packets would otherwise reach the pod un-NATed and cause
        # resets (kubernetes#74839, #117924).
        forward.append(f"-A {c.KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
    forward.append(
        f"-A {c.KUBE_FORWARD} {comment('kubernetes forwarding rules')} "
        f"-m mark --mark {mark}/{mark} -j ACCEPT"
    )
    forward.append(
        f"-A {c.KUBE_FORWARD} {comment('kubernetes forwarding conntrack rule')} "
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )

    masquerade = (
        f"-A {c.KUBE_POSTROUTING} {comment('kubernetes service traffic requiring SNAT')} "
        "-j MASQUERADE" + (" --random-fully" if options.random_fully else "")
    )
    nat_rules = (
        f"-A {c.KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        # Clear the mark so a packet going through the stack again is not
        # masqueraded twice.
        f"-A {c.KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
        masquerade,
        f"-A {c.KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
    )

    nodeport_ips = options.nodeport_ips(family)
    if nodeport_ips is None:
        dest = "-m addrtype --dst-type LOCAL"
        # Loopback NodePorts never work on IPv6 and need route_localnet on IPv4.
        if family == 6:
            dest += " ! -d ::1/128"
        elif not options.localhost_nodeports:
            dest += " ! -d 127.0.0.0/8"
        tails = [f"-A {c.KUBE_SERVICES} {comment(_NODEPORTS_COMMENT)} {dest} -j {c.KUBE_NODEPORTS}"]
    else:
        tails = [
            f"-A {c.KUBE_SERVICES} {comment(_NODEPORTS_COMMENT)} -d {ip} -j {c.KUBE_NODEPORTS}"
            for ip in nodeport_ips
        ]
    return FixedRules(
        filter_chains=tuple(filter_chains),
        filter_rules=tuple(filter_rules),
        filter_tail=tuple(forward),
        nat_chains=FIXED_CHAINS[NAT],
        nat_rules=nat_rules,
        nat_tail=tuple(tails),
        jumps=tuple(jumps),
    )


# --------------------------------------------------------------------------- whole family


@dataclass(frozen=True)
class FamilyRules:
    """A family's complete rule set, split into its fixed and per-service parts."""

    family: int
    fixed: FixedRules
    services: tuple[ServiceRules, ...]  # sorted by key
    large: bool

    def restore_text(
        self,
        *,
        missing_jumps: Sequence[Jump] | None = None,
        stale_chains: Sequence[str] = (),
    ) -> str:
        """The iptables-restore --noflush input of a full sync.

        ``missing_jumps``: the jump rules to add (None: all of them, as on a
        fresh node). ``stale_chains``: nat chains of ours to delete.
        """
        jumps = self.fixed.jumps if missing_jumps is None else tuple(missing_jumps)
        out = ["*filter"]
        out += [chain_line(ch) for ch in self.fixed.filter_chains]
        out += [f"-I {j.source} 1 {j.spec}" for j in jumps if j.table == FILTER]
        out += self.fixed.filter_rules
        for svc in self.services:
            out += svc.dispatch_lines(FILTER)
        out += self.fixed.filter_tail
        out.append("COMMIT")
        out.append("*nat")
        out += [chain_line(ch) for ch in self.fixed.nat_chains]
        for svc in self.services:
            out += [chain_line(ch) for ch in svc.chains]
        out += [chain_line(ch) for ch in stale_chains]
        out += [f"-I {j.source} 1 {j.spec}" for j in jumps if j.table == NAT]
        out += self.fixed.nat_rules
        for svc in self.services:
            out += svc.dispatch_lines(NAT)
            out += svc.rules
        # Delete after every reference to them is gone (their declaration
        # above flushed them).
        out += [f"-X {ch}" for ch in stale_chains]
        out += self.fixed.nat_tail
        out.append("COMMIT")
        # The canary lives in mangle too, the table nobody else flushes with
        # ours: losing it means the tables were reset (utiliptables Monitor).
        out += ["*mangle", chain_line(c.KUBE_PROXY_CANARY), "COMMIT"]
        return "\n".join(out) + "\n"

    def owned_chains(self) -> set[str]:
        return {ch for svc in self.services for ch in svc.chains}

    def rule_counts(self) -> dict[str, int]:
        """Rules of each table once this is applied (jump rules excluded)."""
        filt = len(self.fixed.filter_rules) + len(self.fixed.filter_tail)
        nat = len(self.fixed.nat_rules) + len(self.fixed.nat_tail)
        for svc in self.services:
            for (table, _), _spec in svc.dispatch:
                if table == FILTER:
                    filt += 1
                else:
                    nat += 1
            nat += len(svc.rules)
        return {FILTER: filt, NAT: nat}


class IptablesRenderer:
    """Renders plans, caching each service port's output by its plan entry.

    An entry that compares equal to the one rendered last time (same
    service, family, decision) is not rendered again.
    """

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self._cache: dict[PlanKey, tuple[ServicePortPlan, bool, ServiceRules]] = {}
        self.renders = 0  # cache misses, for tests and metrics

    def service(self, entry: ServicePortPlan, large: bool) -> ServiceRules:
        hit = self._cache.get(entry.key)
        if hit is not None and hit[1] == large and (hit[0] is entry or hit[0] == entry):
            return hit[2]
        rules = render_service(entry, self.options, large)
        self._cache[entry.key] = (entry, large, rules)
        self.renders += 1
        return rules

    def forget(self, keys: Iterable[PlanKey]) -> None:
        for key in keys:
            self._cache.pop(key, None)

    def family(self, plan: NodePlan, family: int) -> FamilyRules:
        entries = plan.for_family(family)
        large = large_cluster_mode(entries)
        live = {e.key for e in entries}
        self.forget([k for k in self._cache if k[1] == family and k not in live])
        return FamilyRules(
            family=family,
            fixed=fixed_rules(family, self.options),
            services=tuple(self.service(e, large) for e in entries),
            large=large,
        )

    def render(self, plan: NodePlan, families: Sequence[int] = FAMILIES) -> str:
        """Every family's full-sync restore input, as on a fresh node.

        Each family's text is preceded by a comment naming the binary it is
        for (iptables-restore ignores comment lines).
        """
        parts = []
        for family in families:
            binary = "iptables-restore" if family == 4 else "ip6tables-restore"
            parts.append(f"# IPv{family}: {binary} --noflush\n")
            parts.append(self.family(plan, family).restore_text())
        return "".join(parts)


def render(plan: NodePlan, options: RenderOptions, families: Sequence[int] = FAMILIES) -> str:
    """Convenience: a one-off render without keeping a cache."""
    return IptablesRenderer(options).render(plan, families)
