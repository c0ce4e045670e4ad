"""Blind human review, unblinded: statistics of the ratings `ollama-ft review` saved, and the report section.

Ratings live outside report/ (the eval stage replaces that directory), one file per reviewer:

    runs/<run>/review/<comparison>/<reviewer>.json     comparison: base-vs-tuned | vs-<other run>

(answers from report/metrics.json, or from report-vs-<other run>/metrics.json of `eval --against`).

Each file maps item id -> {"a": side, "b": side, "digest": answers digest, "scores": {"a": {criterion:
1..5}, "b": {...}}, "preference": "a" | "b" | "tie"}. The A/B -> side mapping is only read here, so the
page never learns which answer is which. The sides are the eval's: `base` (the base model, or the other
run's tuned model) and `tuned` (this run's); every difference is tuned minus base.

Statistics (scipy, krippendorff): mean 1-5 score per side and criterion with a bootstrap 95% CI; the
per-item paired difference (averaged over reviewers) with a bootstrap CI and the Wilcoxon signed-rank
p-value; the preference with an exact sign test (binomtest, ties dropped) and a Clopper-Pearson CI;
Krippendorff's alpha between reviewers; and the combined score (automatic and human parts on 0..1,
weighted by `review.combined_weights`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

REVIEW_DIR = "review"
FORMAT = "ollama-ft-review/1"
CRITERIA = ("relevance", "fluency", "professionalism")
BASE_COMPARISON = "base-vs-tuned"
# Automatic metrics of the combined score: per-example key in metrics.json -> divisor to reach 0..1.
AUTOMATIC_PARTS = {"rouge_l": 1.0, "chrf": 100.0, "fact_recall": 1.0}


def answers_digest(answers: dict[str, str]) -> str:
    """Digest of the two answers of an item by side: a rating of answers that changed since is stale."""
    return hashlib.sha256(json.dumps(answers, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def comparison_dir(run_root: Path, comparison: str) -> Path:
    return Path(run_root) / REVIEW_DIR / comparison


def is_complete(rating: dict[str, Any]) -> bool:
    scores = rating.get("scores") or {}
    return rating.get("preference") in ("a", "b", "tie") and all(
        isinstance((scores.get(x) or {}).get(c), int) for x in ("a", "b") for c in CRITERIA)


def read_reviews(run_root: Path) -> dict[str, list[dict[str, Any]]]:
    """comparison -> reviewer files (parsed); files that are not review files are skipped with a reason."""
    out: dict[str, list[dict[str, Any]]] = {}
    root = Path(run_root) / REVIEW_DIR
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*/*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # a hand-damaged file must not break the report; the page reports it when opened
        if isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("items"), dict):
            doc["_path"] = str(path)
            out.setdefault(path.parent.name, []).append(doc)
    return out


def unblind(doc: dict[str, Any], current_digests: dict[str, str] | None) -> tuple[list[dict[str, Any]], int]:
    """Complete ratings of one reviewer as {item, reviewer, scores: {side: {crit: v}}, preferred: side|tie}.

    Ratings whose answers changed since (digest differs from the current eval) are left out; their
    count is returned second.
    """
    rows, stale = [], 0
    for item, r in doc["items"].items():
        if not is_complete(r):
            continue
        if current_digests is not None and current_digests.get(item) != r.get("digest"):
            stale += 1
            continue
        side = {"a": r["a"], "b": r["b"]}
        pref = r["preference"]
        rows.append({"item": item, "reviewer": doc.get("reviewer", "?"),
                     "scores": {side[x]: {c: r["scores"][x][c] for c in CRITERIA} for x in ("a", "b")},
                     "preferred": "tie" if pref == "tie" else side[pref]})
    return rows, stale


# ------------------------------------------------------------------------------------------
# Statistics


def _mean_ci(values: list[float], n_boot: int, seed: int) -> dict[str, Any]:
    """Mean with a percentile bootstrap 95% CI (scipy.stats.bootstrap); no CI below two values."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"mean": float(x.mean()) if len(x) else None, "n": int(len(x)),
                           "ci_low": None, "ci_high": None}
    if len(x) >= 2:
        if np.all(x == x[0]):  # every resample has the same mean
            out["ci_low"] = out["ci_high"] = float(x[0])
        else:
            gen = np.random.default_rng(seed)
            # scipy >= 1.15 names the generator `rng`; older releases `random_state`
            kw = {"rng": gen} if "rng" in inspect.signature(stats.bootstrap).parameters else {"random_state": gen}
            r = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=n_boot, method="percentile", **kw)
            out["ci_low"], out["ci_high"] = float(r.confidence_interval.low), float(r.confidence_interval.high)
    return out


