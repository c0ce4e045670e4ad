"""Chat families: an Ollama Go TEMPLATE that renders exactly what the training chat template rendered.

A chat family is one way of laying out a conversation (ChatML, Llama 3, Gemma 3, ...). For each family
this module holds:

- `go_template`: a Go `text/template` for Ollama's Messages mode (../shared/docs/ollama-contract.md §6.1). It renders,
  for the messages Ollama passes to it, exactly the text the Hugging Face jinja template renders for
  the same messages with `add_generation_prompt=True`. A conversation that ends with an assistant
  message is a prefill: its text is left open, as `continue_final_message=True` does in transformers.
- `stop`: the Modelfile `PARAMETER stop` values (the family's turn markers).
- `jinja`: an own-written HF-style template (`family_jinja`) for bases that ship none; it renders the
  same text as the Go template.

Conventions that make strings *and* token ids equal (see `check_fidelity`):

- Role merging. Ollama merges consecutive messages with the same role (except "tool") with "\\n\\n"
  before rendering, and prepends the stored SYSTEM as a system message when the first message is not
  one. The comparison gives the HF template the same merged list (`ollama_view`), because that is
  what Ollama feeds the model.
- BOS. llama.cpp (and so Ollama) adds the BOS token at tokenization when the GGUF says
  `tokenizer.ggml.add_bos_token=true`. HF templates usually write the `bos_token` text themselves.
  The Go template therefore never writes BOS when the GGUF adds it, and writes the BOS text itself
  (`ChatFamily.build(emit_bos=True)`) when the GGUF does not add it but training had one. The
  comparison is `hf_text == bos_text * add_bos + go_text`, and for ids
  `hf_ids == [bos_id] * add_bos + ids(go_text)`.
- Dates. The Llama 3.1 template writes "Today Date: 26 Jul 2024" unless a `date_string` is passed;
  training passes none, so the Go template writes that fixed text rather than Ollama's `currentDate`.
- `| trim` in a jinja template strips Python whitespace; Go templates have no trim, so the families
  that trim use recursive `define`d templates (`trim`, `after_think`) built from `slice` and `len`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UserError

# ------------------------------------------------------------------------------------------
# Go helpers shared by several families

# Every character Python's str.strip() (hence jinja's `trim`) removes, grouped by UTF-8 length.
_PY_WHITESPACE = [chr(c) for c in (0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                                   *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)]


def _go_quote(s: str) -> str:
    """A Go string literal using only printable ASCII (Modelfile parsing drops non-printable runes)."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def _ws_cond(nbytes: int, at_end: bool) -> str:
    chars = [c for c in _PY_WHITESPACE if len(c.encode()) == nbytes]
    part = f"(slice . (len (slice . {nbytes})))" if at_end else f"(slice . 0 {nbytes})"
    alts = " ".join(f"(eq {part} {_go_quote(c)})" for c in chars)
    return f"and (ge (len .) {nbytes}) (or {alts})"


def _trim_defines() -> str:
    # trim = strip leading Python whitespace, then trailing; recursion depth = whitespace run length.
    left = "".join(
        f"{{{{ {'if' if n == 1 else 'else if'} {_ws_cond(n, False)} }}}}{{{{ template \"ltrim\" (slice . {n}) }}}}"
        for n in (1, 2, 3))
    right = "".join(
        f"{{{{ {'if' if n == 1 else 'else if'} {_ws_cond(n, True)} }}}}"
        f"{{{{ template \"rtrim\" (slice . 0 (len (slice . {n}))) }}}}"
        for n in (1, 2, 3))
    return (
        '{{- define "trim" }}{{ template "ltrim" . }}{{ end }}\n'
        '{{- define "ltrim" }}' + left + '{{ else }}{{ template "rtrim" . }}{{ end }}{{ end }}\n'
        '{{- define "rtrim" }}' + right + "{{ else }}{{ . }}{{ end }}{{ end }}\n"
    )


# after_think(s) writes the part of s after its last "</think>" (all of s when there is none), like
# jinja's `s.split('</think>')[-1]`: f(s) = "" if s ends with "</think>", else f(s[:-1]) + s[-1].
_AFTER_THINK_DEFINE = (
    '{{- define "after_think" }}{{ if . }}'
    '{{ if and (ge (len .) 8) (eq (slice . (len (slice . 8))) "</think>") }}'
    '{{ else }}{{ template "after_think" (slice . 0 (len (slice . 1))) }}{{ slice . (len (slice . 1)) }}{{ end }}'
    "{{ end }}{{ end }}\n"
)

