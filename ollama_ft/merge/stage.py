"""Merge a PEFT LoRA adapter into the full-precision base, shard by shard, and prove the result.

Why streamed: a 7B bf16 base is ~14 GB; loading it whole (plus a merged copy) does not fit a 16 GB
workstation. Each base shard is read, the LoRA deltas of its tensors are added in float32
(W += scaling * B @ A), cast back to the shard's dtype and written, so peak RAM is about one shard
plus the adapter.

Why full precision: QLoRA trains against an NF4 copy, but the published bf16/fp16 weights are the
better base for the merged model. `model.merge_base: dequantized` merges into the NF4 round-trip of
the base instead (what the adapter saw in training); the choice is recorded.

The proof: logits of base+adapter (PEFT, unmerged) and of the merged model on a few validation
sequences must agree within a tolerance that depends on the stored dtype; otherwise UserError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import human_bytes
from ..core.runs import atomic_write_text

# Relative tolerance for max|logits_merged - logits_peft| / max|logits_peft|. Rounding the merged weight
# to the stored dtype (8 mantissa bits for bf16, 11 for fp16) is the only expected source of difference.
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
_FALLBACK_TEXT = (
    "The clinic opens at eight in the morning. Please check in at the front desk, fill in the form, "
    "and wait to be called. Urgent cases go to triage first."
)
_NON_WEIGHT_FILES = ("ollama_ft_base.json",)


# ------------------------------------------------------------------------------------------
# Adapter reading


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, tensors keyed by PEFT name); clear errors for what cannot be merged."""
    from safetensors.torch import load_file

    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter (need adapter_config.json and adapter_model.safetensors)",
                        hint="run `ollama-ft train CONFIG --until train` first")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r} cannot be merged here; only LORA")
    if acfg.get("use_dora"):
        raise UserError(f"{cfg_path}: DoRA adapters (use_dora: true) are not supported by the streamed merge",
                        hint="train without DoRA, or merge with peft's merge_and_unload yourself")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"{weights}: cannot read the adapter weights ({e})",
                        hint="the file is damaged; re-run training or restore it") from None
    return acfg, tensors


def _scaling(acfg: dict[str, Any], module: str) -> float:
    """PEFT's scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA; per-module patterns win."""
    r = acfg.get("r", 8)
    alpha = acfg.get("lora_alpha", r)
    # rank_pattern / alpha_pattern keys are regexes matched against the end of the module name.
    for pat, val in (acfg.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pat}$", module):
            r = val
            break
    for pat, val in (acfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pat}$", module):
            alpha = val
            break
    return alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r


