"""Eval report: report.md, PNG plots (loss curves, base vs tuned bars, drift by stage) and the terminal table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.runs import Run, atomic_write_bytes, atomic_write_text

# Metrics on a 0..1 (or 0..100) scale shown side by side in metrics.png: key -> (label, scale)
BAR_METRICS = {"rouge_l": ("ROUGE-L", 1.0), "bleu": ("BLEU/100", 100.0), "chrf": ("chrF/100", 100.0),
               "exact": ("exact", 1.0), "contains": ("contains", 1.0), "hit_limit": ("hit limit", 1.0)}


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


def comparison_rows(m: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, c in m["comparisons"].items():
        t = c["test"]
        delta = "–" if t["mean_diff"] is None else f"{t['mean_diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"
        eff = f"dz {_fmt(t['cohens_dz'], 2)}, r {_fmt(t['rank_biserial'], 2)}"
        mark = " *" if key == m["primary_metric"] else ""
        rows.append([c["label"] + mark, _fmt(c["base"]), _fmt(c["tuned"]), delta, _p(t["p_wilcoxon"]),
                     _p(t["p_bootstrap"]), eff, c["verdict"]])
    return rows


COMPARISON_COLUMNS = ["metric", "base", "tuned", "tuned-base [95% CI]", "p (Wilcoxon)", "p (bootstrap)",
                      "effect", "verdict"]


def print_table(m: dict[str, Any]) -> None:
    """Rich table of the comparison on stdout (through ui)."""
    ui.table(f"base vs tuned on {m['examples']} test examples (* = gate's primary metric)",
             COMPARISON_COLUMNS, comparison_rows(m))
    corpus_keys = ["perplexity", "bleu", "chrf", "distinct_1", "distinct_2", "mean_answer_tokens", "stop_at_eot"]
    rows = [[k, _fmt(m["base"]["corpus"].get(k)), _fmt(m["tuned"]["corpus"].get(k))] for k in corpus_keys
            if k in m["base"]["corpus"] or k in m["tuned"]["corpus"]]
    rows.append(["tokens/s", _fmt(m["base"].get("tokens_per_second"), 1), _fmt(m["tuned"].get("tokens_per_second"), 1)])
    ui.table("corpus-level", ["metric", "base", "tuned"], rows)
    if m.get("drift"):
        ui.table("validation perplexity by stage", ["stage", "perplexity", "source"],
                 [[d["stage"], _fmt(d["perplexity"]), d["source"]] for d in m["drift"]])
    g = m["gate"]
    (ui.success if g["passed"] else ui.warn)(f"gate: {'passed' if g['passed'] else 'REFUSES'}: {g['reason']}")


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(m: dict[str, Any], run: Run, out: Path) -> list[str]:
    """report.md plus PNGs in out; returns the PNG names written."""
    pngs = []
    loss = loss_curve_png(run.root / "adapter" / "metrics.jsonl")
    if loss:
        atomic_write_bytes(out / "loss_curve.png", loss)
        pngs.append("loss_curve.png")
    bars = metric_bars_png(m)
    if bars:
        atomic_write_bytes(out / "metrics.png", bars)
        pngs.append("metrics.png")
    drift = drift_png(m.get("drift") or [])
    if drift:
        atomic_write_bytes(out / "drift.png", drift)
        pngs.append("drift.png")
    cap = (f"the first {m['examples']} of {m['examples_available']} test examples (eval.max_examples: {m['cap']})"
           if m["examples"] < m["examples_available"] else f"all {m['examples']} test examples")
    g = m["gate"]
    lines = [
        f"# Evaluation of run `{m['run']}`",
        "",
        f"Base vs tuned on {cap}, via {m['via']}; {m['decoding']}, at most {m['max_new_tokens']} new tokens.",
        f"Base: {m['base']['model']}. Tuned: {m['tuned']['model']}.",
        "",
        f"**Gate: {'passed' if g['passed'] else 'REFUSES registration'}.** {g['reason']}",
        "",
        "## Base vs tuned (paired, per example)",
        "",
        "Differences are tuned minus base, with a seeded paired-bootstrap 95% CI; p-values from the "
        "Wilcoxon signed-rank test and the bootstrap; effect sizes Cohen's dz and the rank-biserial "
        "correlation r. A change is called significant when its CI excludes 0 and the Wilcoxon p < 0.05. "
        f"The gate's primary metric (*) is `{m['primary_metric']}`.",
        "",
        _md_table(COMPARISON_COLUMNS, comparison_rows(m)),
        "",
        "## Corpus-level",
        "",
    ]
    keys = sorted(set(m["base"]["corpus"]) | set(m["tuned"]["corpus"]))
    rows = [[k, _fmt(m["base"]["corpus"].get(k)), _fmt(m["tuned"]["corpus"].get(k))] for k in keys]
    rows.append(["tokens/s (generation)", _fmt(m["base"].get("tokens_per_second"), 1),
                 _fmt(m["tuned"].get("tokens_per_second"), 1)])
    lines += [_md_table(["metric", "base", "tuned"], rows), "",
              "BLEU and chrF here are corpus-level (sacrebleu); `hit_limit` is the share of answers that ran "
              "into the token limit instead of ending their turn (rambling); `stop_at_eot` is the rest.", ""]
    if "metrics.png" in pngs:
        lines += ["![base vs tuned](metrics.png)", ""]
    lines += ["## Drift by stage (validation answer-only perplexity)", ""]
    if m.get("drift"):
        lines += [_md_table(["stage", "perplexity", "source"],
                            [[d["stage"], _fmt(d["perplexity"]), d["source"]] for d in m["drift"]]), ""]
        if "drift.png" in pngs:
            lines += ["![drift by stage](drift.png)", ""]
    else:
        lines += ["Not measured (eval.drift: false, or no validation tokens).", ""]
    if "loss_curve.png" in pngs:
        lines += ["## Training", "", "![loss curves](loss_curve.png)", ""]
    ex = m.get("example") or {}
    if ex:
        lines += ["## One held-out question", "", f"**Question:** {ex['question']}", "",
                  f"**Reference:** {ex['reference']}", "", f"**Base:** {ex['base']}", "",
                  f"**Tuned:** {ex['tuned']}", ""]
    lines += ["Every example, with both answers and per-example scores, is in `metrics.json` (`per_example`).", ""]
    # --- Human review (eval/human.py; issue 16): only when runs/<run>/review/ holds complete ratings.
    from .human import report_section

    lines += report_section(run.root, m, out, _md_table)
    # --- end human review
    atomic_write_text(out / "report.md", "\n".join(lines))
    return pngs


# ------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)


def _fig_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve_png(metrics_jsonl: Path) -> bytes | None:
    """Training and validation loss by step from adapter/metrics.jsonl (records with step + loss/eval_loss)."""
    if not metrics_jsonl.is_file():
        return None
    train, val = [], []
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = r.get("step", r.get("global_step"))
        if step is None:
            continue
        if isinstance(r.get("loss"), (int, float)):
            train.append((step, r["loss"]))
        if isinstance(r.get("eval_loss"), (int, float)):
            val.append((step, r["eval_loss"]))
    if not train and not val:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _fig_bytes(fig)


def metric_bars_png(m: dict[str, Any]) -> bytes | None:
    """Left: base vs tuned means; right: tuned-base with paired 95% CIs (0 line = no change)."""
    keys = [k for k in BAR_METRICS if k in m["comparisons"]]
    if not keys:
        return None
    plt = _plt()
    import numpy as np

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(keys))
    scale = [BAR_METRICS[k][1] for k in keys]
    base = [(m["comparisons"][k]["base"] or 0) / s for k, s in zip(keys, scale, strict=False)]
    tuned = [(m["comparisons"][k]["tuned"] or 0) / s for k, s in zip(keys, scale, strict=False)]
    a1.bar(x - 0.2, base, 0.4, label="base", color="#999999")
    a1.bar(x + 0.2, tuned, 0.4, label="tuned", color="#2a7ab9")
    a1.set_xticks(x, [BAR_METRICS[k][0] for k in keys], rotation=30, ha="right")
    a1.set_ylim(0, 1)
    a1.legend()
    a1.set_title("mean per example")
    diffs, lo, hi = [], [], []
    for k, s in zip(keys, scale, strict=False):
        t = m["comparisons"][k]["test"]
        d = (t["mean_diff"] or 0) / s
        diffs.append(d)
        lo.append(d - (t["ci_low"] or 0) / s)
        hi.append((t["ci_high"] or 0) / s - d)
    a2.errorbar(diffs, x, xerr=[lo, hi], fmt="o", color="#2a7ab9", capsize=4)
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks(x, [BAR_METRICS[k][0] for k in keys])
    a2.set_title("tuned - base, paired 95% CI")
    if "nll" in m["comparisons"]:
        t = m["comparisons"]["nll"]["test"]
        a2.set_xlabel(f"answer NLL/token: {t['mean_diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] "
                      "(below 0 = better)")
    return _fig_bytes(fig)


def drift_png(drift: list[dict[str, Any]]) -> bytes | None:
    rows = [d for d in drift if d.get("perplexity") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(rows)))
    labels = [d["stage"] for d in rows]
    vals = [d["perplexity"] for d in rows]
    colors = ["#999999" if "base" in d["stage"] else "#2a7ab9" for d in rows]
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3f}", va="center")
    ax.set_xlabel("validation answer-only perplexity (lower is better)")
    return _fig_bytes(fig)
