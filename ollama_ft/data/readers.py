"""Reading data files of every type, with every problem located (file:line or row).

Files: JSON Lines (.jsonl, .ndjson), JSON (.json: an array, or an object holding one list of
records), CSV/TSV, Parquet, plain text (.txt: blank-line separated passages), or a directory of
them. `iter_raw` yields the raw rows of one file; `formats.py` turns them into records. Reading
streams (one line/row at a time, except .json files) and never stops at the first problem: each
problem is a `Problem` with file, line (or row), field and a short `kind`, collected in a `Report`
that also counts every record dropped, by reason.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "txt"}

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