def _adapter_deltas(acfg: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Group LoRA tensors by the base weight they modify.

    Returns (loras, replacements): loras[base_key] = {"A", "B", "scaling", "embedding"}; replacements are
    full tensors saved through modules_to_save (e.g. a trained lm_head).
    """
    loras: dict[str, dict] = {}
    replacements: dict[str, Any] = {}
    pat = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$")
    for key, t in tensors.items():
        m = pat.match(key)
        if m:
            module, kind = m.group(1), m.group(2)
            entry = loras.setdefault(module + ".weight", {"module": module})
            entry["A" if kind.endswith("A") else "B"] = t
            entry["embedding"] = kind.startswith("lora_embedding")
            continue
        name = re.sub(r"^base_model\.model\.", "", key)
        if name.endswith(".base_layer.weight"):
            # PEFT saves the frozen base weight of an embedding-like module it put a LoRA on (a tied
            # lm_head, embed_tokens) in case the vocabulary was resized; training here never resizes it.
            continue
        # modules_to_save (a fully trained lm_head, say) and trained biases replace the base tensor.
        replacements[name.replace(".modules_to_save.default", "")] = t
    for k, e in loras.items():
        if "A" not in e or "B" not in e:
            raise UserError(f"adapter tensor pair incomplete for {e['module']} (found only one of lora_A/lora_B)",
                            hint="the adapter file is damaged; re-run training")
        e["scaling"] = _scaling(acfg, e["module"])
        del e["module"]
        loras[k] = e
    return loras, replacements


# ------------------------------------------------------------------------------------------
# Base shards


def _base_shards(base_dir: Path) -> list[Path]:
    idx = base_dir / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text()).get("weight_map", {})
        files = sorted(set(wm.values()))
        return [base_dir / f for f in files]
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{base_dir} holds no *.safetensors weights",
                        hint="run `ollama-ft pull` again; merge needs the full-precision base")
    return files


def _resolve_key(key: str, available: set[str]) -> str | None:
    """Map an adapter's module name onto the base's tensor name (prefixes differ across wrappers)."""
    if key in available:
        return key
    cands = [k for k in available if k.endswith("." + key) or key.endswith("." + k)]
    return cands[0] if len(cands) == 1 else None


def _nf4_roundtrip(w):
    """The base weight as the 4-bit training copy saw it (NF4, double quant), in float32."""
    import bitsandbytes.functional as bnbf
    import torch

    q, state = bnbf.quantize_4bit(w.to(torch.bfloat16).contiguous(), quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(q, state, quant_type="nf4").to(torch.float32)


def _is_quantized_linear(name: str, t) -> bool:
    # bitsandbytes quantizes the decoder's Linear layers; embeddings, norms and lm_head stay full precision.
    return t.dim() == 2 and "embed" not in name and "lm_head" not in name and "norm" not in name


class _RssSampler:
    """Peak resident memory of this process while a block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def merge_streamed(base_dir: Path, adapter_dir: Path, out: Path, merge_base: str = "full") -> dict[str, Any]:
    """Write base + LoRA into `out` shard by shard (weights only). Returns merge statistics."""
    # One long loop on purpose: each tensor is read, merged, checked and written while only one shard
    # is in memory; splitting it would pass the open shard handles and running statistics around.
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    acfg, tensors = _read_adapter(adapter_dir)
    loras, replacements = _adapter_deltas(acfg, tensors)
    shards = _base_shards(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))

    # Which base tensor each LoRA lands in (checked before writing anything).
    names: dict[Path, list[str]] = {}
    for sh in shards:
        try:
            with safe_open(str(sh), framework="pt") as f:
                names[sh] = list(f.keys())
        except Exception as e:
            raise UserError(f"{sh}: cannot read base weights ({e})", hint="the base is damaged; run `ollama-ft pull --force`") from None
    available = {k for ks in names.values() for k in ks}
    target_of: dict[str, str] = {}
    head_key: str | None = None  # the adapter's key for a tied lm_head it modifies (LoRA or trained copy)
    for key in list(loras) + list(replacements):
        real = _resolve_key(key, available)
        if real is None and tied and key.endswith("lm_head.weight"):
            head_key = key
            continue
        if real is None:
            raise UserError(f"adapter modifies '{key}', which the base in {base_dir} does not have",
                            hint="the adapter was trained on a different base model; check model.base")
        target_of[real] = key
    # In PEFT a tied lm_head keeps the base embedding when the embedding is trained, and the embedding
    # keeps the base when the head is trained: once either changes, the merged model needs its own head.
    embedding_changed = any(k.endswith("embed_tokens.weight") for k in target_of)
    untie = tied and (head_key is not None or embedding_changed)

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    merged_count = 0
    max_delta = 0.0
    weight_map: dict[str, str] = {}
    total_bytes = 0
    dtypes: set[str] = set()
    with _RssSampler() as rss, ui.progress_steps() as prog:
        task = prog.add_task("merge: shards", total=len(shards))
        for sh in shards:
            result: dict[str, Any] = {}
            with safe_open(str(sh), framework="pt") as f:
                meta = f.metadata() or {}
                for name in names[sh]:
                    w = base_w = f.get_tensor(name)
                    dtypes.add(str(w.dtype).replace("torch.", ""))
                    key = target_of.get(name)
                    if merge_base == "dequantized" and w.is_floating_point() and _is_quantized_linear(name, w):
                        w = _nf4_roundtrip(w).to(w.dtype)
                    if key in replacements:
                        w = replacements[key].to(w.dtype)
                    elif key in loras:
                        w = _apply(w, loras[key])
                        merged_count += 1
                        max_delta = max(max_delta, loras[key].get("_maxabs", 0.0))
                    if name.endswith("embed_tokens.weight") and untie:
                        if head_key in loras:
                            head = _apply(base_w, loras[head_key])
                            merged_count += 1
                        elif head_key in replacements:
                            head = replacements[head_key].to(base_w.dtype)
                        else:
                            head = base_w.clone()
                        result["lm_head.weight"] = head.contiguous()
                    result[name] = w.contiguous()
            fname = sh.name
            save_file(result, str(out / fname), metadata={**meta, "format": "pt"})
            for k, v in result.items():
                weight_map[k] = fname
                total_bytes += v.numel() * v.element_size()
            del result
            prog.advance(task)
    if len(shards) > 1 or (base_dir / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    expected = len(loras)
    if merged_count != expected:
        raise UserError(f"merged {merged_count} of {expected} LoRA modules; the rest matched no base tensor",
                        hint="the adapter and base do not match; check model.base")
    return {
        "modules_merged": merged_count,
        "tensors_replaced": len(replacements),
        "lm_head_untied": untie,
        "shards": len(shards),
        "dtype": sorted(dtypes),
        "bytes": total_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": rss.peak,
        "scaling": sorted({round(e["scaling"], 6) for e in loras.values()}),
        "r": acfg.get("r"),
        "lora_alpha": acfg.get("lora_alpha"),
        "use_rslora": bool(acfg.get("use_rslora")),
        "max_abs_delta": max_delta,
    }


def _apply(w, lora: dict[str, Any]):
    """W + scaling * (B @ A) in float32, cast back to W's dtype."""
    import torch

    a = lora["A"].to(torch.float32)
    b = lora["B"].to(torch.float32)
    delta = (b @ a) * lora["scaling"]
    if lora.get("embedding"):
        delta = delta.T  # PEFT embedding LoRA: A is (r, vocab), B is (dim, r)
    if delta.shape != w.shape:
        raise UserError(f"LoRA delta shape {tuple(delta.shape)} does not match base weight {tuple(w.shape)}",
                        hint="the adapter was trained on a different base model")
    lora["_maxabs"] = float(delta.abs().max())
    return (w.to(torch.float32) + delta).to(w.dtype)


# ------------------------------------------------------------------------------------------
# Side files (config, tokenizer, chat template)


def copy_side_files(base_dir: Path, data_dir: Path | None, out: Path, untied: bool = False) -> str | None:
    """Copy config/tokenizer/etc. and install the training chat template. Returns the template text."""
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json" \
                and p.name not in _NON_WEIGHT_FILES:
            shutil.copy2(p, out / p.name)
    template = None
    for cand in ([data_dir / "chat_template.jinja"] if data_dir else []) + [base_dir / "chat_template.jinja"]:
        if cand.is_file():
            template = cand.read_text(encoding="utf-8")
            break
    if template is not None:
        atomic_write_text(out / "chat_template.jinja", template)
        tc = out / "tokenizer_config.json"
        if tc.is_file():
            # A template inside tokenizer_config.json could shadow the training one for some readers.
            d = json.loads(tc.read_text())
            if "chat_template" in d:
                d.pop("chat_template")
                atomic_write_text(tc, json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    if untied:
        c = json.loads((out / "config.json").read_text())
        c["tie_word_embeddings"] = False
        if isinstance(c.get("text_config"), dict):
            c["text_config"]["tie_word_embeddings"] = False
        atomic_write_text(out / "config.json", json.dumps(c, indent=2) + "\n")
    return template


# ------------------------------------------------------------------------------------------
# The proof


def validation_batches(data_dir: Path | None, tokenizer_dir: Path, n: int = 4, max_len: int = 128) -> list[list[int]]:
    """Up to n token-id sequences from data_dir/validation.parquet; a fixed text if there is none."""
    if data_dir is not None:
        for split in ("validation", "test", "train"):
            p = Path(data_dir) / f"{split}.parquet"
            if p.is_file():
                import pyarrow.parquet as pq

                rows = pq.read_table(p, columns=["input_ids"]).column("input_ids").to_pylist()
                seqs = [list(r)[:max_len] for r in rows if r]
                if seqs:
                    return seqs[:n]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tok(_FALLBACK_TEXT)["input_ids"][:max_len]]


def _logits(model, seqs: list[list[int]]):
    import torch

    outs = []
    with torch.no_grad():
        for s in seqs:
            outs.append(model(input_ids=torch.tensor([s])).logits[0].float())
    return outs


def logits_check(base_dir: Path, adapter_dir: Path, merged_dir: Path, seqs: list[list[int]],
                 merge_base: str = "full", trust_remote_code: bool = False,
                 offload_dir: Path | None = None) -> dict[str, Any]:
    """Compare logits of PEFT base+adapter (unmerged) with the merged model, one model in RAM at a time.

    Models whose float32 weights exceed the RAM budget run disk-offloaded (hf_loading.py).
    """
    import torch

    from ..core.hf_loading import adapter_disabled, attach_adapter, load_float32

    offload_dir = Path(offload_dir or Path(merged_dir).parent / f".offload-{os.getpid()}")
    try:
        base, offloaded = load_float32(base_dir, offload_dir / "base", trust_remote_code)
        if merge_base == "dequantized":
            if offloaded:
                raise UserError("the logits proof of a merge into the dequantized base needs the float32 base "
                                "in RAM, and it does not fit the RAM budget",
                                hint="use model.merge_base: full (the default), or run the merge on a machine "
                                     "with more RAM (OLLAMA_FT_PROOF_RAM_BYTES sets the budget)")
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if _is_quantized_linear(name, p):
                        p.copy_(_nf4_roundtrip(p.data))
        ref_model = attach_adapter(base, adapter_dir, offloaded)
        ref = _logits(ref_model, seqs)
        with adapter_disabled(ref_model):
            base_only = _logits(ref_model, seqs)
        del ref_model, base
        merged, merged_offloaded = load_float32(merged_dir, offload_dir / "merged", trust_remote_code)
        got = _logits(merged, seqs)
        del merged
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    scale = max(float(a.abs().max()) for a in ref)
    adapter_effect = max(float((a - b).abs().max()) for a, b in zip(ref, base_only, strict=True))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got, strict=True))
    total = sum(a.shape[0] for a in ref)
    return {
        "sequences": len(seqs),
        "tokens": total,
        "max_abs_diff": max_abs,
        "logit_scale": scale,
        "relative_diff": max_abs / max(scale, 1e-12),
        "adapter_effect_max_abs": adapter_effect,
        "argmax_agreement": agree / max(total, 1),
        "disk_offloaded": bool(offloaded or merged_offloaded),
    }


