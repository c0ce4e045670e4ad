"""The eval stage: base vs tuned on the held-out test split, drift by stage, and the regression gate.

    build_report(cfg, run, out) -> info      (pipeline stage; writes metrics.json, report.md, report.html, PNGs)
    evaluate(cfg, run, a, b, out) -> metrics (any two sides; `ollama-ft eval RUN --against OTHER`, eval/against.py)

Both models answer the same test prompts with greedy decoding (GGUF files through llama-cpp-python,
or the Ollama API with eval.via=ollama). Generations are scored against the reference answers
(ROUGE-L, BLEU, chrF, exact/contains match, key facts, distinct-n, length, stop behaviour), and the
reference answers are scored under each model (answer-only perplexity, teacher-forced on the data
stage's tokens). Every per-example metric is compared pairwise (metrics.paired_test). The general-text
perplexity of both sides is the forgetting check (eval/general.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.runs import Run, atomic_write_text
from . import facts as ef
from . import general as eg
from . import metrics as em
from .drift import drift_by_stage
from .inputs import (  # noqa: F401  (re-exported: the eval stage's inputs, as tests and docs name them)
    _aligned_labels,
    _quantize,
    _read_json,
    answer_span,
    base_gguf,
    chat_template,
    load_examples,
    prompt_prefix,
    tuned_gguf,
)
from .lineage import lineage
from .runner import _llama_log, per_token_nll, perplexity_of, run_model

# Per-example metrics compared base vs tuned: key -> (higher_is_better, label)
COMPARED: dict[str, tuple[bool | None, str]] = {
    "nll": (False, "answer NLL/token (log perplexity)"),
    "facts_all": (True, "all key facts stated"),
    "fact_recall": (True, "key-fact recall"),
    "fact_contradiction": (False, "contradicts a key fact"),
    "rouge_l": (True, "ROUGE-L F1"),
    "bleu": (True, "BLEU (sentence)"),
    "chrf": (True, "chrF (sentence)"),
    "exact": (True, "exact match"),
    "contains": (True, "contains reference"),
    "answer_words": (None, "answer length (words)"),  # neither better nor worse by itself
    "hit_limit": (False, "ran into token limit"),
}
# 0/1 per example: compared with the exact McNemar test instead of Wilcoxon
BINARY = {"facts_all", "fact_contradiction", "exact", "contains", "hit_limit"}
SHOWCASE_RULE = ("the median test example by the tuned model's key-fact recall (lower median, first in test "
                 "order), not the best one")


@dataclass
class Side:
    """One model under test: its GGUF (or Ollama name), its records (with its own tokens), its template."""

    label: str
    gguf: Path | None
    desc: str
    records: list[dict[str, Any]]
    template: str
    ollama_model: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Scoring and comparing


def compare(base: dict[str, Any], tuned: dict[str, Any], cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Paired test per metric (tuned - base) over the per-example scores both models have."""
    out: dict[str, dict[str, Any]] = {}
    for key, (hib, label) in COMPARED.items():
        a, b = base["per_example"].get(key), tuned["per_example"].get(key)
        if not a or not b or len(a) != len(b) or all(x is None for x in a):
            continue
        a = [float("nan") if x is None else x for x in a]
        b = [float("nan") if x is None else x for x in b]
        t = em.paired_test(a, b, n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed, binary=key in BINARY)
        out[key] = {"label": label, "higher_is_better": hib, "base": _nanmean(a), "tuned": _nanmean(b),
                    "test": t, "verdict": em.verdict(t, hib)}
    return out


