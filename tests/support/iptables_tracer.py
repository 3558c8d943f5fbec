"""A packet tracer over ``iptables-restore`` text, for tests that have no root.

Tests hand it the rule text a renderer produced (or an ``iptables-save`` dump) and
ask where a *new* connection can go: which endpoints it is DNATed to, with what
probability, whether it is masqueraded on the way out, and whether a filter chain
rejects or drops it.  It models only what kube-proxy's layouts use (the ``filter``
and ``nat`` tables and a fixed set of matches and targets); anything else raises
:class:`TraceError` naming the offending line, because a tracer that silently skips
a rule would let a wrong rule pass a test.

Branching matches are explored instead of sampled: ``-m statistic`` forks the
packet into "taken" and "not taken" copies that carry their probability, and
``-m recent --rcheck/--update`` forks into "client already has affinity" and
"fresh client".  Every path that reaches a verdict becomes one :class:`Outcome`.

Packet walk (the kernel's hook order for the first packet of a connection):

* arriving from outside: nat PREROUTING, then filter INPUT when the (possibly
  DNATed) destination is a local address, else filter FORWARD followed by nat
  POSTROUTING;
* generated on the node: nat OUTPUT, filter OUTPUT, nat POSTROUTING, and filter
  INPUT as well when the destination is local (the packet loops back through lo).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, TypeAlias

__all__ = [
    "Outcome",
    "Rule",
    "Ruleset",
    "TraceError",
    "TraceResult",
    "parse_rules",
    "trace",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Verdict: TypeAlias = Literal["ACCEPT", "DROP", "REJECT"]
# Where a walk can end: the packet as it left, and its verdict.
_Paths: TypeAlias = list[tuple["_Packet", str]]


class TraceError(Exception):
    """The rules cannot be applied or traced; the message names the line."""


# Loop guards.  The kernel refuses jump loops when the rules are loaded; we detect
# them at COMMIT too, so these only bound pathological but loop-free inputs.
MAX_CHAIN_ENTRIES_PER_PATH = 1000
MAX_PATHS = 100_000
_MARK_BITS = 0xFFFFFFFF

_BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
# Only these tables are walked; rules in any other table would be ignored, so
# loading one is an error rather than a silent gap in the trace.
_TRACED_TABLES = frozenset({"filter", "nat"})

# Builds the error for the line being applied, from a message.
_Fail: TypeAlias = Callable[[str], "TraceError"]

_PROTOCOL_NUMBERS: Mapping[str, str] = {"6": "tcp", "17": "udp", "132": "sctp", "0": "all"}
_KNOWN_PROTOCOLS = frozenset(
    {"tcp", "udp", "sctp", "udplite", "icmp", "icmpv6", "ipv6-icmp", "esp", "ah", "gre", "all"}
)
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
_ADDRTYPES = frozenset({"LOCAL", "UNICAST", "MULTICAST", "BROADCAST"})
_CTSTATES = frozenset({"INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT"})


# --------------------------------------------------------------------------- packet


@dataclass(frozen=True)
class _Packet:
    """One path's view of the connection; forks copy it with ``replace``."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    mark: int
    orig_dst: IPAddress
    orig_dport: int
    dnat: bool = False
    masquerade: bool = False
    probability: float = 1.0
    # recent lists whose membership this path has decided (name -> listed?), so a
    # second check of the same list on the same path stays consistent.
    recent: tuple[tuple[str, bool], ...] = ()
    affinity: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()
    chains: tuple[str, ...] = ()

    def recent_state(self, key: str) -> bool | None:
        for name, listed in self.recent:
            if name == key:
                return listed
        return None

    def with_recent(self, key: str, listed: bool) -> _Packet:
        kept = tuple(item for item in self.recent if item[0] != key)
        return replace(self, recent=(*kept, (key, listed)))


@dataclass(frozen=True)
class _Context:
    """What the packet's hook knows besides the packet itself."""

    hook: str
    protocol: str
    in_iface: str | None
    out_iface: str | None
    local: frozenset[IPAddress]
    ipsets: Mapping[str, tuple[tuple[_SetPart, ...], ...]]

    def is_local(self, addr: IPAddress) -> bool:
        # Loopback is always local, whatever node addresses the test passed.
        return addr.is_loopback or addr in self.local

    def addrtype(self, addr: IPAddress) -> str:
        if self.is_local(addr):
            return "LOCAL"
        if addr.is_multicast:
            return "MULTICAST"
        if isinstance(addr, ipaddress.IPv4Address) and int(addr) == 0xFFFFFFFF:
            return "BROADCAST"
        return "UNICAST"


# --------------------------------------------------------------------------- matches


def _iface_matches(pattern: str, iface: str | None) -> bool:
    if iface is None:
        # An interface the test did not name never equals a named one.
        return False
    if pattern.endswith("+"):
        return iface.startswith(pattern[:-1])
    return iface == pattern


@dataclass(frozen=True)
class AddrMatch:
    field: Literal["src", "dst"]
    net: IPNetwork
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        addr = pkt.src if self.field == "src" else pkt.dst
        return (addr in self.net) != self.negate


@dataclass(frozen=True)
class ProtoMatch:
    protocol: str
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        hit = self.protocol == "all" or self.protocol == ctx.protocol
        return hit != self.negate


@dataclass(frozen=True)
class IfaceMatch:
    direction: Literal["in", "out"]
    name: str
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        iface = ctx.in_iface if self.direction == "in" else ctx.out_iface
        return _iface_matches(self.name, iface) != self.negate


@dataclass(frozen=True)
class PortMatch:
    """``--dport``/``--sport`` (one range) and multiport lists (several ranges)."""

    field: Literal["src", "dst", "any"]
    ranges: tuple[tuple[int, int], ...]
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        ports = {"src": (pkt.sport,), "dst": (pkt.dport,), "any": (pkt.sport, pkt.dport)}
        hit = any(lo <= p <= hi for p in ports[self.field] for lo, hi in self.ranges)
        return hit != self.negate


@dataclass(frozen=True)
class AddrTypeMatch:
    field: Literal["src", "dst"]
    types: frozenset[str]
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        addr = pkt.src if self.field == "src" else pkt.dst
        return (ctx.addrtype(addr) in self.types) != self.negate


@dataclass(frozen=True)
class MarkMatch:
    value: int
    mask: int
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        return ((pkt.mark & self.mask) == self.value) != self.negate


@dataclass(frozen=True)
class CtStateMatch:
    states: frozenset[str]
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        # A traced connection is always NEW; DNAT/SNAT are conntrack's virtual
        # states, true once this path has rewritten the address.
        current = {"NEW"}
        if pkt.dnat:
            current.add("DNAT")
        if pkt.masquerade:
            current.add("SNAT")
        return bool(self.states & current) != self.negate


