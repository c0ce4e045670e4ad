"""The eval report's PNG plots (matplotlib, Agg backend: no display needed): loss curves, base vs tuned
bars with paired CIs, drift by stage."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

# Metrics on a 0..1 (or 0..100) scale shown side by side in metrics.png: key -> (label, scale)
BAR_METRICS = {"facts_all": ("all facts", 1.0), "fact_recall": ("fact recall", 1.0), "rouge_l": ("ROUGE-L", 1.0),
               "bleu": ("BLEU/100", 100.0), "chrf": ("chrF/100", 100.0), "exact": ("exact", 1.0),
               "contains": ("contains", 1.0), "hit_limit": ("hit limit", 1.0)}


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
