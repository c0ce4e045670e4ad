"""What a reviewer rates: the held-out questions with the two answers the eval stage recorded.

Answers come from `runs/<run>/report/metrics.json` (`per_example[i].base/tuned.text`, written by the
eval stage); the question from the record of the same id in `runs/<run>/data/test.jsonl` (or the
per-example `question` when the eval writes one). Base vs tuned of one run, or with `--against`
this run's tuned model vs another run's, on the same test examples (checked by a content hash).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.runs import Run
from ..eval.human import BASE_COMPARISON, answers_digest


@dataclass
class Item:
    id: str
    question: str
    reference: str
    answers: dict[str, str]  # side -> answer text

    @property
    def digest(self) -> str:
        return answers_digest(self.answers)


@dataclass
class Comparison:
    key: str  # directory name under runs/<run>/review/
    run: Run
    sides: list[str]  # [reference, candidate]
    labels: dict[str, str]
    items: list[Item]
    other_run: Path | None = None
    split_digest: str = ""
    notes: list[str] = field(default_factory=list)


def _metrics(run: Run) -> dict[str, Any]:
    path = run.root / "report" / "metrics.json"
    if not path.is_file():
        raise UserError(f"run {run.root.name} has no eval yet ({path} is missing): there are no answers to review",
                        hint=f"evaluate it first: `ollama-ft eval {run.root}`, then `ollama-ft review {run.root}`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable eval result ({e})",
                        hint=f"re-run the eval: `ollama-ft eval {run.root} --force`") from None
    rows = m.get("per_example") if isinstance(m, dict) else None
    if not rows or not all(isinstance(r, dict) and _text(r, "tuned") is not None for r in rows):
        raise UserError(f"{path} has no per-example answers (written by an older ollama-ft, or with no generations)",
                        hint=f"re-run the eval: `ollama-ft eval {run.root} --force`")
    return m


def _text(row: dict[str, Any], side: str) -> str | None:
    g = row.get(side)
    return g.get("text") if isinstance(g, dict) else g if isinstance(g, str) else None


def _questions(run: Run) -> dict[str, str]:
    """id -> the last user message of each test record (the question the model answered)."""
    path = run.root / "data" / "test.jsonl"
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            users = [m.get("content", "") for m in rec.get("messages") or [] if m.get("role") == "user"]
            if users:
                out[str(rec.get("id"))] = users[-1]
    return out


def _rows(run: Run) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(id, question, reference, per_example row) for every evaluated example of a run."""
    m = _metrics(run)
    questions = _questions(run)
    out = []
    for row in m["per_example"]:
        i = str(row.get("id"))
        q = row.get("question") or questions.get(i)
        if q is None:
            raise UserError(f"no question for test example {i!r} in {run.root / 'data' / 'test.jsonl'}",
                            hint=f"the data split changed after the eval; re-run `ollama-ft eval {run.root} --force`")
        out.append((i, q, str(row.get("reference") or ""), row))
    return out


def _split_digest(rows: list[tuple[str, str, str, dict[str, Any]]]) -> str:
    h = hashlib.sha256(json.dumps([r[:3] for r in rows], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def load_comparison(run: Run, against: Run | None = None) -> Comparison:
    """The items of base vs tuned of `run`, or of `against`'s tuned model vs `run`'s."""
    rows = _rows(run)
    if against is None:
        items = [Item(i, q, ref, {"base": _text(r, "base") or "", "tuned": _text(r, "tuned") or ""})
                 for i, q, ref, r in rows]
        labels = {"base": "base model", "tuned": f"tuned ({run.root.name})"}
        return Comparison(BASE_COMPARISON, run, ["base", "tuned"], labels, items, split_digest=_split_digest(rows))
    if against.root.resolve() == run.root.resolve():
        raise UserError(f"--against {against.root} is the run itself",
                        hint="compare with another run, or leave --against out for base vs tuned")
    other_rows = _rows(against)
    if _split_digest(rows) != _split_digest(other_rows):
        mine, theirs = {r[0] for r in rows}, {r[0] for r in other_rows}
        raise UserError(f"{run.root.name} and {against.root.name} were evaluated on different test examples "
                        f"({len(mine & theirs)} shared ids of {len(mine)} and {len(theirs)}, or different "
                        "questions/references)",
                        hint="give both runs the same data and data.split/seed and the same eval.max_examples, "
                             "then re-run `ollama-ft eval` on the one that differs")
    other = {r[0]: r[3] for r in other_rows}
    # Side names are the run names; "other" is the reference, this run's tuned model the candidate.
    ref, cand = f"run:{against.root.name}", f"run:{run.root.name}"
    if ref == cand:
        ref = f"run:{against.root.resolve()}"
    items = [Item(i, q, refr, {ref: _text(other[i], "tuned") or "", cand: _text(r, "tuned") or ""})
             for i, q, refr, r in rows]
    labels = {ref: f"tuned ({against.root.name})", cand: f"tuned ({run.root.name})"}
    return Comparison(f"vs-{against.root.name}", run, [ref, cand], labels, items,
                      other_run=against.root.resolve(), split_digest=_split_digest(rows))
