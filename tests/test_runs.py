"""Run layout: atomic stages, skip when the fingerprint matches, stale propagation, kill safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ollama_ft.core.runs import Run


def test_stage_runs_once_then_skips(tmp_path):
    run = Run.open("r", tmp_path, create=True)
    calls = []

    def build(out):
        calls.append(1)
        (out / "a.txt").write_text("hello")
        return {"summary": "ok"}

    r1 = run.run_stage("pull", {"x": 1}, build)
    assert not r1.skipped and (tmp_path / "r" / "base" / "a.txt").read_text() == "hello"
    r2 = run.run_stage("pull", {"x": 1}, build)
    assert r2.skipped and len(calls) == 1
    r3 = run.run_stage("pull", {"x": 2}, build)  # changed settings -> redone
    assert not r3.skipped and len(calls) == 2
    r4 = run.run_stage("pull", {"x": 2}, build, force=True)
    assert not r4.skipped and len(calls) == 3
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    e = m["stages"]["pull"]
    assert e["outputs"] == {"a.txt": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert "torch" in e["versions"] and e["seconds"] >= 0 and e["fingerprint"]


def test_failure_leaves_no_partial_output(tmp_path):
    run = Run.open("r", tmp_path, create=True)

    def build(out):
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run.run_stage("data", {}, build)
    assert not (tmp_path / "r" / "data").exists()
    assert list((tmp_path / "r").glob(".data.tmp-*")) == []
    assert run.entry("data") is None


def test_upstream_change_makes_downstream_stale(tmp_path):
    run = Run.open("r", tmp_path, create=True)
    run.run_stage("pull", {}, lambda o: (o / "w").write_text("1") and None)
    run.run_stage("data", {}, lambda o: (o / "d").write_text("1") and None)
    assert {r["stage"]: r["state"] for r in run.status()}["data"] == "done"
    run.run_stage("pull", {}, lambda o: (o / "w").write_text("2") and None, force=True)
    st = {r["stage"]: r for r in run.status()}
    assert st["data"]["state"] == "stale" and "pull changed" in st["data"]["reason"]
    assert st["train"]["state"] == "pending"
    # re-running data with the same settings is not skipped, since its input changed
    res = run.run_stage("data", {}, lambda o: (o / "d").write_text("1") and None)
    assert not res.skipped


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from ollama_ft.core.runs import Run
    run = Run.open("r", sys.argv[1], create=True)
    def build(out):
        (out / "part1").write_text("x")
        print("started", flush=True)
        time.sleep(60)
        (out / "part2").write_text("y")
    run.run_stage("train", {}, build)
""")


def test_killed_stage_leaves_nothing_and_rerun_completes(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.stdout.readline().strip() == "started"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    run = Run(tmp_path / "r")
    assert not (tmp_path / "r" / "adapter").exists()
    assert run.entry("train") is None
    leftovers = list((tmp_path / "r").glob(".adapter.tmp-*"))
    assert leftovers  # SIGKILL leaves the temp dir; the next run cleans it
    res = run.run_stage("train", {}, lambda o: (o / "done").write_text("ok") and None)
    assert not res.skipped and (tmp_path / "r" / "adapter" / "done").exists()
    assert list((tmp_path / "r").glob(".adapter.tmp-*")) == []
    assert {r["stage"]: r["state"] for r in run.status()}["train"] == "done"


def test_interrupt_removes_temp(tmp_path):
    run = Run.open("r", tmp_path, create=True)

    def build(out):
        (out / "x").write_text("1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run_stage("merge", {}, build)
    assert not (tmp_path / "r" / "merged").exists()
    assert list((tmp_path / "r").glob(".merged.tmp-*")) == []


def test_missing_output_dir_is_stale(tmp_path):
    run = Run.open("r", tmp_path, create=True)
    run.run_stage("pull", {}, lambda o: (o / "w").write_text("1") and None)
    import shutil

    shutil.rmtree(tmp_path / "r" / "base")
    assert {r["stage"]: r["state"] for r in run.status()}["pull"] == "stale"
    assert not run.is_done("pull", run.fingerprint("pull", {})[0])
    time.sleep(0)


def test_an_upgraded_library_changes_the_fingerprint_of_the_stages_it_shapes(monkeypatch):
    from ollama_ft import pipeline
    from ollama_ft.core import runs
    from ollama_ft.core.config import RunConfig

    cfg = RunConfig()
    before = {s: pipeline.stage_settings(cfg, s) for s in ("train", "export", "modelfile")}
    assert before["export"]["tools"]["llama-cpp-python"] != "missing"
    real = runs.versions_of
    monkeypatch.setattr(runs, "versions_of", lambda d: {**real(d), **({"llama-cpp-python": "9.9.9"}
                                                                       if "llama-cpp-python" in d else {})})
    after = {s: pipeline.stage_settings(cfg, s) for s in ("train", "export", "modelfile")}
    assert after["export"] != before["export"]      # llama.cpp shapes the GGUF
    assert after["train"] == before["train"]        # ... not the adapter
    assert after["modelfile"] == before["modelfile"]
