"""The one thing every source produces: an event about a raw API object.

Sources (manifest files, the API server) hand the state plain JSON-decoded
dicts exactly as the API serves them; validation and conversion into the
model happen once, in the state, whatever the source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["upsert", "delete"]

# The kinds sliceproxy reads; sources drop everything else quietly.
KINDS = ("Service", "EndpointSlice", "Node")


@dataclass(frozen=True)
class ObjectEvent:
    """An object was created/updated (``upsert``) or removed (``delete``).

    ``obj`` is the raw object (a JSON-decoded dict). For ``delete`` only its
    ``metadata.namespace``/``metadata.name`` are needed. ``origin`` names where
    the object came from (``file.yaml:3`` or ``api``) for error reports.
    """

    action: Action
    kind: str
    obj: Mapping[str, Any] = field(hash=False, compare=False)
    origin: str = ""

    def _meta(self, key: str) -> str:
        # Defensive: events may carry malformed objects, which the state
        # reports by namespace/name before rejecting them.
        meta = self.obj.get("metadata") if isinstance(self.obj, Mapping) else None
        value = meta.get(key) if isinstance(meta, Mapping) else None
        return value if isinstance(value, str) else ""

    @property
    def namespace(self) -> str:
        return self._meta("namespace") or ("default" if self.kind != "Node" else "")

    @property
    def name(self) -> str:
        return self._meta("name")