_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
# $hasSys/$sys: the first message is a system one (after Ollama's merge), and its text.
_FIRST_SYSTEM = (
    '{{- $hasSys := false }}{{ $sys := "" }}'
    '{{- if .Messages }}{{ if eq (index .Messages 0).Role "system" }}'
    "{{ $hasSys = true }}{{ $sys = (index .Messages 0).Content }}{{ end }}{{ end -}}\n"
)
_BOS = "@@BOS@@"
_EOS = "@@EOS@@"


# ------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class ChatFamily:
    """One chat layout: Go TEMPLATE, stop tokens, token conventions and a fallback jinja template."""

    name: str
    description: str
    go_template_source: str  # with @@EOS@@ where the family writes the tokenizer's eos text
    stop: tuple[str, ...]
    bos_token: str | None  # the strings the family's tokenizers use (for checks without a tokenizer)
    eos_token: str | None
    template_emits_bos: bool  # the HF template writes bos_token text first
    add_bos: bool  # the family's GGUFs set tokenizer.ggml.add_bos_token
    jinja: str
    markers: tuple[str, ...]  # all must appear in a jinja template for it to be a candidate
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # Variables pinned when comparing templates (the day-dependent Llama 3.2 header).
    detect_kwargs: dict[str, Any] = field(default_factory=dict)
    dated: bool = False  # the TEMPLATE must carry the date training rendered (build(date_string=...))

    def build(self, *, emit_bos: bool = False, bos_token: str | None = None, eos_token: str | None = None,
              date_string: str | None = None) -> str:
        """The Go TEMPLATE text. emit_bos: write the BOS text (when the GGUF does not add BOS itself).
        date_string: the "Today Date" training saw (dated families)."""
        eos = eos_token if eos_token is not None else (self.eos_token or "")
        text = self.go_template_source.replace(_EOS, eos)
        if date_string is not None and self.dated:
            text = text.replace("Today Date: " + LLAMA31_DATE + "\n", "Today Date: " + date_string + "\n")
        if emit_bos:
            bos = bos_token if bos_token is not None else self.bos_token
            if not bos:
                raise UserError(f"chat family '{self.name}' needs a BOS token text, and the tokenizer has none")
            text = bos + text
        return text

    @property
    def go_template(self) -> str:
        """The Go TEMPLATE for the family's usual tokenizer (GGUF adds BOS when the template wrote it)."""
        return self.build(emit_bos=self.template_emits_bos and not self.add_bos)


def _chatml_go(default_system: str | None) -> str:
    head = ""
    if default_system is not None:
        head = ("{{- if not (and .Messages (eq (index .Messages 0).Role \"system\")) }}<|im_start|>system\n"
                + default_system + "<|im_end|>\n{{ end }}\n")
    return head + (
        "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
        "{{- if or (not $last) (ne .Role \"assistant\") }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ else }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}\n"
        "{{- end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
        "{{ end }}\n"
        "{{- end }}"
    )


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN_JINJA = (
    "{%- if not (messages and messages[0]['role'] == 'system') %}"
    "{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}" + _CHATML_JINJA
)

_R1_GO = (
    _AFTER_THINK_DEFINE
    + '{{- $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}{{ end }}{{ end }}'
    "{{ $sys }}\n"
    "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if eq .Role \"user\" }}<｜User｜>{{ .Content }}\n"
    "{{- else if eq .Role \"assistant\" }}<｜Assistant｜>"
    "{{ if $last }}{{ .Content }}{{ else }}{{ template \"after_think\" .Content }}<｜end▁of▁sentence｜>{{ end }}\n"
    "{{- end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}<｜Assistant｜><think>\n"
    "{{ end }}\n"
    "{{- end }}"
)

_R1_JINJA = (
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}"
    "{% endif %}{% endfor %}"
    "{{- bos_token }}{{ ns.system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

_DSLLM_GO = (
    "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if eq .Role \"user\" }}User: {{ .Content }}\n\n"
    "{{ else if eq .Role \"assistant\" }}Assistant: {{ .Content }}{{ if not $last }}" + _EOS + "{{ end }}\n"
    "{{- else if eq .Role \"system\" }}{{ .Content }}\n\n"
    "{{ end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}Assistant:{{ end }}\n"
    "{{- end }}"
)

_DSLLM_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_LLAMA3_TURNS = (
    "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ template \"trim\" .Content }}{{ if or (not $last) (ne .Role \"assistant\") }}<|eot_id|>{{ end }}\n"
)
_LLAMA3_GEN = "{{- if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"

_LLAMA3_GO = (
    _trim_defines()
    + "{{- range $i, $_ := .Messages }}\n" + _LAST + _LLAMA3_TURNS + _LLAMA3_GEN + "{{- end }}"
)

