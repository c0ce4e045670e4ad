"""The model catalog: names, aliases, pinned revisions, and dims consistent with parameter counts."""

from __future__ import annotations

import re

import pytest

from ollama_ft.base import catalog
from ollama_ft.core.errors import UserError

REQUIRED = {
    "deepseek-r1:7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "deepseek-llm:7b": "deepseek-ai/deepseek-llm-7b-chat",
    "qwen2.5:7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.1:8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral:7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma3:270m": "google/gemma-3-270m-it",
    "gemma3:1b": "google/gemma-3-1b-it",
    "gemma3:4b": "google/gemma-3-4b-it",
    "phi3:mini": "microsoft/Phi-3-mini-4k-instruct",
}
FAMILIES = {"chatml", "deepseek-r1-distill", "deepseek-llm-chat", "llama3", "mistral", "gemma3", "phi3"}


def test_required_models_are_covered():
    got = {e.name: e.hf_repo for e in catalog.entries()}
    for name, repo in REQUIRED.items():
        assert got[name] == repo


@pytest.mark.parametrize("entry", catalog.entries(), ids=lambda e: e.name)
def test_entry_is_complete_and_consistent(entry):
    # A verified pin is a full commit hash; an unverified one must say so.
    if entry.revision_verified:
        assert re.fullmatch(r"[0-9a-f]{40}", entry.revision), entry.revision
    assert entry.family in FAMILIES
    assert entry.license and entry.hf_architecture.endswith(("ForCausalLM", "ForConditionalGeneration"))
    assert entry.lora_target_modules and entry.context_length >= 4096
    # The dims reproduce the published parameter count (a typo in any dim would not). The
    # multimodal Gemma 3 4B carries a ~0.42B vision tower the text dims do not describe.
    ratio = entry.dims.text_parameters() / entry.parameters
    if "vision" in entry.description:
        assert 0.88 < ratio < 0.92
    else:
        assert abs(ratio - 1) < 0.001, ratio


def test_families_exist_in_chat_templates():
    from ollama_ft.ollama.templates import family_names

    assert {e.family for e in catalog.entries()} <= set(family_names())


def test_architectures_are_known_to_llama_cpp_converter():
    from ollama_ft.base.sources import llama_cpp_architectures

    known = llama_cpp_architectures()
    if known is None:
        pytest.skip("llama.cpp's converter is not installed")
    for e in catalog.entries():
        assert e.hf_architecture in known, e.name


def test_deepseek_7b_means_the_r1_distill_and_says_so():
    canonical, note = catalog.resolve_alias("deepseek:7b")
    assert canonical == "deepseek-r1:7b"
    assert "deepseek-r1:7b" in note and "deepseek-llm:7b" in note
    assert catalog.lookup("deepseek:7b").hf_repo == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert note == catalog.DEEPSEEK_7B_NOTE


@pytest.mark.parametrize("spelling,canonical", [
    ("Qwen2.5:7B", "qwen2.5:7b"),
    ("registry.ollama.ai/library/qwen2.5:7b", "qwen2.5:7b"),
    ("library/gemma3:1b", "gemma3:1b"),
    ("mistral", "mistral:7b"),
    ("phi3:3.8b", "phi3:mini"),
    ("llama3.1:latest", "llama3.1:8b"),
])
def test_aliases_and_ollama_prefixes(spelling, canonical):
    assert catalog.lookup(spelling).name == canonical


@pytest.mark.parametrize("typo,expected", [
    ("qwen2.5:7", "qwen2.5:7b"),
    ("gemma:270m", "gemma3:270m"),
    ("deepsek-r1:7b", "deepseek-r1:7b"),
    ("llama3:8b", "llama3.1:8b"),
])
def test_unknown_name_lists_close_matches(typo, expected):
    with pytest.raises(UserError) as ei:
        catalog.lookup(typo)
    e = ei.value
    assert typo in e.message
    assert expected in e.hint
    assert any("gemma3:270m" in d for d in e.details)  # the whole catalog is listed


def test_config_dict_has_what_the_planner_reads():
    cd = catalog.lookup("gemma3:270m").config_dict()
    assert cd["hidden_size"] == 640 and cd["num_hidden_layers"] == 18 and cd["head_dim"] == 256
    assert cd["num_key_value_heads"] == 1 and cd["vocab_size"] == 262144 and cd["tie_word_embeddings"] is True
    assert catalog.lookup("llama3.1:8b").config_dict()["head_dim"] == 128  # derived: 4096 / 32
