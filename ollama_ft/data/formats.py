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

Reading streams (one line/row at a time, except .json files) and never stops at the first
problem: each problem is a `Problem` with file, line (or row), field and a short `kind`, collected
in a `Report` that also counts every record dropped, by reason.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role, and Gemma's name for the assistant.
_MESSAGE_ROLE_ALIASES = {"developer": "system", "model": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "eval": "validation", "test": "test"}
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "txt"}
_FORMAT_KEYS = {
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction + output (+ optional input)",
    "prompt_completion": "prompt + completion",
    "text": "text",
}


@dataclass
class Problem:
    """One problem at one place. `kind` is a short reason used to count dropped records."""

    file: str
    where: str  # "12" (line), "row 7" (parquet), or "" for the whole file
    field: str | None
    message: str
    kind: str
    severity: str = "error"  # or "warning": reported, but the record (or file) is still used

    def location(self) -> str:
        return f"{self.file}:{self.where}" if self.where else self.file

    def __str__(self) -> str:
        fld = f" [{self.field}]" if self.field else ""
        return f"{self.location()}{fld}: {self.message}"


@dataclass
class Report:
    """Everything found while reading: problems (the first `keep` stored), counts, drops by reason."""

    keep: int = 1000
    problems: list[Problem] = field(default_factory=list)
    errors: int = 0
    warnings: int = 0
    rows: int = 0  # raw rows/lines/items seen (records or not)
    records: int = 0  # valid records produced
    dropped: Counter = field(default_factory=Counter)  # reason -> records dropped
    formats: Counter = field(default_factory=Counter)  # detected format -> records
    files: list[str] = field(default_factory=list)

    def add(self, p: Problem) -> None:
        if p.severity == "error":
            self.errors += 1
        else:
            self.warnings += 1
        if len(self.problems) < self.keep:
            self.problems.append(p)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]
    split: str | None
    source: str  # file:line, for messages about this record later on

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages}


# ------------------------------------------------------------------------------------------
# Files


def list_files(path: Path, report: Report) -> list[Path]:
    """The data files under `path` (a file, or a directory searched recursively), sorted."""
    if path.is_file():
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if p.suffix.lower() in EXTENSIONS:
            files.append(p)
        else:
            report.add(Problem(str(p), "", None, f"skipped: '{p.suffix or p.name}' is not a data file type "
                               f"({', '.join(sorted(EXTENSIONS))})", "unsupported_file", "warning"))
    return files


def _check_encoding_head(head: bytes, name: str, report: Report) -> tuple[bool, int]:
    """Return (readable, bytes to skip). UTF-16/32 files are refused; a UTF-8 BOM is skipped."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        report.add(Problem(name, "1", None, "file is UTF-32 encoded; re-save it as UTF-8", "not_utf8"))
        return False, 0
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (len(head) >= 2 and b"\0" in head[:2]):
        report.add(Problem(name, "1", None, "file is UTF-16 encoded; re-save it as UTF-8 "
                           "(e.g. `iconv -f UTF-16 -t UTF-8 in > out`)", "not_utf8"))
        return False, 0
    if head.startswith(codecs.BOM_UTF8):
        report.add(Problem(name, "1", None, "file starts with a UTF-8 byte-order mark (BOM); it is ignored, "
                           "but some tools choke on it: save as UTF-8 without BOM", "bom", "warning"))
        return True, len(codecs.BOM_UTF8)
    return True, 0


def _bad_utf8(raw: bytes, name: str, line: int, err: UnicodeDecodeError) -> Problem:
    col = raw[: err.start].decode("utf-8", errors="replace")
    return Problem(name, str(line), None,
                   f"not valid UTF-8: byte 0x{raw[err.start]:02X} at column {len(col) + 1}; "
                   "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8`)", "not_utf8")


def _iter_text_lines(path: Path, report: Report, refused: list | None = None) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, decoded ok) for each line; undecodable lines are reported once here.
    A file refused for its encoding yields nothing and appends to `refused`."""
    name = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
        ok, skip = _check_encoding_head(head, name, report)
        if not ok:
            if refused is not None:
                refused.append(name)
            return
        f.seek(skip)
        for i, raw in enumerate(f, start=1):
            try:
                yield i, raw.decode("utf-8"), True
            except UnicodeDecodeError as e:
                report.add(_bad_utf8(raw, name, i, e))
                yield i, raw.decode("utf-8", errors="replace"), False


