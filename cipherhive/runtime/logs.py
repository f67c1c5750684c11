"""Logging for the daemons: readable lines by default, JSON lines on request.

Every record may carry structured fields (``round``, ``node``, ``event``, …)
passed as ``extra={"fields": {...}}``; :func:`event` is the short form. The
server's audit trail is the ``cipherhive.audit`` logger: one line per join,
submission accepted or refused, round opened, closed or failed, and admin action.

Fields often carry what a client sent (a reason quoting its input, a version
string). Both formats therefore escape control characters (a newline in a
field must not start a forged ``cipherhive.audit`` line) and cut every string
field to :data:`MAX_FIELD` characters; call sites bound client strings further.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

AUDIT = logging.getLogger("cipherhive.audit")
#: (role, name) of the caller a server call is serving, set by the server's guard; it
#: travels into worker threads with the call's context.
_CALLER: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("log_caller", default=None)
#: Longest string a log field keeps (the rest is replaced by "…").
MAX_FIELD = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` fit for one log line: control characters escaped, at most ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub(_escape, text)


def _clean_value(value: Any) -> Any:
    return clean(value) if isinstance(value, str) else value


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        if self.as_json:
            doc = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": clean(record.getMessage()),
                **{k: _clean_value(v) for k, v in fields.items()},
            }
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={clean(str(v))}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {clean(record.getMessage())}"
        if extra:
            line += f" [{extra}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: The name of the stderr handler :func:`setup` installs, so a caller can find it again.
HANDLER_NAME = "cipherhive.stderr"


def setup(level: str = "INFO", as_json: bool = False, audit_file: Path | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(_Formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    AUDIT.handlers[:] = []
    if audit_file is not None:
        audit_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(audit_file, encoding="utf-8")
        file_handler.setFormatter(_Formatter(as_json=True))
        AUDIT.addHandler(file_handler)
    try:
        root.setLevel(level.upper())
    except ValueError as exc:
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR") from exc


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


def bind_caller(role: str, name: str) -> None:
    """Name the caller of the call in progress, so audit lines about it carry its role."""
    _CALLER.set((role, name))


def audit(action: str, actor: str, **fields: Any) -> None:
    """One audit line. Identities are (role, name): a node certificate named like the
    operator is another identity, so the role is added when the actor is the caller."""
    if "role" not in fields:
        caller = _CALLER.get()
        if caller is not None and caller[1] == actor:
            fields["role"] = caller[0]
    event(AUDIT, action, action=action, actor=actor, **fields)
