"""The eval stage: base vs tuned on the held-out test split, drift by stage, and the regression gate.

    build_report(cfg, run, out) -> info      (pipeline stage; writes metrics.json, report.md, PNGs)

Both models answer the same test prompts with greedy decoding (GGUF files through llama-cpp-python,
or the Ollama API with eval.via=ollama). Generations are scored against the reference answers
(ROUGE-L, BLEU, chrF, exact/contains match, distinct-n, length, stop behaviour), and the reference
answers are scored under each model (answer-only perplexity, teacher-forced on the data stage's
tokens). Every per-example metric is compared pairwise (eval_metrics.paired_test).
"""

from __future__ import annotations

import collections
import json
import math
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.runs import Run, atomic_write_text
from . import metrics as em

# Per-example metrics compared base vs tuned: key -> (higher_is_better, label)
COMPARED: dict[str, tuple[bool | None, str]] = {
    "nll": (False, "answer NLL/token (log perplexity)"),
    "rouge_l": (True, "ROUGE-L F1"),
    "bleu": (True, "BLEU (sentence)"),
    "chrf": (True, "chrF (sentence)"),
    "exact": (True, "exact match"),
    "contains": (True, "contains reference"),
    "answer_words": (None, "answer length (words)"),  # neither better nor worse by itself
    "hit_limit": (False, "ran into token limit"),
}


# ------------------------------------------------------------------------------------------
# Inputs


def load_examples(data_dir: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Records of a split joined with their tokens: {id, messages, input_ids?, labels?}, first `limit`."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing", hint="re-run the data stage: `ollama-ft data RUN --force`")
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})",
                                hint="re-run the data stage: `ollama-ft data RUN --force`") from None
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


# ------------------------------------------------------------------------------------------
# Stage drift


