"""Chain names of kube-proxy's iptables mode, hashed exactly as upstream.

Same names and hashes as kube-proxy (pkg/proxy/iptables/proxier.go,
portProtoHash / servicePortEndpointChainName), so that people who read
kube-proxy's rules can read ours, and so that `sliceproxy cleanup` and
kube-proxy's own cleanup recognise each other's chains.
"""

from __future__ import annotations

import base64
import hashlib

# Top-level chains (proxier.go constants).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
# kubelet's own firewall chain; kube-proxy writes an identical copy of its
# anti-martian rule and never deletes it (iptablesKubeletJumpChains).
KUBELET_FIREWALL = "KUBE-FIREWALL"

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, FW_PREFIX, EXT_PREFIX, SEP_PREFIX)

# Chains kube-proxy created in older releases (KUBE-XLB: eTP Local before
# 1.24; KUBE-MARK-DROP: before 1.25). Only `cleanup --kube-proxy` removes them.
LEGACY_KUBE_PROXY_PREFIXES = ("KUBE-XLB-",)
LEGACY_KUBE_PROXY_CHAINS = ("KUBE-MARK-DROP",)


def _hash16(text: str) -> str:
    # Go's base32.StdEncoding is RFC 4648 with padding, as Python's b32encode;
    # 16 characters keep names within iptables' 28-character limit.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """portProtoHash: sha256 of the ServicePortName string + lower-case protocol."""
    return _hash16(service_port_name + protocol)


def svc_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-SVC-*: dispatch to the cluster-policy endpoints."""
    return SVC_PREFIX + port_proto_hash(service_port_name, protocol)


def svl_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-SVL-*: dispatch to the local-policy endpoints."""
    return SVL_PREFIX + port_proto_hash(service_port_name, protocol)


def fw_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-FW-*: loadBalancerSourceRanges filtering."""
    return FW_PREFIX + port_proto_hash(service_port_name, protocol)


def ext_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-EXT-*: entry for NodePort / external / LB traffic."""
    return EXT_PREFIX + port_proto_hash(service_port_name, protocol)


def sep_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-*: one endpoint; ``endpoint`` is ``ip:port`` / ``[ip]:port``."""
    return SEP_PREFIX + _hash16(service_port_name + protocol + endpoint)


def is_service_chain(name: str) -> bool:
    """A per-service chain (what a full sync may delete when unused)."""
    return name.startswith(SERVICE_CHAIN_PREFIXES)