def _wilcoxon(diffs: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value (zero differences dropped); None when all are zero."""
    from scipy import stats

    if sum(1 for d in diffs if d != 0) == 0:
        return None
    return float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def _human_score(scores: dict[str, int]) -> float:
    return sum(scores[c] for c in CRITERIA) / len(CRITERIA)


def _alpha(rows: list[dict[str, Any]], sides: list[str], reviewers: list[str]) -> dict[str, Any]:
    """Krippendorff's alpha per criterion (ordinal, units = item x side) and for the preference (nominal)."""
    import krippendorff
    import numpy as np

    items = sorted({r["item"] for r in rows})
    by = {(r["reviewer"], r["item"]): r for r in rows}
    out: dict[str, Any] = {}

    def alpha(matrix: list[list[float]], level: str) -> float | None:
        data = np.asarray(matrix, dtype=float)
        try:
            return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
        except ValueError:  # one value in the whole domain: agreement is undefined
            return None

    for c in CRITERIA:
        m = [[by[(who, i)]["scores"][s][c] if (who, i) in by else np.nan for i in items for s in sides]
             for who in reviewers]
        out[c] = alpha(m, "ordinal")
    code = {sides[0]: 0.0, sides[1]: 1.0, "tie": 2.0}
    m = [[code[by[(who, i)]["preferred"]] if (who, i) in by else np.nan for i in items] for who in reviewers]
    out["preference"] = alpha(m, "nominal")
    out["items_rated_by_several"] = sum(1 for i in items if sum((w, i) in by for w in reviewers) >= 2)
    return out


def automatic_scores(per_example: dict[str, dict[str, float | None]], items: list[str]) -> dict[str, Any]:
    """Mean over `items` of the mean of the automatic parts present for them (each scaled to 0..1)."""
    used = [k for k in AUTOMATIC_PARTS if any(per_example.get(i, {}).get(k) is not None for i in items)]
    vals = []
    for i in items:
        row = per_example.get(i, {})
        parts = [row[k] / AUTOMATIC_PARTS[k] for k in used if isinstance(row.get(k), (int, float))]
        if parts:
            vals.append(sum(parts) / len(parts))
    return {"score": sum(vals) / len(vals) if vals else None, "metrics": used, "items": len(vals)}


def summarise(rows: list[dict[str, Any]], sides: list[str], auto: dict[str, dict[str, dict[str, Any]]],
              weights: dict[str, float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every number of the human-review section from unblinded ratings (see the module docstring).

    auto: side -> item -> {metric: value} (the eval's per-example automatic scores).
    """
    from scipy import stats

    ref, cand = sides
    reviewers = sorted({r["reviewer"] for r in rows})
    items = sorted({r["item"] for r in rows})
    out: dict[str, Any] = {"sides": sides, "reviewers": reviewers, "items": len(items), "ratings": len(rows)}
    crits: dict[str, Any] = {}
    for c in (*CRITERIA, "overall"):
        def val(r: dict[str, Any], s: str, c: str = c) -> float:
            return _human_score(r["scores"][s]) if c == "overall" else float(r["scores"][s][c])

        # Paired by item: reviewers of one item are averaged first, so a second reviewer is not a second item.
        diffs = [sum(val(r, cand) - val(r, ref) for r in rows if r["item"] == i)
                 / sum(1 for r in rows if r["item"] == i) for i in items]
        crits[c] = {s: _mean_ci([val(r, s) for r in rows], n_boot, seed) for s in sides}
        crits[c]["diff"] = _mean_ci(diffs, n_boot, seed)
        crits[c]["p_wilcoxon"] = _wilcoxon(diffs)
    out["criteria"] = crits
    # Preference: each item's net vote over its reviewers decides it (ties and even splits are ties).
    net = {i: sum(1 if r["preferred"] == cand else -1 if r["preferred"] == ref else 0
                  for r in rows if r["item"] == i) for i in items}
    wins, losses = sum(v > 0 for v in net.values()), sum(v < 0 for v in net.values())
    pref: dict[str, Any] = {"candidate": wins, "reference": losses, "tie": len(items) - wins - losses,
                            "ratings": {k: sum(r["preferred"] == k for r in rows) for k in (ref, cand, "tie")}}
    if wins + losses:
        bt = stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided")
        ci = bt.proportion_ci(confidence_level=0.95, method="exact")
        pref.update(share=wins / (wins + losses), p_sign=float(bt.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    else:
        pref.update(share=None, p_sign=None, ci_low=None, ci_high=None)
    out["preference"] = pref
    out["agreement"] = _alpha(rows, sides, reviewers) if len(reviewers) >= 2 else None
    out["combined"] = combined(rows, sides, auto, weights, items)
    return out


def combined(rows: list[dict[str, Any]], sides: list[str], auto: dict[str, dict[str, dict[str, Any]]],
             weights: dict[str, float], items: list[str]) -> dict[str, Any]:
    """Per side: automatic part (0..1), human part ((mean 1-5 score - 1) / 4), and their weighted mean."""
    wa, wh = float(weights.get("automatic", 0.4)), float(weights.get("human", 0.6))
    out: dict[str, Any] = {"weights": {"automatic": wa, "human": wh}}
    for s in sides:
        a = automatic_scores(auto.get(s, {}), items)
        h = sum(_human_score(r["scores"][s]) for r in rows) / len(rows) if rows else None
        hn = (h - 1) / 4 if h is not None else None
        if a["score"] is None or hn is None:
            score = hn if wa == 0 else (a["score"] if wh == 0 else None)
        else:
            score = (wa * a["score"] + wh * hn) / (wa + wh)
        out[s] = {"automatic": a["score"], "automatic_metrics": a["metrics"], "human": hn, "human_mean_1_5": h,
                  "combined": score}
    return out


# ------------------------------------------------------------------------------------------
# Gathering one comparison from the files, and the report section


def per_example_scores(metrics: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """item id -> {metric: value} of one side (`base` or `tuned`) in a metrics.json's per_example."""
    out = {}
    for row in metrics.get("per_example") or []:
        out[str(row.get("id"))] = {k: row.get(f"{prefix}_{k}") for k in AUTOMATIC_PARTS}
    return out


def per_example_digests(metrics: dict[str, Any]) -> dict[str, str]:
    """item id -> answers_digest of the answers the eval holds now (the same digest the page saved)."""
    def text(row: dict[str, Any], key: str) -> str | None:
        g = row.get(key)
        return g.get("text") if isinstance(g, dict) else g

    out = {}
    for row in metrics.get("per_example") or []:
        answers = {"base": text(row, "base"), "tuned": text(row, "tuned")}
        if all(isinstance(v, str) for v in answers.values()):
            out[str(row.get("id"))] = answers_digest(answers)
    return out


def comparison_key(report_dir: Path) -> str:
    """report/ -> base-vs-tuned; report-vs-OTHER/ (`eval RUN --against OTHER`) -> vs-OTHER."""
    name = Path(report_dir).name
    return f"vs-{name[len('report-vs-'):]}" if name.startswith("report-vs-") else BASE_COMPARISON


def gather(run_root: Path, metrics: dict[str, Any], comparison: str, weights: dict[str, float],
           n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The summary of one comparison's complete ratings, with labels and the stale count; None without any.

    The sides are the eval's: `base` (the base model, or OTHER's tuned model in run vs run) and `tuned`.
    """
    docs = read_reviews(run_root).get(comparison) or []
    sides = ["base", "tuned"]
    digests = per_example_digests(metrics)
    rows, stale = [], 0
    for d in docs:
        r, s = unblind(d, digests)
        rows += r
        stale += s
    if not rows:
        return None
    auto = {s: per_example_scores(metrics, s) for s in sides}
    summary = summarise(rows, sides, auto, weights, n_boot=n_boot, seed=seed)
    labels = {**(docs[0].get("labels") or {}),
              **{k: v["label"] for k, v in (metrics.get("sides") or {}).items() if isinstance(v, dict) and v.get("label")}}
    summary.update(comparison=comparison, labels={s: labels.get(s, s) for s in sides}, stale=stale,
                   items_available=len(digests))
    return summary


def _f(v: Any, nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _p(v: float | None) -> str:
    return "–" if v is None else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _ci(d: dict[str, Any], nd: int = 2, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{nd}f}}"
    m = "–" if d["mean"] is None else fmt.format(d["mean"])
    if d["ci_low"] is None:
        return m
    return f"{m} [{fmt.format(d['ci_low'])}, {fmt.format(d['ci_high'])}]"


def section_lines(summaries: list[dict[str, Any]], table: Callable[[list[str], list[list[str]]], str]) -> list[str]:
    """The report's "Human review" section (markdown lines, tables made by `table`); empty without ratings."""
    if not summaries:
        return []

    lines = ["## Human review (blind A/B, 1-5)", "",
             "Reviewers saw each held-out question with two answers labelled A and B in a random order per item "
             "and reviewer (`ollama-ft review`), and rated relevance, fluency and professionalism 1-5 plus a "
             "preference. The sides are unblinded only here. Means are over ratings with a bootstrap 95% CI; "
             "differences are paired per item (reviewers of an item averaged first), with a bootstrap CI and "
             "the Wilcoxon signed-rank p-value (– where every difference is 0); the preference is decided per item by its reviewers' net vote "
             "and tested with an exact sign test (ties left out), with a Clopper-Pearson 95% CI.", ""]
    for s in summaries:
        ref, cand = s["sides"]
        lr, lc = s["labels"][ref], s["labels"][cand]
        lines += [f"### {lc} vs {lr}", "",
                  f"{s['items']} of {s['items_available']} items rated ({s['ratings']} ratings) by "
                  f"{len(s['reviewers'])} reviewer(s): {', '.join(s['reviewers'])}."
                  + (f" {s['stale']} rating(s) left out: the answers changed since they were given (eval re-run)."
                     if s["stale"] else ""), ""]
        rows = [[c, _ci(v[ref]), _ci(v[cand]), _ci(v["diff"], sign=True), _p(v["p_wilcoxon"])]
                for c, v in s["criteria"].items()]
        lines += [table(["criterion", f"{lr} mean [95% CI]", f"{lc} mean [95% CI]",
                             f"{cand} - {ref} [95% CI]", "p (Wilcoxon)"], rows), ""]
        p = s["preference"]
        share = (f"{lc} preferred in {p['candidate']} of {p['candidate'] + p['reference']} decided items "
                 f"({_f(100 * p['share'], 0)}%, 95% CI {_f(100 * p['ci_low'], 0)}-{_f(100 * p['ci_high'], 0)}%), "
                 f"{lr} in {p['reference']}, {p['tie']} tied; sign test p = {_p(p['p_sign'])}"
                 + (" (significant at 0.05)." if p["p_sign"] is not None and p["p_sign"] < 0.05 else ".")
                 if p["share"] is not None else f"No item was decided ({p['tie']} tied); no sign test.")
        lines += [f"**Preference:** {share}", ""]
        a = s["agreement"]
        if a is not None:
            lines += [f"**Agreement between reviewers** (Krippendorff's alpha, `krippendorff` package; ordinal "
                      f"for the scores, nominal for the preference; {a['items_rated_by_several']} items rated by "
                      "two or more): " + ", ".join(f"{k} {_f(a[k])}" for k in (*CRITERIA, "preference"))
                      + ". 1 = perfect agreement, 0 = chance.", ""]
        cmb = s["combined"]
        w = cmb["weights"]
        metrics = sorted({m for x in (ref, cand) for m in cmb[x]["automatic_metrics"]})
        lines += [table(["side", "automatic (0-1)", "human (0-1)", "combined"],
                            [[s["labels"][x], _f(cmb[x]["automatic"], 3), _f(cmb[x]["human"], 3),
                              _f(cmb[x]["combined"], 3)] for x in (ref, cand)]), "",
                  f"Combined score = {w['automatic']:g} x automatic + {w['human']:g} x human (divided by the sum of "
                  "the weights; `review.combined_weights`). Automatic: per item the mean of "
                  + (", ".join(f"{m}/{AUTOMATIC_PARTS[m]:g}" for m in metrics) or "no automatic metric")
                  + ", averaged over the rated items. Human: (mean of the three 1-5 criteria - 1) / 4 over all "
                  "ratings, so 1 -> 0 and 5 -> 1.", ""]
    return lines


def report_section(run_root: Path, metrics: dict[str, Any], out: Path | None,
                   table: Callable[[list[str], list[list[str]]], str]) -> list[str]:
    """Section lines for report.md (and human.json in `out`) from the run's ratings; [] without any.

    `table` renders a markdown table (report.py's, passed in so this module does not import report.py).
    """
    weights, n_boot, seed = {"automatic": 0.4, "human": 0.6}, 2000, 0
    run_yaml = Path(run_root) / "run.yaml"
    if run_yaml.is_file():
        from ..core.config import load_config
        from ..core.errors import UserError

        try:
            rv = load_config(run_yaml).config.review
            weights, n_boot, seed = rv.combined_weights.model_dump(), rv.bootstrap_samples, rv.seed
        except UserError:
            pass  # the eval itself already validated the config; a later edit falls back to the defaults
    out_dir = Path(out) if out is not None else Path(run_root) / "report"
    summary = gather(Path(run_root), metrics, comparison_key(out_dir), weights, n_boot=n_boot, seed=seed)
    summaries = [summary] if summary else []
    if out is not None and summaries:
        from ..core.runs import atomic_write_text

        atomic_write_text(Path(out) / "human.json", json.dumps(summaries, indent=2, ensure_ascii=False) + "\n")
    return section_lines(summaries, table)
