"""Chat families: detection from HF templates, and the proof that each Go TEMPLATE renders exactly what
the HF template renders (strings and token ids), with Go's own text/template and Ollama's data model."""

from __future__ import annotations

import re
import shutil

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.ollama import rendering
from ollama_ft.ollama import templates as ct

FIXTURES = {
    "qwen2.5-instruct": "qwen2.5",
    "deepseek-r1-distill-qwen": "deepseek-r1-distill",
    "deepseek-llm-chat": "deepseek-llm-chat",
    "llama3.1-instruct": "llama3.1",
    "mistral-instruct": "mistral",
    "gemma3-it": "gemma3",
    "phi3-mini": "phi3",
}
# Conversations each training template refuses (HF raises), so training data never holds them.
# Conversations a family's own HF template raises on (so training never contains them): they must
# alternate user/assistant after the system message, which a num_ctx-truncated history may not.
REFUSED = {"mistral": {"system later in the conversation", "history after truncation"},
           "gemma3": {"system later in the conversation", "history after truncation"}}

needs_go = pytest.mark.skipif(shutil.which("go") is None,
                              reason="Go is not installed (apt-get install golang-go); the fidelity proof needs it")


def _fixture(chat_templates_dir, stem: str) -> str:
    return (chat_templates_dir / f"{stem}.jinja").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------
# Registry and detection


def test_every_family_is_complete():
    assert len(ct.CONVERSATIONS) >= 8
    for name in ct.family_names():
        fam = ct.get_family(name)
        assert fam.stop and fam.jinja and fam.markers and "{{" in fam.go_template
        assert ".Messages" in fam.go_template
        # The BOS is never written twice: either the GGUF adds it or the template writes it.
        assert not (fam.add_bos and fam.go_template.startswith(fam.bos_token or "\0"))


def test_unknown_family_names_what_exists():
    with pytest.raises(UserError) as e:
        ct.get_family("vicuna")
    assert "vicuna" in e.value.message and "chatml" in e.value.hint and "gemma3" in e.value.hint
    with pytest.raises(UserError):
        ct.family_jinja("")
    assert ct.get_family("gemma").name == "gemma3"
    assert ct.get_family("Qwen").name == "qwen2.5"


@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_detect_fixture(chat_templates_dir, stem):
    assert ct.detect_family(_fixture(chat_templates_dir, stem)) == FIXTURES[stem]


@pytest.mark.parametrize("stem", ["qwen2.5-instruct", "deepseek-r1-distill-qwen", "llama3.1-instruct",
                                  "mistral-instruct"])
def test_detect_escape_and_whitespace_variants(chat_templates_dir, stem):
    text = _fixture(chat_templates_dir, stem)
    assert "\\n" in text
    real_newlines = text.replace("\\n", "\n")  # the same template as stored with JSON "\n" escapes
    assert ct.detect_family(real_newlines) == FIXTURES[stem]
    reindented = re.sub(r"\n\s+", "\n", text).rstrip("\n") + "\n\n"  # indentation is stripped by lstrip_blocks
    assert ct.detect_family(reindented) == FIXTURES[stem]


@pytest.mark.parametrize("name", ct.family_names())
def test_detect_own_fallback_templates(name):
    assert ct.detect_family(ct.family_jinja(name)) == name


def test_detect_refuses_look_alikes():
    assert ct.detect_family("") is None
    assert ct.detect_family("{{ messages[0]['content'] }}") is None
    # ChatML with a different default system prompt is not Qwen 2.5 and not plain ChatML.
    other_default = ct.family_jinja("qwen2.5").replace("You are Qwen, created by Alibaba Cloud.", "You are Bob.")
    assert ct.detect_family(other_default) is None
    assert any("differs" in line for line in ct.explain_detection(other_default))
    # A Llama 3 header that always writes today's date (ignoring date_string) matches no family.
    dated = ct.family_jinja("llama3.1").replace("(date_string if date_string is defined else '26 Jul 2024')",
                                                "strftime_now('%d %b %Y')")
    assert "strftime_now" in dated
    assert ct.detect_family(dated) is None
    # Llama 3.2 style (today unless date_string is given) is its own, dated family.
    assert ct.detect_family(ct.family_jinja("llama3.1").replace(
        "else '26 Jul 2024'", "else strftime_now('%d %b %Y')")) == "llama3.2"
    assert "no known family" in ct.explain_detection("{{ messages }}")[0]


