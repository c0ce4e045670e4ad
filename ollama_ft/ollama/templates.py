"""Which chat family a jinja template is, and the fidelity proof that a Go TEMPLATE renders what training
rendered (strings and token ids). The public face of the chat-family modules: families (layouts),
conversations (the fidelity set), rendering (HF jinja and Go text/template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .conversations import CONVERSATIONS, Conversation, ollama_view
from .families import (
    _AFTER_THINK_DEFINE,
    _ALIASES,
    _FAMILIES,
    _PY_WHITESPACE,
    LLAMA31_DATE,
    ChatFamily,
    _trim_defines,
    family_jinja,
    family_names,
    get_family,
)
from .rendering import go_render_binary, render_go, render_go_batch, render_hf

__all__ = ["CONVERSATIONS", "LLAMA31_DATE", "ChatFamily", "Conversation", "ConversationCheck", "FidelityReport",
           "check_fidelity", "detect_family", "explain_detection", "family_jinja", "family_names", "get_family",
           "go_render_binary", "ollama_view", "render_go", "render_go_batch", "render_hf", "tokenizer_adds_bos",
           "_AFTER_THINK_DEFINE", "_PY_WHITESPACE", "_trim_defines"]


# ------------------------------------------------------------------------------------------
# Detection


def _render_or_error(jinja: str, msgs: list[dict[str, str]], prefill: bool, bos: str | None, eos: str | None,
                     kwargs: dict[str, Any]) -> str | Exception:
    try:
        return render_hf(jinja, msgs, bos_token=bos, eos_token=eos, prefill=prefill, **kwargs)
    except Exception as e:  # jinja TemplateError, raise_exception(), continue_final_message ValueError
        return e


def _compare_with_family(jinja: str, fam: ChatFamily) -> tuple[bool, str]:
    """(matches, why not). A match renders like the family's jinja on every conversation it accepts."""
    rendered_any = False
    for conv in CONVERSATIONS:
        msgs = ollama_view(conv)
        got = _render_or_error(jinja, msgs, conv.prefill, fam.bos_token, fam.eos_token, fam.detect_kwargs)
        ref = _render_or_error(fam.jinja, msgs, conv.prefill, fam.bos_token, fam.eos_token, fam.detect_kwargs)
        if isinstance(got, Exception):
            if conv.name in ("user only", "multi-turn without system"):
                return False, f"it refuses the conversation '{conv.name}': {got}"
            continue  # the template refuses shapes the family renders: training never saw them
        if isinstance(ref, Exception):
            return False, f"it renders '{conv.name}', which the {fam.name} layout refuses"
        if got != ref:
            i = next((k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
            return False, (f"conversation '{conv.name}' differs at character {i}: "
                           f"template {got[max(0, i - 20):i + 30]!r} vs {fam.name} {ref[max(0, i - 20):i + 30]!r}")
        rendered_any = True
    return rendered_any, "" if rendered_any else "it renders none of the test conversations"


def _candidates(jinja: str) -> list[ChatFamily]:
    norm = jinja.replace("\\n", "\n")
    return [f for f in _FAMILIES.values() if all(m in norm for m in f.markers)]


def detect_family(jinja_text: str) -> str | None:
    """The chat family an HF chat template belongs to, or None.

    Candidates are picked by their marker strings, then proven by behaviour: the template must render
    every test conversation it accepts exactly like the family's own template (so formatting, quoting
    and escape variants of the same template all map to the same family, and look-alikes do not)."""
    if not jinja_text or not jinja_text.strip():
        return None
    for fam in _candidates(jinja_text):
        ok, _ = _compare_with_family(jinja_text, fam)
        if ok:
            return fam.name
    return None


def explain_detection(jinja_text: str) -> list[str]:
    """Why a template matches no family: one line per candidate family (for error messages)."""
    cands = _candidates(jinja_text or "")
    if not cands:
        return ["it contains the turn markers of no known family "
                f"({'; '.join(f'{f.name}: ' + ', '.join(f.markers) for f in _FAMILIES.values())})"]
    lines = []
    for fam in cands:
        ok, why = _compare_with_family(jinja_text, fam)
        lines.append(f"{fam.name}: " + ("matches" if ok else why))
    return lines


# ------------------------------------------------------------------------------------------
# Fidelity: HF template (as trained) vs Go TEMPLATE (as Ollama renders and tokenizes)


@dataclass
class ConversationCheck:
    name: str
    status: str  # "match", "mismatch" or "skipped" (the training template refuses this conversation)
    detail: str = ""
    tokens: int | None = None


@dataclass
class FidelityReport:
    """Per-conversation results of `check_fidelity`."""

    family: str | None
    results: list[ConversationCheck]
    add_bos: bool
    go_checked: bool
    ids_checked: bool

    @property
    def matched(self) -> int:
        return sum(r.status == "match" for r in self.results)

    @property
    def mismatched(self) -> list[ConversationCheck]:
        return [r for r in self.results if r.status == "mismatch"]

    @property
    def skipped(self) -> int:
        return sum(r.status == "skipped" for r in self.results)

    @property
    def ok(self) -> bool:
        return not self.mismatched and self.matched > 0

    def counts(self) -> dict[str, Any]:
        return {"conversations": len(self.results), "matched": self.matched, "mismatched": len(self.mismatched),
                "skipped": self.skipped, "strings": self.go_checked, "token_ids": self.ids_checked,
                "add_bos": self.add_bos}


def _first_diff(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: training {a[max(0, i - 25):i + 25]!r} vs Ollama {b[max(0, i - 25):i + 25]!r}"


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the HF tokenizer puts BOS in front when special tokens are added."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def check_fidelity(source: str, go_template: str, conversations: list[Conversation] | tuple[Conversation, ...] | None = None,
                   tokenizer=None, *, bos_token: str | None = None, eos_token: str | None = None,
                   add_bos: bool | None = None, jinja_kwargs: dict[str, Any] | None = None,
                   render_served=None) -> FidelityReport:
    """Render every conversation with the training template (`source`: a family name or jinja text) and
    with the Go TEMPLATE, and compare what the model is fed.

    Training side (as data.py tokenizes): the HF render of the Ollama-merged messages; the tokenizer adds
    BOS only when the template did not write it. Ollama side: the Go render; llama.cpp adds BOS when the
    GGUF says so (`add_bos`, default: what the tokenizer does, else the family's convention). Strings are
    compared with those BOS texts, token ids (when a tokenizer is given) with those BOS ids.

    render_served: what renders the served side, given [(messages, system)] -> [text | Exception]; default
    the Go TEMPLATE through Go's text/template (a real Ollama server's `_debug_render_only` in tests).
    """
    fam = None
    if source in _FAMILIES or source in _ALIASES:
        fam = get_family(source)
        jinja = source = fam.jinja
    else:
        jinja = source
        fam_name = detect_family(jinja)
        fam = get_family(fam_name) if fam_name else None
    convs = list(conversations if conversations is not None else CONVERSATIONS)
    if tokenizer is not None:
        bos = bos_token if bos_token is not None else getattr(tokenizer, "bos_token", None)
        eos = eos_token if eos_token is not None else getattr(tokenizer, "eos_token", None)
        tok_bos = tokenizer_adds_bos(tokenizer)
    else:
        bos = bos_token if bos_token is not None else (fam.bos_token if fam else None)
        eos = eos_token if eos_token is not None else (fam.eos_token if fam else None)
        tok_bos = add_bos if add_bos is not None else (fam.add_bos if fam else False)
    if add_bos is None:
        add_bos = tok_bos
    if jinja_kwargs is None:  # a family's own template is checked with its pinned variables
        jinja_kwargs = fam.detect_kwargs if fam is not None and source == fam.jinja else {}
    kwargs = dict(jinja_kwargs)
    if render_served is None:
        def render_served(batch):
            return render_go_batch(go_template, batch)
    go_out = render_served([(c.as_dicts(), c.system) for c in convs])
    results = []
    for conv, go_text in zip(convs, go_out, strict=True):
        msgs = ollama_view(conv)
        try:
            hf_text = render_hf(jinja, msgs, bos_token=bos, eos_token=eos, prefill=conv.prefill, **kwargs)
        except Exception as e:  # the training template refuses it, so training never contained it
            results.append(ConversationCheck(conv.name, "skipped", f"the training template refuses it: {e}"))
            continue
        if isinstance(go_text, Exception):
            results.append(ConversationCheck(conv.name, "mismatch", f"the Go TEMPLATE failed: {go_text}"))
            continue
        train_bos = bool(tok_bos and bos and not hf_text.startswith(bos))
        trained = (bos if train_bos else "") + hf_text
        served = ((bos or "") if add_bos else "") + go_text
        if trained != served:
            why = _first_diff(trained, served)
            if add_bos and bos and not hf_text.startswith(bos) and not tok_bos:
                why = "the GGUF adds BOS but training had none; " + why
            results.append(ConversationCheck(conv.name, "mismatch", why))
            continue
        n_tokens = None
        if tokenizer is not None:
            # data.py lets the tokenizer add BOS only when the template did not write it
            train_ids = ([tokenizer.bos_token_id] if train_bos else []) + \
                tokenizer(hf_text, add_special_tokens=False)["input_ids"]
            served_ids = ([tokenizer.bos_token_id] if add_bos else []) + \
                tokenizer(go_text, add_special_tokens=False)["input_ids"]
            if list(train_ids) != list(served_ids):
                k = next((i for i, (x, y) in enumerate(zip(train_ids, served_ids, strict=False)) if x != y),
                         min(len(train_ids), len(served_ids)))
                results.append(ConversationCheck(
                    conv.name, "mismatch", f"same text but token ids differ at position {k}: training "
                    f"{list(train_ids[k:k + 5])} vs Ollama {list(served_ids[k:k + 5])}"))
                continue
            n_tokens = len(train_ids)
        results.append(ConversationCheck(conv.name, "match", tokens=n_tokens))
    return FidelityReport(fam.name if fam else None, results, bool(add_bos), True, tokenizer is not None)
