"""Reading a user's data in whatever shape it comes, with every problem located.

Files: JSON Lines (.jsonl, .ndjson), JSON (.json: an array, or an object holding one list of
records), CSV/TSV, Parquet, plain text (.txt: blank-line separated passages), or a directory of them.
Formats (per record, auto-detected per file unless given):

  messages           {"messages": [{"role": "system|user|assistant", "content": "..."}]}   (OpenAI)
  sharegpt           {"conversations": [{"from": "human|gpt|system", "value": "..."}]}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}
  prompt_completion  {"prompt": "...", "completion": "..."}
  text               {"text": "..."}

Every record becomes `{"id", "messages": [{"role", "content"}]}`. A plain-text record becomes one
assistant message with no prompt; the data stage trains on all of it without a chat template.
Optional per-record fields: "id" (kept as the record id) and "split" (train | validation | test),
which pins the record to that split instead of the hash-based assignment.


Files are read by `readers.py`; this module turns each raw row into a record, with every problem
located, and counts what it drops in the `Report`. Optional fields "category" (balance report) and
"timestamp" (time split; ISO 8601 or epoch seconds) are kept on the record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .readers import EXTENSIONS, Problem, Report, iter_raw, list_files

__all__ = ["EXTENSIONS", "FORMATS", "Problem", "Record", "Report", "iter_records", "list_files", "normalise"]

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role, and Gemma's name for the assistant.
_MESSAGE_ROLE_ALIASES = {"developer": "system", "model": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "eval": "validation", "test": "test"}
_FORMAT_KEYS = {
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction + output (+ optional input)",
    "prompt_completion": "prompt + completion",
    "text": "text",
}


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]
    split: str | None
    source: str  # file:line, for messages about this record later on
    category: str | None = None  # the record's "category" field (balance report, balanced sampling)
    timestamp: float | None = None  # the record's "timestamp" as epoch seconds (data.split: time)
    facts: list[str] | None = None  # what the answer must state (eval's key facts), from "facts"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages, **({"facts": self.facts} if self.facts else {})}


# ------------------------------------------------------------------------------------------
# Records


def detect_format(obj: Any) -> str | None:
    """The format a record looks like, by its keys; None when none fits."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or ("output" in obj and "input" in obj):
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


class _Checker:
    """Collects the problems of one record."""

    def __init__(self, file: str, where: str):
        self.file, self.where = file, where
        self.problems: list[Problem] = []

    def add(self, fld: str | None, msg: str, kind: str) -> None:
        self.problems.append(Problem(self.file, self.where, fld, msg, kind))

    def string(self, obj: dict, key: str, *, required: bool = True, label: str | None = None) -> str | None:
        label = label or key
        if key not in obj or obj[key] is None:
            if required:
                self.add(label, f"missing field '{key}'", "missing_field")
            return None
        v = obj[key]
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            v = self._parts(v, label)
            if v is None:
                return None
        if not isinstance(v, str):
            self.add(label, f"'{key}' must be a string, got {type(v).__name__} ({_short(v)})", "wrong_type")
            return None
        if required and not v.strip():
            self.add(label, f"'{key}' is empty", "empty_field")
            return None
        return v

    def _parts(self, parts: list[dict], label: str) -> str | None:
        # OpenAI content parts: [{"type": "text", "text": "..."}]
        texts = []
        for j, p in enumerate(parts):
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                self.add(f"{label}[{j}]", f"only text content is supported, got part type {p.get('type')!r}",
                         "unsupported_content")
                return None
            texts.append(p["text"])
        return "".join(texts)


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _maybe_json(obj: dict, key: str, chk: _Checker) -> Any:
    """CSV cells hold nested lists as JSON text."""
    v = obj.get(key)
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            chk.add(key, f"cell is not valid JSON: {e.msg} (column {e.colno})", "bad_json")
            return None
    return v


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str],
           chk: _Checker) -> list[dict[str, str]] | None:
    conv = _maybe_json(obj, key, chk)
    if chk.problems:
        return None
    if conv is None:
        chk.add(key, f"missing field '{key}'", "missing_field")
        return None
    if not isinstance(conv, list):
        chk.add(key, f"'{key}' must be a list of turns, got {type(conv).__name__} ({_short(conv)})", "wrong_type")
        return None
    if not conv:
        chk.add(key, f"'{key}' is an empty list", "empty_conversation")
        return None
    out: list[dict[str, str]] = []
    for i, turn in enumerate(conv):
        label = f"{key}[{i}]"
        if not isinstance(turn, dict):
            chk.add(label, f"each turn must be an object with '{role_key}' and '{text_key}', got "
                    f"{type(turn).__name__} ({_short(turn)})", "wrong_type")
            continue
        # ShareGPT exports sometimes use role/content inside `conversations`.
        rk = role_key if role_key in turn or "role" not in turn else "role"
        tk = text_key if text_key in turn or "content" not in turn else "content"
        role_raw = turn.get(rk)
        if role_raw is None:
            chk.add(f"{label}.{rk}", f"missing field '{rk}'", "missing_field")
        elif not isinstance(role_raw, str):
            chk.add(f"{label}.{rk}", f"'{rk}' must be a string, got {type(role_raw).__name__}", "wrong_type")
            role_raw = None
        role = roles.get(role_raw.strip().lower()) if isinstance(role_raw, str) else None
        if isinstance(role_raw, str) and role is None:
            chk.add(f"{label}.{rk}", f"unknown role {role_raw!r}; expected one of {', '.join(sorted(roles))}",
                    "unknown_role")
        content = chk.string(turn, tk, label=f"{label}.{tk}")
        if role and content is not None:
            out.append({"role": role, "content": content})
    return out if not chk.problems else None


