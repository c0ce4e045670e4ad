"""One reviewer's ratings: blind A/B order, validation, atomic save after every change, resume, CSV.

The file is `runs/<run>/review/<comparison>/<reviewer>.json` (format in eval/human.py), rewritten
whole with an atomic replace after every rating, so a killed server loses nothing that was
acknowledged and never leaves half a file. Each reviewer has a file of their own.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.runs import atomic_write_text
from ..eval.human import CRITERIA, FORMAT, comparison_dir, is_complete
from .items import Comparison, Item

REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
PREFERENCES = ("a", "b", "tie")


def check_reviewer(name: str) -> str:
    if not REVIEWER_RE.match(name or ""):
        raise UserError(f"reviewer name {name!r} is not usable as a file name",
                        hint="use letters, digits, '.', '_' or '-' (up to 40), e.g. --reviewer alice")
    return name


def blind_order(seed: int, reviewer: str, item_id: str, sides: list[str]) -> tuple[str, str]:
    """(side shown as A, side shown as B): a coin flip seeded by (seed, reviewer, item), stable on reload."""
    h = int.from_bytes(hashlib.sha256(f"{seed}|{reviewer}|{item_id}".encode()).digest()[:8], "big")
    return (sides[0], sides[1]) if h % 2 == 0 else (sides[1], sides[0])


def item_order(seed: int, reviewer: str, items: list[Item]) -> list[Item]:
    """Items in an order of the reviewer's own (seeded), so reviewers do not all tire on the same ones."""
    order = list(items)
    random.Random(f"{seed}|{reviewer}|order").shuffle(order)
    return order


