"""Eval stage: metrics against hand-computed values, paired significance, the gate, and an end-to-end
report on a fake run directory with tiny GGUFs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.eval import metrics as em

# ------------------------------------------------------------------------------------------
# Metrics on fixed strings (expected values derived by hand in the comments)


def test_normalise_exact_contains():
    assert em.normalise("  The Clinic, opens!  ") == "the clinic opens"
    assert em.exact_match("The clinic opens.", "the clinic  opens") == 1.0
    assert em.exact_match("clinic opens", "the clinic opens") == 0.0
    # contains works on word boundaries: "opens at 8" is in the first, not in "reopens at 8"
    assert em.contains_match("Yes, the clinic opens at 8.", "opens at 8") == 1.0
    assert em.contains_match("it reopens at 8", "opens at 8") == 0.0
    assert em.contains_match("anything", "...") == 0.0  # empty normalised reference never matches


def test_distinct_n():
    # words: [a b a b] + [a c] -> 6 unigrams, unique {a, b, c} = 3 -> 3/6
    assert em.distinct_n(["a b a b", "a c"], 1) == pytest.approx(0.5)
    # bigrams: ab, ba, ab + ac -> 4, unique {ab, ba, ac} = 3 -> 3/4
    assert em.distinct_n(["a b a b", "a c"], 2) == pytest.approx(0.75)
    assert em.distinct_n(["a", "b"], 2) == 0.0  # no bigram at all


def test_rouge_l_lcs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 and 6 -> F = 5/6
    assert em.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert em.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # Non-ASCII words count (rouge-score's default tokenizer would drop ü and ß)
    assert em.rouge_l("über Straße", "Über straße") == pytest.approx(1.0)
    assert em.rouge_l("x", "y") == 0.0


def test_bleu_by_hand():
    # hyp "the cat sat on the mat", ref "the cat sat on a mat", equal length (BP = 1):
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU = (5/6 * 3/5 * 1/2 * 1/3)^(1/4) = (1/12)^(1/4)
    assert em.sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(100 * (1 / 12) ** 0.25)
    assert em.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # corpus BLEU of the same single pair equals the sentence value
    assert em.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)


def test_chrf_by_hand():
    # chrF (char n=1..6, beta=2, whitespace removed), hyp "abc" vs ref "abd":
    # n=1: P=R=2/3 -> F=2/3; n=2: {ab,bc} vs {ab,bd}: F=1/2; n=3: no match -> 0; n=4..6: no n-grams.
    # sacrebleu averages F over the 3 orders both sides have: (2/3 + 1/2 + 0) / 3 = 7/18
    assert em.sentence_chrf("abc", "abd") == pytest.approx(100 * 7 / 18)
    assert em.sentence_chrf("the cat", "the cat") == pytest.approx(100.0)
    assert em.corpus_chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18)


def test_score_generations_corpus_and_stop_behaviour():
    s = em.score_generations(["The answer is yes.", "no no no"], ["the answer is yes", "maybe"],
                             hit_limit=[False, True], gen_tokens=[5, 12])
    c = s["corpus"]
    assert s["per_example"]["exact"] == [1.0, 0.0]
    assert c["exact"] == 0.5 and c["hit_limit"] == 0.5 and c["stop_at_eot"] == 0.5
    assert c["mean_answer_words"] == pytest.approx((4 + 3) / 2)
    assert c["mean_answer_tokens"] == pytest.approx(8.5)
    # unigrams: the answer is yes no no no -> 7, unique 5 -> 5/7
    assert c["distinct_1"] == pytest.approx(5 / 7)
    assert em.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------
# Significance


def test_paired_test_identical_is_not_significant():
    xs = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4]
    t = em.paired_test(xs, list(xs), n_boot=500)
    assert t["mean_diff"] == 0 and t["ci_low"] == 0 and t["ci_high"] == 0
    assert t["significant"] is False and t["p"] == 1.0 and t["p_permutation"] == 1.0
    assert em.verdict(t, True) == "no significant change"


def test_paired_test_hand_values():
    # d = 1..6: mean 3.5, sample variance 17.5/5 = 3.5 -> dz = 3.5/sqrt(3.5); all positive -> rank-biserial 1;
    # exact Wilcoxon two-sided p = 2 * (1/2^6) = 0.03125
    t = em.paired_test([0] * 6, [1, 2, 3, 4, 5, 6], n_boot=1000, seed=1)
    assert t["mean_diff"] == pytest.approx(3.5)
    assert t["cohens_dz"] == pytest.approx(3.5 / math.sqrt(3.5))
    assert t["rank_biserial"] == pytest.approx(1.0)
    assert t["p"] == pytest.approx(0.03125) and t["test_name"] == "Wilcoxon signed-rank"
    # the sign-flip permutation test is exact for 2**6 <= n_boot: only all-positive (and all-negative)
    # of the 64 sign patterns reach a mean of 3.5
    assert t["p_permutation"] == pytest.approx(2 / 64)
    assert t["significant"] and t["ci_low"] > 0
    # seeded: the same call gives the same CI
    assert em.paired_test([0] * 6, [1, 2, 3, 4, 5, 6], n_boot=1000, seed=1)["ci_low"] == t["ci_low"]
    # five examples: the bootstrap CI excludes 0 but the rank test cannot reach p < 0.05 (2/32)
    five = em.paired_test([0] * 5, [1, 2, 3, 4, 5])
    assert five["ci_low"] > 0 and five["p"] == pytest.approx(0.0625) and not five["significant"]


def test_paired_test_clearly_different_and_noise():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, 40)
    tuned = base + 0.3 + rng.normal(0, 0.02, 40)
    t = em.paired_test(base, tuned)
    assert t["significant"] and t["p"] < 1e-6 and t["ci_low"] > 0.25
    assert em.verdict(t, higher_is_better=True) == "better"
    assert em.verdict(t, higher_is_better=False) == "worse"
    assert em.verdict(t, higher_is_better=None) == "higher"  # neutral quantity such as length
    # symmetric noise around 0 is not significant
    noise = em.paired_test(base, base + rng.normal(0, 0.001, 40) * np.array([1, -1] * 20))
    assert noise["ci_low"] < 0 < noise["ci_high"]


# ------------------------------------------------------------------------------------------
# The gate


def _cmp(base, tuned, hib, label):
    t = em.paired_test(base, tuned, n_boot=500)
    return {"label": label, "higher_is_better": hib, "test": t, "verdict": em.verdict(t, hib)}


def test_gate_refuses_significant_regression_of_primary():
    worse = _cmp([1.0] * 10, [1.5 + 0.01 * i for i in range(10)], False, "answer NLL/token")
    g = em.gate({"nll": worse}, 0.0, 0.0, primary="nll")
    assert g["passed"] is False and "significantly worse" in g["reason"]
    assert em.gate({"nll": worse}, 0.0, 0.0, primary="nll", enabled=False)["passed"] is True
    better = _cmp([1.5 + 0.01 * i for i in range(10)], [1.0] * 10, False, "answer NLL/token")
    assert em.gate({"nll": better}, 0.0, 0.0, primary="nll")["passed"] is True
    # a regression in a secondary metric does not block (ROUGE-L worse, primary NLL better)
    rouge_worse = _cmp([0.8] * 10, [0.2] * 10, True, "ROUGE-L")
    assert em.gate({"nll": better, "rouge_l": rouge_worse}, 0.0, 0.0, primary="nll")["passed"] is True
    assert em.gate({"rouge_l": rouge_worse}, 0.0, 0.0, primary="rouge_l")["passed"] is False


def test_gate_token_limit_rule():
    n = 20
    ten_more = _cmp([0.0] * n, [1.0] * 2 + [0.0] * (n - 2), False, "hit")
    g = em.gate({"hit_limit": ten_more}, 0.0, 0.10, primary="nll")
    assert g["passed"] is True  # 10 points more: under the 25-point margin
    rambling = _cmp([0.0] * n, [1.0] * 12 + [0.0] * (n - 12), False, "hit")
    g = em.gate({"hit_limit": rambling}, 0.0, 0.60, primary="nll")
    assert g["passed"] is False and "token limit" in g["reason"]
    # same share, not significant (tiny sample): allowed
    one = _cmp([0.0], [1.0], False, "hit")
    assert em.gate({"hit_limit": one}, 0.0, 1.0, primary="nll")["passed"] is True


# ------------------------------------------------------------------------------------------
# Inputs


def test_answer_span_and_prefix_and_label_alignment():
    from ollama_ft.eval.stage import _aligned_labels, answer_span, prompt_prefix

    labels = [-100, -100, 7, 8, -100, -100, 11, 12, 13]
    assert answer_span(labels) == (6, 9)
    rec = {"input_ids": [1, 2, 7, 8, 5, 6, 11, 12, 13], "labels": labels}
    assert prompt_prefix(rec) == [1, 2, 7, 8, 5, 6]
    assert prompt_prefix({"input_ids": [1, 2], "labels": [1, 2]}) is None  # train_on_prompt: unknown start
    ids = [1, 2, 3, 4]
    assert _aligned_labels(ids, [-100, -100, 3, 4]) == [-100, -100, 3, 4]
    assert _aligned_labels(ids, [-100, 3, 4, -100]) == [-100, -100, 3, 4]  # stored pre-shifted


def test_load_examples_reports_file_and_line(tmp_path):
    from ollama_ft.eval.stage import load_examples

    (tmp_path / "test.jsonl").write_text('{"id": "a", "messages": [{"role": "user", "content": "q"}, '
                                         '{"role": "assistant", "content": "r"}]}\n{broken\n')
    with pytest.raises(UserError) as e:
        load_examples(tmp_path, "test", None)
    assert "test.jsonl:2" in e.value.message
    assert len(load_examples(tmp_path, "test", 1)) == 1  # the cap stops before the bad line


# ------------------------------------------------------------------------------------------
# End to end on tiny GGUFs

QA = [
    ("when does the clinic open", "the clinic opens at eight"),
    ("where is the ward", "the ward is one level up"),
    ("what should the patient do", "rest and water"),
    ("who answers the call", "the nurse at the desk"),
    ("how is the fever", "mild fever"),
    ("is the visit urgent", "no it is routine"),
    ("what dose", "one tablet in the morning"),
    ("can i wait", "yes please wait"),
]


def _write_split(data: Path, split: str, pairs, tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, table = [], {"id": [], "input_ids": [], "labels": []}
    for i, (q, a) in enumerate(pairs):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rid = f"{split}-{i}"
        rows.append(json.dumps({"id": rid, "messages": msgs}))
        full = tok.apply_chat_template(msgs, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        ids = tok(full)["input_ids"]
        n = len(tok(prompt)["input_ids"])
        table["id"].append(rid)
        table["input_ids"].append(ids)
        table["labels"].append([-100] * n + ids[n:])
    (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    pq.write_table(pa.table({"id": pa.array(table["id"]), "input_ids": pa.array(table["input_ids"], pa.list_(pa.int32())),
                             "labels": pa.array(table["labels"], pa.list_(pa.int32()))}), data / f"{split}.parquet")


def _fake_run(root: Path, hf_dir: Path, base_gguf: Path | None, tuned_gguf: Path, merged_dir: Path | None = None,
              name: str = "tiny", quants: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    from ollama_ft.core.runs import Run

    run = Run.open(root, create=True)
    base = root / "base"
    shutil.copytree(hf_dir, base)
    meta = {"spec": str(hf_dir), "source_kind": "local", "family": "chatml"}
    if base_gguf is not None:
        meta["gguf_source"] = {"path": str(base_gguf), "file_type": "F16"}  # as sources.py records it
    (base / "ollama_ft_base.json").write_text(json.dumps(meta))
    data = root / "data"
    data.mkdir()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    _write_split(data, "test", QA[:6], tok)
    _write_split(data, "validation", QA[6:], tok)
    (data / "chat_template.jinja").write_text((hf_dir / "chat_template.jinja").read_text())
    gg = root / "gguf"
    gg.mkdir()
    shutil.copy(tuned_gguf, gg / f"{name}-F16.gguf")
    for q in quants:
        from ollama_ft.eval.stage import _quantize

        _quantize(gg / f"{name}-F16.gguf", gg / f"{name}-{q}.gguf", q)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "type": "train", "loss": 3.0}, {"step": 2, "type": "train", "loss": 2.5},
        {"step": 2, "type": "eval", "eval_loss": 2.7}]) + "\n")
    (adapter / "train_summary.json").write_text(json.dumps({"best_eval_loss": 2.7, "best_step": 2}))
    if merged_dir is not None:
        shutil.copytree(merged_dir, root / "merged")
        (root / "merged" / "merge_check.json").write_text(json.dumps({"relative_diff": 0.0, "passed": True}))
    for stage in ("pull", "data", "train", "export"):
        run.record(stage, {})
    return run


def _cfg(quant: str = "F16", **eval_kw):
    from ollama_ft.core.config import RunConfig

    ev = {"max_examples": 4, "max_new_tokens": 12, "bootstrap_samples": 500, "threads": 2, **eval_kw}
    return RunConfig(name="tiny", ollama={"name": "tiny", "quant": quant}, eval=ev)


def test_build_report_end_to_end(tmp_path, tiny_llama, tiny_gguf):
    """Base recorded as an F16 GGUF, tuned at Q8_0: the base is re-converted at Q8_0 so that the comparison
    holds the quantization fixed (same weights underneath, so no difference may show)."""
    from ollama_ft.eval.stage import build_report

    run = _fake_run(tmp_path / "run", tiny_llama, tiny_gguf, tiny_gguf, merged_dir=tiny_llama, quants=("Q8_0",))
    out = tmp_path / "report"
    out.mkdir()
    info = build_report(_cfg(quant="Q8_0"), run, out)
    for f in ("metrics.json", "report.md", "report.html", "metrics.png", "drift.png", "loss_curve.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    # the new sections, in the markdown and in the one self-contained page
    for heading in ("Key facts", "Forgetting check (general-text perplexity)", "Drift by stage"):
        assert f"## {heading}" in md and f"<h2>{heading}" in page, heading
    assert page.count("data:image/png;base64,") == 3 and not re.search(r"(src|href)=\"(https?:)?//", page)
    # forgetting check at the registered quant: both GGUFs are the same weights, so no change and the gate passes
    gen = m["general"]
    assert gen["quant"] == "Q8_0" and gen["examples"] >= 30 and gen["passed"] is True
    assert gen["base_perplexity"] == pytest.approx(gen["tuned_perplexity"]) and gen["increase"] == pytest.approx(0.0)
    assert {d["stage"]: d.get("general_perplexity") for d in m["drift"]}["GGUF Q8_0"] == pytest.approx(gen["tuned_perplexity"])
    # key facts derived from the references ("one tablet", "eight"): compared with McNemar, both sides equal
    assert m["comparisons"]["facts_all"]["test"]["test_name"] == "exact McNemar"
    assert m["comparisons"]["facts_all"]["test"]["mean_diff"] == pytest.approx(0.0)
    assert m["examples"] == 4 and m["examples_available"] == 6 and m["cap"] == 4
    assert "first 4 of 6 test examples" in (out / "report.md").read_text()
    assert set(info["gate"]) >= {"passed", "reason"} and isinstance(info["gate"]["passed"], bool)
    assert set(info["example"]) >= {"question", "reference", "base", "tuned"}
    # the showcase is picked by a fixed, stated rule (median by fact recall), not the first or the best
    ex = info["example"]
    assert "median" in ex["rule"] and "Picked by a fixed rule: " + ex["rule"] in (out / "report.md").read_text()
    assert ex["reference"] == m["per_example"][ex["index"]]["reference"]
    recalls = sorted(r["tuned_fact_recall"] for r in m["per_example"] if r["tuned_fact_recall"] is not None)
    if recalls:
        assert ex["tuned_fact_recall"] == recalls[(len(recalls) - 1) // 2]
    assert info["summary"].startswith("4 test examples")
    for side in ("base", "tuned"):
        c = m[side]["corpus"]
        assert c["perplexity"] > 1 and math.isfinite(c["perplexity"])
        assert m[side]["tokens_per_second"] > 0
        assert c["hit_limit"] + c["stop_at_eot"] == pytest.approx(1.0)
        assert m[side]["engine"]["prompt_source"] == {"data tokens": 4}
    assert set(m["comparisons"]) >= {"nll", "rouge_l", "bleu", "chrf", "exact", "contains", "hit_limit"}
    assert m["primary_metric"] == "nll"
    # like with like: the F16 base source is not used against a Q8_0 tuned model
    assert "converted to GGUF Q8_0" in m["base"]["model"]
    assert (tmp_path / "run" / "cache" / "base-Q8_0.gguf").is_file()
    assert m["comparisons"]["nll"]["test"]["mean_diff"] == pytest.approx(0.0, abs=1e-9)
    stages = {d["stage"]: d for d in m["drift"]}
    assert list(stages)[:4] == ["adapter (PEFT, training eval)", "merged (HF)", "GGUF F16", "GGUF Q8_0"]
    assert stages["adapter (PEFT, training eval)"]["perplexity"] == pytest.approx(math.exp(2.7))
    # the F16 GGUF was converted from the merged dir: llama.cpp and transformers agree on its perplexity
    assert stages["GGUF F16"]["perplexity"] == pytest.approx(stages["merged (HF)"]["perplexity"], rel=0.01)
    assert stages["GGUF Q8_0"]["perplexity"] == pytest.approx(stages["GGUF F16"]["perplexity"], rel=0.05)
    assert "base GGUF (untuned, reference)" in stages


def test_build_report_identical_models_converts_base(tmp_path, tiny_llama, tiny_gguf):
    """No GGUF source: the base is converted (and cached); with the same weights nothing differs."""
    from ollama_ft.eval.stage import build_report

    run = _fake_run(tmp_path / "run", tiny_llama, None, tiny_gguf)
    out = tmp_path / "report"
    out.mkdir()
    info = build_report(_cfg(drift=False, max_examples=None), run, out)
    assert (tmp_path / "run" / "cache" / "base-F16.gguf").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["examples"] == 6 and "all 6 test examples" in (out / "report.md").read_text()
    for key, c in m["comparisons"].items():
        assert c["test"]["mean_diff"] == pytest.approx(0.0, abs=1e-9), key
        assert c["verdict"] == "no significant change"
    assert info["gate"]["passed"] is True
    assert info["example"]["base"] == info["example"]["tuned"]
    assert m["base"]["corpus"]["perplexity"] == pytest.approx(m["tuned"]["corpus"]["perplexity"])


def test_general_gate_refuses_registration(tmp_path, tiny_llama, tiny_gguf):
    """Forgetting gate: a tuned GGUF whose final norm is scaled up 50x (confidently wrong logits) scores the
    general text far worse than the base, so eval.max_general_ppl_increase: 0.15 refuses registration;
    null only reports."""
    from ollama_ft.eval.stage import build_report

    run = _fake_run(tmp_path / "run", tiny_llama, tiny_gguf, tiny_gguf)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    from safetensors.torch import load_file, save_file

    st = next(other.glob("*.safetensors"))
    w = load_file(st)
    w["model.norm.weight"] = w["model.norm.weight"] * 50
    save_file(w, st, metadata={"format": "pt"})
    from ollama_ft.export import converter

    converter.convert_to_gguf(other, run.root / "gguf" / "tiny-F16.gguf", "f16")
    out = tmp_path / "report"
    out.mkdir()
    info = build_report(_cfg(drift=False, max_general_ppl_increase=0.15), run, out)
    gen = json.loads((out / "metrics.json").read_text())["general"]
    assert gen["increase"] > 0.15 and gen["passed"] is False
    assert info["gate"]["passed"] is False and "eval.max_general_ppl_increase 15%" in info["gate"]["reason"]
    assert "REFUSED" in (out / "report.md").read_text()
    # null: reported, not gated
    out2 = tmp_path / "report2"
    out2.mkdir()
    info2 = build_report(_cfg(drift=False, max_general_ppl_increase=None), run, out2)
    assert "general-text perplexity rose" not in info2["gate"]["reason"]


def _run_yaml(run, **eval_kw) -> None:
    ev = {"max_examples": 3, "max_new_tokens": 8, "bootstrap_samples": 200, "threads": 2, "general_data": "none",
          **eval_kw}
    (run.root / "run.yaml").write_text(json.dumps({"name": "tiny", "ollama": {"name": "tiny", "quant": "F16"},
                                                   "eval": ev}))


def test_eval_against_other_run(tmp_path, tiny_llama, tiny_gguf):
    """Run vs run: same test split -> a report-vs-OTHER/ with both sides' lineage; a different split -> one error."""
    from ollama_ft.eval.against import eval_against

    a = _fake_run(tmp_path / "a", tiny_llama, tiny_gguf, tiny_gguf)
    b = _fake_run(tmp_path / "b", tiny_llama, tiny_gguf, tiny_gguf)
    for r in (a, b):
        _run_yaml(r)
    out = eval_against(str(a.root), str(b.root))
    assert out == a.root / "report-vs-b"
    m = json.loads((out / "metrics.json").read_text())
    assert m["comparison"] == "run vs run" and m["examples"] == 3
    assert m["sides"]["base"]["label"] == "tuned (b)" and m["sides"]["tuned"]["label"] == "tuned (a)"
    md = (out / "report.md").read_text()
    assert "Lineage:" in md and "- tuned (b): run b (" in md and "- tuned (a): run a (" in md
    assert (out / "report.html").is_file() and "## Drift by stage" not in md
    for c in m["comparisons"].values():
        assert c["test"]["mean_diff"] == pytest.approx(0.0, abs=1e-9)
    # another test split: refused before any model runs, naming both hashes
    test = b.root / "data" / "test.jsonl"
    test.write_text(test.read_text().replace("the clinic opens at eight", "the clinic opens at nine"))
    with pytest.raises(UserError) as e:
        eval_against(str(a.root), str(b.root))
    assert "different test splits" in e.value.message and "sha256" in e.value.message
    with pytest.raises(UserError):
        eval_against(str(a.root), str(a.root))


