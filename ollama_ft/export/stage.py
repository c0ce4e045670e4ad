"""Stage `export`: merged HF model -> F16/BF16 GGUF -> quantized GGUFs, each one verified.

Conversion runs llama.cpp's packaged converter (converter.py); quantization uses llama-cpp-python's
`llama_model_quantize`. Every llama.cpp call runs in a subprocess (gguf.py): a native crash (e.g. an AMX build
in a VM) is then reported as an error about that file instead of killing ollama-ft.

Verification of each file: GGUF structure and metadata (gguf reader), llama.cpp loads it with tensor
validation, tokenizer parity with the HF tokenizer on the validation texts, teacher-forced perplexity
on the validation split (F16 must be within 1% of the merged HF model; quantized files report their
increase), and a short greedy generation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import human_bytes, read_base_meta
from ..core.nll import NllSum, perplexity, token_nll
from ..core.runs import atomic_write_text
from .gguf import eval_gguf, quantize, verify_gguf_file

PPL_TOLERANCE = 0.01  # F16 GGUF perplexity within 1% of the merged HF model's
PPL_MAX_TOKENS = 256  # per sequence; keeps llama.cpp's logits buffer (n_ctx x vocab floats) small
PPL_MAX_SEQS = 32
QUANT_LOSS_WARN = 0.25  # answer perplexity this much above F16's: say the quantization costs the fine-tune

# ------------------------------------------------------------------------------------------
# Lineage


def lineage_metadata(cfg, run) -> dict[str, Any]:
    """general.* keys for the converter's --metadata file: name, finetune, base model, datasets."""
    meta: dict[str, Any] = {"general.name": cfg.ollama_name, "general.finetune": cfg.run_name}
    base = read_base_meta(Path(run.root) / "base") if run is not None else {}
    entry: dict[str, Any] = {"name": base.get("hf_repo") or base.get("spec") or cfg.model.base}
    if base.get("hf_repo"):
        entry["repo_url"] = f"https://huggingface.co/{base['hf_repo']}"
        entry["organization"] = base["hf_repo"].split("/")[0]
    if base.get("revision"):
        entry["version"] = str(base["revision"])
    if base.get("gguf_source"):
        entry["description"] = f"dequantized from GGUF {base['gguf_source']}"
    meta["general.base_models"] = [entry]
    if base.get("license"):
        meta["general.license"] = str(base["license"])
    ds: dict[str, Any] = {"name": Path(cfg.data.path).name}
    stats_path = Path(run.root) / "data" / "stats.json" if run is not None else None
    if stats_path is not None and stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text())
            # data/stats.json (the data stage): per-split example counts and trained tokens
            counts = stats.get("counts") or {}
            train = (stats.get("splits") or {}).get("train") or {}
            if counts.get("train"):
                ds["description"] = (f"{counts['train']} training examples ({train.get('trained_tokens', '?')} trained "
                                     f"tokens), {counts.get('validation', 0)} validation, {counts.get('test', 0)} test")
        except (json.JSONDecodeError, AttributeError):
            pass
    meta["general.datasets"] = [ds]
    return meta


# ------------------------------------------------------------------------------------------
# Verification against the merged HF model


