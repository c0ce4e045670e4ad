"""Blind review: ratings store, token-gated app, crash safety, several reviewers, and the unblinded report."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from tests.review_helpers import QUESTIONS, ROOT, ReviewServer, make_run


def _store(run_root, reviewer="alice", against=None):
    from ollama_ft.core.runs import Run
    from ollama_ft.review.items import load_comparison
    from ollama_ft.review.store import ReviewStore

    comp = load_comparison(Run(run_root), Run(against) if against else None)
    return ReviewStore(comp, reviewer, seed=0)


def _rate_unblinded(store, n, by_side: dict, preferred: str):
    """Rate item n giving each *side* the scores in by_side, and prefer `preferred` (a side or 'tie')."""
    a, b = store._ab(store.items[n])
    scores = {"a": by_side[a], "b": by_side[b]}
    pref = "tie" if preferred == "tie" else ("a" if preferred == a else "b")
    return store.rate(n, scores, pref)


GOOD = {"relevance": 5, "fluency": 4, "professionalism": 4}
POOR = {"relevance": 2, "fluency": 3, "professionalism": 3}


def test_blind_order_is_stable_per_reviewer_and_hides_sides(tmp_path):
    run = make_run(tmp_path / "runs")
    s1, s2 = _store(run), _store(run)
    st = s1.page_state()
    assert [x["a"] for x in st["items"]] == [x["a"] for x in s2.page_state()["items"]]  # a reload shows the same
    assert len(st["items"]) == len(QUESTIONS) and st["done"] == 0 and st["start"] == 0
    text = json.dumps(st)
    assert '"base"' not in text and '"tuned"' not in text and "side" not in text  # nothing names a side
    orders = {s1._ab(it) for it in s1.items}
    assert orders == {("base", "tuned"), ("tuned", "base")}  # both orders occur over six items
    bob = _store(run, "bob")
    assert [bob._ab(it) for it in bob.items] != [s1._ab(it) for it in bob.items] or \
        [it.id for it in bob.items] != [it.id for it in s1.items]  # another reviewer, another shuffle


def test_rate_validates_saves_atomically_and_resumes(tmp_path):
    run = make_run(tmp_path / "runs")
    s = _store(run)
    with pytest.raises(ValueError, match="1-5"):
        s.rate(0, {"a": {"relevance": 6}}, None)
    with pytest.raises(ValueError, match="criterion"):
        s.rate(0, {"a": {"charm": 3}}, None)
    with pytest.raises(ValueError, match="preference"):
        s.rate(0, {}, "base")
    res = s.rate(0, {"a": dict(GOOD), "b": dict(POOR)}, "a")
    assert res["complete"] and res["done"] == 1
    s.rate(1, {"a": {"relevance": 3}}, None)  # partial ratings are kept too
    files = sorted(p.name for p in (run / "review" / "base-vs-tuned").iterdir())
    assert files == ["alice.json"]  # no temp file left behind
    again = _store(run).page_state()
    assert again["done"] == 1 and again["start"] == 1  # resumes at the first unfinished item
    assert again["items"][1]["scores"]["a"] == {"relevance": 3}


def test_changed_answers_set_old_ratings_aside(tmp_path):
    run = make_run(tmp_path / "runs")
    s = _store(run)
    s.rate(0, {"a": dict(GOOD), "b": dict(POOR)}, "a")
    m = json.loads((run / "report" / "metrics.json").read_text())
    target = s.items[0].id
    for row in m["per_example"]:
        if row["id"] == target:
            row["tuned"]["text"] = "a different answer after re-running eval"
    (run / "report" / "metrics.json").write_text(json.dumps(m))
    st = _store(run).page_state()
    assert st["stale"] == 1 and st["done"] == 0


def test_app_refuses_requests_without_the_token(tmp_path):
    from starlette.testclient import TestClient

    from ollama_ft.review.server import create_app

    run = make_run(tmp_path / "runs")
    client = TestClient(create_app(_store(run), "s3cret"), base_url="http://127.0.0.1")
    for path in ("/", "/api/state", "/export.csv", "/?token=wrong"):
        r = client.get(path)
        assert r.status_code == 403 and "token" in r.text
    assert client.post("/api/rate", json={"item": 0}).status_code == 403
    r = client.get("/?token=s3cret")
    assert r.status_code == 200 and "Blind review" in r.text
    assert "http" not in r.text.split("<script>")[0].replace('http-equiv', '')  # no external CSS/fonts
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer"
    h = {"X-Review-Token": "s3cret"}
    bad = client.post("/api/rate", headers=h, json={"item": 99, "scores": {}})
    assert bad.status_code == 400 and "item" in bad.json()["error"]
    ok = client.post("/api/rate", headers=h, json={"item": 0, "scores": {"a": GOOD, "b": POOR}, "preference": "b"})
    assert ok.status_code == 200 and ok.json()["complete"] is True
    rows = list(csv.DictReader(io.StringIO(client.get("/export.csv?token=s3cret").text)))
    assert len(rows) == 1 and rows[0]["preference"] == "B" and rows[0]["A_relevance"] == "5"
    assert "base" not in rows[0] and "tuned" not in json.dumps(rows)  # the page's export stays blind
    # a Host other than localhost (DNS rebinding) is refused even with the token
    other = TestClient(create_app(_store(run), "s3cret"), base_url="http://evil.example")
    assert other.get("/?token=s3cret").status_code == 400


def test_ratings_survive_kill_9_and_second_reviewer_does_not_overwrite(tmp_path):
    run = make_run(tmp_path / "runs")
    srv = ReviewServer(str(run), "--reviewer", "alice")
    try:
        assert srv.url.startswith("http://127.0.0.1:") and len(srv.token) >= 24
        assert srv.api("GET", "/api/state").json()["done"] == 0
        for n in range(3):
            r = srv.api("POST", "/api/rate", json={"item": n, "scores": {"a": GOOD, "b": POOR}, "preference": "a"})
            assert r.status_code == 200 and r.json()["done"] == n + 1
    finally:
        srv.kill()  # SIGKILL mid-session: no shutdown code runs
    path = run / "review" / "base-vs-tuned" / "alice.json"
    saved = json.loads(path.read_text())
    assert sum(1 for r in saved["items"].values() if r["preference"] == "a") == 3
    alice_bytes = path.read_bytes()

    srv = ReviewServer(str(run), "--reviewer", "alice")
    try:
        st = srv.api("GET", "/api/state").json()
        assert st["done"] == 3 and st["start"] == 3  # restarted server resumes after the three
        assert st["items"][0]["scores"]["a"] == GOOD
        # (the lock of the killed server died with it; a second live server for alice is refused)
        twin = _cli("review", str(run), "--reviewer", "alice")
        assert twin.returncode == 1 and "already has a review page open" in twin.stderr
        assert "review page:" not in twin.stdout
    finally:
        srv.stop()

    bob = ReviewServer(str(run), "--reviewer", "bob")
    try:
        assert bob.api("GET", "/api/state").json()["done"] == 0  # bob starts fresh, not from alice's file
        bob.api("POST", "/api/rate", json={"item": 0, "scores": {"a": POOR, "b": GOOD}, "preference": "b"})
    finally:
        bob.stop()
    assert path.read_bytes() == alice_bytes
    assert json.loads((run / "review" / "base-vs-tuned" / "bob.json").read_text())["reviewer"] == "bob"


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ollama_ft", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=120)


def test_no_eval_yet_is_a_clear_error(tmp_path):
    run = tmp_path / "runs" / "fresh"
    run.mkdir(parents=True)
    (run / "run.yaml").write_text("name: fresh\n")
    r = _cli("review", str(run))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has no eval yet" in r.stderr and f"ollama-ft eval {run}" in r.stderr
    r = _cli("review", str(run), "--reviewer", "no/slashes")
    assert r.returncode == 1  # (no eval is reported first; the name check is covered below)
    from ollama_ft.core.errors import UserError
    from ollama_ft.review.store import check_reviewer

    with pytest.raises(UserError, match="not usable as a file name"):
        check_reviewer("no/slashes")


def test_against_reviews_the_run_vs_run_eval(tmp_path):
    """--against OTHER reviews what `eval RUN --against OTHER` wrote (OTHER's tuned model on the base side),
    in a comparison of its own; without that eval, the error says what to type."""
    from ollama_ft.core.errors import UserError
    from ollama_ft.eval import human

    runs = tmp_path / "runs"
    r1, r2 = make_run(runs, "r1"), make_run(runs, "r2")
    with pytest.raises(UserError, match="has no eval yet") as e:
        _store(r1, against=r2)
    assert f"ollama-ft eval {r1} --against {r2}" in e.value.hint
    vs = r1 / "report-vs-r2"
    vs.mkdir()
    m = json.loads((r1 / "report" / "metrics.json").read_text())
    for row in m["per_example"]:
        row["base"]["text"] = row["tuned"]["text"].replace("v1 answer", "v2 answer")
    m["sides"] = {"base": {"label": "tuned (r2)"}, "tuned": {"label": "tuned (r1)"}}
    (vs / "metrics.json").write_text(json.dumps(m))
    s = _store(r1, against=r2)
    assert s.comparison.key == "vs-r2" and s.comparison.labels == {"base": "tuned (r2)", "tuned": "tuned (r1)"}
    assert s.path == r1 / "review" / "vs-r2" / "alice.json"
    assert s.report_command == f"ollama-ft review {r1} --against {runs / 'r2'} --report"
    _fill(r1, "alice", {0, 1, 2}, against=r2)
    (got,) = [human.gather(r1, m, "vs-r2", {"automatic": 0.4, "human": 0.6}, n_boot=200)]
    assert got["labels"] == {"base": "tuned (r2)", "tuned": "tuned (r1)"} and got["items"] == 6
    assert human.gather(r1, m, "base-vs-tuned", {"automatic": 0.4, "human": 0.6}) is None  # kept apart


def _fill(run, reviewer, tuned_pref_items, against=None, tuned_side="tuned", base_side="base"):
    """Rate every item: tuned GOOD and preferred on the item ids in the set, else both POOR and a tie."""
    s = _store(run, reviewer, against=against)
    for n, it in enumerate(s.items):  # n: position in the reviewer's own order; the set names item ids
        if int(it.id.split("-")[1]) in tuned_pref_items:
            _rate_unblinded(s, n, {tuned_side: GOOD, base_side: POOR}, tuned_side)
        else:
            _rate_unblinded(s, n, {tuned_side: POOR, base_side: POOR}, "tie")
    return s


def test_statistics_match_scipy_and_krippendorff(tmp_path):
    import krippendorff
    import numpy as np
    from scipy import stats

    from ollama_ft.eval import human

    run = make_run(tmp_path / "runs")
    _fill(run, "alice", {0, 1, 2, 3, 4})
    _fill(run, "bob", {0, 1, 2, 3})
    m = json.loads((run / "report" / "metrics.json").read_text())
    s = human.gather(run, m, "base-vs-tuned", {"automatic": 0.4, "human": 0.6}, n_boot=500)
    assert s["reviewers"] == ["alice", "bob"] and s["items"] == 6 and s["ratings"] == 12
    # per item net vote: items 0-3 both prefer tuned, item 4 alice tuned / bob tie -> tuned, item 5 tie
    p = s["preference"]
    assert (p["candidate"], p["reference"], p["tie"]) == (5, 0, 1)
    assert p["p_sign"] == pytest.approx(stats.binomtest(5, 5, 0.5).pvalue)
    # relevance differences per item (mean over reviewers): 3, 3, 3, 3, (3+0)/2, 0
    diffs = [3, 3, 3, 3, 1.5, 0]
    rel = s["criteria"]["relevance"]
    assert rel["diff"]["mean"] == pytest.approx(np.mean(diffs))
    assert rel["p_wilcoxon"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert rel["diff"]["ci_low"] <= rel["diff"]["mean"] <= rel["diff"]["ci_high"]
    assert rel["tuned"]["mean"] == pytest.approx((9 * 5 + 3 * 2) / 12)
    # agreement: the same matrix handed to the krippendorff package directly
    order = sorted(f"test-{i}" for i in range(6))
    alice = {i: (GOOD if i in {0, 1, 2, 3, 4} else POOR) for i in range(6)}
    bob = {i: (GOOD if i in {0, 1, 2, 3} else POOR) for i in range(6)}
    mat = [[(who[int(i.split("-")[1])]["relevance"] if side == "tuned" else POOR["relevance"])
            for i in order for side in ("base", "tuned")] for who in (alice, bob)]
    want = krippendorff.alpha(reliability_data=np.asarray(mat, float), level_of_measurement="ordinal")
    assert s["agreement"]["relevance"] == pytest.approx(want)
    # combined: automatic = mean(rouge_l, chrf/100) over the rated items; human = (mean 1-5 - 1) / 4
    c = s["combined"]
    auto_tuned = np.mean([(0.5 + 0.05 * i + 0.6) / 2 for i in range(6)])
    assert c["tuned"]["automatic"] == pytest.approx(auto_tuned)
    assert c["base"]["automatic"] == pytest.approx((0.1 + 0.2) / 2)
    human_tuned = (np.mean([np.mean(list(GOOD.values()))] * 9 + [np.mean(list(POOR.values()))] * 3) - 1) / 4
    assert c["tuned"]["human"] == pytest.approx(human_tuned)
    assert c["tuned"]["combined"] == pytest.approx(0.4 * auto_tuned + 0.6 * human_tuned)
    from ollama_ft.eval.report import _md_table

    md = "\n".join(human.section_lines([s], _md_table))
    assert "2 reviewer(s): alice, bob" in md and f"relevance {s['agreement']['relevance']:.2f}" in md
    assert f"sign test p = {p['p_sign']:.3f}" in md and f"{c['tuned']['combined']:.3f}" in md


def test_report_shows_human_review_on_a_real_eval(tmp_path, tiny_llama, tiny_gguf):
    """The eval stage's own metrics.json (tiny model, both sides the same weights), ratings written through
    the store, then `ollama-ft review RUN --report`: report.md has the scores, the p-value and the combined score."""
    from scipy import stats

    from ollama_ft.eval.stage import build_report
    from tests.test_evaluate import _cfg, _fake_run

    run = _fake_run(tmp_path / "runs" / "tiny", tiny_llama, tiny_gguf, tiny_gguf)
    (run.root / "run.yaml").write_text("name: tiny\nreview:\n  combined_weights: {automatic: 0.3, human: 0.7}\n")
    out = run.root / "report"
    out.mkdir()
    build_report(_cfg(drift=False, general_data="none"), run, out)  # the forgetting check is not under test here
    assert "## Human review" not in (out / "report.md").read_text()  # no ratings, no section
    s = _store(run.root, "alice")
    for n in range(len(s.items)):
        _rate_unblinded(s, n, {"tuned": GOOD, "base": POOR}, "tuned")
    r = _cli("review", str(run.root), "--report")
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    n = len(s.items)
    assert "## Human review (blind A/B, 1-5)" in md and f"{n} of {n} items rated" in md
    assert f"sign test p = {stats.binomtest(n, n, 0.5).pvalue:.3f}" in md
    assert "| relevance | 2.00" in md and "| 5.00" in md
    h = json.loads((out / "human.json").read_text())[0]
    assert h["combined"]["weights"] == {"automatic": 0.3, "human": 0.7}
    cmb = h["combined"]["tuned"]
    assert cmb["combined"] == pytest.approx(0.3 * cmb["automatic"] + 0.7 * cmb["human"])
    assert f"{cmb['combined']:.3f}" in md and "0.3 x automatic + 0.7 x human" in md
    # the unblinded CLI export names the sides
    r = _cli("review", str(run.root), "--export-csv", str(tmp_path / "all.csv"))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "all.csv")))
    assert len(rows) == n and {x["preferred"] for x in rows} == {"tuned"} and rows[0]["relevance_tuned"] == "5"
