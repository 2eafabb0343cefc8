"""Reading an intent eval set: JSONL, one session a line (docs/intent.md).

``{"id": str, "behaviours": [{"action": str, "text": str, "t": int (optional)}],
"next_query": str, "prefix": str (optional)}``. Every malformed line is refused with its
line number and what is wrong, before any model runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.errors import UsageError

BUILTIN = "builtin"  # the shipped eval split (exporter/intent/data/eval.jsonl)
BUILTIN_PATH = Path(__file__).with_name("data") / "eval.jsonl"


class EvalSetError(UsageError):
    """An eval set that cannot be read; the message names the file and the line."""


def _check(session, where: str) -> dict:
    if not isinstance(session, dict):
        raise EvalSetError(f"{where}: a session is a JSON object, got {type(session).__name__}")
    unknown = sorted(set(session) - {"id", "behaviours", "next_query", "prefix"})
    if unknown:
        raise EvalSetError(f"{where}: unknown field {unknown[0]!r}",
                           hint="fields: id, behaviours, next_query, prefix (optional)")
    for field, kind in (("id", str), ("next_query", str), ("behaviours", list)):
        if not isinstance(session.get(field), kind):
            raise EvalSetError(f"{where}: {field!r} must be a {'list' if kind is list else 'string'}")
    if not session["behaviours"]:
        raise EvalSetError(f"{where}: 'behaviours' is empty")
    if not session["next_query"].strip():
        raise EvalSetError(f"{where}: 'next_query' is empty")
    if not isinstance(session.get("prefix", ""), str):
        raise EvalSetError(f"{where}: 'prefix' must be a string")
    for j, event in enumerate(session["behaviours"]):
        spot = f"{where}: behaviours[{j}]"
        if not isinstance(event, dict) or not isinstance(event.get("action"), str) \
                or not isinstance(event.get("text"), str):
            raise EvalSetError(f"{spot} needs a string 'action' and a string 'text'")
        t = event.get("t")
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            raise EvalSetError(f"{spot}.t must be a whole number of seconds >= 0, got {t!r}")
    return session


def read_eval_set(source: str | Path) -> list[dict]:
    """The sessions of ``source`` ("builtin" or a JSONL path), every line checked."""
    path = BUILTIN_PATH if str(source) == BUILTIN else Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalSetError(f"eval set {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"eval set {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    sessions, ids = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            session = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        session = _check(session, where)
        if session["id"] in ids:
            raise EvalSetError(f"{where}: id {session['id']!r} appears twice")
        ids.add(session["id"])
        sessions.append(session)
    if not sessions:
        raise EvalSetError(f"eval set {path} has no sessions")
    return sessions