def iter_raw(path: Path, report: Report) -> Iterator[tuple[str, Any, list[Problem]]]:
    """(where, object, problems) for every raw row of one file. Problems here make the row unusable."""
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind == "jsonl":
        yield from _iter_jsonl(path, report)
    elif kind == "json":
        yield from _iter_json(path, report)
    elif kind in ("csv", "tsv"):
        yield from _iter_csv(path, report, "\t" if kind == "tsv" else ",")
    elif kind == "parquet":
        yield from _iter_parquet(path, report)
    elif kind == "txt":
        yield from _iter_txt(path, report)
    else:
        report.add(Problem(str(path), "", None, f"unsupported file type '{path.suffix}'; use one of "
                           f"{', '.join(sorted(EXTENSIONS))}", "unsupported_file"))


def _json_error(e: json.JSONDecodeError) -> str:
    return f"bad JSON: {e.msg} (column {e.colno})"


def _iter_jsonl(path: Path, report: Report) -> Iterator[tuple[str, Any, list[Problem]]]:
    name = str(path)
    any_line = False
    refused: list[str] = []
    for i, line, ok in _iter_text_lines(path, report, refused):
        if not line.strip():
            continue
        any_line = True
        if not ok:
            yield str(i), None, [Problem(name, str(i), None, "line dropped: not valid UTF-8", "not_utf8_dup")]
            continue
        try:
            yield str(i), json.loads(line), []
        except json.JSONDecodeError as e:
            yield str(i), None, [Problem(name, str(i), None, _json_error(e), "bad_json")]
    if not any_line and not refused:
        report.add(Problem(name, "", None, "file is empty (no records)", "empty_file"))


_WS = re.compile(r"[ \t\r\n]*")