def test_missing_tuned_quant_is_a_user_error(tmp_path, tiny_llama, tiny_gguf):
    from ollama_ft.core.config import RunConfig
    from ollama_ft.eval.stage import build_report

    run = _fake_run(tmp_path / "run", tiny_llama, tiny_gguf, tiny_gguf)
    cfg = RunConfig(name="tiny", ollama={"name": "tiny", "quant": "Q4_K_M"})
    with pytest.raises(UserError) as e:
        build_report(cfg, run, tmp_path)
    assert "tiny-Q4_K_M.gguf" in e.value.message and "tiny-F16.gguf" in e.value.message


def test_build_report_via_ollama(tmp_path, tiny_llama, tiny_gguf):
    """eval.via=ollama: answers come from the (stand-in) Ollama API; perplexity still from the GGUFs."""
    import hashlib

    import httpx

    from ollama_ft.core.config import RunConfig
    from ollama_ft.eval.stage import build_report
    from tests.fake_ollama import FakeOllama

    fake = FakeOllama(store_dir=tmp_path / "models").start()
    try:
        data = tiny_gguf.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        chatml = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                  "<|im_start|>assistant\n")
        with httpx.Client(base_url=fake.url, timeout=60) as c:
            assert c.post(f"/api/blobs/{digest}", content=data).status_code == 201
            for model in ("tinybase:latest", "tiny:latest"):
                r = c.post("/api/create", json={"model": model, "files": {"t.gguf": digest}, "template": chatml,
                                                "parameters": {"stop": ["<|im_end|>"]}, "stream": False})
                assert r.status_code == 200, r.text
        run = _fake_run(tmp_path / "run", tiny_llama, tiny_gguf, tiny_gguf)
        meta = json.loads((run.root / "base" / "ollama_ft_base.json").read_text())
        (run.root / "base" / "ollama_ft_base.json").write_text(json.dumps({**meta, "spec": "tinybase",
                                                                          "source_kind": "ollama"}))
        cfg = RunConfig(name="tiny", ollama={"name": "tiny", "quant": "F16", "host": fake.url},
                        eval={"max_examples": 3, "max_new_tokens": 8, "via": "ollama", "drift": False,
                              "bootstrap_samples": 200})
        out = tmp_path / "report"
        out.mkdir()
        info = build_report(cfg, run, out)
        chats = fake.calls("POST", "/api/chat")
        assert len(chats) == 6  # 3 examples x (base, tuned)
    finally:
        fake.stop()
    m = json.loads((out / "metrics.json").read_text())
    assert m["via"] == "ollama" and m["base"]["engine"]["ollama_model"] == "tinybase"
    assert m["tuned"]["engine"]["ollama_model"] == "tiny:latest"
    assert m["base"]["corpus"]["perplexity"] == pytest.approx(m["tuned"]["corpus"]["perplexity"])
    assert all(g["base"]["tokens"] <= 8 for g in m["per_example"])
    assert info["gate"]["passed"] and info["example"]["base"] == info["example"]["tuned"]


