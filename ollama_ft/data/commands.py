"""The `ollama-ft data validate PATH` and `ollama-ft data inspect RUN` commands."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..core import ui
from ..core.config import BalanceSettings, NearDuplicateSettings
from ..core.errors import UserError
from . import balance
from .dedupe import Deduper
from .formats import FORMATS, Report, iter_records
from .render import common_prefix, load_tokenizer
from .summary import iso_time, print_findings
from .writer import IGNORE

SPLITS = ("train", "validation", "test")

def _check_format(fmt: str) -> str:
    if fmt not in ("auto", *FORMATS):
        import difflib

        close = difflib.get_close_matches(fmt, ["auto", *FORMATS], n=1)
        raise UserError(f"unknown data format '{fmt}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                        hint=f"formats: auto, {', '.join(FORMATS)}")
    return fmt


def validate_command(path: Path | str, format: str = "auto", show: int = 20,
                     near_duplicates: float | None = None) -> Report:
    """Check every record under `path`; print the first `show` problems and the totals, and the
    findings the data stage would act on (duplicates, near-duplicates, category balance, timestamps).

    Raises UserError (exit 1) when any record has a problem; warnings alone (a BOM, a skipped
    non-data file) do not fail.
    """
    fmt = _check_format(format)
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {path}", hint="give a file or directory (jsonl, json, csv, parquet, txt)")
    if near_duplicates is not None and not 0 < near_duplicates <= 1:
        raise UserError(f"--near-duplicates {near_duplicates}: a Jaccard similarity is in (0, 1]",
                        hint="e.g. --near-duplicates 0.85")
    report = Report(keep=max(show, 0) + 1)
    near = NearDuplicateSettings(threshold=near_duplicates, action="flag") if near_duplicates else None
    dedupe = Deduper(near)
    splits: Counter = Counter()
    cats: Counter = Counter()
    timed: list[float] = []
    with ui.status(f"reading {p}"):
        for rec, exact, norm in iter_records(p, fmt, report):
            dedupe.check(rec, exact, norm)
            if rec.split:
                splits[rec.split] += 1
            cats[rec.category or balance.NONE] += 1
            if rec.timestamp is not None:
                timed.append(rec.timestamp)
    dups = dedupe.counts
    rows = [["files", len(report.files)], ["records read", report.rows], ["valid records", report.records],
            ["format", ", ".join(f"{k} ({v})" for k, v in report.formats.items()) or "-"],
            ["duplicates (dropped by prepare)", f"{dups['exact']} exact, {dups['whitespace']} whitespace-only"],
            ["errors", report.errors], ["warnings", report.warnings]]
    if near:
        rows.append([f"near-duplicates (Jaccard >= {near.threshold})", dups["near"]])
    if timed:
        rows.append(["with a timestamp (data.split: time)", f"{len(timed)} of {report.records}, "
                     f"{iso_time(min(timed))} .. {iso_time(max(timed))}"])
    rows += [[f"would drop: {k}", v] for k, v in sorted(report.dropped.items())]
    if splits:
        rows.append(["pinned by 'split' field", ", ".join(f"{k} {v}" for k, v in splits.items())])
    ui.table(f"data validate: {p}", ["", ""], rows)
    findings = {"duplicates": dedupe.summary()}
    bal = balance.report(cats, BalanceSettings().tolerance)
    if bal:
        findings["balance"] = {**bal, "dropped_by_sampling": 0}
    print_findings(findings)
    shown = report.problems[:show]
    for prob in shown:
        colour = "red" if prob.severity == "error" else "yellow"
        ui.out.print(f"[{colour}]{prob.severity}[/] ", end="")
        ui.out.print(str(prob), markup=False, highlight=False, soft_wrap=True)
    total = report.errors + report.warnings
    if total > len(shown):
        ui.out.print(f"... and {total - len(shown)} more (--show {total} lists them all)", highlight=False)
    if report.errors:
        dropped = sum(report.dropped.values())
        first = next((prob for prob in report.problems if prob.severity == "error"), None)
        at = f"; first: {first.location()}: {first.message}" if first else ""
        raise UserError(f"{p}: {report.errors} problem(s); {dropped} of {report.rows} records would be dropped{at}",
                        hint="fix the places listed above; `data prepare` skips and counts such records")
    if report.records == 0:
        raise UserError(f"{p}: no records found", hint="give a file with records (jsonl, json, csv, parquet, txt)")
    ui.success(f"{report.records} valid records" + (f", {report.warnings} warning(s)" if report.warnings else ""))
    return report


def inspect_command(run: str, n: int = 3, split: str = "train") -> None:
    """Print `n` examples of a prepared split, trained tokens highlighted."""
    import pyarrow.parquet as pq
    from rich.text import Text

    from ..core.runs import Run

    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'", hint=f"splits: {', '.join(SPLITS)}")
    r = Run.open(run)
    data_dir, base_dir = r.root / "data", r.root / "base"
    pq_path = data_dir / f"{split}.parquet"
    if not pq_path.is_file():
        raise UserError(f"{r.root} has no prepared data ({pq_path} missing)",
                        hint="run `ollama-ft data prepare CONFIG` (or `ollama-ft train CONFIG --until data`)")
    stats_path = data_dir / "stats.json"
    if stats_path.is_file():
        try:
            print_findings(json.loads(stats_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError):
            ui.warn(f"{stats_path} is unreadable; re-run the data stage (--force data)")
    tok = load_tokenizer(base_dir)
    pf = pq.ParquetFile(pq_path)
    rows = []
    for b in pf.iter_batches(batch_size=max(n, 1)):
        rows.extend(b.to_pylist())
        if len(rows) >= n:
            break
    if not rows:
        ui.info(f"the {split} split is empty")
        return
    ui.out.print(Text.assemble(("trained tokens", "bold black on green"), "  ", ("context (not trained)", "dim")))
    for row in rows[:n]:
        ids, labels = row["input_ids"], row["labels"]
        text = Text()
        prev = ""
        # Decode growing prefixes: single-token decoding loses SentencePiece spaces and splits
        # multi-byte characters; a piece is what the next token adds to the decoded text.
        for i, lab in enumerate(labels):
            cur = tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
            k = common_prefix(prev, cur)
            if k < len(prev):
                text.right_crop(len(prev) - k)
            text.append(cur[k:], style="bold black on green" if lab != IGNORE else "dim")
            prev = cur
        trained = sum(1 for x in labels if x != IGNORE)
        ui.out.rule(f"{split} · id {row['id']} · {len(ids)} tokens, {trained} trained")
        ui.out.print(text, soft_wrap=True)
