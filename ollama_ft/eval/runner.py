"""Running one model over the eval records: greedy generations (llama.cpp or Ollama) and the reference
answers' teacher-forced NLL (llama.cpp only)."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from . import metrics as em
from .inputs import answer_span, prompt_prefix

# ------------------------------------------------------------------------------------------
# Running one model over the examples


def _stop_ids(engine: Any, records: list[dict[str, Any]]) -> set[int]:
    """The token that closes answers in the training data (e.g. <|im_end|>, <end_of_turn>).

    It is the last labelled non-whitespace token of each answer when that token is not part of
    the answer text; taken when it is the same token in most examples.
    """
    seen: collections.Counter[int] = collections.Counter()
    for rec in records:
        if "labels" not in rec:
            continue
        span = answer_span(rec["labels"])
        if span is None:
            continue
        for t in range(span[1] - 1, span[0] - 1, -1):
            piece = engine.piece(rec["input_ids"][t])
            if piece.strip():
                if piece.strip() not in rec["messages"][-1]["content"]:
                    seen[rec["input_ids"][t]] += 1
                break
    if not seen:
        return set()
    tok, n = seen.most_common(1)[0]
    return {tok} if n >= max(1, len(records) // 2) else set()


def _llama_log(gguf: Path) -> Path:
    """runs/<run>/logs/llama.log for a GGUF inside a run (runs/<run>/gguf/...), else beside the GGUF."""
    gguf = Path(gguf)
    root = gguf.parent.parent if gguf.parent.name == "gguf" else gguf.parent
    return root / "logs" / "llama.log"


def _n_ctx(records: list[dict[str, Any]], max_new: int) -> int:
    longest = max([len(r.get("input_ids", [])) for r in records] + [0])
    return max(512, longest + max_new + 16)


def run_model(label: str, gguf: Path | None, records: list[dict[str, Any]], cfg: RunConfig, template: str,
              ollama_model: str | None = None, generate: bool = True) -> dict[str, Any]:
    """Generate for every record (if `generate`) and score the reference answers' NLL (GGUF only)."""
    from .engines import ContainedLlamaCppEngine, OllamaEngine

    ev = cfg.eval
    llama = None
    gens: list[Any] = []
    nll: list[tuple[float, int]] = []
    prompt_src = collections.Counter()
    load_s = 0.0
    try:
        if gguf is not None:
            t0 = time.perf_counter()
            # in a child process: a llama.cpp crash is reported, not fatal; its log goes to the run's logs/
            llama = ContainedLlamaCppEngine(gguf, template, log_path=_llama_log(gguf),
                                            n_ctx=_n_ctx(records, ev.max_new_tokens), threads=ev.threads,
                                            seed=ev.seed)
            llama.stop_ids = _stop_ids(llama, records)
            load_s = time.perf_counter() - t0
            if generate and not ollama_model and records:
                # one untimed token first: llama.cpp's first decode allocates buffers, which is not speed
                llama.generate(records[0]["messages"][:-1], 1, prompt=prompt_prefix(records[0]))
        gen_engine = OllamaEngine(ollama_model, cfg.ollama.host, template) if ollama_model else llama
        with ui.progress_steps() as prog:
            task = prog.add_task(f"eval {label}", total=len(records))
            for rec in records:
                msgs = rec["messages"][:-1]
                if generate and gen_engine is not None:
                    prefix = prompt_prefix(rec) if gen_engine is llama else None
                    prompt_src["data tokens" if prefix else "template"] += 1
                    if gen_engine is llama:
                        gens.append(llama.generate(msgs, ev.max_new_tokens, prompt=prefix))
                    else:
                        gens.append(gen_engine.generate(msgs, ev.max_new_tokens))
                if llama is not None:
                    # (0, 0) keeps the list aligned with the records when an example has no tokens
                    nll.append(llama.nll(rec["input_ids"], rec["labels"]) if "labels" in rec else (0.0, 0))
                prog.advance(task)
    finally:
        if llama is not None:
            llama.close()
    gen_tokens = sum(g.n_tokens for g in gens)
    gen_secs = sum(g.seconds for g in gens)
    res: dict[str, Any] = {
        "label": label,
        "gguf": str(gguf) if gguf else None,
        "ollama_model": ollama_model,
        "load_seconds": round(load_s, 3),
        "generations": [{"text": g.text, "tokens": g.n_tokens, "hit_limit": g.hit_limit} for g in gens],
        "tokens_per_second": round(gen_tokens / gen_secs, 2) if gen_secs > 0 else None,
        "generated_tokens": gen_tokens,
        "prompt_source": dict(prompt_src),
        "nll": [a for a, _ in nll],
        "nll_tokens": [n for _, n in nll],
    }
    return res


def perplexity_of(res: dict[str, Any]) -> float | None:
    n = sum(res["nll_tokens"])
    return em.perplexity(sum(res["nll"]), n) if n else None


def per_token_nll(res: dict[str, Any]) -> list[float]:
    return [a / n if n else float("nan") for a, n in zip(res["nll"], res["nll_tokens"], strict=False)]