@dataclass(frozen=True)
class CtOrigMatch:
    """``--ctorigsrc``/``--ctorigdst``/``--ctorigdstport``: the pre-NAT tuple."""

    field: Literal["src", "dst", "dport"]
    net: IPNetwork | None = None
    ports: tuple[int, int] | None = None
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        if self.field == "dport":
            assert self.ports is not None
            hit = self.ports[0] <= pkt.orig_dport <= self.ports[1]
        else:
            assert self.net is not None
            # Source NAT happens only in POSTROUTING, after every filter hook, so
            # the original source is the current one.
            hit = (pkt.src if self.field == "src" else pkt.orig_dst) in self.net
        return hit != self.negate


@dataclass(frozen=True)
class CommentMatch:
    text: str

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        return True


@dataclass(frozen=True)
class PhysdevMatch:
    """Traced packets never cross a bridge, so every physdev test is false."""

    options: tuple[tuple[str, bool], ...]

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        return all(negate for _, negate in self.options)


@dataclass(frozen=True)
class _SetPart:
    """One dimension of an ipset entry: an address/net, or a port range."""

    net: IPNetwork | None = None
    protocol: str | None = None  # None: any protocol (bitmap:port)
    ports: tuple[int, int] | None = None


@dataclass(frozen=True)
class SetMatch:
    name: str
    flags: tuple[Literal["src", "dst"], ...]
    negate: bool = False

    def test(self, pkt: _Packet, ctx: _Context) -> bool:
        entries = ctx.ipsets.get(self.name)
        if entries is None:
            raise TraceError(
                f"rule uses ipset {self.name!r} but trace() got no such set "
                f"(known: {sorted(ctx.ipsets)})"
            )
        hit = any(self._entry_matches(entry, pkt, ctx) for entry in entries)
        return hit != self.negate

    def _entry_matches(self, entry: tuple[_SetPart, ...], pkt: _Packet, ctx: _Context) -> bool:
        if len(entry) > len(self.flags):
            # The kernel refuses a set match with fewer direction flags than the
            # set has dimensions; a test feeding that has a broken fixture.
            raise TraceError(
                f"ipset {self.name!r} entry has {len(entry)} dimensions but the rule "
                f"gives only {len(self.flags)} flags"
            )
        for part, flag in zip(entry, self.flags, strict=False):
            if part.net is not None:
                addr = pkt.src if flag == "src" else pkt.dst
                if addr.version != part.net.version or addr not in part.net:
                    return False
            else:
                assert part.ports is not None
                if part.protocol is not None and part.protocol != ctx.protocol:
                    return False
                port = pkt.sport if flag == "src" else pkt.dport
                if not part.ports[0] <= port <= part.ports[1]:
                    return False
        return True


@dataclass(frozen=True)
class StatisticMatch:
    probability: float
    negate: bool = False


@dataclass(frozen=True)
class RecentMatch:
    """xt_recent, keyed by list name (and by which address it records)."""

    name: str
    mode: Literal["set", "rcheck", "update", "remove"]
    by_dest: bool = False
    negate: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}@dst" if self.by_dest else self.name


Match: TypeAlias = (
    AddrMatch
    | ProtoMatch
    | IfaceMatch
    | PortMatch
    | AddrTypeMatch
    | MarkMatch
    | CtStateMatch
    | CtOrigMatch
    | CommentMatch
    | PhysdevMatch
    | SetMatch
    | StatisticMatch
    | RecentMatch
)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class VerdictTarget:
    verdict: Literal["ACCEPT", "DROP", "REJECT", "RETURN"]


@dataclass(frozen=True)
class JumpTarget:
    chain: str
    goto: bool = False


@dataclass(frozen=True)
class DnatTarget:
    addr: IPAddress
    port: int | None


@dataclass(frozen=True)
class SnatTarget:
    """MASQUERADE or SNAT; the tracer only reports *that* the source is rewritten."""

    kind: Literal["MASQUERADE", "SNAT"]


@dataclass(frozen=True)
class MarkTarget:
    """Every MARK flavour as the kernel stores it: mark = (mark & ~mask) ^ value."""

    value: int
    mask: int


@dataclass(frozen=True)
class NoopTarget:
    """No ``-j`` at all, or LOG: the packet continues with the next rule."""

    name: str


Target: TypeAlias = VerdictTarget | JumpTarget | DnatTarget | SnatTarget | MarkTarget | NoopTarget


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    target: Target
    # Where the rule came from, for error messages and ``-D``; not part of the
    # rule's identity, exactly like the kernel compares rules by content.
    text: str = field(default="", compare=False)
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Chain:
    name: str
    builtin: bool
    policy: Verdict | None
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Ruleset:
    """Committed state of all tables after applying every text in order."""

    tables: Mapping[str, Mapping[str, Chain]]
    family: int | None  # 4 or 6 from the addresses in the rules; None if none appear

    def chain(self, table: str, name: str) -> Chain | None:
        return self.tables.get(table, {}).get(name)


# --------------------------------------------------------------------------- parsing


def _tokenize(line: str, where: str) -> list[str]:
    """Split one line the way iptables-restore does: double quotes group words."""
    if '"' not in line:
        return line.split()  # the common case, and much faster than the loop below
    tokens: list[str] = []
    buf: list[str] = []
    in_quote = escaped = have_token = False
    for ch in line:
        if in_quote:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
            else:
                buf.append(ch)
        elif ch == '"':
            in_quote = have_token = True
        elif ch in " \t":
            if have_token:
                tokens.append("".join(buf))
                buf = []
                have_token = False
        else:
            buf.append(ch)
            have_token = True
    if in_quote:
        raise TraceError(f"{where}: unterminated quote: {line!r}")
    if have_token:
        tokens.append("".join(buf))
    return tokens


@dataclass(frozen=True)
class _OptSpec:
    canonical: str
    nargs: int
    negatable: bool


def _opts(*specs: tuple[tuple[str, ...], int, bool]) -> Mapping[str, _OptSpec]:
    table: dict[str, _OptSpec] = {}
    for names, nargs, negatable in specs:
        for name in names:
            table[name] = _OptSpec(names[0], nargs, negatable)
    return table