_LLAMA3_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

LLAMA31_DATE = "26 Jul 2024"

_LLAMA31_GO = (
    _trim_defines() + _FIRST_SYSTEM
    + "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\n"
    "Today Date: " + LLAMA31_DATE + "\n\n"
    "{{ if $hasSys }}{{ template \"trim\" $sys }}{{ end }}<|eot_id|>\n"
    "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if not (and (eq $i 0) $hasSys) }}" + _LLAMA3_TURNS + "{{- end }}\n"
    + _LLAMA3_GEN + "{{- end }}"
)

_LLAMA31_JINJA = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_text = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_text = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + (date_string if date_string is defined else '" + LLAMA31_DATE + "') + '\\n\\n' + system_text"
    " + '<|eot_id|>' }}"
    "{%- for message in turns %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama 3.2 writes the day it renders unless date_string is given: the TEMPLATE carries the training day.
_LLAMA32_JINJA = _LLAMA31_JINJA.replace("(date_string if date_string is defined else '" + LLAMA31_DATE + "')",
                                        "(date_string if date_string is defined else strftime_now('%d %b %Y'))")

_MISTRAL_GO = (
    _trim_defines() + _FIRST_SYSTEM
    + "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if and (eq $i 0) $hasSys }}\n"
    "{{- else if eq .Role \"assistant\" }} {{ template \"trim\" .Content }}{{ if not $last }}" + _EOS + "{{ end }}\n"
    "{{- else }}[INST] {{ if and $last $hasSys }}{{ $sys }}\n\n{{ end }}{{ .Content }}[/INST]\n"
    "{{- end }}\n"
    "{{- end }}"
)

_MISTRAL_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_text = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_text = none %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] not in ['user', 'assistant'] or (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_text is not none %}"
    "{{- '[INST] ' + system_text + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_GEMMA3_GO = (
    _trim_defines() + _FIRST_SYSTEM
    + "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if not (and (eq $i 0) $hasSys) }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
    "{{ if and $hasSys (eq $i 1) }}{{ $sys }}\n\n{{ end }}{{ template \"trim\" .Content }}"
    "{{ if or (not $last) (ne .Role \"assistant\") }}<end_of_turn>\n{{ end }}\n"
    "{{- end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}<start_of_turn>model\n{{ end }}\n"
    "{{- end }}"
)

_GEMMA3_JINJA = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_PHI3_GO = (
    "{{- range $i, $_ := .Messages }}\n" + _LAST + "\n"
    "{{- if or (eq .Role \"system\") (eq .Role \"user\") (eq .Role \"assistant\") }}<|{{ .Role }}|>\n"
    "{{ .Content }}{{ if or (not $last) (ne .Role \"assistant\") }}<|end|>\n{{ end }}\n"
    "{{- end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}<|assistant|>\n{{ end }}\n"
    "{{- end }}"
)

_PHI3_JINJA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_DS_BOS, _DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