def _validation(merged_dir: Path, data_dir: Path | None
                ) -> tuple[list[str], list[list[int]], list[int], list[list[int]] | None]:
    """(texts for tokenizer parity, token-id sequences for perplexity, prompt ids for generation, answer masks).

    masks[i][t] = 1 where token t+1 of seqs[i] is a trained (answer) token; None without the data stage.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    texts: list[str] = []
    prompt_ids: list[int] | None = None
    if data_dir is not None and (data_dir / "validation.jsonl").is_file():
        for line in (data_dir / "validation.jsonl").read_text(encoding="utf-8").splitlines()[:200]:
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = rec.get("messages") or []
            texts += [m.get("content", "") for m in msgs if m.get("content")]
            if tok.chat_template:
                try:
                    texts.append(tok.apply_chat_template(msgs, tokenize=False))
                    if prompt_ids is None:
                        user = [m for m in msgs if m.get("role") != "assistant"][:2] or msgs[:1]
                        prompt_ids = list(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True,
                                                                  return_dict=False))
                except Exception:  # a template that needs other roles: the plain texts still count
                    pass
    if not texts:
        texts = ["The clinic opens at eight. Please wait to be called!",
                 "Ünïcödé – ä ö ü ß é ñ 日本語 🙂  two  spaces\nnew line 12345"]
        if tok.chat_template:
            # the rendered template exercises the chat markers (special tokens) too
            try:
                texts.append(tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False,
                                                     add_generation_prompt=True))
            except Exception:
                pass
    seqs: list[list[int]] = []
    masks: list[list[int]] | None = None
    if data_dir is not None:
        for split in ("validation", "test"):
            p = data_dir / f"{split}.parquet"
            if p.is_file():
                import pyarrow.parquet as pq

                table = pq.read_table(p, columns=["input_ids", "labels"])
                pairs = [(list(r)[:PPL_MAX_TOKENS], list(lab)[:PPL_MAX_TOKENS]) for r, lab in
                         zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True)
                         if r and len(r) > 2][:PPL_MAX_SEQS]
                seqs = [ids for ids, _ in pairs]
                masks = [[int(t != -100) for t in lab[1:]] for _, lab in pairs]
                break
    if not seqs:
        seqs = [tok(t)["input_ids"][:PPL_MAX_TOKENS] for t in texts[:PPL_MAX_SEQS]]
        seqs = [s for s in seqs if len(s) > 2]
    if prompt_ids is None:
        prompt_ids = tok(texts[0])["input_ids"][:32]
    if masks is not None and not any(any(m) for m in masks):
        masks = None
    return texts, seqs, prompt_ids, masks


def hf_reference(merged_dir: Path, texts: list[str], seqs: list[list[int]],
                 masks: list[list[int]] | None = None) -> dict[str, Any]:
    """HF tokenizer ids for the texts, and the merged HF model's teacher-forced NLL on seqs (all tokens,
    and answer tokens only where masks are given)."""
    from transformers import AutoTokenizer

    from ..core.hf_loading import load_float32

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    offload_dir = Path(merged_dir).parent / f".offload-ref-{os.getpid()}"
    try:
        model, offloaded = load_float32(Path(merged_dir), offload_dir)
        return {"ids": ids, **_teacher_forced_nll(model, seqs, masks), "disk_offloaded": offloaded}
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)


def _teacher_forced_nll(model, seqs: list[list[int]], masks: list[list[int]] | None) -> dict[str, Any]:
    """The HF reference for llama.cpp's numbers: the same NLL (core/nll) on the model's float64 logits."""
    import torch

    sums, first = NllSum(), None
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logits = model(input_ids=torch.tensor([s])).logits[0].double()
            if first is None:
                first = logits[:8]
            sums.add(token_nll(logits.numpy(), s), masks[i] if masks is not None else None)
    return {**sums.as_dict(), "first_logits": first}


def build_gguf(cfg, run, merged_dir: Path, out: Path) -> dict[str, Any]:
    """Stage `export`: convert, quantize, verify. Writes gguf/<name>-<QUANT>.gguf and gguf/verify.json."""
    merged_dir, out = Path(merged_dir), Path(out)
    ecfg = cfg.export
    name = cfg.ollama_name
    hi = ecfg.outtype.upper()  # F16 | BF16
    src = out / f"{name}-{hi}.gguf"
    timings: dict[str, float] = {}
    ui.info(f"export: {merged_dir} -> {src.name} with llama.cpp's converter")
    template_path = merged_dir / "chat_template.jinja"
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
    gguf_template = _gguf_chat_template(template, ecfg.gguf_chat_template)
    conv = _convert_with_lineage(cfg, run, merged_dir, src,
                                 **({"chat_template": gguf_template.jinja} if template is not None else {}))
    timings["convert_s"] = conv["seconds"]
    files = {hi: src}
    to_quantize = {q: out / f"{name}-{q}.gguf" for q in dict.fromkeys(ecfg.quants) if q != hi}
    if to_quantize:
        t = time.perf_counter()
        qsec = quantize(src, to_quantize)
        timings["quantize_s"] = round(time.perf_counter() - t, 3)
        timings.update({f"quantize_{q}_s": s for q, s in qsec.items()})
        files.update(to_quantize)

    data_dir = Path(run.root) / "data" if run is not None and (Path(run.root) / "data").is_dir() else None
    t = time.perf_counter()
    results = verify_outputs(files, merged_dir, data_dir, gguf_template.jinja if template is not None else None,
                             verify=ecfg.verify, base_quant=hi,
                             parity=ecfg.tokenizer_parity)
    timings["verify_s"] = round(time.perf_counter() - t, 3)

    adapter_info = None
    if ecfg.adapter_gguf:
        adapter_info = export_adapter(cfg, run, merged_dir, out, src, data_dir, verify=ecfg.verify)

    report = {"files": results, "timings": timings, "converter": {k: conv[k] for k in ("phases", "architecture", "tokenizer", "lowmem")},
              "ppl_tolerance": PPL_TOLERANCE, "adapter": adapter_info,
              "gguf_chat_template": gguf_template.as_dict()}
    atomic_write_text(out / "verify.json", json.dumps(report, indent=2) + "\n")
    _print_table(results)
    default_q = cfg.ollama.quant if cfg.ollama.quant in files else next(iter(files))
    summary = ", ".join(f"{q} {human_bytes(r['bytes'])}"
                        + (f" answer ppl {r['answer_ppl']:.3g}" if r.get("answer_ppl")
                           else f" ppl {r['ppl']:.3g}" if r.get("ppl") else "")
                        for q, r in results.items())
    return {
        "files": {q: p.name for q, p in files.items()},
        "default": files[default_q].name,
        "verify": {q: {k: r.get(k) for k in ("ppl", "ppl_increase", "answer_ppl", "answer_ppl_increase",
                                             "tokenizer_parity", "loaded", "generation")}
                   for q, r in results.items()},
        "reference_ppl": next(iter(results.values())).get("reference_ppl"),
        "timings": timings,
        "converter_phases": conv["phases"],
        "adapter": adapter_info,
        "summary": summary,
        "gguf_chat_template": gguf_template.as_dict(),
    }


def export_adapter(cfg, run, merged_dir: Path, out: Path, merged_gguf: Path, data_dir: Path | None,
                   verify: bool = True) -> dict[str, Any]:
    """The LoRA alone as `<name>-lora-F16.gguf`, checked against the merged model's GGUF.

    Verification converts the unmerged base to a scratch F16 GGUF, loads it with the adapter in llama.cpp
    and compares perplexity, logits and greedy output with the merged model's F16 GGUF.
    """
    import numpy as np

    from .converter import convert_lora_to_gguf, convert_to_gguf

    if run is None:
        raise UserError("adapter export needs the run's base/ and adapter/ directories")
    base_dir, adapter_dir = Path(run.root) / "base", Path(run.root) / "adapter"
    for d, stage in ((base_dir, "pull"), (adapter_dir, "train")):
        if not d.is_dir():
            raise UserError(f"adapter export needs {d}", hint=f"run `ollama-ft {stage} {run.root}` first")
    dst = out / f"{cfg.ollama_name}-lora-F16.gguf"
    info = convert_lora_to_gguf(adapter_dir, base_dir, dst, metadata={"general.name": f"{cfg.ollama_name}-lora"})
    finfo = verify_gguf_file(dst, load=False)
    if finfo["type"] != "adapter" or finfo["adapter"].get("adapter.type") != "lora":
        raise UserError(f"{dst.name}: not marked as a LoRA adapter (general.type/adapter.type)")
    info.update({"file": dst.name, "architecture": finfo["architecture"], "tensors": finfo["tensors"]})
    if not verify:
        return info
    if cfg.model.merge_base != "full":
        info["note"] = "merged into the dequantized base; base+adapter is compared against it loosely"
    scratch = out / f".base-{os.getpid()}-F16.gguf"
    try:
        convert_to_gguf(base_dir, scratch, outtype="f16", pre_tokenizer=cfg.export.pre_tokenizer)
        texts, seqs, prompt_ids, _masks = _validation(merged_dir, data_dir)
        with ui.status("export: base GGUF + adapter GGUF vs merged GGUF in llama.cpp"):
            with_lora = eval_gguf(scratch, texts[:1], seqs, prompt_ids, lora_path=dst)
            merged = eval_gguf(merged_gguf, texts[:1], seqs, prompt_ids)
    finally:
        if scratch.exists():
            scratch.unlink()
    a, b = np.asarray(with_lora["first_logits"]), np.asarray(merged["first_logits"])
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    ppl_a, ppl_b = perplexity(with_lora["nll"], with_lora["n"]), perplexity(merged["nll"], merged["n"])
    n_same = next((i for i, (x, y) in enumerate(zip(with_lora["gen_ids"], merged["gen_ids"], strict=False)) if x != y),
                  min(len(with_lora["gen_ids"]), len(merged["gen_ids"])))
    info.update({"ppl_base_plus_adapter": ppl_a, "ppl_merged": ppl_b, "ppl_ratio": ppl_a / ppl_b,
                 "logits_relative_diff": rel, "greedy_tokens_equal": n_same,
                 "greedy_tokens": len(merged["gen_ids"]), "generation": with_lora["gen_text"]})
    info["passed"] = abs(ppl_a / ppl_b - 1) <= PPL_TOLERANCE or cfg.model.merge_base != "full"
    if not info["passed"]:
        raise UserError(f"{dst.name}: base + adapter in llama.cpp disagrees with the merged model "
                        f"(perplexity {ppl_a:.4g} vs {ppl_b:.4g})",
                        hint="the adapter conversion is wrong for this architecture; use the merged GGUF")
    ui.success(f"adapter GGUF: base+adapter perplexity {ppl_a:.4g} vs merged {ppl_b:.4g}; greedy output equal for "
               f"{n_same}/{len(merged['gen_ids'])} tokens")
    return info


def _convert_with_lineage(cfg, run, merged_dir: Path, dst: Path, **overrides: Any) -> dict[str, Any]:
    from .converter import convert_to_gguf

    return convert_to_gguf(merged_dir, dst, outtype=cfg.export.outtype, metadata=lineage_metadata(cfg, run),
                           pre_tokenizer=cfg.export.pre_tokenizer, **overrides)


def _gguf_chat_template(template: str | None, mode: str):
    """The chat template the GGUF carries (Ollama v0.30+ must not prefer it over the TEMPLATE); says why."""
    from ..ollama.capabilities import choose_gguf_chat_template

    choice = choose_gguf_chat_template(template, mode)
    if choice.not_advertised:
        what = " and ".join(choice.not_advertised)
        kept = (f"it carries the {choice.source.split(':', 1)[1]} family's equivalent template instead"
                if choice.source.startswith("family:") else "it carries no chat template")
        ui.warn(f"export: {what} not advertised through the GGUF: {kept}. {choice.reason}. Tool calls through "
                "Ollama are refused for this model; set export.gguf_chat_template: training to keep them in the GGUF "
                "for other runtimes (newer Ollama then renders that template instead)")
    return choice


def verify_outputs(files: dict[str, Path], merged_dir: Path, data_dir: Path | None, template: str | None,
                   verify: bool = True, base_quant: str = "F16", parity: str = "error") -> dict[str, dict[str, Any]]:
    """Verify every GGUF; raise UserError on a structural problem, tokenizer mismatch or F16 ppl drift."""
    results: dict[str, dict[str, Any]] = {}
    for q, p in files.items():
        info = verify_gguf_file(p, load=verify)
        problems = []
        # template "": the GGUF must carry no chat template (see ollama.capabilities)
        if template is not None and (info["chat_template"] or "") != template:
            problems.append("tokenizer.chat_template differs from the chat template chosen for the GGUF")
        if not info["lineage"].get("general.base_model.count"):
            problems.append("lineage keys general.base_model.* missing")
        if problems:
            raise UserError(f"{p.name}: metadata check failed", details=problems,
                            hint="this is a bug in the export; please report it")
        results[q] = {"file": p.name, "bytes": info["bytes"], "architecture": info["architecture"],
                      "tensors": info["tensors"], "chat_template_ok": True if template is not None else None,
                      "loaded": bool(verify), "lineage": info["lineage"]}
    if not verify:
        return results
    texts, seqs, prompt_ids, masks = _validation(merged_dir, data_dir)
    with ui.status("export: reference perplexity with the merged HF model"):
        ref = hf_reference(merged_dir, texts, seqs, masks)
    ref_ppl = perplexity(ref["nll"], ref["n"])
    base_ppl = None
    for q, p in files.items():
        with ui.status(f"export: verifying {p.name} with llama.cpp"):
            ev = eval_gguf(p, texts, seqs, prompt_ids, masks=masks)
        if ev.get("nonfinite"):
            raise UserError(f"{p.name}: llama.cpp produced non-finite logits; the file is damaged",
                            hint="re-run `ollama-ft export RUN --force`")
        mismatches = [i for i, (a, b) in enumerate(zip(ref["ids"], ev["tokens"], strict=True)) if list(a) != list(b)]
        ppl = perplexity(ev["nll"], ev["n"])
        r = results[q]
        r.update({"tokenizer_parity": not mismatches, "texts_checked": len(texts),
                  "tokens_scored": ev["n"], "ppl": ppl, "reference_ppl": ref_ppl,
                  "ppl_vs_reference": ppl / ref_ppl - 1, "generation": ev["gen_text"], "load_s": ev["load_s"],
                  "reference_disk_offloaded": ref["disk_offloaded"]})
        if masks is not None and ev.get("answer_n"):
            # answer tokens only: what the fine-tune changed, so what a quantization can undo
            r.update({"answer_ppl": perplexity(ev["answer_nll"], ev["answer_n"]), "answer_tokens": ev["answer_n"],
                      "reference_answer_ppl": perplexity(ref["answer_nll"], ref["answer_n"])})
        if mismatches:
            i = mismatches[0]
            err = UserError(
                f"{p.name}: llama.cpp tokenizes {len(mismatches)} of {len(texts)} validation texts differently "
                "from the HF tokenizer",
                hint="the served model would see other tokens than in training; use a base whose tokenizer llama.cpp "
                     "knows, update the converter package, or correct export.pre_tokenizer if you set it "
                     "(export.tokenizer_parity=warn accepts the difference)",
                details=[f"text: {texts[i][:80]!r}", f"HF:        {list(ref['ids'][i])[:24]}",
                         f"llama.cpp: {ev['tokens'][i][:24]}"])
            r["tokenizer_mismatches"] = len(mismatches)
            r["tokenizer_first_mismatch"] = err.details
            if parity == "error":
                raise err
            ui.warn(f"{err.message} (export.tokenizer_parity=warn)")
        if q == base_quant:
            base_ppl = ppl
            if abs(ppl / ref_ppl - 1) > PPL_TOLERANCE:
                raise UserError(
                    f"{p.name}: perplexity {ppl:.4g} differs from the merged HF model's {ref_ppl:.4g} by "
                    f"{100 * (ppl / ref_ppl - 1):+.2f}% (allowed ±{100 * PPL_TOLERANCE:g}%)",
                    hint="the conversion changed the model; check the converter version and the model architecture")
    base_answer = results.get(base_quant, {}).get("answer_ppl")
    for q, r in results.items():
        if base_ppl and r.get("ppl"):
            r["ppl_increase"] = r["ppl"] / base_ppl - 1
        if base_answer and r.get("answer_ppl"):
            r["answer_ppl_increase"] = r["answer_ppl"] / base_answer - 1
            if r["answer_ppl_increase"] > QUANT_LOSS_WARN:
                ui.warn(f"{q}: answer perplexity {r['answer_ppl']:.3g} vs {base_answer:.3g} at {base_quant} "
                        f"({100 * r['answer_ppl_increase']:+.0f}%): this quantization undoes much of the fine-tune; "
                        "register a larger one (ollama.quant: Q8_0 or Q6_K)")
    return results


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = []
    answer = any(r.get("answer_ppl") for r in results.values())
    for q, r in results.items():
        key = "answer_ppl" if answer else "ppl"
        inc = r.get("answer_ppl_increase" if answer else "ppl_increase")
        rows.append([q, r["file"], human_bytes(r['bytes']), r["tensors"],
                     "yes" if r.get("loaded") else "not checked",
                     {True: "equal", False: "DIFFERS", None: "-"}[r.get("tokenizer_parity")],
                     f"{r['ppl']:.4g}" if r.get("ppl") else "-",
                     f"{r[key]:.4g}" + (f" ({100 * inc:+.1f}%)" if inc is not None else "") if r.get(key) else "-",
                     (r.get("generation") or "-")[:40].replace("\n", " ")])
    ui.table("GGUF verification", ["quant", "file", "size", "tensors", "llama.cpp loads", "tokens vs HF",
                                   "perplexity (all tokens)", "answer ppl (vs F16)" if answer else "ppl (vs F16)",
                                   "greedy sample"], rows, console=ui.err)
