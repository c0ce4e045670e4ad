"""Eval report: report.md + report.html (one self-contained page) + PNGs, and the terminal table.

The report is a list of sections (`SECTIONS`): each is a name and a function of a `ReportContext`
that returns markdown lines ([] to leave the section out). report.md is their concatenation and
report.html is rendered from the same markdown (eval/html_report.py), so a section added here shows
in both. To add one (e.g. the human review), write a builder and `add_section("name", builder,
after="example")`, or list it in SECTIONS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.runs import Run, atomic_write_bytes, atomic_write_text
from .lineage import lineage_text
from .plots import BAR_METRICS, drift_png, loss_curve_png, metric_bars_png  # noqa: F401  (re-exported)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _p(v: Any) -> str:
    if v is None:
        return "–"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v:.0%}"


def comparison_rows(m: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, c in m["comparisons"].items():
        t = c["test"]
        delta = "–" if t["mean_diff"] is None else f"{t['mean_diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"
        eff = f"dz {_fmt(t['cohens_dz'], 2)}, r {_fmt(t['rank_biserial'], 2)}"
        mark = " *" if key == m["primary_metric"] else ""
        test = "McNemar" if t.get("test_name") == "exact McNemar" else "Wilcoxon"
        rows.append([c["label"] + mark, _fmt(c["base"]), _fmt(c["tuned"]), delta, f"{_p(t.get('p'))} ({test})",
                     _p(t.get("p_permutation")), eff, c["verdict"]])
    return rows


COMPARISON_COLUMNS = ["metric", "base", "tuned", "tuned-base [95% CI]", "p (rank test)", "p (permutation)",
                      "effect", "verdict"]


def _sides(m: dict[str, Any]) -> tuple[str, str]:
    s = m.get("sides") or {}
    return (s.get("base", {}).get("label", "base"), s.get("tuned", {}).get("label", "tuned"))


def _drift_rows(m: dict[str, Any]) -> list[list[str]]:
    return [[d["stage"], _fmt(d["perplexity"]), _fmt(d.get("general_perplexity")), d["source"]]
            for d in m.get("drift") or []]


DRIFT_COLUMNS = ["stage", "validation perplexity", "general-text perplexity", "source"]


def print_table(m: dict[str, Any]) -> None:
    """Rich table of the comparison on stdout (through ui)."""
    a, b = _sides(m)
    ui.table(f"{a} vs {b} on {m['examples']} test examples (* = gate's primary metric)",
             COMPARISON_COLUMNS, comparison_rows(m))
    corpus_keys = ["facts_all", "fact_recall", "fact_contradiction", "perplexity", "bleu", "chrf", "distinct_1",
                   "distinct_2", "mean_answer_tokens", "stop_at_eot"]
    rows = [[k, _fmt(m["base"]["corpus"].get(k)), _fmt(m["tuned"]["corpus"].get(k))] for k in corpus_keys
            if k in m["base"]["corpus"] or k in m["tuned"]["corpus"]]
    rows.append(["tokens/s", _fmt(m["base"].get("tokens_per_second"), 1), _fmt(m["tuned"].get("tokens_per_second"), 1)])
    if m.get("general"):
        rows.append(["general-text perplexity", _fmt(m["general"]["base_perplexity"]),
                     _fmt(m["general"]["tuned_perplexity"])])
    ui.table("corpus-level", ["metric", a, b], rows)
    if m.get("drift"):
        ui.table("perplexity by stage", DRIFT_COLUMNS, _drift_rows(m))
    g = m["gate"]
    (ui.success if g["passed"] else ui.warn)(f"gate: {'passed' if g['passed'] else 'REFUSES'}: {g['reason']}")


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


md_table = _md_table  # public name for section builders in other modules


# ------------------------------------------------------------------------------------------
# Sections


@dataclass
class ReportContext:
    """What a section builder sees: the metrics, the run, the output directory and the PNGs written."""

    m: dict[str, Any]
    run: Run
    out: Path
    pngs: list[str] = field(default_factory=list)


def _title(c: ReportContext) -> list[str]:
    m = c.m
    a, b = _sides(m)
    cap = (f"the first {m['examples']} of {m['examples_available']} test examples (eval.max_examples: {m['cap']})"
           if m["examples"] < m["examples_available"] else f"all {m['examples']} test examples")
    g = m["gate"]
    lines = [f"# Evaluation of run `{m['run']}`" + (" against another run" if m.get("comparison") == "run vs run" else ""),
             "", f"{a} vs {b} on {cap}, via {m['via']}; {m['decoding']}, at most {m['max_new_tokens']} new tokens.",
             f"{a.capitalize()}: {m['base']['model']}. {b.capitalize()}: {m['tuned']['model']}.", ""]
    lin = _lineage_lines(m)
    if lin:
        lines += lin + [""]
    return lines + [f"**Gate: {'passed' if g['passed'] else 'REFUSES registration'}.** {g['reason']}", ""]


def _lineage_lines(m: dict[str, Any]) -> list[str]:
    sides = m.get("sides") or {}
    out = [f"- {s.get('label', k)}: {lineage_text(s['lineage'])}" for k, s in sides.items() if s.get("lineage")]
    return ["Lineage:", ""] + out if out else []


def _facts(c: ReportContext) -> list[str]:
    m = c.m
    cm = m["comparisons"]
    if "facts_all" not in cm:
        return []
    a, b = _sides(m)
    bc, tc = m["base"]["corpus"], m["tuned"]["corpus"]
    rows = [["answers stating all key facts", _pct(bc.get("facts_all")), _pct(tc.get("facts_all"))],
            ["key-fact recall (mean per answer)", _fmt(bc.get("fact_recall"), 2), _fmt(tc.get("fact_recall"), 2)],
            ["answers contradicting a key fact", _pct(bc.get("fact_contradiction")), _pct(tc.get("fact_contradiction"))]]
    t = cm["facts_all"]["test"]
    lines = ["## Key facts", "",
             f"Does the answer state the facts it must (key facts {m.get('facts_source', '')})? Times, dates, "
             "numbers and codes are compared after normalisation (7:40 = 07:40 = 7.40, \"two hours\" = \"2 hours\", "
             "LV 12 = LV-12); a *contradiction* is a different value in the same slot (another time, another "
             "number with the same unit or label).", "",
             _md_table(["", a, b], rows), "",
             f"All facts, paired: {b} minus {a} {t['mean_diff']:+.2f} [95% CI {t['ci_low']:+.2f}, {t['ci_high']:+.2f}], "
             f"exact McNemar p = {_p(t['p'])} ({cm['facts_all']['verdict']}).", ""]
    return lines


def _paired(c: ReportContext) -> list[str]:
    m = c.m
    a, b = _sides(m)
    return [f"## {a} vs {b} (paired, per example)", "",
            f"Differences are {b} minus {a}, with a seeded paired-bootstrap 95% CI (scipy.stats.bootstrap); "
            "p-values from the rank test (Wilcoxon signed-rank; exact McNemar for yes/no scores) and a sign-flip "
            "permutation test (scipy.stats.permutation_test); effect sizes Cohen's dz and the rank-biserial "
            "correlation r. A change is called significant when its CI excludes 0 and the rank test's p < 0.05. "
            f"The gate's primary metric (*) is `{m['primary_metric']}`.", "",
            _md_table(COMPARISON_COLUMNS, comparison_rows(m)), ""]


def _corpus(c: ReportContext) -> list[str]:
    m = c.m
    a, b = _sides(m)
    keys = sorted(set(m["base"]["corpus"]) | set(m["tuned"]["corpus"]))
    rows = [[k, _fmt(m["base"]["corpus"].get(k)), _fmt(m["tuned"]["corpus"].get(k))] for k in keys]
    rows.append(["tokens/s (generation)", _fmt(m["base"].get("tokens_per_second"), 1),
                 _fmt(m["tuned"].get("tokens_per_second"), 1)])
    lines = ["## Corpus-level", "", _md_table(["metric", a, b], rows), "",
             "BLEU and chrF here are corpus-level (sacrebleu); `hit_limit` is the share of answers that ran "
             "into the token limit instead of ending their turn (rambling); `stop_at_eot` is the rest.", ""]
    if "metrics.png" in c.pngs:
        lines += [f"![{a} vs {b}](metrics.png)", ""]
    return lines


def _general(c: ReportContext) -> list[str]:
    gen = c.m.get("general")
    lines = ["## Forgetting check (general-text perplexity)", ""]
    if not gen:
        return lines + ["Not measured (eval.general_data: none, or a side has no GGUF).", ""]
    a, b = _sides(c.m)
    t = gen["test"]
    limit = ("no limit (eval.max_general_ppl_increase: null)" if gen["max_increase"] is None
             else f"the gate allows at most {gen['max_increase']:+.0%}")
    return lines + [
        f"Perplexity of {gen['examples']} paragraphs of general prose ({gen['source']}, {gen['tokens']} tokens, "
        f"digest {gen['digest']}) under both models at {gen['quant']}: {a} {gen['base_perplexity']:.3f}, "
        f"{b} {gen['tuned_perplexity']:.3f} ({gen['increase']:+.1%}; {limit}: "
        f"{'passed' if gen['passed'] else 'REFUSED'}). Per paragraph NLL/token {b} minus {a}: "
        f"{t['mean_diff']:+.3f} [95% CI {t['ci_low']:+.3f}, {t['ci_high']:+.3f}], Wilcoxon p = {_p(t['p'])}.", ""]


def _drift(c: ReportContext) -> list[str]:
    m = c.m
    if m.get("comparison") == "run vs run":
        return []
    lines = ["## Drift by stage (validation answer-only perplexity; general text at the registered quant)", ""]
    if not m.get("drift"):
        return lines + ["Not measured (eval.drift: false, or no validation tokens).", ""]
    lines += [_md_table(DRIFT_COLUMNS, _drift_rows(m)), ""]
    if "drift.png" in c.pngs:
        lines += ["![drift by stage](drift.png)", ""]
    return lines


def _training(c: ReportContext) -> list[str]:
    return ["## Training", "", "![loss curves](loss_curve.png)", ""] if "loss_curve.png" in c.pngs else []


def _example(c: ReportContext) -> list[str]:
    ex = c.m.get("example") or {}
    if not ex:
        return []
    a, b = _sides(c.m)
    lines = ["## One held-out question", "", f"Picked by a fixed rule: {ex.get('rule', 'the first test example')}.", "",
             f"**Question:** {ex['question']}", "", f"**Reference:** {ex['reference']}", ""]
    if ex.get("facts"):
        lines += [f"**Key facts:** {', '.join(ex['facts'])}", ""]
    return lines + [f"**{a.capitalize()}:** {ex['base']}", "", f"**{b.capitalize()}:** {ex['tuned']}", ""]


def _human_review(c: ReportContext) -> list[str]:
    # Human review (eval/human.py; issue 16): only when runs/<run>/review/ holds complete ratings.
    from .human import report_section

    return report_section(c.run.root, c.m, c.out, _md_table)


def _footer(c: ReportContext) -> list[str]:
    return ["Every example, with both answers and per-example scores, is in `metrics.json` (`per_example`).", ""]


Builder = Callable[[ReportContext], list[str]]
SECTIONS: list[tuple[str, Builder]] = [
    ("title", _title), ("facts", _facts), ("paired", _paired), ("corpus", _corpus), ("general", _general),
    ("drift", _drift), ("training", _training), ("example", _example), ("human_review", _human_review),
    ("footer", _footer),
]


def add_section(name: str, builder: Builder, after: str | None = None) -> None:
    """Insert (or replace) a section; `after` names the section it follows (default: before the footer)."""
    names = [n for n, _ in SECTIONS]
    if name in names:
        SECTIONS[names.index(name)] = (name, builder)
        return
    at = names.index(after) + 1 if after in names else names.index("footer")
    SECTIONS.insert(at, (name, builder))


def render_markdown(c: ReportContext) -> str:
    lines: list[str] = []
    for _, build in SECTIONS:
        lines += build(c)
    return "\n".join(lines)


def write_report(m: dict[str, Any], run: Run, out: Path) -> list[str]:
    """report.md, report.html and the PNGs in out; returns the PNG names written."""
    from .html_report import write_html

    out = Path(out)
    pngs = []
    for name, png in (("loss_curve.png", loss_curve_png(run.root / "adapter" / "metrics.jsonl")),
                      ("metrics.png", metric_bars_png(m)), ("drift.png", drift_png(m.get("drift") or []))):
        if png:
            atomic_write_bytes(out / name, png)
            pngs.append(name)
    md = render_markdown(ReportContext(m, run, out, pngs))
    atomic_write_text(out / "report.md", md)
    write_html(md, out, title=f"Evaluation of run {m['run']}")
    return pngs
