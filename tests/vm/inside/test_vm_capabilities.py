"""Kernel features the IPVS backend relies on, checked inside the VM.

These run only in the guest booted by tests/vm/vmrun.py (which sets
SLICEPROXY_IN_VM=1); tests/vm/test_vm.py runs them there. On the host they
skip, since this host's kernel has no IPVS and no dummy links.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from socket import AF_INET6, IPPROTO_TCP, IPPROTO_UDP

import pytest

if os.environ.get("SLICEPROXY_IN_VM") != "1":
    pytest.skip(
        "runs only inside the test VM (tests/vm/test_vm.py boots it)", allow_module_level=True
    )

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService, NetNS, netns

# Values of the kernel's IP_VS_CONN_F_* / IP_VS_SVC_F_* constants.
FWD_MASQ = 0  # pyroute2's IPVSDest defaults to 3 (direct routing): always pass this
SVC_F_PERSISTENT = 0x1


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}): {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def ipvs() -> Iterator[IPVS]:
    sh("modprobe", "ip_vs")
    sock = IPVS()
    try:
        yield sock
    finally:
        sock.close()


def dest_attrs(msg: dict) -> dict:
    # IPVSDest.from_message() reports class defaults for fwd_method and
    # thresholds instead of the kernel's values, so read the raw attributes.
    return dict(msg.get("IPVS_CMD_ATTR_DEST")["attrs"])


def svc_attrs(msg: dict) -> dict:
    return dict(msg.get("IPVS_CMD_ATTR_SERVICE")["attrs"])


def test_ipvs_module_and_genl_family(ipvs: IPVS) -> None:
    assert os.path.exists("/proc/net/ip_vs")
    # Resolving the "IPVS" generic netlink family happens on the first request.
    assert isinstance(ipvs.service("dump"), list)


def test_ipvs_service_and_dest_lifecycle(ipvs: IPVS) -> None:
    svc = IPVSService(
        addr="10.0.0.1",
        port=80,
        protocol=IPPROTO_TCP,
        sched_name="rr",
        flags={"flags": SVC_F_PERSISTENT, "mask": 0xFFFFFFFF},
        timeout=10800,
    )
    ipvs.service("add", service=svc)
    try:
        (found,) = [
            s for s in ipvs.service("dump") if IPVSService.from_message(s)["addr"] == "10.0.0.1"
        ]
        attrs = svc_attrs(found)
        assert attrs["IPVS_SVC_ATTR_PORT"] == 80
        assert attrs["IPVS_SVC_ATTR_SCHED_NAME"] == "rr"
        assert attrs["IPVS_SVC_ATTR_TIMEOUT"] == 10800
        assert attrs["IPVS_SVC_ATTR_FLAGS"]["flags"] & SVC_F_PERSISTENT

        ipvs.dest(
            "add",
            service=svc,
            dest=IPVSDest(addr="10.1.0.5", port=8080, fwd_method=FWD_MASQ, weight=3),
        )
        (dest,) = [dest_attrs(d) for d in ipvs.dest("dump", service=svc)]
        assert dest["IPVS_DEST_ATTR_ADDR"] == "10.1.0.5"
        assert dest["IPVS_DEST_ATTR_PORT"] == 8080
        assert dest["IPVS_DEST_ATTR_WEIGHT"] == 3
        assert dest["IPVS_DEST_ATTR_FWD_METHOD"] == FWD_MASQ
        assert dest["IPVS_DEST_ATTR_ACTIVE_CONNS"] == 0
        assert dest["IPVS_DEST_ATTR_INACT_CONNS"] == 0

        # Graceful termination drains a real server by setting its weight to 0.
        ipvs.dest(
            "set",
            service=svc,
            dest=IPVSDest(addr="10.1.0.5", port=8080, fwd_method=FWD_MASQ, weight=0),
        )
        (dest,) = [dest_attrs(d) for d in ipvs.dest("dump", service=svc)]
        assert dest["IPVS_DEST_ATTR_WEIGHT"] == 0

        ipvs.dest("del", service=svc, dest=IPVSDest(addr="10.1.0.5", port=8080))
        assert ipvs.dest("dump", service=svc) == []
    finally:
        ipvs.service("del", service=IPVSService(addr="10.0.0.1", port=80, protocol=IPPROTO_TCP))
    assert not [
        s for s in ipvs.service("dump") if IPVSService.from_message(s)["addr"] == "10.0.0.1"
    ]


def test_ipvs_udp_service(ipvs: IPVS) -> None:
    svc = IPVSService(addr="10.0.0.10", port=53, protocol=IPPROTO_UDP, sched_name="rr")
    ipvs.service("add", service=svc)
    try:
        ipvs.dest("add", service=svc, dest=IPVSDest(addr="10.1.0.6", port=53, fwd_method=FWD_MASQ))
        assert len(ipvs.dest("dump", service=svc)) == 1
    finally:
        ipvs.service("del", service=svc)


def test_ipvs_ipv6_service_needs_netmask_workaround(ipvs: IPVS) -> None:
    # The kernel requires IPVS_SVC_ATTR_NETMASK, which for IPv6 is a prefix
    # length (1..128) read as a raw host-order u32. pyroute2 only fills it for
    # IPv4 and encodes it as an IPv4 address, so 128 must be spelled as the
    # address whose bytes are 128 in little-endian order: "128.0.0.0".
    assert int.from_bytes(bytes([128, 0, 0, 0]), "little") == 128
    svc = IPVSService(
        addr="fd00::1", port=80, protocol=IPPROTO_TCP, sched_name="rr", netmask="128.0.0.0"
    )
    ipvs.service("add", service=svc)
    try:
        ipvs.dest("add", service=svc, dest=IPVSDest(addr="fd01::5", port=80, fwd_method=FWD_MASQ))
        (dest,) = [dest_attrs(d) for d in ipvs.dest("dump", service=svc)]
        assert dest["IPVS_DEST_ATTR_ADDR"] == "fd01::5"
        assert dest["IPVS_DEST_ATTR_ADDR_FAMILY"] == AF_INET6
    finally:
        ipvs.service("del", service=svc)


def test_dummy_link_with_service_addresses() -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname="kube-ipvs0", kind="dummy")
        try:
            (idx,) = ipr.link_lookup(ifname="kube-ipvs0")
            ipr.addr("add", index=idx, address="10.0.0.1", prefixlen=32)
            addrs = [a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx)]
            assert "10.0.0.1" in addrs
        finally:
            ipr.link("del", ifname="kube-ipvs0")


def test_netns_and_veth() -> None:
    name = f"sp-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname="sp-host", kind="veth", peer="sp-peer")
            try:
                (peer,) = ipr.link_lookup(ifname="sp-peer")
                ipr.link("set", index=peer, net_ns_fd=name)
                with NetNS(name) as ns:
                    assert ns.link_lookup(ifname="sp-peer")
            finally:
                ipr.link("del", ifname="sp-host")
    finally:
        netns.remove(name)


RULES = "*nat\n:SLICEPROXY-PROBE - [0:0]\n-A SLICEPROXY-PROBE -j RETURN\nCOMMIT\n"


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_iptables_restore(flavour: str) -> None:
    sh(f"iptables-{flavour}-restore", "--noflush", stdin=RULES)
    try:
        assert "-A SLICEPROXY-PROBE -j RETURN" in sh(
            f"iptables-{flavour}", "-t", "nat", "-S", "SLICEPROXY-PROBE"
        )
    finally:
        sh(f"iptables-{flavour}", "-t", "nat", "-F", "SLICEPROXY-PROBE")
        sh(f"iptables-{flavour}", "-t", "nat", "-X", "SLICEPROXY-PROBE")


def test_ipset_restore() -> None:
    sh(
        "ipset",
        "restore",
        stdin="create SLICEPROXY-PROBE hash:ip,port family inet\n"
        "add SLICEPROXY-PROBE 10.0.0.1,tcp:80\n",
    )
    try:
        assert "10.0.0.1,tcp:80" in sh("ipset", "list", "SLICEPROXY-PROBE")
    finally:
        sh("ipset", "destroy", "SLICEPROXY-PROBE")
