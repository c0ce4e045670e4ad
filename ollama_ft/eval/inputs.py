"""Eval inputs: the test/validation records joined with their data-stage tokens, the chat template,
and the two GGUFs compared (the tuned one at ollama.quant, the base converted to the same quant)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.files import iter_jsonl
from ..core.runs import Run

# ------------------------------------------------------------------------------------------
# Inputs


def load_examples(data_dir: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Records of a split joined with their tokens: {id, messages, input_ids?, labels?}, first `limit`."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing", hint="re-run the data stage: `ollama-ft data RUN --force`")
    records: list[dict[str, Any]] = []
    for lineno, rec in iter_jsonl(path, hint="re-run the data stage: `ollama-ft data RUN --force`"):
        rec = rec if isinstance(rec, dict) else {}
        msgs = rec.get("messages") or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise UserError(f"{path}:{lineno}: record {rec.get('id')!r} does not end with an assistant message",
                            hint="the data stage writes records whose last message is the reference answer")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    tokens = _load_tokens(data_dir / f"{split}.parquet")
    for rec in records:
        t = tokens.get(str(rec.get("id")))
        if t is not None:
            rec["input_ids"], rec["labels"] = t
    return records


def _load_tokens(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "input_ids", "labels"])
    out = {}
    for row in table.to_pylist():
        out[str(row["id"])] = (list(row["input_ids"]), _aligned_labels(row["input_ids"], row["labels"]))
    return out


def _aligned_labels(ids: list[int], labels: list[int]) -> list[int]:
    """Labels aligned with input_ids (HF convention); shift them if they were stored pre-shifted."""
    same = sum(1 for i, lab in zip(ids, labels, strict=False) if lab != -100 and lab == i)
    nxt = sum(1 for i, lab in zip(ids[1:], labels, strict=False) if lab != -100 and lab == i)
    if nxt > same:
        return [-100] + list(labels[:-1])
    return list(labels)


def answer_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last contiguous run of trained tokens: the final assistant answer."""
    end = None
    for t in range(len(labels) - 1, -1, -1):
        if labels[t] != -100:
            end = t + 1
            break
    if end is None:
        return None
    start = end - 1
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return start, end


def prompt_prefix(rec: dict[str, Any]) -> list[int] | None:
    """The data stage's tokens before the final answer (prompt + generation header), if defined."""
    if "labels" not in rec:
        return None
    span = answer_span(rec["labels"])
    if span is None or span[0] == 0:
        return None  # train_on_prompt labels everything: the answer start is unknown
    return rec["input_ids"][: span[0]]


def chat_template(run: Run) -> str | None:
    """The template the data was rendered with; else the base's; else its chat family's."""
    for p in (run.root / "data" / "chat_template.jinja", run.root / "base" / "chat_template.jinja"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    family = (_read_json(run.root / "base" / "ollama_ft_base.json") or {}).get("family")
    if family:
        from ..ollama.templates import family_jinja

        try:
            return family_jinja(family)
        except UserError:
            return None
    return None


def tuned_gguf(cfg: RunConfig, run: Run) -> Path:
    gdir = run.require("export")
    p = gdir / f"{cfg.ollama_name}-{cfg.ollama.quant}.gguf"
    if not p.is_file():
        have = ", ".join(sorted(x.name for x in gdir.glob("*.gguf"))) or "none"
        raise UserError(f"tuned GGUF {p} not found (ollama.quant: {cfg.ollama.quant}); exported: {have}",
                        hint="set ollama.quant to an exported quant, or add it to export.quants and re-export")
    return p


def base_gguf(cfg: RunConfig, run: Run) -> tuple[Path, str]:
    """The base model as GGUF at the tuned model's quant: its GGUF source, or converted once and cached."""
    base_dir = run.require("pull")
    meta_path = base_dir / "ollama_ft_base.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    src = meta.get("gguf_source")
    src_type = None
    if isinstance(src, dict):  # sources.py records {"path", "sha256", "file_type", ...}
        src, src_type = src.get("path"), src.get("file_type")
    # Compare like with like: the base's own GGUF only when it has the tuned model's quant, so a
    # difference measures the fine-tune and not a quantization level (a 270M model loses a lot at Q4).
    if src and src_type and str(src_type).upper() != cfg.ollama.quant.upper():
        src = None
    if src:
        p = Path(src)
        if not p.is_absolute() and not p.is_file():
            p = base_dir / src
        if p.is_file():
            return p, f"GGUF source of the base ({p.name})"
        ui.warn(f"the base's GGUF source {src} is gone; converting base/ instead")
    quant = cfg.ollama.quant
    cache = run.root / "cache"
    out = cache / f"base-{quant}.gguf"
    if out.is_file():
        return out, f"base/ converted to GGUF {quant} (cached in {cache})"
    from ..export import converter

    outtype = cfg.export.outtype
    f16 = cache / f"base-{outtype.upper()}.gguf"
    if not f16.is_file():
        ui.info(f"converting the base model to GGUF {outtype.upper()} for comparison (cached in {cache})")
        converter.convert_to_gguf(base_dir, f16, outtype, pre_tokenizer=cfg.export.pre_tokenizer)
    if quant.upper() in ("F16", "BF16") and quant.upper() == outtype.upper():
        return f16, f"base/ converted to GGUF {outtype.upper()} (cached)"
    _quantize(f16, out, quant)
    return out, f"base/ converted to GGUF {quant} (cached in {cache})"


def _quantize(src: Path, dst: Path, quant: str) -> None:
    """Quantize with the export stage's llama.cpp worker (same quantizer, crash-contained)."""
    from ..export.gguf import quantize

    quantize(src, {quant.upper(): dst})


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