def _find_number(obj: Any, keys: tuple[str, ...]) -> float | None:
    """First numeric value under one of `keys` (searched breadth-first through nested dicts)."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for k in keys:
                v = cur.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    return float(v)
            queue.extend(v for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            queue.extend(v for v in cur if isinstance(v, (dict, list)))
    return None


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def drift_by_stage(cfg: RunConfig, run: Run, template: str, base_path: Path | None) -> list[dict[str, Any]]:
    """Validation answer-only perplexity after each step: adapter, merged, F16 GGUF, each quant.

    adapter and merged come from their stages' own records (computed in PyTorch during training and
    the merge check); GGUF files are scored here with llama.cpp on the same validation tokens.
    """
    rows: list[dict[str, Any]] = []
    adir, mdir = run.root / "adapter", run.root / "merged"
    summ = _read_json(adir / "train_summary.json")
    if summ is not None:
        loss = _find_number(summ, ("best_eval_loss", "eval_loss", "best_metric", "final_eval_loss"))
        if loss is not None:
            rows.append({"stage": "adapter (PEFT, training eval)", "perplexity": math.exp(loss),
                         "source": "adapter/train_summary.json"})
    mc = _read_json(mdir / "merge_check.json")
    if mc is not None:
        ppl = _find_number(mc, ("merged_perplexity", "val_perplexity", "perplexity"))
        if ppl is None:
            loss = _find_number(mc, ("merged_loss", "val_loss", "eval_loss", "loss"))
            ppl = math.exp(loss) if loss is not None else None
        if ppl is not None:
            rows.append({"stage": "merged (HF)", "perplexity": ppl, "source": "merged/merge_check.json"})
    data_dir = run.root / "data"
    try:
        # The whole validation split: the adapter's number was measured on all of it.
        val = load_examples(data_dir, "validation", None)
    except UserError:
        val = []
    val = [r for r in val if "labels" in r]
    if not val:
        ui.warn("no validation tokens (data/validation.parquet); GGUF drift not measured")
        return rows
    if mc is not None and not any(r["stage"].startswith("merged") for r in rows):
        row = _merged_row(mdir, val)
        if row:
            rows.append(row)
    gdir = run.root / "gguf"
    ggufs = sorted(gdir.glob("*.gguf"), key=lambda p: (not p.stem.upper().endswith(("F16", "BF16", "F32")), p.name))
    targets: list[tuple[str, Path]] = [(f"GGUF {p.stem.rsplit('-', 1)[-1]}", p) for p in ggufs if "-lora-" not in p.name]
    if base_path is not None:
        targets.append(("base GGUF (untuned, reference)", base_path))
    for label, path in targets:
        res = run_model(f"drift {label}", path, val, cfg, template, generate=False)
        rows.append({"stage": label, "perplexity": perplexity_of(res), "source": path.name,
                     "examples": len(val), "tokens": sum(res["nll_tokens"])})
    return rows


MERGED_SCORE_MAX_BYTES = 3 * 2**30  # score the merged HF model in-process only when it is small


def hf_nll(model_dir: Path, records: list[dict[str, Any]]) -> tuple[float, int]:
    """Teacher-forced answer-only NLL of an HF model directory (transformers, float32 on CPU or CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            ids = torch.tensor([rec["input_ids"]], device=device)
            labels = torch.tensor([rec["labels"]], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            mask = tgt != -100
            if mask.any():
                lp = torch.log_softmax(logits[mask], dim=-1)
                total += float(-lp.gather(1, tgt[mask].unsqueeze(1)).sum())
                count += int(mask.sum())
    del model
    return total, count


def _merged_row(mdir: Path, val: list[dict[str, Any]]) -> dict[str, Any] | None:
    size = sum(p.stat().st_size for p in mdir.glob("*.safetensors"))
    if size == 0:
        return None
    if size > MERGED_SCORE_MAX_BYTES:
        return {"stage": "merged (HF)", "perplexity": None, "source": f"not scored ({size / 2**30:.1f} GB; "
                "see the F16 GGUF row, converted from it)"}
    with ui.status("scoring the merged model on the validation split"):
        total, n = hf_nll(mdir, val)
    return {"stage": "merged (HF)", "perplexity": em.perplexity(total, n) if n else None,
            "source": "computed (transformers, float32)", "examples": len(val), "tokens": n}


# ------------------------------------------------------------------------------------------
# The stage


def compare(base: dict[str, Any], tuned: dict[str, Any], cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Paired test per metric (tuned - base) over the per-example scores both models have."""
    out: dict[str, dict[str, Any]] = {}
    for key, (hib, label) in COMPARED.items():
        a, b = base["per_example"].get(key), tuned["per_example"].get(key)
        if not a or not b or len(a) != len(b):
            continue
        t = em.paired_test(a, b, n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
        out[key] = {"label": label, "higher_is_better": hib, "base": _nanmean(a), "tuned": _nanmean(b),
                    "test": t, "verdict": em.verdict(t, hib)}
    return out


def _nanmean(xs: list[float]) -> float | None:
    v = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def summarise_model(res: dict[str, Any], refs: list[str]) -> dict[str, Any]:
    gens = res["generations"]
    scored: dict[str, Any] = {"per_example": {}, "corpus": {}}
    if gens:
        scored = em.score_generations([g["text"] for g in gens], refs, [g["hit_limit"] for g in gens],
                                      [g["tokens"] for g in gens])
    if res["nll_tokens"]:
        scored["per_example"]["nll"] = per_token_nll(res)
        scored["corpus"]["perplexity"] = perplexity_of(res)
        scored["corpus"]["answer_tokens_scored"] = sum(res["nll_tokens"])
    scored["tokens_per_second"] = res["tokens_per_second"]
    scored["engine"] = {k: res[k] for k in ("gguf", "ollama_model", "load_seconds", "generated_tokens",
                                            "prompt_source")}
    return scored


def build_report(cfg: RunConfig, run: Run, out: Path) -> dict[str, Any]:
    """Eval stage: base vs tuned on the test split, drift by stage, report files, and the gate."""
    from . import report as eval_report

    t0 = time.perf_counter()
    out = Path(out)
    data_dir = run.require("data")
    ev = cfg.eval
    records = load_examples(data_dir, "test", ev.max_examples)
    if not records:
        raise UserError(f"{data_dir}/test.jsonl has no examples",
                        hint="give the test split a share: data.split: [0.8, 0.1, 0.1]")
    total = sum(1 for line in open(data_dir / "test.jsonl", encoding="utf-8") if line.strip())
    template = chat_template(run)
    if template is None:
        raise UserError(f"no chat template in {data_dir} or {run.root / 'base'}",
                        hint="re-run the data stage; it writes data/chat_template.jinja")
    tuned_path = tuned_gguf(cfg, run)
    base_path, base_desc = base_gguf(cfg, run)
    refs = [r["messages"][-1]["content"] for r in records]
    base_ollama = tuned_ollama = None
    if ev.via == "ollama":
        base_ollama = _ollama_base_name(cfg, run)
        from ..ollama.api import model_name_for

        tuned_ollama = model_name_for(cfg).display
    ui.info(f"eval: {len(records)} of {total} test examples, greedy, up to {ev.max_new_tokens} new tokens, "
            f"via {ev.via}")
    base_res = run_model("base", base_path, records, cfg, template, ollama_model=base_ollama)
    tuned_res = run_model("tuned", tuned_path, records, cfg, template, ollama_model=tuned_ollama)
    base = summarise_model(base_res, refs)
    tuned = summarise_model(tuned_res, refs)
    comparisons = compare(base, tuned, cfg)
    primary = "nll" if "nll" in comparisons else "rouge_l"
    g = em.gate(comparisons, base["corpus"].get("hit_limit", 0.0), tuned["corpus"].get("hit_limit", 0.0),
                primary=primary, enabled=ev.gate, limit_margin=ev.limit_margin)
    drift = drift_by_stage(cfg, run, template, base_path) if ev.drift else []
    ex = {"id": records[0].get("id"), "question": _question(records[0]), "reference": refs[0],
          "base": base_res["generations"][0]["text"] if base_res["generations"] else "",
          "tuned": tuned_res["generations"][0]["text"] if tuned_res["generations"] else ""}
    metrics = {
        "run": run.root.name,
        "split": "test",
        "examples": len(records),
        "examples_available": total,
        "cap": ev.max_examples,
        "via": ev.via,
        "max_new_tokens": ev.max_new_tokens,
        "decoding": "greedy (temperature 0, top_k 1), stops at end of turn",
        "base": {"model": base_desc, **{k: v for k, v in base.items() if k != "per_example"}},
        "tuned": {"model": tuned_path.name, **{k: v for k, v in tuned.items() if k != "per_example"}},
        "comparisons": comparisons,
        "primary_metric": primary,
        "gate": g,
        "drift": drift,
        "example": ex,
        "per_example": [
            {"id": r.get("id"), "reference": ref,
             "base": base_res["generations"][i] if base_res["generations"] else None,
             "tuned": tuned_res["generations"][i] if tuned_res["generations"] else None,
             **{f"base_{k}": v[i] for k, v in base["per_example"].items()},
             **{f"tuned_{k}": v[i] for k, v in tuned["per_example"].items()}}
            for i, (r, ref) in enumerate(zip(records, refs, strict=False))
        ],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    metrics = _json_safe(metrics)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    eval_report.write_report(metrics, run, out)
    eval_report.print_table(metrics)
    summary = _summary_line(metrics)
    return {"summary": summary, "gate": g, "example": ex, "examples": len(records),
            "primary_metric": primary, "headline": _headline(metrics),
            "tokens_per_second": {"base": base["tokens_per_second"], "tuned": tuned["tokens_per_second"]}}


def _ollama_base_name(cfg: RunConfig, run: Run) -> str:
    meta = _read_json(run.root / "base" / "ollama_ft_base.json") or {}
    spec = str(meta.get("spec") or cfg.model.base)
    kind = meta.get("source_kind")
    src = meta.get("gguf_source")
    if isinstance(src, dict) and src.get("ollama_model"):
        return str(src["ollama_model"])
    if spec.startswith("ollama://"):
        return spec[len("ollama://"):]
    if kind in (None, "catalog", "ollama", "embedded") and "/" not in spec and not spec.endswith(".gguf"):
        return spec
    raise UserError(f"eval.via ollama needs the base in Ollama, but the base is {spec!r} ({kind})",
                    hint="evaluate with `--via llama_cpp`, or create the base in Ollama and use its name")


def _question(rec: dict[str, Any]) -> str:
    for m in reversed(rec["messages"][:-1]):
        if m.get("role") == "user":
            return m.get("content", "")
    return rec["messages"][-2].get("content", "")


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in ("perplexity", "rouge_l", "bleu", "chrf", "hit_limit"):
        b, t = m["base"]["corpus"].get(k), m["tuned"]["corpus"].get(k)
        if b is not None or t is not None:
            out[k] = {"base": b, "tuned": t}
    return out


def _summary_line(m: dict[str, Any]) -> str:
    parts = []
    c = m["comparisons"]
    bp, tp = m["base"]["corpus"].get("perplexity"), m["tuned"]["corpus"].get("perplexity")
    if bp and tp:
        parts.append(f"answer perplexity {bp:.2f} -> {tp:.2f} ({c['nll']['verdict']})" if "nll" in c
                     else f"answer perplexity {bp:.2f} -> {tp:.2f}")
    if "rouge_l" in c:
        parts.append(f"ROUGE-L {c['rouge_l']['base']:.3f} -> {c['rouge_l']['tuned']:.3f} ({c['rouge_l']['verdict']})")
    gate = "gate passed" if m["gate"]["passed"] else "GATE REFUSES registration"
    return f"{m['examples']} test examples: " + "; ".join(parts) + f"; {gate}"


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
