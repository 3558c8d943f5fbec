"""Manifest files -> the same events the API server source produces.

Accepts what `kubectl get -o yaml|json` prints: single objects, multi-document
YAML, JSON, and ``List``/``*List`` wrappers. One bad document never hides the
others: documents are split before parsing, and each is parsed on its own.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from agent.sources.events import KINDS, ObjectEvent

try:  # the C loader is several times faster on large dumps
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader

API_VERSIONS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}
SUFFIXES = (".yaml", ".yml", ".json")
_DOC_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


@dataclass(frozen=True)
class ReadProblem:
    """A document that could not be read at all."""

    origin: str
    message: str
    reason: str = "unreadable"

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}"


@dataclass
class Loaded:
    events: list[ObjectEvent]
    problems: list[ReadProblem]


def expand(paths: Iterable[str]) -> Iterator[str]:
    """Files named, every manifest in a directory (sorted), or ``-``."""
    for p in paths:
        if p == "-":
            yield p
            continue
        path = Path(p)
        if path.is_dir():
            yield from (str(f) for f in sorted(path.iterdir()) if f.suffix in SUFFIXES)
        else:
            yield p


def load(paths: Iterable[str], stdin: TextIO | None = None) -> Loaded:
    loaded = Loaded([], [])
    for p in expand(paths):
        if p == "-":
            text, label = (stdin or sys.stdin).read(), "<stdin>"
        else:
            try:
                text = Path(p).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                loaded.problems.append(ReadProblem(p, f"cannot read: {err}", "unreadable"))
                continue
            label = p
        read_text(text, label, loaded, json_only=p.endswith(".json"))
    return loaded


def read_text(text: str, label: str, loaded: Loaded, json_only: bool = False) -> None:
    stripped = text.lstrip()
    if json_only or stripped.startswith(("{", "[")):
        try:
            docs: list[tuple[str, Any]] = [(f"{label}:1", json.loads(text))]
        except json.JSONDecodeError as err:
            if json_only:
                loaded.problems.append(ReadProblem(f"{label}:1", f"not valid JSON: {err}"))
                return
            docs = list(_yaml_documents(text, label, loaded))
    else:
        docs = list(_yaml_documents(text, label, loaded))
    for origin, doc in docs:
        _collect(doc, origin, loaded)


def _yaml_documents(text: str, label: str, loaded: Loaded) -> Iterator[tuple[str, Any]]:
    parts = _DOC_SEPARATOR.split(text)
    for index, part in enumerate(parts, start=1):
        if not part.strip():
            continue
        origin = f"{label}:{index}"
        try:
            doc = yaml.load(part, Loader=_Loader)  # a safe loader (CSafeLoader/SafeLoader)
        except yaml.YAMLError as err:
            message = " ".join(str(err).split())
            loaded.problems.append(ReadProblem(origin, f"not valid YAML: {message}"))
            continue
        if doc is not None:
            yield origin, doc


def _collect(doc: Any, origin: str, loaded: Loaded) -> None:
    if not isinstance(doc, Mapping):
        loaded.problems.append(
            ReadProblem(origin, f"expected an object, got {type(doc).__name__}", "not-an-object")
        )
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        item_kind = kind[: -len("List")]
        for i, item in enumerate(doc["items"]):
            if isinstance(item, Mapping) and "kind" not in item and item_kind in KINDS:
                # `kubectl get services -o json` may omit kind on items.
                item = {**item, "kind": item_kind, "apiVersion": API_VERSIONS[item_kind]}
            _collect(item, f"{origin}.items[{i}]", loaded)
        return
    if not isinstance(kind, str) or not kind:
        loaded.problems.append(ReadProblem(origin, "object has no kind", "missing-field"))
        return
    if kind not in KINDS or doc.get("apiVersion") != API_VERSIONS[kind]:
        return  # other kinds (and other versions) are not ours: ignored quietly
    loaded.events.append(ObjectEvent("upsert", kind, doc, origin))
