"""What a reviewer rates: the held-out questions with the two answers the eval recorded.

Base vs tuned: `runs/<run>/report/metrics.json`. Run vs run (`--against OTHER`): the report that
`ollama-ft eval RUN --against OTHER` wrote, `runs/<run>/report-vs-OTHER/metrics.json` (OTHER's tuned
model on the base side; that eval already checked both runs share the test split). Each per-example
row holds the question (else it is read from data/test.jsonl by id), the reference and both answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.runs import Run
from ..eval.human import BASE_COMPARISON, answers_digest, comparison_key


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
    report_dir: Path | None = None  # the eval report the answers come from


def _metrics(run: Run, report_dir: Path, how: str) -> dict[str, Any]:
    path = report_dir / "metrics.json"
    if not path.is_file():
        raise UserError(f"run {run.root.name} has no eval yet ({path} is missing): there are no answers to review",
                        hint=f"evaluate it first: `{how}`, then run this review again")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable eval result ({e})", hint=f"re-run the eval: `{how} --force`") from None
    rows = m.get("per_example") if isinstance(m, dict) else None
    if not rows or not all(isinstance(r, dict) and _text(r, "tuned") is not None for r in rows):
        raise UserError(f"{path} has no per-example answers (written by an older ollama-ft, or with no generations)",
                        hint=f"re-run the eval: `{how} --force`")
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
            try:
                rec = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                continue
            users = [m.get("content", "") for m in rec.get("messages") or [] if m.get("role") == "user"]
            if users:
                out[str(rec.get("id"))] = users[-1]
    return out


def load_comparison(run: Run, against: Run | None = None) -> Comparison:
    """The items of base vs tuned of `run`, or (`against`) of OTHER's tuned model vs `run`'s."""
    if against is not None and against.root.resolve() == run.root.resolve():
        raise UserError(f"--against {against.root} is the run itself",
                        hint="compare with another run, or leave --against out for base vs tuned")
    if against is None:
        report_dir, how = run.root / "report", f"ollama-ft eval {run.root}"
    else:
        report_dir, how = run.root / f"report-vs-{against.root.name}", f"ollama-ft eval {run.root} --against {against.root}"
    m = _metrics(run, report_dir, how)
    questions = {} if all(r.get("question") for r in m["per_example"]) else _questions(run)
    items = []
    for row in m["per_example"]:
        i = str(row.get("id"))
        q = row.get("question") or questions.get(i)
        if q is None:
            raise UserError(f"no question for test example {i!r} in {run.root / 'data' / 'test.jsonl'}",
                            hint=f"the data split changed after the eval; re-run `{how} --force`")
        items.append(Item(i, q, str(row.get("reference") or ""),
                          {"base": _text(row, "base") or "", "tuned": _text(row, "tuned") or ""}))
    sides = m.get("sides") or {}
    default = {"base": "base model" if against is None else f"tuned ({against.root.name})",
               "tuned": f"tuned ({run.root.name})"}
    labels = {k: str((sides.get(k) or {}).get("label") or default[k]) for k in ("base", "tuned")}
    key = BASE_COMPARISON if against is None else comparison_key(report_dir)
    return Comparison(key, run, ["base", "tuned"], labels, items, report_dir=report_dir)