def build_merged(cfg, base_dir: Path, adapter_dir: Path, data_dir: Path | None, out: Path) -> dict[str, Any]:
    """Stage `merge`: streamed merge into the full-precision base, side files, logits proof."""
    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    merge_base = cfg.model.merge_base
    if not (base_dir / "config.json").is_file():
        raise UserError(f"{base_dir} is not an HF model directory (no config.json)",
                        hint="run `ollama-ft pull` for this run first")
    ui.info(f"merge: adapter {adapter_dir} into {'the NF4 round-trip of ' if merge_base == 'dequantized' else ''}"
            f"the full-precision base {base_dir}")
    stats = merge_streamed(base_dir, adapter_dir, out, merge_base=merge_base)
    template = copy_side_files(base_dir, data_dir, out, untied=stats["lm_head_untied"])

    seqs = validation_batches(data_dir, out)
    stored = "float32" if stats["dtype"] == ["float32"] else ("float16" if "float16" in stats["dtype"] else "bfloat16")
    tol = LOGIT_TOLERANCE[stored]
    with ui.status("merge: checking logits of base+adapter against the merged model"):
        check = logits_check(base_dir, adapter_dir, out, seqs, merge_base=merge_base,
                             trust_remote_code=cfg.model.trust_remote_code)
    check.update({"tolerance": tol, "stored_dtype": stored,
                  "rule": "max|logits_merged - logits_peft| / max|logits_peft| <= tolerance",
                  "passed": check["relative_diff"] <= tol})
    atomic_write_text(out / "merge_check.json", json.dumps({**check, "merge": stats}, indent=2) + "\n")
    if not check["passed"]:
        raise UserError(
            f"merged model disagrees with base+adapter: relative logit difference {check['relative_diff']:.3g} "
            f"> tolerance {tol:g} ({stored})",
            hint="the merge is wrong (adapter/base mismatch or a damaged file); nothing was saved. "
                 "Re-run `ollama-ft merge RUN --force`, and report it if it persists",
            details=[f"max abs diff {check['max_abs_diff']:.4g} over {check['tokens']} tokens, logit scale {check['logit_scale']:.4g}"],
        )
    ui.success(f"merge: {stats['modules_merged']} LoRA modules merged; logits match within "
               f"{check['relative_diff']:.2e} (tolerance {tol:g}); peak RSS {human_bytes(stats['peak_rss_bytes'])}")
    return {
        "merge_base": merge_base,
        "modules_merged": stats["modules_merged"],
        "shards": stats["shards"],
        "dtype": stored,
        "peak_rss_bytes_streaming": stats["peak_rss_bytes"],
        "merge_seconds": stats["seconds"],
        "chat_template": template is not None,
        "logits_check": {k: check[k] for k in ("relative_diff", "tolerance", "max_abs_diff", "argmax_agreement",
                                                "tokens", "passed")},
        "summary": (f"{stats['modules_merged']} modules merged into the {merge_base} base; logits rel. diff "
                    f"{check['relative_diff']:.1e} <= {tol:g}"),
    }