_FAMILIES: dict[str, ChatFamily] = {f.name: f for f in (
    ChatFamily(
        name="chatml", description="ChatML without a default system prompt (SmolLM-style, tiny test models)",
        go_template_source=_chatml_go(None), stop=("<|im_start|>", "<|im_end|>"),
        bos_token=None, eos_token="<|im_end|>", template_emits_bos=False, add_bos=False,
        jinja=_CHATML_JINJA, markers=("<|im_start|>",),
        notes="system messages render in place as ordinary turns"),
    ChatFamily(
        name="qwen2.5", description="ChatML with Qwen 2.5's default system prompt (Qwen2.5-*-Instruct)",
        go_template_source=_chatml_go(_QWEN_SYSTEM), stop=("<|im_start|>", "<|im_end|>"),
        bos_token=None, eos_token="<|im_end|>", template_emits_bos=False, add_bos=False,
        jinja=_QWEN_JINJA, markers=("<|im_start|>", "You are Qwen, created by Alibaba Cloud"),
        notes="without a leading system message the template writes Qwen's default one; tools are not rendered",
        aliases=("qwen", "qwen2")),
    ChatFamily(
        name="deepseek-r1-distill", description="DeepSeek-R1 distills (Qwen/Llama based), <think> reasoning",
        go_template_source=_R1_GO,
        stop=(_DS_BOS, _DS_EOS, "<｜User｜>", "<｜Assistant｜>"),
        bos_token=_DS_BOS, eos_token=_DS_EOS, template_emits_bos=True, add_bos=True,
        jinja=_R1_JINJA, markers=("<｜User｜>", "<｜Assistant｜>", "</think>"),
        notes="only the last system message is used, written first; earlier assistant turns lose everything up "
              "to their last </think>; the generation prompt opens a <think> block",
        aliases=("deepseek-r1",)),
    ChatFamily(
        name="deepseek-llm-chat", description="DeepSeek LLM chat (User:/Assistant: turns)",
        go_template_source=_DSLLM_GO, stop=("User:", "Assistant:", _DS_EOS),
        bos_token=_DS_BOS, eos_token=_DS_EOS, template_emits_bos=True, add_bos=True,
        jinja=_DSLLM_JINJA, markers=("User: ", "Assistant:"),
        notes="system messages render in place followed by a blank line", aliases=("deepseek-llm",)),
    ChatFamily(
        name="llama3", description="Llama 3 instruct (header/eot turns, no date header)",
        go_template_source=_LLAMA3_GO, stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", template_emits_bos=True, add_bos=True,
        jinja=_LLAMA3_JINJA, markers=("<|start_header_id|>", "<|eot_id|>"),
        notes="message contents are trimmed like jinja's `trim`"),
    ChatFamily(
        name="llama3.1", description="Llama 3.1 instruct (system header with knowledge/today date)",
        go_template_source=_LLAMA31_GO,
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", template_emits_bos=True, add_bos=True,
        jinja=_LLAMA31_JINJA, markers=("<|start_header_id|>", "Cutting Knowledge Date"),
        notes=f"the system header always says 'Today Date: {LLAMA31_DATE}' (the template's default, which "
              "training used), not Ollama's currentDate; tools are not rendered"),
    ChatFamily(
        name="llama3.2", description="Llama 3.2 instruct (like 3.1, but the header carries the day of rendering)",
        go_template_source=_LLAMA31_GO,
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", template_emits_bos=True, add_bos=True,
        jinja=_LLAMA32_JINJA, markers=("<|start_header_id|>", "Cutting Knowledge Date", "strftime_now"),
        detect_kwargs={"date_string": LLAMA31_DATE}, dated=True,
        notes="training rendered 'Today Date: <day of the data stage>'; the TEMPLATE writes that same day "
              "(read back from the training tokens), not Ollama's currentDate; tools are not rendered"),
    ChatFamily(
        name="mistral", description="Mistral instruct v0.3 ([INST] turns, system joined to the last user turn)",
        go_template_source=_MISTRAL_GO, stop=("[INST]", "[/INST]", "</s>"),
        bos_token="<s>", eos_token="</s>", template_emits_bos=True, add_bos=True,
        jinja=_MISTRAL_JINJA, markers=("[INST]", "[/INST]"),
        notes="the system message goes into the last user turn only (as the v0.3 template does); no generation "
              "prompt after [/INST]; a system message after the first turn renders as a user turn (the HF "
              "template refuses it)"),
    ChatFamily(
        name="gemma3", description="Gemma 3 instruct (<start_of_turn> turns, system folded into the first user turn)",
        go_template_source=_GEMMA3_GO, stop=("<start_of_turn>", "<end_of_turn>"),
        bos_token="<bos>", eos_token="<eos>", template_emits_bos=True, add_bos=True,
        jinja=_GEMMA3_JINJA, markers=("<start_of_turn>",),
        notes="a leading system message is prepended to the first user turn; a later system message renders "
              "as a user turn (the HF template refuses it)", aliases=("gemma", "gemma2")),
    ChatFamily(
        name="phi3", description="Phi-3 instruct (<|user|>/<|assistant|> turns ending in <|end|>)",
        go_template_source=_PHI3_GO, stop=("<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
        bos_token="<s>", eos_token="<|endoftext|>", template_emits_bos=False, add_bos=False,
        jinja=_PHI3_JINJA, markers=("<|user|>", "<|assistant|>", "<|end|>"),
        notes="system messages render in place, even when empty"),
)}
_ALIASES = {a: f.name for f in _FAMILIES.values() for a in f.aliases}


def family_names() -> list[str]:
    """Names of the known chat families."""
    return list(_FAMILIES)


def get_family(name: str) -> ChatFamily:
    """The family called `name` (or one of its aliases); a UserError naming what exists otherwise."""
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FAMILIES:
        raise UserError(
            f"unknown chat family '{name}': ollama-ft has no Go TEMPLATE for it",
            hint=f"known families: {', '.join(_FAMILIES)} (aliases: {', '.join(sorted(_ALIASES))}); "
                 "a new family needs a Go template, stop tokens and a jinja template in ollama_ft/ollama/families.py")
    return _FAMILIES[key]


def family_jinja(family: str) -> str:
    """An HF-style jinja chat template for the family (used when a base model ships none)."""
    return get_family(family).jinja
