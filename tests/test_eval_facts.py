"""Key facts, the forgetting check's pieces and the HTML report: extraction and normalisation cases,
contradictions, the paired tests against scipy computed independently, the general-text gate, the
bundled sample data's facts and held-out split, and a self-contained report.html."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.eval import facts as ef
from ollama_ft.eval import general as eg
from ollama_ft.eval import metrics as em

DATA = Path(__file__).resolve().parent.parent / "ollama_ft" / "data_files"


def _values(text: str, kind: str | None = None) -> list[str]:
    return [f.value for f in ef.extract(text) if kind is None or f.kind == kind]


# ------------------------------------------------------------------------------------------
# Extraction and normalisation


@pytest.mark.parametrize("text", ["7:40", "07:40", "7.40", "7:40 am", "7.40 a.m.", "07h40"])
def test_time_spellings_are_one_value(text):
    assert _values(f"We open at {text} sharp.", "time") == ["07:40"]


def test_twelve_hour_clock_and_amounts():
    assert _values("from 9 am to 6:20 pm", "time") == ["09:00", "18:20"]
    assert _values("12 pm and 12:30 am", "time") == ["12:00", "00:30"]
    # a decimal amount with a unit is not a time; a bare number is not a time
    assert _values("it costs 2.50 euros", "time") == [] and _values("it costs 2.50 euros", "number") == ["2.5"]
    assert _values("Room 40", "time") == []


def test_numbers_words_codes_phones_dates():
    f = {x.value: x.slot for x in ef.extract("seen within two hours, logged every four hours")}
    assert f == {"2": "hour", "4": "hour"}
    assert [(x.value, x.slot) for x in ef.extract("a ten-minute handover in Room 7")] == [("10", "minute"), ("7", "room")]
    assert [(x.value, x.slot) for x in ef.extract("Fill in Form LV-12 at Room 14C")] == [("LV12", "form"), ("14C", "room")]
    assert _values("Call 0100 555 2740 or 0100-555-2740", "number") == ["01005552740"]
    assert _values("within 5 working days", "number") == ["5"]
    assert [x.slot for x in ef.extract("within 5 working days")] == ["day"]
    assert _values("on 12 March 2024, March 3rd and 2024-03-12", "date") == ["2024-03-12", "03-03"]
    assert _values("1,250 people", "number") == ["1250"]


def test_names_not_sentence_starts():
    names = _values("Blood draws are done in Room 14C, which staff call the Lantern Room. Ask Dr. Imogen Thale.",
                    "name")
    assert names == ["lantern room", "dr imogen thale"]  # not "blood" (sentence start), not "room" (a label)
    assert _values("Violet is the top code at Larkspur Valley Clinic.", "name") == ["larkspur valley clinic"]


# ------------------------------------------------------------------------------------------
# Scoring answers


def test_score_answer_recall_all_and_normalised_match():
    facts = ef.facts_for("The clinic is open from 7:40 to 18:20.", ["7:40", "18:20"])
    assert [f.slot for f in facts] == ["time", "time"]
    s = ef.score_answer("We are open 07.40 until 6:20 pm.", facts)
    assert s == {"recall": 1.0, "all": 1.0, "contradiction": 0.0, "missing": [], "contradicted": []}
    half = ef.score_answer("We open at 7:40.", facts)
    assert half["recall"] == 0.5 and half["all"] == 0.0 and half["missing"] == ["18:20"]
    assert half["contradiction"] == 0.0  # leaving a fact out is not contradicting it


def test_contradiction_is_a_different_value_in_the_same_slot():
    facts = ef.facts_for("Copper means the patient must be seen within 20 minutes in Room 14C.")
    assert {(f.value, f.slot) for f in facts} == {("20", "minute"), ("14C", "room")}
    s = ef.score_answer("Copper patients are seen within 25 minutes in Room 14C.", facts)
    assert s["contradiction"] == 1.0 and s["contradicted"] == [{"fact": "20", "answer_says": "25"}]
    assert s["recall"] == 0.5
    # another number in another slot (a room, a floor) contradicts nothing
    other = ef.score_answer("Copper patients go to Room 14C on floor 2.", facts)
    assert other["contradiction"] == 0.0 and other["missing"] == ["20"]
    # a different time contradicts a time
    t = ef.score_answer("Open 9:15 to 15:45.", ef.facts_for("Open 7:40 to 18:20."))
    assert t["contradiction"] == 1.0 and t["recall"] == 0.0


def test_given_phrase_facts_and_no_facts():
    facts = ef.facts_for("Velmorin is stored in locked Cabinet K.", ["Cabinet K", "two hours"])
    assert [f.kind for f in facts] == ["phrase", "number"]
    assert ef.score_answer("It is in cabinet k, for 2 hours.", facts)["all"] == 1.0
    assert ef.score_answer("It is in the cabinet.", facts)["recall"] == 0.0
    assert ef.score_answer("anything", [])["recall"] is None


def test_median_example_rule():
    assert ef.median_example([1.0, 0.0, 0.5, None, 0.5]) == 2  # sorted 0, .5, .5, 1 -> lower median, first
    assert ef.median_example([None, None]) is None


def test_given_facts_by_id_and_reference(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "facts": ["7:40"], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r1"}]},
        {"facts": ["Room 3A"], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r2"}]},
        {"id": "c", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "at 9:15"}]},
    ]) + "\nnot json\n")
    given = ef.given_facts([p])
    recs = [{"id": "a", "messages": [{"role": "assistant", "content": "other text"}]},
            {"id": "zz", "messages": [{"role": "assistant", "content": "r2"}]},
            {"id": "c", "messages": [{"role": "assistant", "content": "at 9:15"}]}]
    facts, source = ef.example_facts(recs, given)
    assert [[f.text for f in fs] for fs in facts] == [["7:40"], ["Room 3A"], ["9:15"]]
    assert source == "derived from the reference and the data file's \"facts\""
    # A data stage that writes "facts" into test.jsonl is the only source: a record it left without
    # (its facts were malformed) has them derived, not read again from the source file.
    recs[1]["facts"] = ["Room 3A"]
    facts, _ = ef.example_facts(recs, given)
    assert [[f.text for f in fs] for fs in facts] == [[], ["Room 3A"], ["9:15"]]  # "other text": no facts


# ------------------------------------------------------------------------------------------
# Paired tests: scipy computed independently


def test_mcnemar_matches_scipy_binomtest():
    from scipy.stats import binomtest

    # 40 pairs: 9 where only tuned is right, 2 where only base is, 29 ties
    base = [0] * 9 + [1] * 2 + [1] * 10 + [0] * 19
    tuned = [1] * 9 + [0] * 2 + [1] * 10 + [0] * 19
    t = em.paired_test(base, tuned, binary=True, n_boot=1000)
    assert t["test_name"] == "exact McNemar"
    assert t["p"] == pytest.approx(binomtest(9, 11, 0.5).pvalue)
    assert t["p"] == pytest.approx(0.06542968750)  # 2 * P(X <= 2), X ~ Bin(11, 1/2) = 2 * 67/2048
    assert t["mean_diff"] == pytest.approx(7 / 40)
    assert not t["significant"]  # p > 0.05 even though the bootstrap CI may exclude 0


def test_permutation_and_bootstrap_match_scipy():
    import numpy as np
    from scipy.stats import bootstrap, permutation_test

    rng = np.random.default_rng(3)
    a = rng.normal(size=25)
    b = a + 0.4 + rng.normal(scale=0.8, size=25)
    t = em.paired_test(a, b, n_boot=999, seed=5)
    d = b - a
    ref = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=999, vectorized=True,
                           random_state=np.random.default_rng(6))
    ci = bootstrap((d,), np.mean, n_resamples=999, method="percentile", vectorized=True,
                   random_state=np.random.default_rng(5)).confidence_interval
    assert t["p_permutation"] == pytest.approx(ref.pvalue)
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((ci.low, ci.high))


# ------------------------------------------------------------------------------------------
# Forgetting check pieces


def test_general_gate_refuses_past_the_limit():
    base = [(10.0, 10), (12.0, 10)]  # ppl exp(1.1)
    worse = [(12.0, 10), (14.0, 10)]  # ppl exp(1.3): +22%
    g = {**eg.check(base, worse, max_increase=0.15, n_boot=200, seed=0), "examples": 2, "source": "x.jsonl"}
    assert g["increase"] == pytest.approx(np.exp(0.2) - 1) and g["passed"] is False
    reason = eg.gate_reason(g)
    assert "+22.1%" in reason and "eval.max_general_ppl_increase 15%" in reason
    out = em.gate({}, 0.0, 0.0, primary="nll", extra_reasons=[reason])
    assert out["passed"] is False and "general-text perplexity rose" in out["reason"]
    assert eg.check(base, worse, max_increase=0.25, n_boot=200, seed=0)["passed"] is True
    assert eg.check(base, worse, max_increase=None, n_boot=200, seed=0)["passed"] is True


def test_general_data_errors_and_formats(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(UserError) as e:
        eg.load_texts(bad)
    assert f"{bad}:2" in e.value.message
    with pytest.raises(UserError):
        eg.general_path(str(tmp_path / "missing.jsonl"))
    assert eg.general_path("none") is None and eg.general_path(None) == eg.BUNDLED
    txt = tmp_path / "g.txt"
    txt.write_text("One paragraph.\n\nAnother one.\n")
    assert [t["text"] for t in eg.load_texts(txt)] == ["One paragraph.", "Another one."]


def test_bundled_general_set_is_varied_and_disjoint_from_replay_chat():
    texts = eg.load_texts(eg.BUNDLED)
    assert len(texts) >= 30 and len({t["id"] for t in texts}) == len(texts)
    assert all(30 <= len(t["text"].split()) <= 120 for t in texts)
    words = set()
    for t in texts:
        words |= set(em.words(t["text"]))
    assert not ({"larkspur", "clinic", "triage"} & words)  # nothing of the demo's domain
    chat = " ".join(p.read_text(encoding="utf-8") for p in DATA.glob("general_chat*.jsonl"))
    for t in texts:  # the forgetting set must not be trained on through replay
        assert t["text"][:60] not in chat


# ------------------------------------------------------------------------------------------
# The bundled sample data


def test_sample_data_carries_facts_and_test_questions_are_held_out():
    recs = [json.loads(x) for x in (DATA / "clinic_sample.jsonl").read_text().splitlines() if x.strip()]
    test = [r for r in recs if r["split"] == "test"]
    train_q = {em.normalise(r["messages"][1]["content"]) for r in recs if r["split"] == "train"}
    assert test and all(r.get("facts") for r in test)
    for r in test:
        assert em.normalise(r["messages"][1]["content"]) not in train_q, r["id"]
        # no training question merely wraps the test question
        assert not any(em.normalise(r["messages"][1]["content"]) in q for q in train_q), r["id"]
        facts = ef.facts_for(r["messages"][-1]["content"], r["facts"])
        assert ef.score_answer(r["messages"][-1]["content"], facts)["all"] == 1.0, r["id"]


# ------------------------------------------------------------------------------------------
# HTML report


def test_html_is_self_contained(tmp_path):
    from ollama_ft.eval.html_report import render_html

    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    md = ("# T\n\n| a | b |\n|---|---|\n| 1 | <script>x</script> |\n\n![p](plot.png)\n\n![remote](https://e.x/a.png)\n\n"
          "[link](http://example.com/x)\n")
    page = render_html(md, tmp_path, "t")
    assert "<table>" in page and "data:image/png;base64," in page
    assert "<script>" not in page  # raw HTML in the markdown is escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)

