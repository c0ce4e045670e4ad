"""End to end on the tiny model: config -> pull -> data -> train -> merge -> export -> modelfile ->
register (stand-in Ollama server) -> eval, then a chat through the API; re-runs skip every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ollama_ft.core.runs import STAGES, Run

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "ollama_ft" / "data_files" / "clinic_sample.jsonl"


def _config(tmp_path: Path, base: Path, host: str, **extra) -> Path:
    lines = SAMPLE.read_text().splitlines()[:80]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = {
        "name": "tiny-e2e",
        "runs_dir": str(tmp_path / "runs"),
        "model": {"base": str(base), "adapter": "qlora"},
        "data": {"path": str(data), "max_length": 256},
        "lora": {"r": 8, "alpha": 16},
        "training": {"batch_size": 4, "max_steps": 4, "eval_steps": 2, "save_steps": 2, "learning_rate": 1e-3},
        "export": {"quants": ["Q8_0"]},
        "ollama": {"name": "tiny-e2e", "host": host, "parameters": {"num_predict": 16}},
        "eval": {"max_examples": 4, "max_new_tokens": 8, "bootstrap_samples": 200},
        **extra,
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_full_pipeline_on_tiny_model_registers_and_chats(tmp_path, tiny_llama, fake_ollama, monkeypatch):
    from ollama_ft.ollama import api as ollama_api
    from ollama_ft.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)  # modelfiles/<name>.Modelfile is written relative to the CWD
    cfg = _config(tmp_path, tiny_llama, fake_ollama.url)
    run = run_pipeline(cfg, [])
    status = {r["stage"]: r["state"] for r in run.status()}
    assert all(status[s] == "done" for s in STAGES), status

    manifest = json.loads((run.root / "manifest.json").read_text())
    reg = manifest["stages"]["register"]["info"]
    assert reg["model"].startswith("tiny-e2e")
    assert (tmp_path / "modelfiles" / "tiny-e2e.Modelfile").exists()
    for stage in ("pull", "data", "train", "merge", "export", "eval"):
        assert manifest["stages"][stage]["outputs"], stage
    assert (run.root / "report" / "metrics.json").exists()

    reply = ollama_api.chat_once(fake_ollama.url, "tiny-e2e", [{"role": "user", "content": "hello"}],
                                 options={"num_predict": 8})
    assert isinstance(reply["content"], str) and reply["content"] != ""
    assert reply["done_reason"] in ("stop", "length")

    # A second run skips every finished stage and re-registers without uploading anything.
    before = fake_ollama.blob_bytes_received() if hasattr(fake_ollama, "blob_bytes_received") else None
    run2 = run_pipeline(cfg, [])
    m2 = json.loads((run2.root / "manifest.json").read_text())
    for stage in ("pull", "data", "train", "merge", "export", "modelfile", "eval"):
        assert m2["stages"][stage]["started"] == manifest["stages"][stage]["started"], stage
    assert m2["stages"]["register"]["info"]["uploaded_bytes"] == 0
    if before is not None:
        assert fake_ollama.blob_bytes_received() == before


@pytest.mark.slow
def test_pipeline_without_ollama_stops_after_modelfile(tmp_path, tiny_qwen2, capsys, monkeypatch):
    from ollama_ft.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    # The tiny qwen2's byte-level vocabulary is new to llama.cpp: its pre-tokenizer is named in the config.
    cfg = _config(tmp_path, tiny_qwen2, "http://127.0.0.1:9",
                  export={"quants": ["Q8_0"], "pre_tokenizer": "qwen2"})
    run = run_pipeline(cfg, [], until="register")
    st = {r["stage"]: r["state"] for r in run.status()}
    assert st["modelfile"] == "done" and st["register"] == "pending"
    out = capsys.readouterr()
    assert "ollama create tiny-e2e -f" in out.out + out.err
    assert Run(run.root).entry("register") is None


def test_unexportable_tokenizer_stops_before_training(tmp_path, tiny_qwen2, monkeypatch):
    """A tokenizer llama.cpp's converter cannot take is found before training starts, not after it."""
    from ollama_ft.core.errors import UserError
    from ollama_ft.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, tiny_qwen2, "http://127.0.0.1:9")
    with pytest.raises(UserError, match="does not recognise the BPE pre-tokenizer") as e:
        run_pipeline(cfg, [])
    assert "export.pre_tokenizer" in e.value.hint
    run = Run(tmp_path / "runs" / "tiny-e2e")
    st = {r["stage"]: r["state"] for r in run.status()}
    assert st["data"] == "done" and st["train"] != "done"
    assert not (run.root / "checkpoints").exists() or not any((run.root / "checkpoints").iterdir())


