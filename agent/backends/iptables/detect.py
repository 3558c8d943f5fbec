"""Which iptables flavour (legacy or nft) the node uses.

Rules in the two flavours live in different kernel tables and do not see
each other, so sliceproxy must write where kubelet (and everyone else) does.
The order of evidence follows kube-proxy's image wrapper
(kubernetes-sigs/iptables-wrappers, pkg/xtables/detect.go):

1. kubelet's chains (KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY in mangle):
   checked in nft first (cheaper, and more common), then legacy;
2. kube-proxy's (or our) chains, nft first;
3. the flavour holding more rules (the older wrapper's fallback);
4. otherwise nft.

iptables-legacy-save is run without ``-t``: naming a table would make the
kernel create it (upstream avoids it for the same reason).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent.backends.iptables.restore import (
    MODES,
    BinaryMissing,
    IptablesError,
    Mode,
    Runner,
    binary,
    subprocess_runner,
)

_KUBELET = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.M)
_KUBE_PROXY = re.compile(r"^:(KUBE-PROXY-CANARY|KUBE-SERVICES|KUBE-POSTROUTING)\b", re.M)
_RULE = re.compile(r"^-A ", re.M)


def _save(runner: Runner, mode: Mode, family: int, table: str | None) -> str:
    argv = [binary("save", family, mode)]
    if table:
        argv += ["-t", table]
    try:
        proc = runner(argv, None)
    except (BinaryMissing, IptablesError, OSError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def detect_mode(runner: Runner | None = None, families: Sequence[int] = (4, 6)) -> tuple[Mode, str]:
    """The flavour to use and why (for the log)."""
    run = runner or subprocess_runner()
    nft_mangle = "".join(_save(run, "nft", f, "mangle") for f in families)
    if _KUBELET.search(nft_mangle):
        return "nft", "kubelet's chains are in iptables-nft"
    dumps: dict[Mode, str] = {"nft": "", "legacy": ""}
    dumps["legacy"] = "".join(_save(run, "legacy", f, None) for f in families)
    if _KUBELET.search(dumps["legacy"]):
        return "legacy", "kubelet's chains are in iptables-legacy"
    dumps["nft"] = "".join(_save(run, "nft", f, None) for f in families)
    for mode in ("nft", "legacy"):
        if _KUBE_PROXY.search(dumps[mode]):
            return mode, f"kube-proxy's chains are in iptables-{mode}"
    counts = {mode: len(_RULE.findall(dumps[mode])) for mode in MODES}
    if counts["legacy"] > counts["nft"]:
        return "legacy", f"iptables-legacy holds more rules ({counts['legacy']} vs {counts['nft']})"
    if counts["nft"] > counts["legacy"]:
        return "nft", f"iptables-nft holds more rules ({counts['nft']} vs {counts['legacy']})"
    return "nft", "no evidence either way: nft by default"