def _iter_json_array(text: str, start: int, name: str) -> Iterator[tuple[str, Any, list[Problem]]]:
    """Elements of the JSON array opening at text[start] == '[', each with its line number."""
    dec = json.JSONDecoder()
    pos = _WS.match(text, start + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    line, counted = 1, 0  # line numbers counted incrementally (a large array stays linear)
    while pos < len(text):
        obj, end = dec.raw_decode(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        yield str(line), obj, []
        pos = _WS.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
            continue
        break


def _iter_json(path: Path, report: Report) -> Iterator[tuple[str, Any, list[Problem]]]:
    name = str(path)
    raw = path.read_bytes()
    ok, skip = _check_encoding_head(raw[:4], name, report)
    if not ok:
        return
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        # Report the line of every undecodable byte run (up to a few), then skip the file: a JSON
        # document cannot be parsed around broken bytes.
        body = raw[skip:]
        line = body.count(b"\n", 0, e.start) + 1
        raw_line = body.split(b"\n")[line - 1]
        err = UnicodeDecodeError("utf-8", raw_line, e.start - (body.rfind(b"\n", 0, e.start) + 1),
                                 e.end, e.reason)
        report.add(_bad_utf8(raw_line, name, line, err))
        report.add(Problem(name, "", None, "file skipped: a JSON file must be valid UTF-8 throughout",
                           "file_unreadable"))
        return
    if not text.strip():
        report.add(Problem(name, "", None, "file is empty", "empty_file"))
        return
    start = _WS.match(text).end()
    if text[start] == "[":
        # An array (the common case) is parsed element by element: one pass, line numbers for free.
        try:
            yield from _iter_json_array(text, start, name)
        except json.JSONDecodeError as e:
            report.add(Problem(name, str(e.lineno), None, f"{_json_error(e)}; records after this point are "
                               "not read until it is fixed", "bad_json"))
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:
            # One object per line in a .json file: read it as JSON Lines.
            report.add(Problem(name, "", None, "file holds one JSON object per line (JSON Lines); read as "
                               "JSONL: rename it to .jsonl to silence this", "jsonl_named_json", "warning"))
            yield from _iter_jsonl(path, Report())  # BOM/encoding already reported above
            return
        report.add(Problem(name, str(e.lineno), None, f"{_json_error(e)}; the whole file is unreadable "
                           "until this is fixed", "bad_json"))
        return
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v]
        if len(lists) > 1:
            report.add(Problem(name, "1", None, f"top-level object has several lists ({', '.join(map(repr, lists))}); "
                               "expected one list of records: split them into one file each", "no_records"))
            return
        if len(lists) == 1:
            key = lists[0]
            m = re.search('"' + re.escape(key) + r'"\s*:\s*\[', text)
            if m:
                yield from _iter_json_array(text, m.end() - 1, name)
            else:  # escaped key spelling: no line numbers, but still every item
                for i, obj in enumerate(doc[key]):
                    yield f"{key}[{i}]", obj, []
            return
        if any(k in doc for k in ("messages", "conversations", "instruction", "prompt", "text")):
            yield "1", doc, []  # a single record
            return
        found = ", ".join(repr(k) for k in doc) or "nothing"
        report.add(Problem(name, "1", None, f"top-level object has no list of records (keys: {found}); expected "
                           "an array of records or an object with one list of records", "no_records"))
        return
    report.add(Problem(name, "1", None, f"top-level JSON value is a {type(doc).__name__}; expected an array of "
                       "records", "no_records"))


def _iter_csv(path: Path, report: Report, delimiter: str) -> Iterator[tuple[str, Any, list[Problem]]]:
    name = str(path)
    bad_lines: set[int] = set()

    def lines() -> Iterator[str]:
        for i, line, ok in _iter_text_lines(path, report):
            if not ok:
                bad_lines.add(i)
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        report.add(Problem(name, "", None, "file is empty", "empty_file"))
        return
    except csv.Error as e:
        report.add(Problem(name, "1", None, f"bad CSV header: {e}", "bad_csv"))
        return
    header = [h.strip() for h in header]
    if not any(header):
        report.add(Problem(name, "1", None, "first line must be a header naming the columns", "bad_csv"))
        return
    prev = reader.line_num
    while True:
        first = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield str(first), None, [Problem(name, str(first), None, f"bad CSV: {e}", "bad_csv")]
            prev = reader.line_num
            continue
        last, prev = reader.line_num, reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        where = str(first)
        probs = []
        if bad_lines and any(n in bad_lines for n in range(first, last + 1)):
            probs.append(Problem(name, where, None, "row dropped: not valid UTF-8", "not_utf8_dup"))
        if len(row) != len(header):
            probs.append(Problem(name, where, None, f"row has {len(row)} fields but the header has {len(header)} "
                                 "(an unquoted comma or tab in a value?)", "bad_csv"))
        yield where, dict(zip(header, row, strict=False)), probs


def _iter_parquet(path: Path, report: Report) -> Iterator[tuple[str, Any, list[Problem]]]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        report.add(Problem(name, "", None, f"not a readable Parquet file: {e}", "bad_parquet"))
        return
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield f"row {row}", obj, []
    if row == 0:
        report.add(Problem(name, "", None, "file has no rows", "empty_file"))


def _iter_txt(path: Path, report: Report) -> Iterator[tuple[str, Any, list[Problem]]]:
    """Passages separated by blank lines, each a `text` record."""
    buf: list[str] = []
    start = 0
    bad = False
    name = str(path)

    def flush():
        probs = [Problem(name, str(start), None, "passage dropped: not valid UTF-8", "not_utf8_dup")] if bad else []
        return str(start), {"text": "".join(buf).strip()}, probs

    for i, line, ok in _iter_text_lines(path, report):
        if line.strip():
            if not buf:
                start, bad = i, False
            buf.append(line)
            bad = bad or not ok
        elif buf:
            yield flush()
            buf = []
    if buf:
        yield flush()
    elif start == 0 and path.stat().st_size == 0:
        report.add(Problem(name, "", None, "file is empty", "empty_file"))


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
            if split_prob:
                report.add(split_prob)
                report.drop(split_prob.kind)
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
            yield Record(rid, msgs, split, f"{name}:{where}"), exact, norm


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