_PORT_OPTS = _opts(
    (("--dport", "--destination-port"), 1, True),
    (("--sport", "--source-port"), 1, True),
)
_MODULE_OPTS: Mapping[str, Mapping[str, _OptSpec]] = {
    "comment": _opts((("--comment",), 1, False)),
    "tcp": _PORT_OPTS,
    "udp": _PORT_OPTS,
    "sctp": _PORT_OPTS,
    "multiport": _opts(
        (("--dports", "--destination-ports"), 1, True),
        (("--sports", "--source-ports"), 1, True),
        (("--ports",), 1, True),
    ),
    "addrtype": _opts((("--dst-type",), 1, True), (("--src-type",), 1, True)),
    "mark": _opts((("--mark",), 1, True)),
    "conntrack": _opts(
        (("--ctstate",), 1, True),
        (("--ctorigsrc",), 1, True),
        (("--ctorigdst",), 1, True),
        (("--ctorigdstport",), 1, True),
    ),
    "state": _opts((("--state",), 1, True)),
    "statistic": _opts(
        (("--mode",), 1, False),
        (("--probability",), 1, True),
        (("--every",), 1, True),
        (("--packet",), 1, False),
    ),
    "recent": _opts(
        (("--name",), 1, False),
        (("--set",), 0, True),
        (("--rcheck",), 0, True),
        (("--update",), 0, True),
        (("--remove",), 0, True),
        (("--seconds",), 1, False),
        (("--reap",), 0, False),
        (("--hitcount",), 1, False),
        (("--rttl",), 0, False),
        (("--mask",), 1, False),
        (("--rsource",), 0, False),
        (("--rdest",), 0, False),
    ),
    "set": _opts((("--match-set",), 2, True)),
    "physdev": _opts(
        (("--physdev-in",), 1, True),
        (("--physdev-out",), 1, True),
        (("--physdev-is-in",), 0, True),
        (("--physdev-is-out",), 0, True),
        (("--physdev-is-bridged",), 0, True),
    ),
}
_TARGET_OPTS: Mapping[str, Mapping[str, _OptSpec]] = {
    "ACCEPT": {},
    "DROP": {},
    "RETURN": {},
    "REJECT": _opts((("--reject-with",), 1, False)),
    "DNAT": _opts(
        (("--to-destination",), 1, False), (("--random",), 0, False), (("--persistent",), 0, False)
    ),
    "SNAT": _opts(
        (("--to-source",), 1, False),
        (("--random",), 0, False),
        (("--random-fully",), 0, False),
        (("--persistent",), 0, False),
    ),
    "MASQUERADE": _opts(
        (("--to-ports",), 1, False), (("--random",), 0, False), (("--random-fully",), 0, False)
    ),
    "MARK": _opts(
        (("--set-xmark",), 1, False),
        (("--set-mark",), 1, False),
        (("--or-mark",), 1, False),
        (("--and-mark",), 1, False),
        (("--xor-mark",), 1, False),
    ),
    "LOG": _opts(
        (("--log-prefix",), 1, False),
        (("--log-level",), 1, False),
        (("--log-tcp-sequence",), 0, False),
        (("--log-tcp-options",), 0, False),
        (("--log-ip-options",), 0, False),
        (("--log-uid",), 0, False),
    ),
}
# Which table each target is legal in (the kernel's own restriction); a renderer
# that puts REJECT in nat would fail on a real node, so it fails here too.
_TARGET_TABLES: Mapping[str, frozenset[str]] = {
    "REJECT": frozenset({"filter"}),
    "DNAT": frozenset({"nat"}),
    "SNAT": frozenset({"nat"}),
    "MASQUERADE": frozenset({"nat"}),
}


@dataclass
class _Collected:
    """Options seen for one ``-m`` module (or the ``-j`` target) on one line."""

    name: str
    options: list[tuple[str, bool, list[str]]] = field(default_factory=list)
    implicit: bool = False


