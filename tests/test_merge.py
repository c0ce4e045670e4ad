"""Streamed LoRA merge: equals peft's merge_and_unload, logits proof, and a corrupted merge is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ollama_ft.core.config import RunConfig
from ollama_ft.core.errors import UserError


def make_adapter(base_dir: Path, out: Path, *, r: int = 4, alpha: int = 8, rslora: bool = False,
                 targets="all-linear", seed: int = 0) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, so the merge has a visible effect."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  use_rslora=rslora, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(out))
    return out


def bf16_copy(src: Path, dst: Path) -> Path:
    """The same tiny model stored in bf16 (the usual published dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    m.save_pretrained(str(dst), safe_serialization=True)
    return dst


def sharded_copy(src: Path, dst: Path) -> Path:
    """The same model saved in several safetensors shards with an index."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    m.save_pretrained(str(dst), safe_serialization=True, max_shard_size="60KB")
    return dst


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()


def load_dir_state(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_streamed_merge_equals_peft(tiny_model, tmp_path, rslora):
    from ollama_ft.merge.stage import merge_streamed

    adapter = make_adapter(tiny_model, tmp_path / "adapter", rslora=rslora, alpha=16)
    out = tmp_path / "merged"
    stats = merge_streamed(tiny_model, adapter, out)
    ours = load_dir_state(out)
    ref = peft_merged_state(tiny_model, adapter)
    assert stats["modules_merged"] == 7 * 2  # q,k,v,o,gate,up,down x 2 layers
    assert set(ours) == set(ref)
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 1e-5, worst
    # rsLoRA scales by alpha/sqrt(r), plain LoRA by alpha/r
    assert stats["scaling"] == [16 / 2.0] if rslora else [16 / 4]


def test_sharded_base_writes_index(tiny_llama, tmp_path):
    from ollama_ft.merge.stage import merge_streamed

    base = sharded_copy(tiny_llama, tmp_path / "base")
    assert len(list(base.glob("*.safetensors"))) > 1
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    stats = merge_streamed(base, adapter, out)
    assert stats["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    ref = peft_merged_state(base, adapter)
    ours = load_dir_state(out)
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) < 1e-5


def _data_dir(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A data/ stage dir with validation.parquet and the training chat template."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    d = tmp_path / "data"
    d.mkdir()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["hello nurse what is the dose", "the clinic opens at eight", "Ünïcödé – ä ö ü ß é ñ 日本語 🙂"]
    ids = [tok(t)["input_ids"] for t in texts]
    pq.write_table(pa.table({"id": [str(i) for i in range(len(ids))], "input_ids": ids,
                             "labels": ids}), d / "validation.parquet")
    (d / "chat_template.jinja").write_text("{{ 'TRAINING TEMPLATE' }}")
    return d


def test_build_merged_bf16_proof_and_side_files(tiny_model, tmp_path):
    from ollama_ft.merge.stage import build_merged

    base = bf16_copy(tiny_model, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    data = _data_dir(tmp_path, tiny_model)
    out = tmp_path / "merged"
    out.mkdir()
    info = build_merged(RunConfig(), base, adapter, data, out)
    check = json.loads((out / "merge_check.json").read_text())
    assert check["passed"] and info["dtype"] == "bfloat16"
    assert check["relative_diff"] <= check["tolerance"] == 3e-2
    assert check["tokens"] > 10
    # the adapter changed the logits far more than the merge differs from peft
    assert check["adapter_effect_max_abs"] > 10 * check["max_abs_diff"]
    assert (out / "chat_template.jinja").read_text() == "{{ 'TRAINING TEMPLATE' }}"
    # the tokenizer files travel with the model (SentencePiece for llama, tokenizer.json only for qwen2)
    tok_files = {"tokenizer.json", "tokenizer_config.json"} | ({"tokenizer.model"} if (base / "tokenizer.model").exists() else set())
    assert all((out / f).is_file() for f in tok_files) and (out / "config.json").is_file()
    assert info["peak_rss_bytes_streaming"] > 0


def test_corrupted_merge_is_caught(tiny_llama, tmp_path, monkeypatch):
    """A merge that drops the LoRA scaling (a classic bug) must fail the logits proof."""
    from ollama_ft.merge import stage as merge

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    data = _data_dir(tmp_path, tiny_llama)
    real = merge._scaling
    monkeypatch.setattr(merge, "_scaling", lambda acfg, module: real(acfg, module) * 0.25)
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(UserError, match="disagrees with base\\+adapter"):
        merge.build_merged(RunConfig(), tiny_llama, adapter, data, out)
    assert json.loads((out / "merge_check.json").read_text())["passed"] is False


def test_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    from ollama_ft.merge.stage import merge_streamed

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    t = load_file(str(f))
    t = {k.replace("q_proj", "query_proj"): v for k, v in t.items()}
    save_file(t, str(f))
    with pytest.raises(UserError, match="does not have"):
        merge_streamed(tiny_llama, adapter, tmp_path / "merged")


def test_merge_into_dequantized_base_is_recorded(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from ollama_ft.merge.stage import build_merged

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    data = _data_dir(tmp_path, tiny_llama)
    cfg = RunConfig()
    cfg.model.merge_base = "dequantized"
    out = tmp_path / "merged"
    out.mkdir()
    info = build_merged(cfg, tiny_llama, adapter, data, out)
    assert info["merge_base"] == "dequantized" and info["logits_check"]["passed"]
    # the NF4 round-trip changed the weights compared with a full-precision merge
    full = tmp_path / "full"
    from ollama_ft.merge.stage import merge_streamed

    merge_streamed(tiny_llama, adapter, full)
    a, b = load_dir_state(out), load_dir_state(full)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert float((a[k] - b[k]).abs().max()) > 1e-3


def test_logits_proof_offloads_to_disk_beyond_the_ram_budget(tiny_model, tmp_path, monkeypatch):
    """A model whose float32 weights exceed the RAM budget (a 7B on a 16 GB workstation; forced here with a
    tiny budget) is proved disk-offloaded, layer by layer, with the same numbers as in RAM."""
    from ollama_ft.core.hf_loading import float32_bytes
    from ollama_ft.merge.stage import copy_side_files, logits_check, merge_streamed

    base = bf16_copy(tiny_model, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    merged = tmp_path / "merged"
    merge_streamed(base, adapter, merged)
    copy_side_files(base, None, merged)
    seqs = [[5, 9, 33, 200, 7, 8, 40, 41], [3, 4, 5, 6]]
    in_ram = logits_check(base, adapter, merged, seqs)
    monkeypatch.setenv("OLLAMA_FT_PROOF_RAM_BYTES", str(float32_bytes(base) // 4))
    offloaded = logits_check(base, adapter, merged, seqs, offload_dir=tmp_path / "offload")
    assert not in_ram["disk_offloaded"] and offloaded["disk_offloaded"]
    for k in ("max_abs_diff", "adapter_effect_max_abs", "logit_scale", "argmax_agreement"):
        assert offloaded[k] == pytest.approx(in_ram[k], rel=1e-6, abs=1e-7), k
    assert offloaded["adapter_effect_max_abs"] > 10 * offloaded["max_abs_diff"]
    assert not (tmp_path / "offload").exists()  # scratch removed
    # the NF4 round trip of a dequantized-base merge needs the weights in RAM: said, not guessed
    with pytest.raises(UserError, match="needs the float32 base in RAM"):
        logits_check(base, adapter, merged, seqs, merge_base="dequantized", offload_dir=tmp_path / "offload")


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny llama whose LM head is its embedding (as in Gemma 3, Qwen2.5 0.5-1.5B, Llama 3.2)."""
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("tiny_tied"), "llama", tokenizer_dir=tiny_tokenizer_dir, tied=True)


