"""Text metrics, paired significance and the regression gate (pure functions, no model code).

Per-example scores are kept so base and tuned can be compared pairwise on the same test examples;
corpus-level numbers (BLEU, chrF, distinct-n) are the headline values.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------
# Normalisation and simple match metrics

_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "–", "—", "…", "¿", "¡"}


def normalise(text: str) -> str:
    """Lower-case, NFKC, drop punctuation, collapse whitespace (SQuAD-style, language-neutral)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (ch in _PUNCT or unicodedata.category(ch).startswith("P")) else ch for ch in text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Word tokens of the normalised text (Unicode-aware, so non-English answers are not empty)."""
    return re.findall(r"\w+", normalise(text))


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference."""
    return float(normalise(pred) == normalise(ref))


def contains_match(pred: str, ref: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction (on word boundaries)."""
    r = normalise(ref)
    if not r:
        return 0.0
    return float(f" {r} " in f" {normalise(pred)} ")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n over a set of generations: unique n-grams / all n-grams (Li et al., 2016).

    Returns 0.0 when there is no n-gram at all (every text shorter than n words).
    """
    total = 0
    seen: set[tuple[str, ...]] = set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# ------------------------------------------------------------------------------------------
# ROUGE-L, BLEU, chrF through their maintained implementations


class _WordTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9], which empties non-English text."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (rouge-score, LCS-based) on Unicode word tokens; 0..1."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return float(_ROUGE.score(ref, pred)["rougeL"].fmeasure)


def sentence_bleu(pred: str, ref: str) -> float:
    """sacrebleu sentence BLEU (0..100, effective-order smoothing as sacrebleu does by default)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)


def sentence_chrf(pred: str, ref: str) -> float:
    """sacrebleu sentence chrF (0..100)."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(pred, [ref]).score)


def corpus_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def corpus_chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score)


# Per-example metrics: name -> (function(pred, ref), higher_is_better, label)
PAIRED_TEXT_METRICS: dict[str, tuple[Any, bool, str]] = {
    "rouge_l": (rouge_l, True, "ROUGE-L F1"),
    "bleu": (sentence_bleu, True, "BLEU (sentence)"),
    "chrf": (sentence_chrf, True, "chrF (sentence)"),
    "exact": (exact_match, True, "exact match"),
    "contains": (contains_match, True, "contains reference"),
}


def score_generations(preds: Sequence[str], refs: Sequence[str], hit_limit: Sequence[bool],
                      gen_tokens: Sequence[int]) -> dict[str, Any]:
    """Per-example scores plus corpus-level headline numbers for one model's generations."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    per: dict[str, list[float]] = {k: [fn(p, r) for p, r in zip(preds, refs, strict=False)]
                                   for k, (fn, _, _) in PAIRED_TEXT_METRICS.items()}
    per["answer_words"] = [float(len(words(p))) for p in preds]
    per["answer_tokens"] = [float(t) for t in gen_tokens]
    per["hit_limit"] = [float(h) for h in hit_limit]
    n = len(preds)
    corpus = {
        "bleu": corpus_bleu(preds, refs) if n else 0.0,
        "chrf": corpus_chrf(preds, refs) if n else 0.0,
        "rouge_l": _mean(per["rouge_l"]),
        "exact": _mean(per["exact"]),
        "contains": _mean(per["contains"]),
        "distinct_1": distinct_n(preds, 1),
        "distinct_2": distinct_n(preds, 2),
        "mean_answer_words": _mean(per["answer_words"]),
        "mean_answer_tokens": _mean(per["answer_tokens"]),
        "stop_at_eot": 1.0 - _mean(per["hit_limit"]) if n else 0.0,
        "hit_limit": _mean(per["hit_limit"]),
    }
    return {"per_example": per, "corpus": corpus}


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), capped; NaN when no tokens (core/nll: the one definition)."""
    from ..core.nll import perplexity as _perplexity

    return _perplexity(nll_sum, n_tokens)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


# ------------------------------------------------------------------------------------------
# Paired significance


