"""Small value types and text helpers shared by the iptables renderer and applier."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.backends.iptables import chains as c

FILTER = "filter"
NAT = "nat"
MANGLE = "mangle"

# (table, chain): one of the shared chains several services add rules to.
Ref = tuple[str, str]

# The shared chains, in the order kube-proxy declares them. A service's
# lines in these chains are its "dispatch" lines: the only part of the
# rules that a partial sync edits with -I/-D instead of rewriting.
# Our fixed chains, per table (the renderer declares them, cleanup removes them; the kubelet's
# KUBE-FIREWALL is shared and left alone, as kube-proxy does).
FIXED_CHAINS: dict[str, tuple[str, ...]] = {
    FILTER: (
        c.KUBE_SERVICES,
        c.KUBE_EXTERNAL_SERVICES,
        c.KUBE_FORWARD,
        c.KUBE_NODEPORTS,
        c.KUBE_PROXY_FIREWALL,
        c.KUBE_PROXY_CANARY,
    ),
    NAT: (
        c.KUBE_SERVICES,
        c.KUBE_NODEPORTS,
        c.KUBE_POSTROUTING,
        c.KUBE_MARK_MASQ,
        c.KUBE_PROXY_CANARY,
    ),
    MANGLE: (c.KUBE_PROXY_CANARY,),
}

FILTER_DISPATCH: tuple[Ref, ...] = (
    (FILTER, c.KUBE_SERVICES),
    (FILTER, c.KUBE_EXTERNAL_SERVICES),
    (FILTER, c.KUBE_NODEPORTS),
    (FILTER, c.KUBE_PROXY_FIREWALL),
)
NAT_DISPATCH: tuple[Ref, ...] = ((NAT, c.KUBE_SERVICES), (NAT, c.KUBE_NODEPORTS))
DISPATCH_REFS: tuple[Ref, ...] = FILTER_DISPATCH + NAT_DISPATCH

# Service key: ServicePortName fields (namespace, name, port, protocol);
# sorts the way the plan does and survives a JSON round trip.
ServiceKey = tuple[str, str, str, str]


def comment(text: str) -> str:
    """``-m comment --comment X``, quoted as iptables-save prints it."""
    return f'-m comment --comment "{text}"' if " " in text else f"-m comment --comment {text}"


def chain_line(chain: str) -> str:
    """Declares (or, under --noflush, flushes) a chain."""
    return f":{chain} - [0:0]"


@dataclass(frozen=True)
class ServiceRules:
    """Everything one service port programs in one IP family.

    ``chains``/``rules`` are the nat chains it owns and the ``-A`` lines
    filling them. ``dispatch`` holds its lines in the shared chains as
    (chain ref, rule spec without ``-A CHAIN``), in the order they are
    written; within one shared chain, services appear in key order.
    """

    key: ServiceKey
    chains: tuple[str, ...]
    rules: tuple[str, ...]
    dispatch: tuple[tuple[Ref, str], ...]
    endpoint_chains: int

    def dispatch_in(self, ref: Ref) -> tuple[str, ...]:
        return tuple(spec for r, spec in self.dispatch if r == ref)

    def dispatch_lines(self, table: str) -> list[str]:
        return [f"-A {chain} {spec}" for (t, chain), spec in self.dispatch if t == table]

    def to_json(self) -> dict[str, object]:
        return {
            "key": list(self.key),
            "chains": list(self.chains),
            "rules": list(self.rules),
            "dispatch": [[t, ch, spec] for (t, ch), spec in self.dispatch],
            "endpoint_chains": self.endpoint_chains,
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> ServiceRules:
        key = tuple(str(x) for x in raw["key"])  # type: ignore[attr-defined]
        if len(key) != 4:
            raise ValueError(f"bad service key {key!r}")
        return cls(
            key=(key[0], key[1], key[2], key[3]),
            chains=tuple(str(x) for x in raw["chains"]),  # type: ignore[attr-defined]
            rules=tuple(str(x) for x in raw["rules"]),  # type: ignore[attr-defined]
            dispatch=tuple(
                ((str(t), str(ch)), str(spec))
                for t, ch, spec in raw["dispatch"]  # type: ignore[attr-defined]
            ),
            endpoint_chains=int(raw["endpoint_chains"]),  # type: ignore[call-overload]
        )


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that leads into one of ours (iptablesJumpChains)."""

    table: str
    source: str
    target: str
    comment: str = ""
    extra: str = ""

    @property
    def spec(self) -> str:
        parts = [self.extra] if self.extra else []
        if self.comment:
            parts.append(comment(self.comment))
        parts.append(f"-j {self.target}")
        return " ".join(parts)

    def found_in(self, save_lines: Iterable[str]) -> str | None:
        """The iptables-save line that is this jump, if present.

        A rule in the source chain jumping to the target that carries our
        comment counts, whatever the order iptables-save prints its matches
        in. The comment is required (as ``iptables -C`` would): the other
        proxy mode's leftover jump between the same two chains (IPVS and
        iptables mode both jump INPUT -> KUBE-PROXY-FIREWALL, with other
        comments and matches) is not this one and must not hide it.
        """
        head, tail = f"-A {self.source} ", f"-j {self.target}"
        for line in save_lines:
            # The comment text, quoted or not (savers differ on quoting).
            if line.startswith(head) and line.rstrip().endswith(tail) and self.comment in line:
                return line.rstrip()
        return None


_NEW = "-m conntrack --ctstate NEW"
_PORTALS = "kubernetes service portals"
_EXTERNAL = "kubernetes externally-visible service portals"
_LB_FW = "kubernetes load balancer firewall"

# iptablesJumpChains in proxier.go, in the same order; each is inserted at
# the top of its built-in chain (EnsureRule(Prepend) upstream).
JUMPS: tuple[Jump, ...] = (
    Jump(FILTER, "INPUT", c.KUBE_EXTERNAL_SERVICES, _EXTERNAL, _NEW),
    Jump(FILTER, "FORWARD", c.KUBE_EXTERNAL_SERVICES, _EXTERNAL, _NEW),
    Jump(FILTER, "INPUT", c.KUBE_NODEPORTS, "kubernetes health check service ports"),
    Jump(FILTER, "FORWARD", c.KUBE_SERVICES, _PORTALS, _NEW),
    Jump(FILTER, "OUTPUT", c.KUBE_SERVICES, _PORTALS, _NEW),
    Jump(FILTER, "FORWARD", c.KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump(FILTER, "INPUT", c.KUBE_PROXY_FIREWALL, _LB_FW, _NEW),
    Jump(FILTER, "OUTPUT", c.KUBE_PROXY_FIREWALL, _LB_FW, _NEW),
    Jump(FILTER, "FORWARD", c.KUBE_PROXY_FIREWALL, _LB_FW, _NEW),
    Jump(NAT, "OUTPUT", c.KUBE_SERVICES, _PORTALS),
    Jump(NAT, "PREROUTING", c.KUBE_SERVICES, _PORTALS),
    Jump(NAT, "POSTROUTING", c.KUBE_POSTROUTING, "kubernetes postrouting rules"),
)
# iptablesKubeletJumpChains: kubelet's chain, ensured but never removed.
KUBELET_JUMPS: tuple[Jump, ...] = (
    Jump(FILTER, "INPUT", c.KUBELET_FIREWALL),
    Jump(FILTER, "OUTPUT", c.KUBELET_FIREWALL),
)