def _check_conversation(msgs: list[dict[str, str]], key: str, chk: _Checker) -> None:
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            chk.add(f"{key}[{i}]", "a system message may only come first", "system_not_first")
    if not any(m["role"] != "system" for m in msgs):
        chk.add(key, "conversation has only a system message", "no_assistant_turn")
    elif msgs[-1]["role"] != "assistant":
        chk.add(f"{key}[{len(msgs) - 1}]", f"conversation ends with a '{msgs[-1]['role']}' turn, not an "
                "assistant turn (nothing to learn from it)", "no_assistant_turn")


def normalise(obj: Any, fmt: str, file: str, where: str) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    """Messages for one raw record of format `fmt`, or None plus every problem found in it."""
    chk = _Checker(file, where)
    if not isinstance(obj, dict):
        chk.add(None, f"record must be a JSON object, got {type(obj).__name__} ({_short(obj)})", "not_object")
        return None, chk.problems
    msgs: list[dict[str, str]] | None = None
    if fmt == "messages":
        roles = {r: r for r in ROLES} | _MESSAGE_ROLE_ALIASES
        msgs = _turns(obj, "messages", "role", "content", roles, chk)
        key = "messages"
    elif fmt == "sharegpt":
        msgs = _turns(obj, "conversations", "from", "value", _SHAREGPT_ROLES, chk)
        key = "conversations"
        system = chk.string(obj, "system", required=False)
        if msgs is not None and system and system.strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
    elif fmt == "alpaca":
        instr = chk.string(obj, "instruction")
        inp = chk.string(obj, "input", required=False)
        output = chk.string(obj, "output")
        system = chk.string(obj, "system", required=False)
        key = "output"
        if not chk.problems:
            user = instr if not (inp and inp.strip()) else f"{instr}\n\n{inp}"
            msgs = ([{"role": "system", "content": system}] if system and system.strip() else []) + [
                {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        key = "completion"
        if isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list):
            # Conversational prompt/completion: both are lists of messages.
            roles = {r: r for r in ROLES} | _MESSAGE_ROLE_ALIASES
            p = _turns(obj, "prompt", "role", "content", roles, chk)
            c = _turns(obj, "completion", "role", "content", roles, chk)
            msgs = (p or []) + (c or []) if not chk.problems else None
        else:
            prompt = chk.string(obj, "prompt")
            completion = chk.string(obj, "completion")
            if not chk.problems:
                msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "text":
        text = chk.string(obj, "text")
        key = "text"
        if text is not None:
            msgs = [{"role": "assistant", "content": text}]
    else:  # pragma: no cover - guarded by the callers
        raise ValueError(fmt)
    if msgs is not None and fmt != "text":
        _check_conversation(msgs, key, chk)
    return (msgs if not chk.problems else None), chk.problems


def content_keys(msgs: list[dict[str, str]]) -> tuple[bytes, bytes]:
    """(exact, whitespace-normalised) digests of a conversation, for dedupe and the split hash."""
    # Separators that cannot be confused with content boundaries; no JSON encoding needed.
    exact = "\x1e".join(m["role"] + "\x1f" + m["content"] for m in msgs)
    norm = "\x1e".join(m["role"] + "\x1f" + " ".join(m["content"].split()) for m in msgs)
    return hashlib.blake2b(exact.encode(), digest_size=16).digest(), hashlib.blake2b(
        norm.encode(), digest_size=16).digest()


def iter_records(path: Path, fmt: str, report: Report) -> Iterator[tuple[Record, bytes, bytes]]:
    """Every valid record under `path` with its (exact, normalised) content digests.

    Invalid rows are reported in `report` (all their problems) and counted as dropped by the kind
    of their first problem. `fmt` is "auto" or one of FORMATS.
    """
    ids: set[str] = set()
    for file in list_files(path, report):
        name = str(file)
        report.files.append(name)
        file_fmt = None if fmt == "auto" else fmt
        pending: list[tuple[str, Any, list[Problem]]] = []
        for item in _with_format(iter_raw(file, report), file_fmt, pending):
            where, obj, probs, ffmt = item
            report.rows += 1
            if not probs:
                if ffmt is None:
                    keys = ", ".join(repr(k) for k in obj) if isinstance(obj, dict) else type(obj).__name__
                    probs = [Problem(name, where, None, f"cannot tell the record's format from its keys ({keys}); "
                                     "expected " + "; ".join(f"{f}: {k}" for f, k in _FORMAT_KEYS.items()),
                                     "unknown_format")]
                else:
                    if fmt == "auto":  # a record of another recognisable format is read as that format
                        ffmt = detect_format(obj) or ffmt
                    msgs, probs = normalise(obj, ffmt, name, where)
            if probs:
                for p in probs:
                    if not p.kind.endswith("_dup"):
                        report.add(p)
                report.drop(probs[0].kind.removesuffix("_dup"))
                continue
            split, split_prob = _split_field(obj, name, where)
            ts, ts_prob = _timestamp_field(obj, name, where)
            if split_prob or ts_prob:
                report.add(split_prob or ts_prob)
                report.drop((split_prob or ts_prob).kind)
                continue
            exact, norm = content_keys(msgs)
            rid = obj.get("id")
            rid = str(rid) if isinstance(rid, (str, int)) and str(rid).strip() else norm.hex()[:16]
            base, k = rid, 1
            while rid in ids:  # keep ids unique (duplicates are counted later, by content)
                k += 1
                rid = f"{base}-{k}"
            ids.add(rid)
            report.records += 1
            report.formats[ffmt] += 1
            cat = obj.get("category")
            cat = str(cat).strip() if isinstance(cat, (str, int)) and str(cat).strip() else None
            facts, facts_prob = facts_field(obj, name, where)
            if facts_prob:
                report.add(facts_prob)  # a warning: the record still trains; eval derives its facts
            yield Record(rid, msgs, split, f"{name}:{where}", cat, ts, facts), exact, norm


def _with_format(rows: Iterator[tuple[str, Any, list[Problem]]], fmt: str | None,
                 pending: list) -> Iterator[tuple[str, Any, list[Problem], str | None]]:
    """Attach the file's format to each row: `fmt`, or the first detectable record's format.

    Rows before the first detectable one are held back (bounded: after 1000 undetectable rows the
    file is declared of unknown format), so streaming is kept.
    """
    if fmt is not None:
        for where, obj, probs in rows:
            yield where, obj, probs, fmt
        return
    detected = None
    for where, obj, probs in rows:
        if detected is None:
            d = detect_format(obj) if not probs else None
            if d is None and len(pending) < 1000:
                pending.append((where, obj, probs))
                continue
            detected = d or "?"
            for p in pending:
                yield (*p, None if detected == "?" else detected)
            pending.clear()
        yield where, obj, probs, None if detected == "?" else detected
    for p in pending:  # nothing detectable in the whole file
        yield (*p, None)
    pending.clear()


def _split_field(obj: dict, file: str, where: str) -> tuple[str | None, Problem | None]:
    v = obj.get("split")
    if v is None or v == "":
        return None, None
    s = _SPLIT_ALIASES.get(str(v).strip().lower()) if isinstance(v, str) else None
    if s is None:
        return None, Problem(file, where, "split", f"unknown split {v!r}; expected train, validation or test",
                             "bad_split")
    return s, None


def facts_field(obj: dict, file: str, where: str) -> tuple[list[str] | None, Problem | None]:
    """The record's "facts": a JSON list of strings/numbers, or (a CSV cell) a string holding a JSON list
    or "7:40; 18:20" (semicolon-separated). An empty value is no facts."""
    v = obj.get("facts")
    if hasattr(v, "tolist"):  # an array (a DataFrame-made list column)
        v = v.tolist()
    if isinstance(v, str):
        text = v.strip()
        parsed = None
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None  # "[3A] room": not JSON, read as text
        v = parsed if isinstance(parsed, list) else [x.strip() for x in text.split(";") if x.strip()]
    if v is None or v == []:
        return None, None
    if isinstance(v, list) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) and str(x).strip()
                                   for x in v):
        return [str(x).strip() for x in v], None
    return None, Problem(file, where, "facts", f"\"facts\" must be a list of strings (or \"a; b\"), got "
                         f"{str(obj.get('facts'))[:60]!r}; the record is kept and its key facts are derived "
                         "from the answer", "bad_facts", "warning")


TIMESTAMP_FIELDS = ("timestamp", "created_at", "date", "time")


def _timestamp_field(obj: dict, file: str, where: str) -> tuple[float | None, Problem | None]:
    """The record's time as epoch seconds: an ISO 8601 string (a date alone is midnight UTC) or a
    number of seconds; None when the record has none."""
    import datetime as dt

    key = next((k for k in TIMESTAMP_FIELDS if obj.get(k) not in (None, "")), None)
    if key is None:
        return None, None
    v = obj[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), None
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            t = None
        if t is not None:
            return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp(), None
    return None, Problem(file, where, key, f"cannot read {key} {v!r} as a time; expected ISO 8601 "
                         "(2024-05-01 or 2024-05-01T09:30:00Z) or epoch seconds", "bad_timestamp")