@pytest.mark.parametrize("trained", [{"modules_to_save": ["lm_head"]}, {"modules_to_save": ["embed_tokens"]},
                                     {"target_modules": ["q_proj", "lm_head"]}],
                         ids=["lm_head copy", "embedding copy", "lm_head LoRA"])
def test_tied_base_with_a_trained_head_or_embedding_merges_untied(tiny_tied, tmp_path, trained):
    """PEFT trains one side of a tied pair and leaves the other on the base weight; the merged model must
    get its own lm_head (untied config) so its logits equal the adapter's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ollama_ft.merge.stage import copy_side_files, merge_streamed

    assert "lm_head.weight" not in load_file(str(next(tiny_tied.glob("*.safetensors"))))  # tied: stored once
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_tied), dtype=torch.float32)
    lcfg = {"target_modules": ["q_proj"], **trained}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lcfg))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits

    out = tmp_path / "merged"
    stats = merge_streamed(tiny_tied, adapter, out)
    copy_side_files(tiny_tied, None, out, untied=stats["lm_head_untied"])
    assert stats["lm_head_untied"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4
    # The unchanged side keeps the base weight exactly.
    state = load_dir_state(out)
    base_emb = load_file(str(next(tiny_tied.glob("*.safetensors"))))["model.embed_tokens.weight"]
    if "embed_tokens" in trained.get("modules_to_save", []):
        assert torch.equal(state["lm_head.weight"], base_emb)
    else:
        assert torch.equal(state["model.embed_tokens.weight"], base_emb)


def test_tied_base_with_only_lora_on_the_decoder_stays_tied(tiny_tied, tmp_path):
    from ollama_ft.merge.stage import merge_streamed

    adapter = make_adapter(tiny_tied, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    stats = merge_streamed(tiny_tied, adapter, tmp_path / "merged")
    assert stats["lm_head_untied"] is False and "lm_head.weight" not in load_dir_state(tmp_path / "merged")
