"""Key-fact accuracy: did the answer state the facts of the reference, or contradict them?

A test example may carry its facts (`"facts": ["7:40", "18:20"]` in the data file); otherwise they are
derived from the reference answer: times, dates, numbers, codes (Room 14C, Form LV-12) and proper
names. Both sides are normalised before comparing, so 7:40 = 07:40 = 7.40 = 7:40 am, 6:20 pm =
18:20, "two hours" = "2 hours" (number words through text2num), "LV 12" = "LV-12", 0100 555 2740 =
0100-555-2740.

A fact is *contradicted* when the answer does not state it but states a different value in the
same slot: another time, another date, or another number with the same unit or label ("within 25
minutes" for "within 20 minutes", "Room 10A" for "Room 14C").
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import normalise

NUMERIC_KINDS = ("time", "date", "number")

# Words that give a number its slot: units after it, labels before it (singular, lower case).
_UNITS = {
    "minute": "minute", "minutes": "minute", "min": "minute", "mins": "minute",
    "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour", "h": "hour",
    "second": "second", "seconds": "second", "sec": "second", "day": "day", "days": "day",
    "week": "week", "weeks": "week", "month": "month", "months": "month", "year": "year", "years": "year",
    "ml": "ml", "mg": "mg", "g": "g", "kg": "kg", "mm": "mm", "cm": "cm", "m": "m", "km": "km",
    "percent": "%", "%": "%", "euro": "eur", "euros": "eur", "eur": "eur", "€": "eur", "dollar": "usd",
    "dollars": "usd", "usd": "usd", "$": "usd", "pound": "gbp", "pounds": "gbp", "£": "gbp",
    "people": "person", "persons": "person", "patients": "person", "tablet": "tablet", "tablets": "tablet",
    "dose": "dose", "doses": "dose", "time": "times", "times": "times",
}
_LABELS = {
    "room", "bay", "extension", "ext", "form", "floor", "level", "protocol", "code", "line", "drawer",
    "pager", "desk", "gate", "step", "page", "number", "no", "ward", "bed", "building", "door", "cabinet",
    "table", "version", "channel", "platform", "seat", "box", "locker", "row", "lane", "route", "bus",
}
_MONTHS = {m: i for i, m in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"], 1)}
_MONTHS.update({k[:3]: v for k, v in list(_MONTHS.items())})
_MONTHS["sept"] = 9
# Capitalised words that start sentences without being names.
_NOT_NAMES = {
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "i", "we", "you", "they", "he", "she",
    "if", "when", "on", "in", "at", "for", "to", "from", "and", "but", "or", "so", "only", "every", "each",
    "all", "no", "yes", "not", "please", "there", "here", "after", "before", "then", "also", "new", "our",
    "your", "my", "their", "his", "her", "as", "by", "with", "of", "is", "are", "be", "do", "does", "can",
    "may", "must", "should", "will", "what", "which", "who", "how", "why", "where", "hi", "hello", "thanks",
    # imperatives that open instructions ("Ask Dr. Thale", "Call the Heron Line")
    "ask", "call", "bring", "press", "see", "go", "use", "take", "fill", "sign", "write", "contact", "visit",
    "page", "tell", "check", "wait", "come", "keep", "send", "email", "phone", "ring", "try", "note",
}

_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_TIME = re.compile(r"(?<![\d.:])(\d{1,2})(?:[:.h](\d{2}))?\s*(a\.?\s?m\.?|p\.?\s?m\.?)?(?![\d:])", re.I)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_DAY_MONTH = re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH_RE})\.?(?:,?\s+(\d{{4}}))?\b", re.I)
_MONTH_DAY = re.compile(rf"\b({_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}}))?", re.I)
_PHONE = re.compile(r"(?<![\w-])\+?\d{2,5}(?:[ \-./]\d{2,5}){1,4}(?![\w-])")
_CODE = re.compile(r"(?<![\w-])([A-Z]{1,4}[- ]?)?(\d+)([A-Za-z]?)(?![\w-])")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w])")
_WORD = re.compile(r"[\w'’.-]+|\S")


@dataclass(frozen=True)
class Fact:
    """One key fact: `kind` (time | date | number | name | phrase), its normalised `value`, the
    `slot` that a different value would contradict (unit or label; None = unknown), the `text` as written."""

    kind: str
    value: str
    slot: str | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "slot": self.slot, "text": self.text}


@functools.lru_cache(maxsize=4096)
def _digits(text: str) -> str:
    """NFKC text with English number words as digits ("two hours" -> "2 hours"), via text2num."""
    from text_to_num import alpha2digit

    text = unicodedata.normalize("NFKC", text)
    # "ten-minute", "twenty-one": text2num reads number words separated by spaces
    spaced = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text, flags=re.I)
    try:
        return alpha2digit(spaced, "en", threshold=0)
    except Exception:  # text2num rejects a few odd inputs; the digits already there still count
        return spaced


def _slot_around(text: str, start: int, end: int) -> str | None:
    """The unit right after a number, else the label right before it."""
    # the unit may follow one adjective: "5 working days", "3 full hours"
    after = re.match(r"\s*([%€$£]|[^\W\d_]+)(?:\s+([^\W\d_]+))?", text[end:])
    if after:
        for w in after.groups():
            if w and w.lower() in _UNITS:
                return _UNITS[w.lower()]
    before = re.search(r"([^\W\d_]+)\.?\s*[#:]?\s*$", text[:start])
    if before and before.group(1).lower() in _LABELS:
        w = before.group(1).lower()
        return "extension" if w == "ext" else w
    return None


def _times(text: str, taken: list[tuple[int, int]], out: list[Fact]) -> None:
    for m in _TIME.finditer(text):
        h, mins, ampm = int(m.group(1)), m.group(2), (m.group(3) or "").replace(".", "").replace(" ", "").lower()
        if mins is None and not ampm:
            continue  # a bare number, not a time
        sep = text[m.end(1):m.end(1) + 1] if mins is not None else ""
        if sep == "." and not ampm and _slot_around(text, m.start(), m.end()) is not None:
            continue  # "2.50 euros" is an amount, not 2:50
        mm = int(mins or 0)
        if mm >= 60 or h > 24 or (ampm and not 1 <= h <= 12):
            continue
        if ampm == "pm" and h != 12:
            h += 12
        elif ampm == "am" and h == 12:
            h = 0
        out.append(Fact("time", f"{h:02d}:{mm:02d}", "time", m.group(0).strip()))
        taken.append((m.start(), m.end()))


def _dates(text: str, taken: list[tuple[int, int]], out: list[Fact]) -> None:
    found = []
    for m in _ISO_DATE.finditer(text):
        found.append((m, m.group(1), int(m.group(2)), int(m.group(3))))
    for m in _DAY_MONTH.finditer(text):
        found.append((m, m.group(3), _MONTHS[m.group(2).lower()], int(m.group(1))))
    for m in _MONTH_DAY.finditer(text):
        found.append((m, m.group(3), _MONTHS[m.group(1).lower()], int(m.group(2))))
    for m, year, month, day in found:
        if not 1 <= day <= 31 or _overlaps(m.start(), m.end(), taken):
            continue
        value = f"{year}-{month:02d}-{day:02d}" if year else f"{month:02d}-{day:02d}"
        out.append(Fact("date", value, "date", m.group(0).strip()))
        taken.append((m.start(), m.end()))


def _numbers(text: str, taken: list[tuple[int, int]], out: list[Fact]) -> None:
    for m in _PHONE.finditer(text):  # phone-like digit groups are one number
        if _overlaps(m.start(), m.end(), taken) or sum(c.isdigit() for c in m.group(0)) < 7:
            continue
        out.append(Fact("number", re.sub(r"\D", "", m.group(0)), _slot_around(text, m.start(), m.end()),
                        m.group(0)))
        taken.append((m.start(), m.end()))
    for m in _CODE.finditer(text):  # letters + digits: Room 14C, Form LV-12, level P2
        prefix, num, suffix = (m.group(1) or "").rstrip("- "), m.group(2), m.group(3)
        if not (prefix or suffix) or _overlaps(m.start(), m.end(), taken):
            continue
        if suffix and suffix.lower() in _UNITS:
            continue  # "5h", "3g": a quantity
        out.append(Fact("number", f"{prefix}{num}{suffix}".upper(), _slot_around(text, m.start(), m.end()),
                        m.group(0)))
        taken.append((m.start(), m.end()))
    for m in _NUMBER.finditer(text):
        if _overlaps(m.start(), m.end(), taken):
            continue
        whole = m.group(1).replace(",", "")
        value = str(int(whole)) + (f".{m.group(2).rstrip('0')}" if m.group(2) and m.group(2).rstrip("0") else "")
        out.append(Fact("number", value, _slot_around(text, m.start(), m.end()), m.group(0)))
        taken.append((m.start(), m.end()))


def _names(text: str, out: list[Fact]) -> None:
    """Runs of capitalised words (Heron Line, Dr. Imogen Thale), not a lone sentence-initial word."""
    runs: list[tuple[list[str], bool]] = []  # (words, started a sentence)
    run: list[str] = []
    initial = run_initial = True
    for m in _WORD.finditer(text):
        tok = m.group(0)
        if tok[:1].isalpha() and tok[:1].isupper() and not any(c.isdigit() for c in tok):
            if not run:
                run_initial = initial
            run.append(tok.rstrip("'’."))
            if tok.endswith(".") and len(tok) > 4:  # "Room." ends the sentence; "Dr." does not
                runs.append((run, run_initial))
                run = []
        elif run:
            runs.append((run, run_initial))
            run = []
        initial = tok in (".", "!", "?", ":", ";") or (tok.endswith(".") and len(tok) > 3)
    if run:
        runs.append((run, run_initial))
    for words, at_start in runs:
        if at_start:
            while words and words[0].lower() in _NOT_NAMES:
                words = words[1:]
            if len(words) < 2:
                continue  # "Violet is ...", "Blood draws ...": a capital only because it starts the sentence
        phrase = " ".join(words).strip(".")
        if len(words) == 1 and (words[0].lower() in _LABELS or words[0].lower().strip(".") in _MONTHS):
            continue  # "Room" of "Room 14C" is the number's label; "March" belongs to its date
        if phrase and phrase.lower() not in _NOT_NAMES:
            out.append(Fact("name", normalise(phrase), None, phrase))


def _overlaps(a: int, b: int, spans: Iterable[tuple[int, int]]) -> bool:
    return any(a < e and s < b for s, e in spans)


def extract(text: str, names: bool = True) -> list[Fact]:
    """The facts of one text, in kind order: times, dates, numbers, then names."""
    t = _digits(text)
    taken: list[tuple[int, int]] = []
    out: list[Fact] = []
    _times(t, taken, out)
    _dates(t, taken, out)
    _numbers(t, taken, out)
    if names:
        _names(t, out)
    seen, uniq = set(), []
    for f in out:
        if (f.kind, f.value, f.slot) not in seen:
            seen.add((f.kind, f.value, f.slot))
            uniq.append(f)
    return uniq


def facts_for(reference: str, given: Sequence[str] | None = None) -> list[Fact]:
    """The key facts of one example: the given strings (parsed; a slot is taken from the reference
    when the string alone has none), else everything `extract` finds in the reference."""
    if not given:
        return extract(reference)
    ref_facts = extract(reference, names=False)
    out = []
    for s in given:
        numeric = [f for f in extract(str(s), names=False) if f.kind in NUMERIC_KINDS]
        if len(numeric) == 1:
            f = numeric[0]
            if f.slot is None:
                f = next((r for r in ref_facts if r.kind == f.kind and r.value == f.value), f)
            out.append(Fact(f.kind, f.value, f.slot, str(s)))
        else:
            out.append(Fact("phrase", normalise(_digits(str(s))), None, str(s)))
    return out


def _states(f: Fact, answer_facts: list[Fact], answer_norm: str) -> bool:
    if f.kind in NUMERIC_KINDS:
        return any(a.kind == f.kind and a.value == f.value and (a.slot == f.slot or None in (a.slot, f.slot))
                   for a in answer_facts)
    return bool(f.value) and f" {f.value} " in f" {answer_norm} "


def score_answer(answer: str, facts: Sequence[Fact]) -> dict[str, Any]:
    """Per-example fact scores: recall (share stated), all stated, any contradicted, and which."""
    if not facts:
        return {"recall": None, "all": None, "contradiction": None, "missing": [], "contradicted": []}
    found = extract(answer, names=False)
    norm = normalise(_digits(answer))
    stated = [_states(f, found, norm) for f in facts]
    ref_values = {(f.kind, f.value) for f in facts}
    contradicted = []
    for f, ok in zip(facts, stated, strict=True):
        if ok or f.kind not in NUMERIC_KINDS or f.slot is None:
            continue
        other = [a for a in found if a.kind == f.kind and a.slot == f.slot and (a.kind, a.value) not in ref_values]
        if other:
            contradicted.append({"fact": f.text, "answer_says": other[0].text})
    return {"recall": sum(stated) / len(facts), "all": float(all(stated)), "contradiction": float(bool(contradicted)),
            "missing": [f.text for f, ok in zip(facts, stated, strict=True) if not ok], "contradicted": contradicted}


def score_all(answers: Sequence[str], facts: Sequence[Sequence[Fact]]) -> dict[str, list[Any]]:
    """Per-example lists for one model: fact_recall, facts_all, fact_contradiction (None = no facts)."""
    scored = [score_answer(a, f) for a, f in zip(answers, facts, strict=True)]
    return {"fact_recall": [s["recall"] for s in scored], "facts_all": [s["all"] for s in scored],
            "fact_contradiction": [s["contradiction"] for s in scored],
            "fact_missing": [s["missing"] for s in scored], "fact_contradicted": [s["contradicted"] for s in scored]}


def median_example(recall: Sequence[float | None]) -> int | None:
    """The showcase rule: the example whose tuned fact recall is the median (lower median, first such
    example in test order); None when no example has facts."""
    scored = sorted((r, i) for i, r in enumerate(recall) if r is not None)
    if not scored:
        return None
    return scored[(len(scored) - 1) // 2][1]


def given_facts(paths: Iterable[Path]) -> dict[str, list[str]]:
    """Facts that the data files carry (`"facts": [...]` on a JSON Lines / JSON record), by record id
    and by reference answer text: for runs whose data stage predates writing "facts" into test.jsonl
    (it does now, for every input format)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            for rec in _json_records(f):
                facts = rec.get("facts")
                if not (isinstance(facts, list) and facts and all(isinstance(x, (str, int, float)) for x in facts)):
                    continue
                strs = [str(x) for x in facts]
                if rec.get("id") is not None:
                    out[f"id:{rec['id']}"] = strs
                msgs = rec.get("messages")
                if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
                    out.setdefault(f"ref:{msgs[-1].get('content')}", strs)
    return out


