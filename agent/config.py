"""Settings shared by every command, with kube-proxy's flag names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Feature gates sliceproxy understands, with their defaults. Same-node
# preference (trafficDistribution PreferSameNode) is GA upstream, so on.
KNOWN_FEATURE_GATES: Mapping[str, bool] = {
    "PreferSameTrafficDistribution": True,
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message is for the user."""


def parse_feature_gates(text: str | None) -> dict[str, bool]:
    """``A=true,B=false`` -> {A: True, B: False} over the defaults.

    Unknown gates are an error, as they are for kube-proxy: a typo must not
    silently leave a behaviour switched the wrong way.
    """
    gates = dict(KNOWN_FEATURE_GATES)
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or value not in ("true", "false"):
            raise ConfigError(f"--feature-gates: expected NAME=true|false, got {item!r}")
        if name not in KNOWN_FEATURE_GATES:
            known = ", ".join(sorted(KNOWN_FEATURE_GATES))
            raise ConfigError(f"--feature-gates: unknown feature gate {name!r} (known: {known})")
        gates[name] = value == "true"
    return gates


@dataclass(frozen=True)
class Config:
    node_name: str = ""
    proxy_name: str = ""
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(KNOWN_FEATURE_GATES))

    @property
    def prefer_same_node(self) -> bool:
        return bool(self.feature_gates.get("PreferSameTrafficDistribution", True))
