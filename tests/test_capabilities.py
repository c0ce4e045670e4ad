"""The GGUF's chat template shows Ollama no capability the TEMPLATE lacks (ollama_ft/ollama/capabilities.py).

Ollama v0.30+ renders the GGUF's jinja instead of the Go TEMPLATE when the jinja shows more capabilities
(tools, thinking); the rules mirrored here are Ollama's own string checks (model/capability.go).
"""

from __future__ import annotations

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.ollama import capabilities as caps
from ollama_ft.ollama import templates as ct
from tests.test_chat_templates import FIXTURES, _fixture


@pytest.mark.parametrize("jinja, expected", [
    ("{% if tools %}{{ tools }}{% endif %}{{ messages[0]['content'] }}", {"tools"}),
    ("{{ '<tool_call>' }}", {"tools"}),
    ("{{ '<think>' }}{{ x }}{{ '</think>' }}", {"thinking"}),
    # Qwen/DeepSeek templates that only strip earlier reasoning still count as thinking ...
    ("{% set content = content.split('</think>')[-1] %}", {"thinking"}),
    ('{% set content = content.split("</think>")[-1] %}', {"thinking"}),
    # ... unless they carry reasoning_content, which the server treats as another mechanism
    ("{% set content = content.split('</think>')[-1] %}{{ reasoning_content }}", set()),
    ("{{ '</think>' }} alone", set()),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", set()),
    (None, set()),
])
def test_jinja_capabilities_follow_ollamas_string_checks(jinja, expected):
    assert caps.jinja_capabilities(jinja) == expected


def test_go_template_capabilities():
    assert caps.go_template_capabilities("{{ range .Messages }}{{ .Content }}{{ end }}") == set()
    assert caps.go_template_capabilities("{{ if .Tools }}x{{ end }}{{ range .Messages }}{{ end }}") == {"tools"}
    assert caps.go_template_capabilities(
        "{{ range .Messages }}{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ end }}") == {"thinking"}
    # every family the project ships: neither tools nor thinking
    for family in ct.family_names():
        assert caps.go_template_capabilities(ct.get_family(family).go_template) == set(), family


# The HF templates whose capabilities the TEMPLATE lacks, and what the GGUF carries instead.
EXPECTED = {
    "qwen2.5-instruct": ("family:qwen2.5", ["tools"]),
    "llama3.1-instruct": ("family:llama3.1", ["tools"]),
    "mistral-instruct": ("family:mistral", ["tools"]),
    # the R1 layout itself opens a <think> block and strips earlier ones: no equivalent without thinking
    "deepseek-r1-distill-qwen": ("none", ["thinking", "tools"]),
    "gemma3-it": ("training", []),
    "deepseek-llm-chat": ("training", []),
    "phi3-mini": ("training", []),
}


@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_gguf_template_for_every_real_hf_template(chat_templates_dir, stem):
    training = _fixture(chat_templates_dir, stem)
    fam = ct.get_family(FIXTURES[stem])
    choice = caps.choose_gguf_chat_template(training)
    source, hidden = EXPECTED[stem]
    assert (choice.source, choice.not_advertised) == (source, hidden)
    # whatever the GGUF carries, Ollama v0.30+ has no reason to prefer it over the TEMPLATE
    assert caps.jinja_override_reasons(choice.jinja, fam.go_template) == []
    assert not caps.jinja_capabilities(choice.jinja) - caps.go_template_capabilities(fam.go_template)
    if source == "training":
        assert choice.jinja == training
    elif source.startswith("family:"):
        # the replacement renders every conversation the training template accepts exactly as it does
        for conv in ct.CONVERSATIONS:
            msgs = ct.ollama_view(conv)
            kw = dict(bos_token=fam.bos_token, eos_token=fam.eos_token, prefill=conv.prefill, **fam.detect_kwargs)
            try:
                want = ct.render_hf(training, msgs, **kw)
            except Exception:  # noqa: BLE001 - the training template refuses this shape; training never saw it
                continue
            assert ct.render_hf(choice.jinja, msgs, **kw) == want, conv.name
    else:
        assert choice.jinja is None and "thinking" in choice.reason


def test_modes_and_a_bad_mode(chat_templates_dir):
    training = _fixture(chat_templates_dir, "qwen2.5-instruct")
    assert caps.choose_gguf_chat_template(training, "training").jinja == training
    none = caps.choose_gguf_chat_template(training, "none")
    assert none.jinja is None and none.not_advertised == ["tools"]
    assert caps.choose_gguf_chat_template(None).source == "none"
    with pytest.raises(UserError, match="gguf_chat_template"):
        caps.choose_gguf_chat_template(training, "sometimes")


def test_unknown_family_with_tools_carries_no_template():
    odd = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if tools %}{{ tools }}{% endif %}"
    choice = caps.choose_gguf_chat_template(odd)
    assert choice.jinja is None and choice.not_advertised == ["tools"] and "unknown" in choice.reason