def test_ollama_view_merges_like_ollama():
    conv = ct.Conversation("x", (("System", "a"), ("system", "b"), ("user", "c"), ("user", "d"),
                                 ("tool", "t1"), ("tool", "t2")), system="stored")
    assert ct.ollama_view(conv) == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "c\n\nd"},
                                    {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"}]
    assert ct.ollama_view([{"role": "user", "content": "q"}], system="S")[0] == {"role": "system", "content": "S"}


# ------------------------------------------------------------------------------------------
# The Go renderer (Ollama's data model)


@needs_go
def test_go_renderer_data_model():
    tpl = "{{ .System }}|{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ .Missing }}|{{ .Response }}"
    out = ct.render_go(tpl, [{"role": "System", "content": "a"}, {"role": "system", "content": "b"},
                             {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
                             {"role": "system", "content": "late"}])
    # missingkey=zero renders a missing key of a map as "<no value>", exactly as Ollama's engine does.
    assert out == "a\n\nb\n\nlate|[system:a\n\nb][user:u1\n\nu2][system:late]|<no value>|"
    assert ct.render_go(tpl, [{"role": "user", "content": "q"}], system="S").startswith("S|[system:S][user:q]")
    with pytest.raises(UserError, match="Messages"):
        ct.render_go("{{ .Prompt }}", [{"role": "user", "content": "q"}])
    with pytest.raises(UserError, match="template error"):
        ct.render_go("{{ range .Messages }", [])


def test_go_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rendering.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as e:
        ct.render_go("{{ .Messages }}", [])
    assert "Go is not installed" in e.value.message and "golang-go" in e.value.hint


@needs_go
def test_go_trim_equals_python_strip():
    tpl = ct._trim_defines() + '{{- range .Messages }}<{{ template "trim" .Content }}>{{ end }}'
    samples = ["", " ", "a", "  a b  ", "\u3000x\u00a0", "\x1c\x1dy\x85", "\u2028\u2029\u202f\u205f",
               "".join(ct._PY_WHITESPACE) + "mid dle" + "".join(reversed(ct._PY_WHITESPACE)),
               "\u200bzero-width is not whitespace\u200b", "日本語\u3000", "🙂 \n"]
    outs = ct.render_go_batch(tpl, [([{"role": "user", "content": s}], None) for s in samples])
    assert outs == [f"<{s.strip()}>" for s in samples]


@needs_go
def test_go_after_think_equals_python_split():
    tpl = ct._AFTER_THINK_DEFINE + '{{- range .Messages }}<{{ template "after_think" .Content }}>{{ end }}'
    samples = ["", "plain", "</think>", "</think>tail", "a</think>b</think>c", "<think>x</think>\n\nanswer",
               "</thin", "x</think", "ünï</think>日本🙂", "</think></think>", "a" * 3000 + "</think>end"]
    outs = ct.render_go_batch(tpl, [([{"role": "user", "content": s}], None) for s in samples])
    assert outs == [f"<{s.split('</think>')[-1]}>" for s in samples]


# ------------------------------------------------------------------------------------------
# Fidelity: every family, against its HF template, with the full conversation set


@needs_go
@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_fidelity_against_hf_fixture(chat_templates_dir, family_tokenizers, stem):
    name = FIXTURES[stem]
    fam = ct.get_family(name)
    tok = family_tokenizers(name)
    rep = ct.check_fidelity(_fixture(chat_templates_dir, stem), fam.go_template, tokenizer=tok)
    assert rep.family == name and rep.go_checked and rep.ids_checked
    assert rep.ok, [(r.name, r.detail) for r in rep.mismatched]
    skipped = {r.name for r in rep.results if r.status == "skipped"}
    assert skipped == REFUSED.get(name, set())
    assert rep.matched == len(ct.CONVERSATIONS) - len(skipped)
    assert all(r.tokens and r.tokens > 3 for r in rep.results if r.status == "match")


@needs_go
@pytest.mark.parametrize("name", ct.family_names())
def test_fidelity_of_own_fallback_template(family_tokenizers, name):
    fam = ct.get_family(name)
    rep = ct.check_fidelity(name, fam.go_template, tokenizer=family_tokenizers(name))
    assert rep.ok, [(r.name, r.detail) for r in rep.mismatched]
    assert rep.matched == len(ct.CONVERSATIONS) - len(REFUSED.get(name, ()))


@needs_go
def test_fidelity_catches_wrong_template_and_bos(chat_templates_dir, family_tokenizers):
    qwen = _fixture(chat_templates_dir, "qwen2.5-instruct")
    rep = ct.check_fidelity(qwen, ct.get_family("chatml").go_template, tokenizer=family_tokenizers("qwen2.5"))
    assert not rep.ok and "user only" in {r.name for r in rep.mismatched}
    assert "first difference" in rep.mismatched[0].detail
    gemma = _fixture(chat_templates_dir, "gemma3-it")
    tok = family_tokenizers("gemma3")
    fam = ct.get_family("gemma3")
    # A GGUF that does not add BOS needs the TEMPLATE to write it, and vice versa.
    rep = ct.check_fidelity(gemma, fam.go_template, tokenizer=tok, add_bos=False)
    assert not rep.ok
    rep = ct.check_fidelity(gemma, fam.build(emit_bos=True, bos_token=tok.bos_token), tokenizer=tok, add_bos=False)
    assert rep.ok
    rep = ct.check_fidelity(gemma, fam.build(emit_bos=True, bos_token=tok.bos_token), tokenizer=tok, add_bos=True)
    assert not rep.ok  # two BOS


# ------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF: its own chat template, and llama.cpp's own tokenizer


@pytest.mark.slow
@needs_go
def test_real_gemma_gguf_llama_cpp_token_ids(gemma_gguf, chat_templates_dir):
    """What Ollama feeds llama.cpp (Go render, BOS added per the GGUF) tokenizes, with the real Gemma 3
    vocabulary in llama.cpp, to exactly what the Gemma 3 jinja template renders for training."""
    import llama_cpp

    from ollama_ft.core.gguf_meta import gguf_add_bos, gguf_metadata

    # This GGUF carries no template; use it when a GGUF does, else Gemma 3's published one.
    jinja = gguf_metadata(gemma_gguf, {"tokenizer.chat_template"}).get("tokenizer.chat_template") or \
        _fixture(chat_templates_dir, "gemma3-it")
    assert ct.detect_family(jinja) == "gemma3"
    add_bos = gguf_add_bos(gemma_gguf)
    llm = llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    fam = ct.get_family("gemma3")
    tpl = fam.build(emit_bos=not add_bos, bos_token=bos, eos_token=eos)
    served = ct.render_go_batch(tpl, [(c.as_dicts(), c.system) for c in ct.CONVERSATIONS])
    matched = 0
    for conv, go_text in zip(ct.CONVERSATIONS, served, strict=True):
        try:
            hf_text = ct.render_hf(jinja, ct.ollama_view(conv), bos_token=bos, eos_token=eos, prefill=conv.prefill)
        except Exception:
            assert conv.name in REFUSED["gemma3"]
            continue
        train_ids = llm.tokenize(hf_text.encode(), add_bos=bool(add_bos and not hf_text.startswith(bos)), special=True)
        served_ids = llm.tokenize(go_text.encode(), add_bos=bool(add_bos), special=True)
        assert train_ids == served_ids, conv.name
        assert train_ids.count(llm.token_bos()) == 1
        matched += 1
    assert matched == len(ct.CONVERSATIONS) - len(REFUSED["gemma3"])
