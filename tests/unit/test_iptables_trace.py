"""Every iptables feature, checked by where packets go: the rendered rules of
each case in tests/golden/iptables_cases.py fed to the packet tracer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.backends.iptables.render import IptablesRenderer
from tests.golden.iptables_cases import (
    CASES_BY_NAME,
    NODE_IP4,
    NODE_IP6,
    POD_LOCAL4,
    REMOTE4,
)
from tests.support.iptables_tracer import TraceResult, trace

POD_LOCAL6 = "fd00:10:244:1::9"
THIRD = pytest.approx(1 / 3, abs=1e-9)
HALF = pytest.approx(0.5, abs=1e-9)
ALL3 = {"10.244.1.2:8080": THIRD, "10.244.2.2:8080": THIRD, "10.244.3.2:8080": THIRD}


@dataclass(frozen=True)
class Row:
    id: str
    case: str
    source: str
    dest: str
    port: int
    # endpoint (or "DROP"/"REJECT") -> chance for a fresh client
    expect: dict[str, object]
    masquerade: bool | str | None = None  # None: not checked
    protocol: str = "tcp"
    local_source: bool = False
    extra: dict[str, object] = field(default_factory=dict)


ROWS = (
    Row("clusterip-balances-evenly", "clusterip", POD_LOCAL4, "10.96.0.10", 80, ALL3, False),
    Row("clusterip-off-cluster-masquerades", "clusterip", REMOTE4, "10.96.0.10", 80, ALL3, True),
    Row("nodeport-masquerades", "nodeport", REMOTE4, NODE_IP4, 30080, ALL3, True),
    Row("nodeport-wrong-port-untouched", "nodeport", REMOTE4, NODE_IP4, 30081, {}, None),
    Row(
        "etp-local-keeps-source-local-only",
        "etp-local",
        REMOTE4,
        NODE_IP4,
        30443,
        {"10.244.1.2:8080": 1.0},
        False,
    ),
    Row(
        "etp-local-lb-from-outside",
        "etp-local",
        REMOTE4,
        "203.0.113.20",
        80,
        {"10.244.1.2:8080": 1.0},
        False,
    ),
    Row("etp-local-pod-short-circuit", "etp-local", POD_LOCAL4, "203.0.113.20", 80, ALL3, False),
    Row(
        "etp-local-node-source-masquerades",
        "etp-local",
        NODE_IP4,
        "203.0.113.20",
        80,
        ALL3,
        True,
        local_source=True,
    ),
    Row(
        "etp-local-no-local-drops-nodeport",
        "etp-local-no-local-endpoints",
        REMOTE4,
        NODE_IP4,
        30443,
        {"DROP": 1.0},
    ),
    Row(
        "etp-local-no-local-drops-lb",
        "etp-local-no-local-endpoints",
        REMOTE4,
        "203.0.113.20",
        80,
        {"DROP": 1.0},
    ),
    Row(
        "etp-local-no-local-pod-still-served",
        "etp-local-no-local-endpoints",
        POD_LOCAL4,
        "203.0.113.20",
        80,
        {"10.244.2.2:8080": HALF, "10.244.3.2:8080": HALF},
        False,
    ),
    Row(
        "itp-local-only-local",
        "itp-local",
        POD_LOCAL4,
        "10.96.0.53",
        53,
        {"10.244.1.2:8080": 1.0},
    ),
    Row("itp-local-none-drops", "itp-local", POD_LOCAL4, "10.96.0.54", 53, {"DROP": 1.0}),
    Row("no-endpoints-cluster-ip", "no-endpoints", POD_LOCAL4, "10.96.0.110", 80, {"REJECT": 1.0}),
    Row("no-endpoints-external-ip", "no-endpoints", REMOTE4, "192.0.2.50", 80, {"REJECT": 1.0}),
    Row("no-endpoints-lb-ip", "no-endpoints", REMOTE4, "203.0.113.30", 80, {"REJECT": 1.0}),
    Row("no-endpoints-nodeport", "no-endpoints", REMOTE4, NODE_IP4, 30110, {"REJECT": 1.0}),
    Row(
        "lb-source-range-allowed",
        "lb-source-ranges",
        REMOTE4,
        "203.0.113.10",
        443,
        {"10.244.2.2:8080": HALF, "10.244.3.2:8080": HALF},
        True,
    ),
    Row(
        "lb-source-range-dropped",
        "lb-source-ranges",
        "203.0.113.99",
        "203.0.113.10",
        443,
        {"DROP": 1.0},
    ),
    Row(
        "lb-source-range-node-allowed",
        "lb-source-ranges",
        "203.0.113.10",
        "203.0.113.10",
        443,
        {"10.244.2.2:8080": HALF, "10.244.3.2:8080": HALF},
    ),
    Row(
        "lb-source-range-ignored-for-nodeport",
        "lb-source-ranges",
        "203.0.113.99",
        NODE_IP4,
        31443,
        {"10.244.2.2:8080": HALF, "10.244.3.2:8080": HALF},
        True,
    ),
    Row(
        "external-ip-masquerades",
        "external-ips",
        REMOTE4,
        "192.0.2.50",
        8080,
        {"10.244.1.2:8080": HALF, "10.244.2.2:8080": HALF},
        True,
    ),
    Row(
        "affinity-fresh-client-balances",
        "affinity",
        POD_LOCAL4,
        "10.96.0.50",
        80,
        {"10.244.1.2:8080": HALF, "10.244.2.2:8080": HALF},
        False,
    ),
    Row(
        "ipv6-clusterip",
        "ipv6",
        POD_LOCAL6,
        "fd00:10:96::a",
        80,
        {"[fd00:10:244:1::2]:8080": HALF, "[fd00:10:244:2::2]:8080": HALF},
        False,
    ),
    Row(
        "ipv6-nodeport",
        "ipv6",
        "2001:db8::7",
        NODE_IP6,
        30606,
        {"[fd00:10:244:1::2]:8080": HALF, "[fd00:10:244:2::2]:8080": HALF},
        True,
    ),
    Row(
        "ipv6-dual-stack-udp",
        "ipv6",
        POD_LOCAL6,
        "fd00:10:96::46",
        53,
        {"[fd00:10:244:1::e]:53": 1.0},
        False,
        protocol="udp",
    ),
    Row(
        "masquerade-all",
        "masquerade-all",
        POD_LOCAL4,
        "10.96.0.10",
        80,
        {"10.244.1.2:8080": 1.0},
        True,
    ),
    Row(
        "nodeport-addresses-listed-ip",
        "nodeport-addresses",
        REMOTE4,
        NODE_IP4,
        30080,
        {"10.244.1.2:8080": 1.0},
        True,
    ),
)


def run(row: Row) -> TraceResult:
    case = CASES_BY_NAME[row.case]
    family = 6 if ":" in row.dest else 4
    text = IptablesRenderer(case.options).family(case.build(), family).restore_text()
    node_ips = [NODE_IP6 if family == 6 else NODE_IP4]
    return trace(
        text,
        source=row.source,
        dest=row.dest,
        port=row.port,
        protocol=row.protocol,
        node_ips=node_ips,
        local_source=row.local_source,
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_packet_reaches_the_expected_endpoints(row: Row) -> None:
    result = run(row)
    if row.expect:
        assert result.probabilities() == row.expect
    else:
        # Not a service port: the packet is not DNATed anywhere.
        assert not any(o.dnat for o in result.outcomes)
    if row.masquerade is not None:
        assert result.masqueraded == row.masquerade


def test_hairpin_masquerades_only_the_endpoint_reaching_itself() -> None:
    row = Row("hairpin", "clusterip", "10.244.1.2", "10.96.0.10", 80, ALL3)
    masq = {o.destination: o.masquerade for o in run(row).outcomes}
    assert masq == {"10.244.1.2:8080": True, "10.244.2.2:8080": False, "10.244.3.2:8080": False}


def test_affinity_returning_client_sticks_to_its_endpoint() -> None:
    row = Row("affinity", "affinity", POD_LOCAL4, "10.96.0.50", 80, {})
    sticky = [o for o in run(row).outcomes if o.affinity]
    assert sticky and all(len(o.affinity) == 1 for o in sticky)
    # A client listed for an endpoint's recent list goes to that endpoint.
    for o in sticky:
        sep = o.affinity[0]
        assert any(c.endswith(sep) for c in o.chains)


def test_masquerade_mark_follows_the_configured_bit() -> None:
    row = Row("mark", "masquerade-all", POD_LOCAL4, "10.96.0.10", 80, {})
    text = IptablesRenderer(CASES_BY_NAME["masquerade-all"].options).family(
        CASES_BY_NAME["masquerade-all"].build(), 4
    )
    assert "--or-mark 0x2000" in text.restore_text()
    assert run(row).masqueraded is True