class ReviewStore:
    """The ratings of one reviewer on one comparison."""

    def __init__(self, comparison: Comparison, reviewer: str, seed: int = 0):
        self.comparison = comparison
        self.reviewer = check_reviewer(reviewer)
        self.seed = seed
        self.path = comparison_dir(comparison.run.root, comparison.key) / f"{reviewer}.json"
        self.items = item_order(seed, reviewer, comparison.items)
        self.doc = self._load()
        self.stale = 0
        for it in self.items:  # answers changed since they were rated (eval re-run): rate them again
            r = self.doc["items"].get(it.id)
            if r is not None and r.get("digest") != it.digest:
                self.stale += 1  # kept aside in the file (not deleted), out of the statistics
                self.doc.setdefault("stale_items", {})[it.id] = self.doc["items"].pop(it.id)

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"format": FORMAT, "run": self.comparison.run.root.name, "comparison": self.comparison.key,
                    "reviewer": self.reviewer, "sides": self.comparison.sides, "labels": self.comparison.labels,
                    "report": str(self.comparison.report_dir), "seed": self.seed, "criteria": list(CRITERIA),
                    "items": {}}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path}: ratings file is not valid JSON ({e})",
                            hint="restore it from a backup, or move it away to start this reviewer afresh") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("items"), dict):
            raise UserError(f"{self.path}: not an ollama-ft ratings file (format {FORMAT})",
                            hint="move it away, or pick another --reviewer name")
        return doc

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One server per reviewer file: a second one would overwrite the first's ratings with its own copy.

        An flock on a lock file beside it; the kernel drops it when the process dies, even by kill -9.
        """
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.reviewer}.lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise UserError(f"reviewer {self.reviewer} already has a review page open for this run "
                                f"({f.read().strip() or 'another process'})",
                                hint="use the URL that one printed, stop it (Ctrl-C), or pick another --reviewer") from None
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            yield

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n")

    # -- what the page sees: A/B only, never the sides ---------------------------------------
    def _ab(self, it: Item) -> tuple[str, str]:
        r = self.doc["items"].get(it.id)
        if r is not None:  # the order the reviewer saw when rating wins over a re-computed one
            return r["a"], r["b"]
        return blind_order(self.seed, self.reviewer, it.id, self.comparison.sides)

    def page_state(self) -> dict[str, Any]:
        out = []
        for n, it in enumerate(self.items):
            a, b = self._ab(it)
            r = self.doc["items"].get(it.id) or {}
            out.append({"n": n, "question": it.question, "reference": it.reference,
                        "a": it.answers[a], "b": it.answers[b],
                        "scores": r.get("scores") or {"a": {}, "b": {}}, "preference": r.get("preference"),
                        "complete": bool(r) and is_complete(r)})
        first_open = next((x["n"] for x in out if not x["complete"]), max(0, len(out) - 1))
        return {"reviewer": self.reviewer, "criteria": list(CRITERIA), "items": out, "start": first_open,
                "done": sum(x["complete"] for x in out), "stale": self.stale,
                "report_command": self.report_command}

    @property
    def report_command(self) -> str:
        """What to type to see the unblinded results of this comparison."""
        c = self.comparison
        other = f" --against {c.run.root.parent / c.key[3:]}" if c.key.startswith("vs-") else ""
        return f"ollama-ft review {c.run.root}{other} --report"

    def rate(self, n: Any, scores: Any, preference: Any) -> dict[str, Any]:
        """Validate and save the rating of item number `n` (partial ratings are kept too)."""
        if not isinstance(n, int) or not 0 <= n < len(self.items):
            raise ValueError(f"item must be 0..{len(self.items) - 1}")
        clean: dict[str, dict[str, int]] = {"a": {}, "b": {}}
        for x in ("a", "b"):
            for c, v in ((scores or {}).get(x) or {}).items():
                if c not in CRITERIA:
                    raise ValueError(f"unknown criterion {c!r}")
                if v is not None:
                    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 5:
                        raise ValueError(f"{c} must be a whole number 1-5, got {v!r}")
                    clean[x][c] = v
        if preference is not None and preference not in PREFERENCES:
            raise ValueError("preference must be a, b or tie")
        it = self.items[n]
        a, b = self._ab(it)
        rec = {"a": a, "b": b, "digest": it.digest, "scores": clean, "preference": preference,
               "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.doc["items"][it.id] = rec
        self.save()
        done = sum(1 for i in self.items if is_complete(self.doc["items"].get(i.id) or {}))
        return {"saved": True, "complete": is_complete(rec), "done": done, "updated": rec["updated"]}

    # -- CSV ----------------------------------------------------------------------------------
    def csv_blinded(self) -> str:
        """This reviewer's ratings as the page showed them (A/B, no sides): the page's download."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["reviewer", "position", "item", "question"]
                   + [f"{x}_{c}" for x in ("A", "B") for c in CRITERIA] + ["preference", "complete", "updated"])
        for n, it in enumerate(self.items):
            r = self.doc["items"].get(it.id)
            if not r:
                continue
            sc = r.get("scores") or {}
            w.writerow([self.reviewer, n + 1, it.id, it.question]
                       + [(sc.get(x) or {}).get(c, "") for x in ("a", "b") for c in CRITERIA]
                       + [{"a": "A", "b": "B", "tie": "tie"}.get(r.get("preference"), ""),
                          "yes" if is_complete(r) else "no", r.get("updated", "")])
        return buf.getvalue()


def csv_unblinded(comparison: Comparison) -> str:
    """Every reviewer's ratings of a comparison with the sides named (for analysis after the review)."""
    ref, cand = comparison.sides
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["reviewer", "item", "question", "shown_as_A", "shown_as_B"]
               + [f"{c}_{s}" for s in (ref, cand) for c in CRITERIA] + ["preferred", "complete", "updated"])
    qs = {it.id: it.question for it in comparison.items}
    for path in sorted(comparison_dir(comparison.run.root, comparison.key).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            continue
        for item, r in sorted((doc.get("items") or {}).items()):
            side = {"a": r.get("a"), "b": r.get("b")}
            by_side = {side[x]: (r.get("scores") or {}).get(x) or {} for x in ("a", "b")}
            pref = r.get("preference")
            w.writerow([doc.get("reviewer"), item, qs.get(item, ""), side["a"], side["b"]]
                       + [by_side.get(s, {}).get(c, "") for s in (ref, cand) for c in CRITERIA]
                       + ["tie" if pref == "tie" else side.get(pref, "") if pref else "",
                          "yes" if is_complete(r) else "no", r.get("updated", "")])
    return buf.getvalue()


def write_csv(path: Path, text: str) -> None:
    atomic_write_text(Path(path), text)