class _RuleParser:
    """Turns the tokens of one rule spec into a :class:`Rule`."""

    def __init__(self, tokens: list[str], table: str, where: str, line: str) -> None:
        self.tokens = tokens
        self.table = table
        self.where = where
        self.line = line
        self.families: set[int] = set()

    def fail(self, msg: str) -> TraceError:
        return TraceError(f"{self.where}: {msg}: {self.line.strip()!r}")

    def parse(self) -> Rule:
        toks = self.tokens
        # Matches in line order; module placeholders are expanded at the end so
        # side-effecting matches (recent --set) keep their position.
        items: list[Match | _Collected] = []
        modules: list[_Collected] = []
        protocol: str | None = None
        target: _Collected | None = None
        goto = False
        negate = False
        i = 0

        def take(n: int) -> list[str]:
            nonlocal i
            if i + n >= len(toks):
                raise self.fail(f"option {toks[i]} needs {n} argument(s)")
            args = toks[i + 1 : i + 1 + n]
            i += 1 + n
            return args

        while i < len(toks):
            tok = toks[i]
            if tok == "!":
                if negate:
                    raise self.fail("double '!'")
                negate = True
                i += 1
                continue
            if tok in ("-s", "--source", "--src", "-d", "--destination", "--dst"):
                (value,) = take(1)
                fld: Literal["src", "dst"] = "src" if tok in ("-s", "--source", "--src") else "dst"
                items.append(AddrMatch(fld, self.network(value), negate))
            elif tok in ("-p", "--protocol"):
                (value,) = take(1)
                proto = _PROTOCOL_NUMBERS.get(value, value.lower())
                if proto not in _KNOWN_PROTOCOLS:
                    raise self.fail(f"unknown protocol {value!r}")
                items.append(ProtoMatch(proto, negate))
                if not negate:
                    protocol = proto
                    if proto in _PORT_PROTOCOLS:
                        # `-p tcp` loads the tcp match implicitly, so `--dport`
                        # may follow without `-m tcp`.
                        implicit = _Collected(proto, implicit=True)
                        items.append(implicit)
                        modules.append(implicit)
            elif tok in ("-i", "--in-interface", "-o", "--out-interface"):
                (value,) = take(1)
                direction: Literal["in", "out"] = "in" if tok.startswith(("-i", "--in")) else "out"
                items.append(IfaceMatch(direction, value, negate))
            elif tok in ("-m", "--match"):
                if negate:
                    raise self.fail("'!' cannot negate -m")
                (name,) = take(1)
                if name not in _MODULE_OPTS:
                    raise self.fail(f"unsupported match module {name!r}")
                mod = _Collected(name)
                items.append(mod)
                modules.append(mod)
            elif tok in ("-j", "--jump", "-g", "--goto"):
                if negate:
                    raise self.fail("'!' cannot negate a target")
                if target is not None:
                    raise self.fail("more than one target")
                (name,) = take(1)
                if name in _EXTENSION_TARGETS:
                    raise self.fail(f"unsupported target {name!r}")
                goto = tok in ("-g", "--goto")
                target = _Collected(name)
            elif tok == "-c":
                take(2)  # packet/byte counters from `iptables-save -c`
            elif tok.startswith("--"):
                owner, spec = self.find_option(tok, target, modules, protocol)
                if negate and not spec.negatable:
                    raise self.fail(f"option {tok} cannot be negated")
                args = take(spec.nargs)
                owner.options.append((spec.canonical, negate, args))
            else:
                raise self.fail(f"unexpected token {tok!r}")
            negate = False
        if negate:
            raise self.fail("trailing '!'")

        matches: list[Match] = []
        for item in items:
            if isinstance(item, _Collected):
                matches.extend(self.build_module(item, protocol))
            else:
                matches.append(item)
        return Rule(tuple(matches), self.build_target(target, goto), self.line.strip(), self.where)

    def find_option(
        self,
        opt: str,
        target: _Collected | None,
        modules: list[_Collected],
        protocol: str | None,
    ) -> tuple[_Collected, _OptSpec]:
        if target is not None:
            spec = _TARGET_OPTS.get(target.name, {}).get(opt)
            if spec is not None:
                return target, spec
        for mod in reversed(modules):
            spec = _MODULE_OPTS[mod.name].get(opt)
            if spec is not None:
                return mod, spec
        hint = "" if protocol in _PORT_PROTOCOLS else " (port options need -p tcp/udp/sctp)"
        raise self.fail(f"unknown option {opt}{hint}")

    # ---- values

    def network(self, value: str) -> IPNetwork:
        if "," in value:
            # iptables expands lists into several rules; a non-terminal target
            # would then run twice, which one rule here cannot express.
            raise self.fail(f"address lists are not supported: {value!r}")
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError as err:
            raise self.fail(f"bad address {value!r}") from err
        self.families.add(net.version)
        return net

    def address(self, value: str) -> IPAddress:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError as err:
            raise self.fail(f"bad address {value!r}") from err
        self.families.add(addr.version)
        return addr

    def port(self, value: str) -> int:
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            raise self.fail(f"bad port {value!r}")
        return int(value)

    def port_range(self, value: str) -> tuple[int, int]:
        lo, sep, hi = value.partition(":")
        first = self.port(lo) if lo else 0
        last = self.port(hi) if hi else (65535 if sep else first)
        if first > last:
            raise self.fail(f"bad port range {value!r}")
        return first, last

    def number(self, value: str) -> int:
        try:
            return int(value, 0)
        except ValueError as err:
            raise self.fail(f"bad number {value!r}") from err

    def value_mask(self, value: str) -> tuple[int, int]:
        val, sep, mask = value.partition("/")
        return self.number(val), self.number(mask) if sep else _MARK_BITS

    # ---- modules

    def build_module(self, mod: _Collected, protocol: str | None) -> list[Match]:
        name, opts = mod.name, mod.options
        if name in _PORT_PROTOCOLS:
            if not mod.implicit and protocol != name:
                raise self.fail(f"-m {name} needs -p {name}")
            return [
                PortMatch("dst" if opt == "--dport" else "src", (self.port_range(args[0]),), neg)
                for opt, neg, args in opts
            ]
        if name == "multiport":
            if protocol not in _PORT_PROTOCOLS:
                raise self.fail("multiport needs -p tcp, udp or sctp")
            where: Mapping[str, Literal["src", "dst", "any"]] = {
                "--dports": "dst",
                "--sports": "src",
                "--ports": "any",
            }
            return [
                PortMatch(where[opt], tuple(self.port_range(p) for p in args[0].split(",")), neg)
                for opt, neg, args in opts
            ]
        if name == "comment":
            return [CommentMatch(args[0]) for _, _, args in opts]
        if name == "addrtype":
            out: list[Match] = []
            for opt, neg, args in opts:
                types = frozenset(t.upper() for t in args[0].split(","))
                if not types <= _ADDRTYPES:
                    raise self.fail(f"unsupported address type {args[0]!r}")
                out.append(AddrTypeMatch("dst" if opt == "--dst-type" else "src", types, neg))
            return out
        if name == "mark":
            return [MarkMatch(*self.value_mask(args[0]), neg) for _, neg, args in opts]
        if name in ("conntrack", "state"):
            return [self.build_conntrack(opt, neg, args[0]) for opt, neg, args in opts]
        if name == "statistic":
            return [self.build_statistic(opts)]
        if name == "recent":
            return [self.build_recent(opts)]
        if name == "set":
            out = []
            for _, neg, args in opts:
                flags = args[1].split(",")
                if not all(f in ("src", "dst") for f in flags):
                    raise self.fail(f"bad ipset flags {args[1]!r}")
                out.append(SetMatch(args[0], tuple(flags), neg))  # type: ignore[arg-type]
            return out
        if name == "physdev":
            return [PhysdevMatch(tuple((opt, neg) for opt, neg, _ in opts))]
        raise self.fail(f"unsupported match module {name!r}")  # pragma: no cover

    def build_conntrack(self, opt: str, neg: bool, value: str) -> Match:
        if opt in ("--ctstate", "--state"):
            states = frozenset(s.upper() for s in value.split(","))
            if not states <= _CTSTATES:
                raise self.fail(f"unknown conntrack state in {value!r}")
            return CtStateMatch(states, neg)
        if opt == "--ctorigdstport":
            return CtOrigMatch("dport", ports=self.port_range(value), negate=neg)
        return CtOrigMatch(
            "src" if opt == "--ctorigsrc" else "dst", net=self.network(value), negate=neg
        )

    def build_statistic(self, opts: list[tuple[str, bool, list[str]]]) -> StatisticMatch:
        values = {opt: (neg, args) for opt, neg, args in opts}
        mode = values.get("--mode", (False, [""]))[1][0]
        if mode == "random" and "--probability" in values:
            neg, args = values["--probability"]
            try:
                p = float(args[0])
            except ValueError as err:
                raise self.fail(f"bad probability {args[0]!r}") from err
            if not 0.0 <= p <= 1.0:
                raise self.fail(f"probability {p} outside [0, 1]")
            return StatisticMatch(p, neg)
        if mode == "nth" and "--every" in values:
            # A counter, not a coin; over many connections it behaves like 1/n.
            neg, args = values["--every"]
            every = self.number(args[0])
            if every < 1:
                raise self.fail("--every must be >= 1")
            return StatisticMatch(1.0 / every, neg)
        raise self.fail("statistic needs --mode random --probability P or --mode nth --every N")

    def build_recent(self, opts: list[tuple[str, bool, list[str]]]) -> RecentMatch:
        name = "DEFAULT"
        by_dest = False
        modes: list[tuple[str, bool]] = []
        for opt, neg, args in opts:
            if opt == "--name":
                name = args[0]
            elif opt == "--rdest":
                by_dest = True
            elif opt in ("--set", "--rcheck", "--update", "--remove"):
                modes.append((opt[2:], neg))
        if len(modes) != 1:
            raise self.fail("recent needs exactly one of --set/--rcheck/--update/--remove")
        mode, neg = modes[0]
        return RecentMatch(name, mode, by_dest, neg)  # type: ignore[arg-type]

    # ---- targets

    def build_target(self, target: _Collected | None, goto: bool) -> Target:
        if target is None:
            return NoopTarget("")
        name, opts = target.name, target.options
        allowed = _TARGET_TABLES.get(name)
        if allowed is not None and self.table not in allowed:
            raise self.fail(f"target {name} is not valid in table {self.table}")
        if goto and name in _TARGET_OPTS:
            raise self.fail(f"-g needs a chain, not target {name}")
        values = {opt: args for opt, _, args in opts}
        if name in ("ACCEPT", "DROP", "REJECT", "RETURN"):
            return VerdictTarget(name)  # type: ignore[arg-type]
        if name == "LOG":
            return NoopTarget(name)
        if name == "MASQUERADE":
            return SnatTarget("MASQUERADE")
        if name == "SNAT":
            if "--to-source" not in values:
                raise self.fail("SNAT needs --to-source")
            return SnatTarget("SNAT")
        if name == "DNAT":
            if "--to-destination" not in values:
                raise self.fail("DNAT needs --to-destination")
            return self.build_dnat(values["--to-destination"][0])
        if name == "MARK":
            return self.build_mark(opts)
        if opts:  # pragma: no cover - find_option gives chains no options
            raise self.fail(f"jump to chain {name} takes no options")
        return JumpTarget(name, goto)

    def build_dnat(self, value: str) -> DnatTarget:
        if value.startswith("["):
            addr, _, rest = value[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
            if rest and port is None:
                raise self.fail(f"bad DNAT destination {value!r}")
        elif value.count(":") == 1:
            addr, port = value.split(":")
        else:
            addr, port = value, None
        if "-" in addr or (port is not None and "-" in port):
            raise self.fail(f"DNAT ranges are not supported: {value!r}")
        return DnatTarget(self.address(addr), None if port is None else self.port(port))

    def build_mark(self, opts: list[tuple[str, bool, list[str]]]) -> MarkTarget:
        if len(opts) != 1:
            raise self.fail("MARK needs exactly one of --set-xmark/--set-mark/--or-mark/...")
        opt, _, args = opts[0]
        value, mask = self.value_mask(args[0])
        # Translate to the kernel's (value, mask) form the same way iptables does.
        if opt == "--set-xmark":
            return MarkTarget(value, mask)
        if opt == "--set-mark":
            return MarkTarget(value, mask | value)
        if opt == "--or-mark":
            return MarkTarget(value, value)
        if opt == "--and-mark":
            return MarkTarget(0, ~value & _MARK_BITS)
        return MarkTarget(value, 0)  # --xor-mark


# Upper-case names that are iptables target extensions, not chains.  Jumping to
# one of them must not be mistaken for a jump to an (undeclared) chain, so the
# error says "unsupported target" instead of "no such chain".
_EXTENSION_TARGETS = frozenset(
    """
    AUDIT CHECKSUM CLASSIFY CLUSTERIP CONNMARK CONNSECMARK CT DSCP ECN HL HMARK
    IDLETIMER LED MIRROR NETMAP NFLOG NFQUEUE NOTRACK QUEUE RATEEST REDIRECT SAME
    SECMARK SET SYNPROXY TCPMSS TCPOPTSTRIP TEE TOS TPROXY TRACE TTL ULOG
    """.split()  # noqa: SIM905 - a word list reads better than 33 one-item lines
)


# --------------------------------------------------------------------------- restore


class _Restorer:
    """Applies iptables-restore texts in order with ``--noflush`` semantics."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Chain]] = {}
        self.families: set[int] = set()

    def fresh_table(self, table: str) -> dict[str, Chain]:
        return {name: Chain(name, True, "ACCEPT", ()) for name in _BUILTIN_CHAINS[table]}

    def apply(self, text: str, index: int) -> None:
        table: str | None = None
        work: dict[str, Chain] = {}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            where = f"rules[{index}] line {lineno}"
            line = raw.strip()
            if not line or line.startswith("#"):
                continue

            def fail(msg: str, where: str = where, raw: str = raw) -> TraceError:
                return TraceError(f"{where}: {msg}: {raw.strip()!r}")

            if line.startswith("*"):
                if table is not None:
                    raise fail(f"table {table} not committed before next table")
                table = line[1:].strip()
                if table not in _BUILTIN_CHAINS:
                    raise fail(f"unknown table {table!r}")
                # Work on a copy: nothing reaches the committed state before COMMIT.
                work = dict(self.tables.get(table) or self.fresh_table(table))
                continue
            if table is None:
                raise fail("line outside a *table section")
            if line == "COMMIT":
                self.check_loops(table, work, where)
                self.tables[table] = work
                table = None
                continue
            if line.startswith(":"):
                self.declare(work, table, line, fail)
                continue
            # `iptables-save -c` prefixes rules with [packets:bytes].
            line = re.sub(r"^\[\d+:\d+\]\s*", "", line)
            tokens = _tokenize(line, where)
            self.command(work, table, tokens, line, where, fail)
        if table is not None:
            raise TraceError(f"rules[{index}]: table {table} has no COMMIT")

    def declare(self, work: dict[str, Chain], table: str, line: str, fail: _Fail) -> None:
        parts = line[1:].split()
        if len(parts) < 2:
            raise fail("chain declaration needs a name and a policy")
        name, policy = parts[0], parts[1]
        builtin = name in _BUILTIN_CHAINS[table]
        if builtin:
            if policy not in ("ACCEPT", "DROP", "-"):
                raise fail(f"bad policy {policy!r}")
            # iptables-restore never flushes a built-in chain on a declaration
            # under --noflush; it only sets the policy.
            old = work[name]
            new_policy: Verdict | None = old.policy if policy == "-" else policy  # type: ignore[assignment]
            work[name] = replace(old, policy=new_policy)
            return
        if policy != "-":
            raise fail(f"user chain {name} cannot have policy {policy}")
        # Declaring a user chain creates it, or flushes it if it exists.
        work[name] = Chain(name, False, None, ())

    def command(
        self,
        work: dict[str, Chain],
        table: str,
        tokens: list[str],
        line: str,
        where: str,
        fail: _Fail,
    ) -> None:
        if not tokens:
            return
        cmd, args = tokens[0], tokens[1:]
        if cmd in ("-A", "--append", "-I", "--insert", "-D", "--delete"):
            if not args:
                raise fail(f"{cmd} needs a chain")
            chain = self.existing(work, args[0], fail)
            spec = args[1:]
            position: int | None = None
            if cmd in ("-I", "--insert", "-D", "--delete") and spec and spec[0].isdigit():
                position = int(spec[0])
                spec = spec[1:]
            if cmd in ("-D", "--delete") and position is not None:
                if spec or not 1 <= position <= len(chain.rules):
                    raise fail(f"no rule {position} in chain {chain.name}")
                rules = list(chain.rules)
                del rules[position - 1]
                work[chain.name] = replace(chain, rules=tuple(rules))
                return
            if table not in _TRACED_TABLES:
                raise fail(f"the tracer models only the filter and nat tables, not {table}")
            parser = _RuleParser(spec, table, where, line)
            rule = parser.parse()
            self.families |= parser.families
            jump = rule.target if isinstance(rule.target, JumpTarget) else None
            if jump is not None and (jump.chain not in work or work[jump.chain].builtin):
                raise fail(f"jump to unknown chain {jump.chain!r}")
            rules = list(chain.rules)
            if cmd in ("-A", "--append"):
                rules.append(rule)
            elif cmd in ("-I", "--insert"):
                at = (position or 1) - 1
                if not 0 <= at <= len(rules):
                    raise fail(f"no position {position} in chain {chain.name}")
                rules.insert(at, rule)
            else:
                try:
                    rules.remove(rule)  # first equal rule, compared by content
                except ValueError:
                    raise fail(f"no matching rule to delete in chain {chain.name}") from None
            work[chain.name] = replace(chain, rules=tuple(rules))
        elif cmd in ("-N", "--new-chain"):
            if len(args) != 1 or args[0] in work:
                raise fail("-N needs one new chain name")
            work[args[0]] = Chain(args[0], False, None, ())
        elif cmd in ("-F", "--flush"):
            if len(args) != 1:
                raise fail("-F needs one chain")
            chain = self.existing(work, args[0], fail)
            work[chain.name] = replace(chain, rules=())
        elif cmd in ("-X", "--delete-chain"):
            if len(args) != 1:
                raise fail("-X needs one chain")
            chain = self.existing(work, args[0], fail)
            if chain.builtin:
                raise fail(f"cannot delete built-in chain {chain.name}")
            if chain.rules:
                # The kernel (ENOTEMPTY) refuses this too: flush it first.
                raise fail(f"chain {chain.name} is not empty")
            users = [
                c.name
                for c in work.values()
                for r in c.rules
                if isinstance(r.target, JumpTarget) and r.target.chain == chain.name
            ]
            if users:
                raise fail(f"chain {chain.name} is still referenced from {sorted(set(users))}")
            del work[chain.name]
        elif cmd in ("-P", "--policy"):
            if len(args) != 2 or args[1] not in ("ACCEPT", "DROP"):
                raise fail("-P needs a built-in chain and ACCEPT or DROP")
            chain = self.existing(work, args[0], fail)
            if not chain.builtin:
                raise fail(f"{chain.name} is not a built-in chain")
            work[chain.name] = replace(chain, policy=args[1])  # type: ignore[arg-type]
        else:
            raise fail(f"unsupported command {cmd!r}")

    @staticmethod
    def existing(work: dict[str, Chain], name: str, fail: _Fail) -> Chain:
        chain = work.get(name)
        if chain is None:
            raise fail(f"no chain {name!r}")
        return chain

    @staticmethod
    def check_loops(table: str, work: dict[str, Chain], where: str) -> None:
        # The kernel rejects a table whose jumps form a cycle; so do we, which
        # also keeps the tracer's walk finite.
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise TraceError(f"{where}: COMMIT of {table}: jump loop {cycle}")
            state[name] = 1
            for rule in work[name].rules:
                if isinstance(rule.target, JumpTarget):
                    visit(rule.target.chain, [*path, name])
            state[name] = 2

        for name in sorted(work):
            visit(name, [])

    def ruleset(self) -> Ruleset:
        if len(self.families) > 1:
            raise TraceError("rules mix IPv4 and IPv6 addresses; trace one family at a time")
        tables = {t: MappingProxyType(dict(chains)) for t, chains in self.tables.items()}
        family = next(iter(self.families)) if self.families else None
        return Ruleset(MappingProxyType(tables), family)


def parse_rules(rules: str | Sequence[str]) -> Ruleset:
    """Apply one or several iptables-restore texts, in order, as ``--noflush``."""
    texts = [rules] if isinstance(rules, str) else list(rules)
    restorer = _Restorer()
    for index, text in enumerate(texts):
        restorer.apply(text, index)
    return restorer.ruleset()


# --------------------------------------------------------------------------- results


def _fmt(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _endpoint_key(endpoint: str) -> tuple[int, int, int]:
    host, _, port = endpoint.rpartition(":")
    addr = ipaddress.ip_address(host.strip("[]"))
    return addr.version, int(addr), int(port)


@dataclass(frozen=True)
class Outcome:
    """One path of a new connection through the rules."""

    verdict: Verdict
    destination: str  # "ip:port" ("[v6]:port") after DNAT; the original one without DNAT
    dnat: bool
    masquerade: bool  # nat POSTROUTING would MASQUERADE/SNAT it (False if never reached)
    probability: float  # product of the statistic branches taken on this path
    chains: tuple[str, ...]  # "table:CHAIN" in the order entered
    affinity: tuple[str, ...]  # recent lists assumed to already hold the client
    conditions: tuple[str, ...]  # every branch decision, human-readable
    mark: int  # packet mark at the end of the path

    @property
    def endpoint(self) -> str | None:
        return self.destination if self.verdict == "ACCEPT" else None


@dataclass(frozen=True)
class TraceResult:
    outcomes: tuple[Outcome, ...]

    @property
    def endpoints(self) -> list[str]:
        """Destinations of accepted paths, unique, sorted by address then port."""
        return sorted(
            {o.destination for o in self.outcomes if o.verdict == "ACCEPT"}, key=_endpoint_key
        )

    @property
    def verdicts(self) -> frozenset[str]:
        return frozenset(o.verdict for o in self.outcomes)

    @property
    def masqueraded(self) -> bool | Literal["mixed"]:
        """Whether accepted paths get masqueraded: True, False or "mixed"."""
        flags = {o.masquerade for o in self.outcomes if o.verdict == "ACCEPT"}
        if len(flags) > 1:
            return "mixed"
        return flags == {True}

    def probabilities(self, *, with_affinity: bool = False) -> dict[str, float]:
        """Chance of each endpoint (or "DROP"/"REJECT") for a fresh client.

        _Paths that assumed an existing affinity entry are left out unless
        ``with_affinity`` is set, because their probability is not comparable:
        they describe a returning client, not a coin flip.
        """
        out: dict[str, float] = {}
        for o in self.outcomes:
            if o.affinity and not with_affinity:
                continue
            key = o.destination if o.verdict == "ACCEPT" else o.verdict
            out[key] = out.get(key, 0.0) + o.probability
        return out

    def visited(self, chain: str) -> bool:
        """Whether any path entered ``chain`` ("KUBE-SVC-X" or "nat:KUBE-SVC-X")."""
        return any(
            c == chain or c.split(":", 1)[1] == chain for o in self.outcomes for c in o.chains
        )


# --------------------------------------------------------------------------- tracing


class _Walker:
    def __init__(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset
        self.paths = 0

    def run(self, table: str, hook: str, pkt: _Packet, ctx: _Context) -> _Paths:
        """Walk one built-in chain; return each path's packet and verdict."""
        base = self.ruleset.chain(table, hook)
        if base is None:
            # Table not loaded at all: its built-in chains are empty, policy ACCEPT.
            return [(pkt, "ACCEPT")]
        assert base.policy is not None
        chains = self.ruleset.tables[table]
        results: list[tuple[_Packet, str]] = []
        start = replace(pkt, chains=(*pkt.chains, f"{table}:{hook}"))
        # Each thread is a packet plus a call stack of (chain, next rule index).
        # Explicit stacks (not recursion) because one chain can hold thousands of
        # rules and forks, and because goto replaces a frame instead of pushing.
        work: list[tuple[_Packet, tuple[tuple[str, int], ...]]] = [(start, ((hook, 0),))]
        while work:
            pkt, stack = work.pop()
            name, idx = stack[-1]
            rules = chains[name].rules
            if idx >= len(rules):
                # End of chain: return to the caller; off the base chain: policy.
                if len(stack) == 1:
                    results.append((pkt, base.policy))
                else:
                    work.append((pkt, stack[:-1]))
                continue
            rule = rules[idx]
            after = (*stack[:-1], (name, idx + 1))
            forks = self.match(rule, pkt, ctx)
            # Pushed in reverse so that the first alternative is explored first,
            # which keeps outcomes in rule order.
            for fork, matched in reversed(forks):
                if not matched:
                    work.append((fork, after))
                    continue
                self.apply(rule, fork, after, ctx, table, work, results, base.policy)
        return results

    def apply(
        self,
        rule: Rule,
        pkt: _Packet,
        after: tuple[tuple[str, int], ...],
        ctx: _Context,
        table: str,
        work: list[tuple[_Packet, tuple[tuple[str, int], ...]]],
        results: list[tuple[_Packet, str]],
        policy: str,
    ) -> None:
        target = rule.target
        if isinstance(target, NoopTarget):
            work.append((pkt, after))
        elif isinstance(target, MarkTarget):
            mark = ((pkt.mark & ~target.mask) ^ target.value) & _MARK_BITS
            work.append((replace(pkt, mark=mark), after))
        elif isinstance(target, JumpTarget):
            if len(pkt.chains) >= MAX_CHAIN_ENTRIES_PER_PATH:
                raise TraceError(f"{rule.where}: path entered too many chains (loop?)")
            entered = replace(pkt, chains=(*pkt.chains, f"{table}:{target.chain}"))
            frame = ((target.chain, 0),)
            # goto drops the current frame: a RETURN from the target goes back
            # to whoever called the chain that did the goto.
            stack = (*after[:-1], *frame) if target.goto else (*after, *frame)
            work.append((entered, stack))
        elif isinstance(target, VerdictTarget):
            if target.verdict == "RETURN":
                if len(after) == 1:
                    results.append((pkt, policy))
                else:
                    work.append((pkt, after[:-1]))
            else:
                results.append((pkt, target.verdict))
        elif isinstance(target, DnatTarget):
            if ctx.hook not in ("PREROUTING", "OUTPUT"):
                raise TraceError(f"{rule.where}: DNAT reached from nat {ctx.hook}")
            if target.addr.version != pkt.dst.version:
                raise TraceError(f"{rule.where}: DNAT to another address family")
            port = pkt.dport if target.port is None else target.port
            results.append((replace(pkt, dst=target.addr, dport=port, dnat=True), "ACCEPT"))
        elif isinstance(target, SnatTarget):
            if ctx.hook != "POSTROUTING" and not (target.kind == "SNAT" and ctx.hook == "INPUT"):
                raise TraceError(f"{rule.where}: {target.kind} reached from nat {ctx.hook}")
            results.append((replace(pkt, masquerade=True), "ACCEPT"))
        else:  # pragma: no cover - the parser builds only the targets above
            raise TraceError(f"{rule.where}: cannot apply {target!r}")

    def match(self, rule: Rule, pkt: _Packet, ctx: _Context) -> list[tuple[_Packet, bool]]:
        """All ways the rule's matches can go for this packet, in order."""
        live = [pkt]
        done: list[tuple[_Packet, bool]] = []
        for m in rule.matches:
            nxt: list[_Packet] = []
            for p in live:
                for q, ok in self.match_one(m, p, ctx, rule):
                    if ok:
                        nxt.append(q)
                    else:
                        done.append((q, False))
            live = nxt
            if not live:
                break
        self.paths += len(live) + len(done) - 1
        if self.paths > MAX_PATHS:
            raise TraceError(f"{rule.where}: more than {MAX_PATHS} paths; rules too branchy")
        return [(p, True) for p in live] + done

    def match_one(
        self, m: Match, pkt: _Packet, ctx: _Context, rule: Rule
    ) -> list[tuple[_Packet, bool]]:
        if isinstance(m, StatisticMatch):
            p_hit = 1.0 - m.probability if m.negate else m.probability
            forks: list[tuple[_Packet, bool]] = []
            for hit, p in ((True, p_hit), (False, 1.0 - p_hit)):
                if p <= 0.0:
                    continue  # a branch that can never happen is not an outcome
                note = f"{rule.where}: statistic {m.probability} {'taken' if hit else 'skipped'}"
                forks.append(
                    (
                        replace(
                            pkt,
                            probability=pkt.probability * p,
                            conditions=(*pkt.conditions, note),
                        ),
                        hit,
                    )
                )
            return forks
        if isinstance(m, RecentMatch):
            return self.match_recent(m, pkt, rule)
        try:
            return [(pkt, m.test(pkt, ctx))]
        except TraceError as err:
            raise TraceError(f"{rule.where}: {err}: {rule.text!r}") from None

    @staticmethod
    def match_recent(m: RecentMatch, pkt: _Packet, rule: Rule) -> list[tuple[_Packet, bool]]:
        if m.mode == "set":
            # --set records the client and matches (inverted by '!').
            return [(pkt.with_recent(m.key, True), not m.negate)]
        known = pkt.recent_state(m.key)
        options: list[tuple[_Packet, bool]] = []
        if known is None:
            # Unknown history: the client may or may not have affinity already.
            listed = replace(
                pkt.with_recent(m.key, True),
                affinity=(*pkt.affinity, m.name),
                conditions=(*pkt.conditions, f"{rule.where}: recent {m.name} listed"),
            )
            fresh = replace(
                pkt.with_recent(m.key, False),
                conditions=(*pkt.conditions, f"{rule.where}: recent {m.name} not listed"),
            )
            options = [(listed, True), (fresh, False)]
        else:
            options = [(pkt, known)]
        out: list[tuple[_Packet, bool]] = []
        for p, present in options:
            if m.mode == "remove" and present:
                p = p.with_recent(m.key, False)
            out.append((p, present != m.negate))
        return out


def _parse_ipsets(
    ipsets: Mapping[str, Iterable[str]] | None,
) -> Mapping[str, tuple[tuple[_SetPart, ...], ...]]:
    """Parse ``ipset list``-style entries: "10.0.0.1,tcp:80", "30080", "fd00::/64"."""
    parsed: dict[str, tuple[tuple[_SetPart, ...], ...]] = {}
    for name, entries in (ipsets or {}).items():
        out: list[tuple[_SetPart, ...]] = []
        for entry in entries:
            text = entry.split()[0] if entry.split() else ""
            parts: list[_SetPart] = []
            for pos, comp in enumerate(text.split(",")):
                proto, sep, port = comp.rpartition(":")
                if re.fullmatch(r"\d+(-\d+)?", comp):
                    lo, _, hi = comp.partition("-")
                    # A bare port is protocol-less in bitmap:port (first dimension)
                    # and means tcp in hash:*,port sets, as ipset itself does.
                    parts.append(
                        _SetPart(
                            protocol=None if pos == 0 else "tcp", ports=(int(lo), int(hi or lo))
                        )
                    )
                elif (
                    sep
                    and proto in ("tcp", "udp", "sctp", "udplite")
                    and re.fullmatch(r"\d+(-\d+)?", port)
                ):
                    lo, _, hi = port.partition("-")
                    parts.append(_SetPart(protocol=proto, ports=(int(lo), int(hi or lo))))
                else:
                    try:
                        parts.append(_SetPart(net=ipaddress.ip_network(comp, strict=False)))
                    except ValueError as err:
                        raise TraceError(f"ipset {name!r}: bad entry {entry!r}") from err
            out.append(tuple(parts))
        parsed[name] = tuple(out)
    return MappingProxyType(parsed)


def trace(
    rules: str | Sequence[str] | Ruleset,
    *,
    source: str,
    dest: str,
    port: int,
    protocol: str = "tcp",
    node_ips: Iterable[str],
    local_source: bool = False,
    mark: int = 0,
    source_port: int = 43210,
    in_iface: str | None = None,
    out_iface: str | None = None,
    ipsets: Mapping[str, Iterable[str]] | None = None,
) -> TraceResult:
    """Every way a new connection source -> dest:port can go through ``rules``.

    ``rules`` is one iptables-restore text, several applied in order with
    ``--noflush`` semantics, or a :class:`Ruleset` from :func:`parse_rules`
    (parse once, trace many packets).  ``node_ips`` are the node's addresses
    for ``-m addrtype LOCAL`` (loopback is always local).
    """
    ruleset = rules if isinstance(rules, Ruleset) else parse_rules(rules)
    try:
        src = ipaddress.ip_address(source)
        dst = ipaddress.ip_address(dest)
    except ValueError as err:
        raise TraceError(f"bad packet address: {err}") from None
    if src.version != dst.version:
        raise TraceError(f"source {source} and destination {dest} differ in family")
    if ruleset.family is not None and ruleset.family != dst.version:
        raise TraceError(f"IPv{dst.version} packet traced through IPv{ruleset.family} rules")
    protocol = protocol.lower()
    if protocol not in _PORT_PROTOCOLS:
        raise TraceError(f"protocol must be tcp, udp or sctp, not {protocol!r}")
    for p in (port, source_port):
        if not 0 < p <= 65535:
            raise TraceError(f"bad port {p}")
    local = frozenset(
        a for a in (ipaddress.ip_address(ip) for ip in node_ips) if a.version == dst.version
    )
    sets = _parse_ipsets(ipsets)

    def ctx(hook: str, in_if: str | None, out_if: str | None) -> _Context:
        return _Context(hook, protocol, in_if, out_if, local, sets)

    base = ctx("PREROUTING", None, None)
    walker = _Walker(ruleset)
    pkt = _Packet(src, dst, source_port, port, mark & _MARK_BITS, dst, port)
    finished: list[tuple[_Packet, str]] = []

    def out_if_for(p: _Packet) -> str | None:
        # Local destinations are routed through lo whatever the test said.
        return "lo" if base.is_local(p.dst) else out_iface

    def then(paths: _Paths, step: Callable[[_Packet], _Paths]) -> _Paths:
        # _Paths that already have a final verdict stop here; accepted ones go on.
        out: _Paths = []
        for p, verdict in paths:
            if verdict == "ACCEPT":
                out.extend(step(p))
            else:
                finished.append((p, verdict))
        return out

    def postrouting(p: _Packet) -> _Paths:
        return walker.run("nat", "POSTROUTING", p, ctx("POSTROUTING", None, out_if_for(p)))

    def deliver(in_if: str | None) -> Callable[[_Packet], _Paths]:
        # Local delivery: filter INPUT, then nat INPUT (where SNAT is legal too).
        def step(p: _Packet) -> _Paths:
            paths = walker.run("filter", "INPUT", p, ctx("INPUT", in_if, None))
            return then(paths, lambda q: walker.run("nat", "INPUT", q, ctx("INPUT", in_if, None)))

        return step

    if local_source:
        # nat OUTPUT sees the route of the original destination, filter OUTPUT
        # the route after DNAT.
        paths = walker.run("nat", "OUTPUT", pkt, ctx("OUTPUT", None, out_if_for(pkt)))
        paths = then(
            paths, lambda p: walker.run("filter", "OUTPUT", p, ctx("OUTPUT", None, out_if_for(p)))
        )
        paths = then(paths, postrouting)
        # Looped back to ourselves: the packet comes in again on lo.
        paths = then(paths, lambda p: deliver("lo")(p) if base.is_local(p.dst) else [(p, "ACCEPT")])
    else:
        paths = walker.run("nat", "PREROUTING", pkt, ctx("PREROUTING", in_iface, None))

        def route(p: _Packet) -> _Paths:
            if base.is_local(p.dst):
                return deliver(in_iface)(p)
            fwd = walker.run("filter", "FORWARD", p, ctx("FORWARD", in_iface, out_iface))
            return then(fwd, postrouting)

        paths = then(paths, route)
    finished.extend(paths)

    outcomes = tuple(
        Outcome(
            verdict=v,  # type: ignore[arg-type]
            destination=_fmt(p.dst, p.dport),
            dnat=p.dnat,
            masquerade=p.masquerade and v == "ACCEPT",
            probability=p.probability,
            chains=p.chains,
            affinity=p.affinity,
            conditions=p.conditions,
            mark=p.mark,
        )
        for p, v in finished
    )
    return TraceResult(outcomes)