def _json_records(f: Path) -> Iterable[dict[str, Any]]:
    if f.suffix.lower() in (".jsonl", ".ndjson"):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the data stage reports bad lines with file:line; here they just carry no facts
                if isinstance(rec, dict):
                    yield rec
    elif f.suffix.lower() == ".json":
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        if isinstance(doc, dict):
            doc = next((v for v in doc.values() if isinstance(v, list)), [])
        yield from (r for r in doc if isinstance(r, dict)) if isinstance(doc, list) else ()


def example_facts(records: Sequence[dict[str, Any]], given: dict[str, list[str]]) -> tuple[list[list[Fact]], str]:
    """The key facts of each test record and where they came from ("data file", "derived", or both)."""
    out, sources = [], set()
    # The data stage writes a record's own (validated) "facts" into test.jsonl; `given`, read from the
    # source files, stands in only for runs whose data stage is older than that (no record has the key).
    use_given = not any("facts" in rec for rec in records)
    for rec in records:
        ref = rec["messages"][-1]["content"]
        strs = rec.get("facts")
        if not strs and use_given:
            strs = given.get(f"id:{rec.get('id')}") or given.get(f"ref:{ref}")
        sources.add("the data file's \"facts\"" if strs else "derived from the reference")
        out.append(facts_for(ref, strs))
    return out, " and ".join(sorted(sources)) or "none"