def paired_test(base: Sequence[float], tuned: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                alpha: float = 0.05, binary: bool = False) -> dict[str, Any]:
    """Compare tuned vs base on the same examples: d = tuned - base (all through scipy.stats).

    - mean difference with a seeded paired-bootstrap percentile CI (`scipy.stats.bootstrap`, resampling examples);
    - a sign-flip permutation p (`scipy.stats.permutation_test`, permutation_type="samples": exact when
      2**n <= n_boot);
    - the rank test p: exact McNemar (`scipy.stats.binomtest` on the discordant pairs) for 0/1 scores
      (`binary`), else Wilcoxon signed-rank (zero differences dropped; 1.0 when all are zero);
    - effect sizes: Cohen's dz = mean(d)/sd(d), and the matched-pairs rank-biserial correlation.
    `significant` means both agree: the (1-alpha) CI excludes 0 AND the rank test's p < alpha. The
    bootstrap alone calls any constant shift significant, even on one or two examples; the rank test does not.
    """
    a = np.asarray(base, dtype=float)
    b = np.asarray(tuned, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs equal lengths, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = b[ok] - a[ok]
    n = int(d.size)
    test_name = "exact McNemar" if binary else "Wilcoxon signed-rank"
    if n == 0:
        return {"n": 0, "mean_diff": None, "ci_low": None, "ci_high": None, "p_permutation": None,
                "p": None, "test_name": test_name, "cohens_dz": None, "rank_biserial": None, "significant": False}
    lo, hi, p_perm = _bootstrap_and_permutation(d, n_boot, seed, alpha)
    mean_d = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if sd > 0:
        dz: float | None = mean_d / sd
    else:
        dz = 0.0 if mean_d == 0 else None  # constant non-zero shift: dz undefined (infinite)
    nz = d[d != 0]
    from scipy.stats import binomtest, rankdata, wilcoxon

    if nz.size == 0:
        p_rank, rbc = 1.0, 0.0
    else:
        ranks = rankdata(np.abs(nz))
        w_plus, w_minus = float(ranks[nz > 0].sum()), float(ranks[nz < 0].sum())
        rbc = (w_plus - w_minus) / (w_plus + w_minus)
        if binary:  # discordant pairs only: tuned right where base was wrong vs the reverse
            p_rank = float(binomtest(int((nz > 0).sum()), int(nz.size), 0.5).pvalue)
        else:
            p_rank = float(wilcoxon(nz, zero_method="wilcox").pvalue)
    return {
        "n": n, "mean_diff": mean_d, "ci_low": lo, "ci_high": hi, "p_permutation": p_perm,
        "p": p_rank, "test_name": test_name, "cohens_dz": dz, "rank_biserial": float(rbc),
        "significant": bool((lo > 0 or hi < 0) and p_rank < alpha),
    }


def _bootstrap_and_permutation(d: np.ndarray, n_boot: int, seed: int, alpha: float) -> tuple[float, float, float]:
    """(CI low, CI high, permutation p) of mean(d) with scipy.stats; a single example has no spread."""
    import warnings

    from scipy.stats import bootstrap, permutation_test

    if d.size < 2:
        m = float(d.mean())
        return m, m, 1.0
    if np.all(d == d[0]):  # scipy warns that the distribution is degenerate; the CI is the point
        ci = (float(d[0]), float(d[0]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha, method="percentile",
                            random_state=np.random.default_rng(seed), vectorized=True)
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    if not np.any(d):
        return ci[0], ci[1], 1.0
    perm = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=n_boot,
                            alternative="two-sided", random_state=np.random.default_rng(seed + 1), vectorized=True)
    return ci[0], ci[1], float(min(1.0, perm.pvalue))


def verdict(test: dict[str, Any], higher_is_better: bool | None) -> str:
    """'better' / 'worse' / 'no significant change' for tuned relative to base.

    higher_is_better=None marks a neutral quantity (e.g. answer length): 'higher' / 'lower'.
    """
    if not test.get("significant"):
        return "no significant change"
    up = test["mean_diff"] > 0
    if higher_is_better is None:
        return "higher" if up else "lower"
    return "better" if up == higher_is_better else "worse"


# ------------------------------------------------------------------------------------------
# Regression gate

GATE_LIMIT_MARGIN = 0.25  # tuned may hit the token limit at most 25 points more often than base


def gate(comparisons: dict[str, dict[str, Any]], base_hit_rate: float, tuned_hit_rate: float, *,
         primary: str, enabled: bool = True, limit_margin: float = GATE_LIMIT_MARGIN,
         extra_reasons: list[str | None] | None = None) -> dict[str, Any]:
    """Decide whether registration may proceed.

    Refuses when (1) the primary metric is significantly worse for the tuned model (its paired CI
    lies entirely on the wrong side of 0), or (2) the tuned model runs into the token limit more
    often than the base by more than `limit_margin` (absolute share) AND that increase is
    significant (the paired CI of the per-example hit indicator lies above 0), or (3) a check outside
    the paired metrics refuses (`extra_reasons`, e.g. general-text perplexity rose past its limit).
    """
    if not enabled:
        return {"passed": True, "reason": "gate disabled (eval.gate: false)", "primary": primary}
    reasons = []
    cmp = comparisons.get(primary)
    if cmp and cmp["verdict"] == "worse":
        t = cmp["test"]
        reasons.append(f"{cmp['label']} is significantly worse for the tuned model "
                       f"(tuned-base {t['mean_diff']:+.4g}, 95% CI [{t['ci_low']:+.4g}, {t['ci_high']:+.4g}])")
    hit = comparisons.get("hit_limit")
    if tuned_hit_rate - base_hit_rate > limit_margin and (hit is None or hit["test"].get("significant")):
        reasons.append(f"the tuned model runs into the token limit in {tuned_hit_rate:.0%} of answers vs "
                       f"{base_hit_rate:.0%} for the base (more than {limit_margin:.0%} points more: rambling)")
    reasons += [r for r in (extra_reasons or []) if r]
    if reasons:
        return {"passed": False, "reason": "; ".join(reasons), "primary": primary}
    p = f"{cmp['label']}: {cmp['verdict']}" if cmp else f"{primary}: not measured"
    return {"passed": True, "reason": f"no significant regression ({p}; token-limit share "
                                      f"{base_hit_rate:.0%} -> {tuned_hit_rate:.0%})", "primary": primary}