@pytest.mark.slow
def test_eval_on_gemma_270m(tmp_path, gemma_gguf):
    """The real Gemma 3 270M GGUF on the bundled clinic data: tokens, template, stop at <end_of_turn>."""
    import llama_cpp
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers.utils.chat_template_utils import render_jinja_template

    from ollama_ft.core.runs import Run
    from ollama_ft.eval.stage import build_report

    vocab = llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    from ollama_ft.ollama.templates import family_jinja

    template = family_jinja("gemma3")  # this GGUF carries no template (Ollama keeps it as a separate layer)
    bos = vocab.detokenize([vocab.token_bos()], special=True).decode()
    sample = Path(__file__).resolve().parent.parent / "ollama_ft" / "data_files" / "clinic_sample.jsonl"
    recs = [json.loads(x) for x in sample.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("split") == "test"][:3]
    run = Run.open(tmp_path / "run", create=True)
    for d in ("base", "data", "gguf"):
        (run.root / d).mkdir()
    (run.root / "base" / "ollama_ft_base.json").write_text(json.dumps({"spec": "gemma3:270m",
                                                                      "gguf_source": str(gemma_gguf)}))
    (run.root / "data" / "chat_template.jinja").write_text(template)
    rows, cols = [], {"id": [], "input_ids": [], "labels": []}
    for r in recs:
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        (full,), _ = render_jinja_template([msgs], chat_template=template, bos_token=bos)
        (prompt,), _ = render_jinja_template([msgs[:-1]], chat_template=template, bos_token=bos,
                                             add_generation_prompt=True)
        assert full.startswith(prompt)
        p_ids = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
        ids = p_ids + vocab.tokenize(full[len(prompt):].encode(), add_bos=False, special=True)
        cols["id"].append(r["id"])
        cols["input_ids"].append(ids)
        cols["labels"].append([-100] * len(p_ids) + ids[len(p_ids):])
        rows.append(json.dumps({"id": r["id"], "messages": msgs}))
    vocab.close()
    (run.root / "data" / "test.jsonl").write_text("\n".join(rows) + "\n")
    pq.write_table(pa.table(cols), run.root / "data" / "test.parquet")
    shutil.copy(gemma_gguf, run.root / "gguf" / "g-Q4_K_M.gguf")
    for stage in ("pull", "data", "export"):
        run.record(stage, {})
    from ollama_ft.core.config import RunConfig

    cfg = RunConfig(name="g", ollama={"name": "g", "quant": "Q4_K_M"}, data={"path": str(sample)},
                    eval={"max_examples": 3, "max_new_tokens": 16, "drift": False, "bootstrap_samples": 500})
    out = tmp_path / "report"
    out.mkdir()
    info = build_report(cfg, run, out)
    m = json.loads((out / "metrics.json").read_text())
    # the new sections: key facts from the sample's own "facts", general-text perplexity before/after
    md = (out / "report.md").read_text()
    assert m["facts_source"] == "the data file's \"facts\"" and m["per_example"][0]["facts"] == recs[0]["facts"]
    assert "## Key facts" in md and "## Forgetting check (general-text perplexity)" in md
    assert 1 < m["general"]["base_perplexity"] < 1000 and m["general"]["increase"] == pytest.approx(0.0)
    assert "Picked by a fixed rule" in md and (out / "report.html").is_file()
    for side in ("base", "tuned"):
        assert 1 < m[side]["corpus"]["perplexity"] < 1000
        assert m[side]["tokens_per_second"] > 1
        # this GGUF is the pretrained (not instruction-tuned) 270M: it rarely ends a turn by itself
        assert 0.0 <= m[side]["corpus"]["stop_at_eot"] <= 1.0
        assert m[side]["corpus"]["answer_tokens_scored"] > 20
    assert info["gate"]["passed"] and info["example"]["base"] == info["example"]["tuned"]
    assert "<end_of_turn>" not in info["example"]["base"] and info["example"]["base"].strip()
    print(json.dumps({k: m["base"]["corpus"][k] for k in ("perplexity", "rouge_l", "chrf", "stop_at_eot")}),
          m["base"]["tokens_per_second"], m["seconds"])
