"""Go-style durations (``1s``, ``500ms``, ``1m30s``) as kube-proxy's flags take them."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-zµμ]+)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (``1s``, ``500ms``, ``1m30s``, ``1.5h``) -> seconds.

    Like Go, a bare number is refused (except ``0``): ``--sync-period=30``
    would otherwise silently mean 30 s to one reader and 30 ns to another.
    """
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if re.fullmatch(r"[\d.]+", s[pos:]):
                raise ValueError(f"invalid duration {text!r}: missing unit (e.g. {s[pos:]}s)")
            raise ValueError(f"invalid duration {text!r}")
        unit = m.group(2)
        if unit not in _UNITS:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}")
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
    return sign * total
