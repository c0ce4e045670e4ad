"""The forgetting check: perplexity on general text before and after tuning, at the registered quant.

A fine-tune that learns its facts but loses general language ability shows it here first: the
tuned GGUF scores the same general paragraphs as the base GGUF (both at `ollama.quant`), and the
relative rise of perplexity is gated by `eval.max_general_ppl_increase`.

The bundled set (data_files/general_text.jsonl) is three dozen short paragraphs of everyday prose
written for this project (weather, cooking, animals, history, ...). It is disjoint from the general
chat set that replay training mixes in (data_files/general_chat*.jsonl): a set the model trained on
would hide forgetting. `eval.general_data` points at a user's own file (.jsonl with "text", or .txt
of blank-line separated paragraphs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import iter_jsonl
from . import metrics as em

BUNDLED = Path(__file__).resolve().parent.parent / "data_files" / "general_text.jsonl"


def general_path(setting: str | None) -> Path | None:
    """The general-text file for `eval.general_data` (None = bundled, "none" = off)."""
    if setting is not None and setting.strip().lower() in ("none", "off", "false", ""):
        return None
    p = Path(setting).expanduser() if setting else BUNDLED
    if not p.is_file():
        raise UserError(f"eval.general_data: {p} is not a file",
                        hint="give a .jsonl with a \"text\" field per line or a .txt of paragraphs; "
                             "`eval.general_data: none` turns the forgetting check off")
    return p


_LINE_HINT = "each line of the general-text file is {\"text\": \"...\"}"


def load_texts(path: Path) -> list[dict[str, str]]:
    """[{id, text}] from a .jsonl ("text" field) or .txt (blank-line separated paragraphs)."""
    out: list[dict[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, rec in iter_jsonl(path, hint=_LINE_HINT):
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{path}:{lineno}: no \"text\" string", hint=_LINE_HINT)
            out.append({"id": str(rec.get("id") or f"line{lineno}"), "text": text.strip()})
    elif path.suffix.lower() == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})",
                            hint="re-save the file as UTF-8") from None
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        out = [{"id": f"p{i}", "text": t} for i, t in enumerate(paras, 1)]
    else:
        raise UserError(f"eval.general_data: {path} has an unsupported extension",
                        hint="use .jsonl (a \"text\" field per line) or .txt (paragraphs separated by blank lines)")
    if not out:
        raise UserError(f"eval.general_data: {path} holds no text", hint="add a few dozen paragraphs of general prose")
    return out


def digest(texts: list[dict[str, str]]) -> str:
    """Content hash of the general set (the report names which set was scored)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t["text"].encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def score(gguf: Path, texts: list[dict[str, str]], template: str, *, threads: int | None, seed: int,
          log_path: Path | None) -> list[tuple[float, int]]:
    """(NLL sum, tokens) per text under one GGUF (llama.cpp in a child process)."""
    from .engines import ContainedLlamaCppEngine

    eng = ContainedLlamaCppEngine(gguf, template, log_path=log_path, n_ctx=1024, threads=threads, seed=seed)
    try:
        return [eng.text_nll(t["text"]) for t in texts]
    finally:
        eng.close()


def check(base: list[tuple[float, int]], tuned: list[tuple[float, int]], *, max_increase: float | None,
          n_boot: int, seed: int) -> dict[str, Any]:
    """Before/after perplexity, the relative increase, a paired test of per-text NLL/token, the gate verdict."""
    bp = em.perplexity(sum(a for a, _ in base), sum(n for _, n in base))
    tp = em.perplexity(sum(a for a, _ in tuned), sum(n for _, n in tuned))
    per_b = [a / n if n else float("nan") for a, n in base]
    per_t = [a / n if n else float("nan") for a, n in tuned]
    increase = tp / bp - 1.0 if bp > 0 else None
    passed = max_increase is None or increase is None or increase <= max_increase
    return {"base_perplexity": bp, "tuned_perplexity": tp, "increase": increase, "max_increase": max_increase,
            "passed": passed, "tokens": sum(n for _, n in base),
            "test": em.paired_test(per_b, per_t, n_boot=n_boot, seed=seed)}


def gate_reason(g: dict[str, Any]) -> str | None:
    """The gate's refusal text when general perplexity rose past the limit, else None."""
    if g.get("passed", True):
        return None
    return (f"general-text perplexity rose {g['increase']:+.1%} ({g['base_perplexity']:.2f} -> "
            f"{g['tuned_perplexity']:.2f} on {g['examples']} paragraphs of {g['source']}), more than "
            f"eval.max_general_ppl_increase {g['max_increase']:.0%}: the tuned model lost general ability "
            "(lower the learning rate or steps, or mix general data in)")