def test_next_steps_say_why_the_gate_refused_instead_of_offering_ollama_create(tmp_path, capsys):
    """Without a server, a run the eval gate refused must not end with an `ollama create` that bypasses it."""
    from ollama_ft.core.config import RunConfig
    from ollama_ft.pipeline import _next_steps

    cfg = RunConfig.model_validate({"name": "gated", "ollama": {"name": "gated-model"}})
    run = Run.open("gated", tmp_path / "runs", create=True)
    run.record("modelfile", {"modelfile": str(tmp_path / "gated.Modelfile")})
    run.record("eval", {"gate": {"passed": True}})
    _next_steps(cfg, run, registered=False, hi=STAGES.index("eval"))
    assert "ollama create gated-model -f" in capsys.readouterr().out

    run.record("eval", {"gate": {"passed": False, "reason": "general-text perplexity rose 48% [limit 15%]"}})
    _next_steps(cfg, run, registered=False, hi=STAGES.index("eval"))
    out = capsys.readouterr().out
    assert "evaluation gate refuses it: general-text perplexity rose 48% [limit 15%]" in " ".join(out.split())
    assert f"ollama-ft register {run.root} --force" in " ".join(out.split()) and "ollama create" not in out


@pytest.mark.slow
def test_trained_lm_head_on_a_tied_base_survives_merge_and_export(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """lora.modules_to_save: [lm_head] on a tied base (Gemma 3's layout): the merge proof (logits against
    the adapter) and llama.cpp's verification of the GGUF (answer perplexity against HF) both pass."""
    from ollama_ft.core.gguf_meta import read_gguf_meta
    from ollama_ft.pipeline import run_pipeline
    from tests.tiny_models import build_model

    monkeypatch.chdir(tmp_path)
    base = build_model(tmp_path / "tied", "llama", tokenizer_dir=tiny_tokenizer_dir, tied=True)
    cfg = _config(tmp_path, base, "http://127.0.0.1:9", lora={"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]})
    run = run_pipeline(cfg, [], until="export")
    merge = Run(run.root).entry("merge")["info"]
    assert merge["logits_check"]["passed"] is True, merge
    assert json.loads((run.root / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    gguf = next((run.root / "gguf").glob("*Q8_0.gguf"))
    assert "output.weight" in {t.name for t in read_gguf_meta(gguf).tensors}  # the trained head, not token_embd
    export = Run(run.root).entry("export")["info"]
    # llama.cpp on the F16 GGUF scores like the merged HF model (the export stage refuses beyond its tolerance).
    assert export["verify"]["F16"]["ppl"] == pytest.approx(export["reference_ppl"], rel=0.02), export["verify"]


def test_the_gate_check_before_registration_raises_with_the_reason_and_shows_the_example(tmp_path, capsys):
    """run_pipeline calls this before registering, before it looks for a server (so the outcome, exit
    status 1, is the same with or without one)."""
    from ollama_ft.core.errors import UserError
    from ollama_ft.pipeline import _stop_if_gate_refused

    run = Run.open("gated", tmp_path / "runs", create=True)
    run.record("eval", {"gate": {"passed": True}, "example": {"question": "Q?", "reference": "R", "base": "b",
                                                                "tuned": "t"}})
    _stop_if_gate_refused(run)  # passed: nothing happens
    run.record("eval", {"gate": {"passed": False, "reason": "answer perplexity got worse"},
                        "example": {"question": "Which fridge?", "reference": "Room 3A", "base": "b", "tuned": "t"}})
    with pytest.raises(UserError) as e:
        _stop_if_gate_refused(run)
    assert "gate refused this model: answer perplexity got worse" in e.value.message
    assert f"ollama-ft register {run.root} --force" in e.value.hint
    assert "Which fridge?" in capsys.readouterr().out  # the example is shown before the error
