"""Rendering conversations with the base model's chat template and finding what to train on.

Masking: only assistant turns are trained (labels -100 elsewhere) unless `data.train_on_prompt`.
Assistant spans are found on the rendered text, not by assuming a template's layout: the prompt
before turn i is the template rendered for messages[:i] with the generation prompt, and the turn
ends where the rendering of messages[:i+1] ends, so the end-of-turn marker (<|im_end|>,
<end_of_turn>, <|eot_id|>, </s>...) is trained and the model learns to stop. Templates that rewrite
earlier turns (dropping old <think> blocks) are handled by locating the turn's text instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..core.errors import UserError


def _base_family(base_dir: Path) -> str | None:
    meta = Path(base_dir) / "ollama_ft_base.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("family")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def resolve_chat_template(cfg, base_dir: Path, tok) -> tuple[str, str]:
    """(template, where it came from): the base's own template, else the chat family's."""
    f = Path(base_dir) / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8"), f"{f.name} of the base model"
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if isinstance(t, str) and t.strip():
        return t, "the tokenizer's chat_template"
    family = cfg.model.chat_template or _base_family(base_dir)
    if not family:
        raise UserError(f"the base model in {base_dir} has no chat template and no chat family is known",
                        hint="set model.chat_template to a chat family, e.g. --set model.chat_template=chatml")
    try:
        from ..ollama.templates import family_jinja
    except ImportError:
        raise UserError(f"the base model has no chat template, and chat family fallbacks ('{family}') are not "
                        "available in this version", hint="use a base model that ships a chat template") from None
    try:
        return family_jinja(family), f"the '{family}' chat family (the base has no template)"
    except KeyError:
        raise UserError(f"unknown chat family '{family}'", hint="see `ollama-ft pull --help` for families") from None


def _compile(template: str):
    try:  # the exact environment transformers renders chat templates with
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)


class SpanError(Exception):
    """The assistant turn could not be located in the rendered conversation."""


def common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Renders conversations with a chat template and finds the character spans to train on."""

    def __init__(self, template: str, special_tokens: dict[str, str]):
        self.template = template
        self._tpl = _compile(template)
        self._kw = {k: v for k, v in special_tokens.items() if isinstance(v, str)}
        self.bos = self._kw.get("bos_token", "")
        self.eos = self._kw.get("eos_token", "")
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text = self.render(probe)
        except Exception:  # a template that refuses the probe still decides below
            text = ""
        # A template that writes the BOS text itself must not get a second BOS from the tokenizer.
        self.template_has_bos = bool(self.bos) and text.startswith(self.bos)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self._tpl.render(messages=messages, add_generation_prompt=generation_prompt, **self._kw)

    def spans(self, messages: list[dict[str, str]], train_on_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end)]) with the character spans whose tokens are trained."""
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            # Plain text: no template; BOS as the template would have it, EOS to learn to stop.
            prefix = self.bos if self.template_has_bos else ""
            text = prefix + messages[0]["content"] + self.eos
            return text, [(len(prefix), len(text))]
        full = self.render(messages)
        if train_on_prompt:
            return full, [(0, len(full))]
        spans: list[tuple[int, int]] = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True)
            if full.startswith(prompt):
                start = len(prompt)
            else:
                start = self._locate_start(full, spans[-1][1] if spans else 0, prompt, messages[i - 1]["content"])
            upto = full if i == last else self.render(messages[: i + 1])
            end = len(upto) if full.startswith(upto) else self._locate_end(full, start, upto, m["content"])
            # Whitespace after the end-of-turn marker is layout, not something to learn.
            while end > start and full[end - 1] in " \t\r\n":
                end -= 1
            content = m["content"].strip()
            if i == last and content and full[start:end].endswith(content) and full[end:].strip() == "":
                # The template ends the last turn with nothing: add EOS so the model learns to stop.
                full = full[:end] + self.eos
                end = len(full)
            if end <= start:
                raise SpanError(f"assistant turn {i} renders to nothing")
            spans.append((start, end))
        return full, spans

    @staticmethod
    def _locate_start(full: str, search_from: int, prompt: str, before: str) -> int:
        # The prompt rendered for messages[:i] is not a prefix of the whole conversation (the
        # template moves the system prompt, or its generation prompt differs from how a finished
        # turn starts): find the message before the turn in `full`, then the prompt's tail after it.
        key = before.strip()[-48:]
        q = prompt.rfind(key) if key else -1
        pos = full.find(key, search_from) if q >= 0 else -1
        if pos < 0:
            return common_prefix(prompt, full)
        tail = prompt[q + len(key):]
        exact = full.find(key + tail, search_from)
        if exact >= 0:
            return exact + len(key) + len(tail)
        pos += len(key)
        return pos + common_prefix(tail, full[pos:])

    @staticmethod
    def _locate_end(full: str, start: int, upto: str, content: str) -> int:
        # The template rendered this turn differently once later turns followed (e.g. it drops
        # <think> blocks of earlier turns): find the visible end of the content and the marker after it.
        visible = content.split("</think>")[-1].strip()
        tail = visible[-48:]
        pos = full.find(tail, start) if tail else -1
        if pos < 0:
            raise SpanError("assistant turn not found in the rendered conversation")
        end = pos + len(tail)
        q = upto.rfind(tail)
        if q >= 0:
            end += common_prefix(upto[q + len(tail):], full[end:])
        return end


# Rendering is pure Python (jinja); with more than one batch it runs in worker processes while the
# main process reads, tokenizes (Rust, multi-threaded) and writes.
_RENDERER: dict[str, Any] = {}


def _init_worker(template: str, special_tokens: dict[str, str], train_on_prompt: bool) -> None:
    _RENDERER["r"] = ChatRenderer(template, special_tokens)
    _RENDERER["train_on_prompt"] = train_on_prompt


def _render_batch(conversations: list[list[dict[str, str]]]) -> list[tuple]:
    """(text, spans) per conversation, or (None, kind, message) when it cannot be rendered."""
    r: ChatRenderer = _RENDERER["r"]
    top = _RENDERER["train_on_prompt"]
    out: list[tuple] = []
    for msgs in conversations:
        try:
            out.append(r.spans(msgs, top))
        except SpanError as e:
            out.append((None, "assistant_not_located", f"{e}; record skipped"))
        except Exception as e:  # jinja TemplateError / raise_exception() in the template
            out.append((None, "template_error", f"the chat template refused this conversation: {e}"))
    return out


def _rendered_batches(batches, template: str, special_tokens: dict[str, str], train_on_prompt: bool):
    """Yield (batch, render results) in order. A single batch renders in-process; more start a
    small process pool (fork) so rendering overlaps with tokenizing and writing."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    _init_worker(template, special_tokens, train_on_prompt)
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    workers = min(2, os.cpu_count() or 1)
    if second is None or workers < 2 or not sys.platform.startswith("linux"):
        for b in (first, second, *it):
            if b is not None:
                yield b, _render_batch([p[0].messages for p in b])
        return
    # Started before the first tokenization, so forked children never inherit a busy Rust pool.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                             initargs=(template, special_tokens, train_on_prompt)) as ex:
        pending: deque = deque()
        for b in (first, second, *it):
            pending.append((b, ex.submit(_render_batch, [p[0].messages for p in b])))
            if len(pending) > workers + 1:
                b0, fut = pending.popleft()
                yield b0, fut.result()
        while pending:
            b0, fut = pending.popleft()
            yield b0, fut.result()


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as e:  # missing/corrupt tokenizer files are a broken base, reported plainly
        raise UserError(f"cannot load the tokenizer of the base model in {base_dir}: {e}",
                        hint="re-run `ollama-ft pull` for this run (or --force pull)") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer in {base_dir} has no fast (Rust) version; ollama-ft needs one for "
                        "character offsets", hint="save the tokenizer with `tokenizer.json` (transformers does "
                        "this when converting)")
    return tok
