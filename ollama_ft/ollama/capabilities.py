"""Which capabilities Ollama reads from a model's templates, and which chat template the GGUF carries.

Since v0.30 Ollama compares the capabilities it infers from the GGUF's jinja `tokenizer.chat_template`
(string checks, `model/capability.go`: "tools"/"tool_call"; "<think>" with "</think>", or
`content.split('</think>')`) with those of the Go TEMPLATE (`.Tools` referenced; a `.Thinking` field
inside the range over `.Messages`). When the jinja shows more, the server renders the jinja natively
in llama-server and never runs the TEMPLATE whose prompts the fidelity check proved equal to training.

The project's TEMPLATEs carry no tools and no thinking field: Go's `json` (compact, keys in Ollama's
struct order, properties sorted) cannot reproduce HF's `tojson` (", "/": " separators, the caller's key
order), so tool definitions and calls cannot be rendered as training would. So the GGUF must not
advertise what the TEMPLATE lacks: `choose_gguf_chat_template` picks the training template when it
shows nothing more, else the family's own jinja (proven to render like the training template by
`templates.detect_family`) when that one shows nothing more, else no chat template at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.errors import UserError
from .templates import detect_family, family_jinja, get_family

TOOLS, THINKING = "tools", "thinking"


def jinja_capabilities(jinja: str | None) -> set[str]:
    """What Ollama v0.30+ infers from a GGUF jinja chat template (its own string checks)."""
    if not jinja:
        return set()
    caps = set()
    if "tools" in jinja or "tool_call" in jinja:
        caps.add(TOOLS)
    if "<think>" in jinja and "</think>" in jinja:
        caps.add(THINKING)
    elif ("content.split('</think>')" in jinja or 'content.split("</think>")' in jinja) and \
            "reasoning_content" not in jinja and "<SPECIAL_12>" not in jinja:
        caps.add(THINKING)
    return caps


_TOOLS_VAR = re.compile(r"\.Tools\b")
_THINKING_FIELD = re.compile(r"\.Thinking\b")


def go_template_capabilities(go_template: str | None) -> set[str]:
    """What Ollama infers from a Go TEMPLATE: tools when it uses `.Tools`, thinking when it writes a
    message's `.Thinking` (the server's tag inference needs one inside the range over `.Messages`)."""
    if not go_template:
        return set()
    caps = set()
    if _TOOLS_VAR.search(go_template):
        caps.add(TOOLS)
    if _THINKING_FIELD.search(go_template) and ".Messages" in go_template:
        caps.add(THINKING)
    return caps


def jinja_override_reasons(jinja: str | None, go_template: str | None) -> list[str]:
    """The capabilities that make Ollama v0.30+ prefer the GGUF's jinja over the Go TEMPLATE (sorted)."""
    if not jinja or not go_template:
        return []
    return sorted(jinja_capabilities(jinja) - go_template_capabilities(go_template))


GGUF_TEMPLATE_MODES = ("auto", "training", "none")


@dataclass
class GgufTemplateChoice:
    """The jinja written into the GGUF (None: no chat template) and why."""

    jinja: str | None
    source: str  # "training" | "family:<name>" | "none"
    not_advertised: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "not_advertised": self.not_advertised, "reason": self.reason}


def choose_gguf_chat_template(training_jinja: str | None, mode: str = "auto") -> GgufTemplateChoice:
    """Pick the GGUF's `tokenizer.chat_template` so that it shows no capability the family's TEMPLATE lacks.

    mode: auto (the rule in the module docstring), training (always the training template: newer Ollama
    may then render the jinja instead of the TEMPLATE), none (no chat template in the GGUF)."""
    if mode not in GGUF_TEMPLATE_MODES:
        raise UserError(f"export.gguf_chat_template must be one of {', '.join(GGUF_TEMPLATE_MODES)}, not {mode!r}")
    if training_jinja is None:
        return GgufTemplateChoice(None, "none", reason="the run has no chat template")
    if mode == "training":
        return GgufTemplateChoice(training_jinja, "training", reason="export.gguf_chat_template: training")
    if mode == "none":
        return GgufTemplateChoice(None, "none", sorted(jinja_capabilities(training_jinja)),
                                  "export.gguf_chat_template: none")
    family = detect_family(training_jinja)
    go_caps = go_template_capabilities(get_family(family).go_template_source) if family else set()
    extra = sorted(jinja_capabilities(training_jinja) - go_caps)
    if not extra:
        return GgufTemplateChoice(training_jinja, "training")
    why = (f"the training template shows {' and '.join(extra)}, which the Ollama TEMPLATE does not render "
           "(Ollama v0.30+ would then render the GGUF's jinja, not the TEMPLATE proven equal to training)")
    if family is None:
        return GgufTemplateChoice(None, "none", extra, why + "; its chat family is unknown, so no equivalent "
                                  "template without them exists")
    plain = family_jinja(family)
    if not (jinja_capabilities(plain) - go_caps):
        return GgufTemplateChoice(plain, f"family:{family}", extra,
                                  why + f"; the {family} family's own template renders the same prompts without them")
    return GgufTemplateChoice(None, "none", extra,
                              why + f"; the {family} family's own template shows them too")