def _nanmean(xs: list[float]) -> float | None:
    v = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def summarise_model(res: dict[str, Any], refs: list[str], facts: list[list[ef.Fact]] | None = None) -> dict[str, Any]:
    gens = res["generations"]
    scored: dict[str, Any] = {"per_example": {}, "corpus": {}}
    if gens:
        texts = [g["text"] for g in gens]
        scored = em.score_generations(texts, refs, [g["hit_limit"] for g in gens], [g["tokens"] for g in gens])
        if facts is not None and any(facts):
            fs = ef.score_all(texts, facts)
            scored["per_example"].update(fs)
            for k in ("fact_recall", "facts_all", "fact_contradiction"):
                scored["corpus"][k] = _nanmean([x for x in fs[k] if x is not None])
    if res["nll_tokens"]:
        scored["per_example"]["nll"] = per_token_nll(res)
        scored["corpus"]["perplexity"] = perplexity_of(res)
        scored["corpus"]["answer_tokens_scored"] = sum(res["nll_tokens"])
    scored["tokens_per_second"] = res["tokens_per_second"]
    scored["engine"] = {k: res[k] for k in ("gguf", "ollama_model", "load_seconds", "generated_tokens",
                                            "prompt_source")}
    return scored


def general_check(cfg: RunConfig, a: Side, b: Side) -> dict[str, Any] | None:
    """The forgetting check on both sides' GGUFs (None when off or a side has no GGUF)."""
    path = eg.general_path(cfg.eval.general_data)
    if path is None or a.gguf is None or b.gguf is None:
        return None
    texts = eg.load_texts(path)
    scores = []
    with ui.status(f"forgetting check: general-text perplexity on {len(texts)} paragraphs ({path.name})"):
        for side in (a, b):
            scores.append(eg.score(side.gguf, texts, side.template, threads=cfg.eval.threads, seed=cfg.eval.seed,
                                   log_path=_llama_log(side.gguf)))
    g = eg.check(scores[0], scores[1], max_increase=cfg.eval.max_general_ppl_increase,
                 n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
    source = "the bundled general_text.jsonl" if path == eg.BUNDLED else str(path)
    return {**g, "source": source, "examples": len(texts), "digest": eg.digest(texts), "quant": cfg.ollama.quant,
            "base_model": a.gguf.name, "tuned_model": b.gguf.name}


def _with_general(drift: list[dict[str, Any]], gen: dict[str, Any] | None) -> list[dict[str, Any]]:
    """General-text perplexity beside the validation perplexity of the two GGUFs it was measured on."""
    if not gen:
        return drift
    for row in drift:
        if row.get("source") == gen["tuned_model"]:
            row["general_perplexity"] = gen["tuned_perplexity"]
        elif row.get("source") == gen["base_model"]:
            row["general_perplexity"] = gen["base_perplexity"]
    return drift


def showcase(records: list[dict[str, Any]], refs: list[str], base_res: dict[str, Any], tuned_res: dict[str, Any],
             tuned_per: dict[str, list[Any]], facts: list[list[ef.Fact]]) -> dict[str, Any]:
    """The one example the report prints, picked by SHOWCASE_RULE (ROUGE-L when no example has facts)."""
    recall = tuned_per.get("fact_recall") or []
    i, rule = ef.median_example(recall), SHOWCASE_RULE
    if i is None:
        i = ef.median_example(tuned_per.get("rouge_l") or [0.0] * len(records)) or 0
        rule = SHOWCASE_RULE.replace("key-fact recall", "ROUGE-L")

    def text(res: dict[str, Any]) -> str:
        return res["generations"][i]["text"] if res["generations"] else ""

    return {"id": records[i].get("id"), "index": i, "rule": rule, "question": _question(records[i]),
            "reference": refs[i], "base": text(base_res), "tuned": text(tuned_res),
            "facts": [f.text for f in facts[i]], "tuned_fact_recall": recall[i] if recall else None}


# ------------------------------------------------------------------------------------------
# The stage


def evaluate(cfg: RunConfig, run: Run, a: Side, b: Side, out: Path, *, comparison: str,
             drift: bool) -> dict[str, Any]:
    """Side a ("base") vs side b ("tuned") on a's test records: every score, the tests, the gate, the report files."""
    from . import report as eval_report

    t0 = time.perf_counter()
    ev = cfg.eval
    records = a.records
    total = sum(1 for line in open(run.root / "data" / "test.jsonl", encoding="utf-8") if line.strip())
    refs = [r["messages"][-1]["content"] for r in records]
    facts, facts_source = ef.example_facts(records, ef.given_facts(_data_paths(cfg)))
    ui.info(f"eval: {a.label} vs {b.label}, {len(records)} of {total} test examples, greedy, up to "
            f"{ev.max_new_tokens} new tokens, via {ev.via}; key facts {facts_source}")
    base_res = run_model(a.label, a.gguf, a.records, cfg, a.template, ollama_model=a.ollama_model)
    tuned_res = run_model(b.label, b.gguf, b.records, cfg, b.template, ollama_model=b.ollama_model)
    base = summarise_model(base_res, refs, facts)
    tuned = summarise_model(tuned_res, refs, facts)
    comparisons = compare(base, tuned, cfg)
    primary = "nll" if "nll" in comparisons else "rouge_l"
    gen = general_check(cfg, a, b)
    g = em.gate(comparisons, base["corpus"].get("hit_limit", 0.0), tuned["corpus"].get("hit_limit", 0.0),
                primary=primary, enabled=ev.gate, limit_margin=ev.limit_margin,
                extra_reasons=[eg.gate_reason(gen)] if gen else [])
    drift_rows = _with_general(drift_by_stage(cfg, run, a.template, a.gguf) if drift else [], gen)
    ex = showcase(records, refs, base_res, tuned_res, tuned["per_example"], facts)
    metrics = {
        "run": run.root.name,
        "comparison": comparison,
        "sides": {"base": {"label": a.label, "model": a.desc, "lineage": a.lineage},
                  "tuned": {"label": b.label, "model": b.desc, "lineage": b.lineage}},
        "split": "test",
        "examples": len(records),
        "examples_available": total,
        "cap": ev.max_examples,
        "via": ev.via,
        "max_new_tokens": ev.max_new_tokens,
        "decoding": "greedy (temperature 0, top_k 1), stops at end of turn",
        "facts_source": facts_source,
        "base": {"model": a.desc, **{k: v for k, v in base.items() if k != "per_example"}},
        "tuned": {"model": b.desc, **{k: v for k, v in tuned.items() if k != "per_example"}},
        "comparisons": comparisons,
        "primary_metric": primary,
        "gate": g,
        "general": gen,
        "drift": drift_rows,
        "example": ex,
        "per_example": [
            {"id": r.get("id"), "question": _question(r), "reference": ref, "facts": [f.text for f in facts[i]],
             "base": base_res["generations"][i] if base_res["generations"] else None,
             "tuned": tuned_res["generations"][i] if tuned_res["generations"] else None,
             **{f"base_{k}": v[i] for k, v in base["per_example"].items()},
             **{f"tuned_{k}": v[i] for k, v in tuned["per_example"].items()}}
            for i, (r, ref) in enumerate(zip(records, refs, strict=False))
        ],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    metrics = _json_safe(metrics)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    eval_report.write_report(metrics, run, out)
    eval_report.print_table(metrics)
    return metrics


def build_report(cfg: RunConfig, run: Run, out: Path) -> dict[str, Any]:
    """Eval stage: base vs tuned on the test split, drift by stage, report files, and the gate."""
    data_dir = run.require("data")
    ev = cfg.eval
    records = load_examples(data_dir, "test", ev.max_examples)
    if not records:
        raise UserError(f"{data_dir}/test.jsonl has no examples",
                        hint="give the test split a share: data.split: [0.8, 0.1, 0.1]")
    template = chat_template(run)
    if template is None:
        raise UserError(f"no chat template in {data_dir} or {run.root / 'base'}",
                        hint="re-run the data stage; it writes data/chat_template.jinja")
    tuned_path = tuned_gguf(cfg, run)
    base_path, base_desc = base_gguf(cfg, run)
    base_ollama = tuned_ollama = None
    if ev.via == "ollama":
        base_ollama = _ollama_base_name(cfg, run)
        from ..ollama.api import model_name_for

        tuned_ollama = model_name_for(cfg).display
    meta = _read_json(run.root / "base" / "ollama_ft_base.json") or {}
    a = Side("base", base_path, base_desc, records, template, base_ollama,
             {"base": meta.get("spec") or cfg.model.base, "untuned": True})
    b = Side("tuned", tuned_path, tuned_path.name, records, template, tuned_ollama, lineage(run, cfg))
    m = evaluate(cfg, run, a, b, Path(out), comparison="base vs tuned", drift=ev.drift)
    return {"summary": _summary_line(m), "gate": m["gate"], "example": m["example"], "examples": m["examples"],
            "primary_metric": m["primary_metric"], "headline": _headline(m),
            "tokens_per_second": {"base": m["base"]["tokens_per_second"], "tuned": m["tuned"]["tokens_per_second"]}}


def _data_paths(cfg: RunConfig) -> list[Path]:
    """The data files the test split came from (where records may carry "facts")."""
    paths = [Path(cfg.data.path)] if getattr(cfg.data, "path", None) else []
    return [p for p in paths if p.exists()]


def _ollama_base_name(cfg: RunConfig, run: Run) -> str:
    meta = _read_json(run.root / "base" / "ollama_ft_base.json") or {}
    spec = str(meta.get("spec") or cfg.model.base)
    kind = meta.get("source_kind")
    src = meta.get("gguf_source")
    if isinstance(src, dict) and src.get("ollama_model"):
        return str(src["ollama_model"])
    if spec.startswith("ollama://"):
        return spec[len("ollama://"):]
    if kind in (None, "catalog", "ollama", "embedded") and "/" not in spec and not spec.endswith(".gguf"):
        return spec
    raise UserError(f"eval.via ollama needs the base in Ollama, but the base is {spec!r} ({kind})",
                    hint="evaluate with `--via llama_cpp`, or create the base in Ollama and use its name")


def _question(rec: dict[str, Any]) -> str:
    for m in reversed(rec["messages"][:-1]):
        if m.get("role") == "user":
            return m.get("content", "")
    return rec["messages"][-2].get("content", "")


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in ("facts_all", "fact_recall", "perplexity", "rouge_l", "bleu", "chrf", "hit_limit"):
        b, t = m["base"]["corpus"].get(k), m["tuned"]["corpus"].get(k)
        if b is not None or t is not None:
            out[k] = {"base": b, "tuned": t}
    if m.get("general"):
        out["general_perplexity"] = {"base": m["general"]["base_perplexity"], "tuned": m["general"]["tuned_perplexity"]}
    return out


def _summary_line(m: dict[str, Any]) -> str:
    parts = []
    c = m["comparisons"]
    if "facts_all" in c:
        t = c["facts_all"]["test"]
        parts.append(f"all key facts {c['facts_all']['base']:.0%} -> {c['facts_all']['tuned']:.0%} "
                     f"({c['facts_all']['verdict']}, McNemar p {t['p']:.2g})")
    bp, tp = m["base"]["corpus"].get("perplexity"), m["tuned"]["corpus"].get("perplexity")
    if bp and tp:
        parts.append(f"answer perplexity {bp:.2f} -> {tp:.2f} ({c['nll']['verdict']})" if "nll" in c
                     else f"answer perplexity {bp:.2f} -> {tp:.2f}")
    if "rouge_l" in c:
        parts.append(f"ROUGE-L {c['rouge_l']['base']:.3f} -> {c['rouge_l']['tuned']:.3f} ({c['rouge_l']['verdict']})")
    gen = m.get("general")
    if gen:
        parts.append(f"general-text perplexity {gen['base_perplexity']:.2f} -> {gen['tuned_perplexity']:.2f} "
                     f"({gen['increase']:+.1%})")
    gate = "gate passed" if m["gate"]["passed"] else "GATE REFUSES registration"
    return f"{m['examples']} test examples: " + "; ".join(parts) + f"; {gate}"


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
