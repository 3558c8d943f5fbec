"""Structured logs as logfmt: one line per record, ``key=value`` pairs.

logfmt rather than JSON lines because operators read these with ``kubectl
logs`` first and feed them to Loki/Vector/Fluent Bit second, and logfmt is
readable as is and parsed by all of those. Every line starts with
``time= level= logger= msg=``; the agent's own messages are written as
``"<event> key=value ..."`` (built with ``kv()``) so their fields become
top-level keys; any other message is quoted whole into ``msg``.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import TextIO

_BARE = re.compile(r"^[^\s\"=\\]+$")
_EVENT = re.compile(r'^[\w.:/-]+(?: [A-Za-z_][\w.]*=(?:"(?:[^"\\]|\\.)*"|[^\s"]*))*$')


def quote(value: object) -> str:
    """A logfmt value: bare when safe, else double-quoted with escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text and _BARE.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def kv(**fields: object) -> str:
    """``key=value`` pairs in the given order (None values left out)."""
    return " ".join(f"{k}={quote(v)}" for k, v in fields.items() if v is not None)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        head = kv(time=ts + "Z", level=record.levelname.lower(), logger=record.name)
        message = record.getMessage()
        if _EVENT.match(message):
            event, _, rest = message.partition(" ")
            line = f"{head} msg={quote(event)}" + (f" {rest}" if rest else "")
        else:
            line = f"{head} msg={quote(message)}"
        if record.exc_info:
            line += f" stack={quote(self.formatException(record.exc_info))}"
        return line


def verbosity_level(v: int) -> int:
    """klog's -v to a logging level: 0-3 info, 4 and above debug."""
    return logging.DEBUG if v >= 4 else logging.INFO


def setup(v: int = 0, stream: TextIO | None = None) -> None:
    """Route every logger to one logfmt handler on stderr."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(v))
    # The client's urllib3 logs every retry at WARNING; our reflector already
    # logs the failure with its backoff, once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
