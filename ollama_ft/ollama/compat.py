"""What a given Ollama server can take, checked before anything is uploaded: PARAMETERs by server version,
a LoRA ADAPTER by the base's architecture (the Go engine refuses them at load), and whether the GGUF's
own chat template could be preferred over the TEMPLATE (v0.30+)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError

# Architectures Ollama v0.24.0 runs on its Go engine (fs/ggml/ggml.go OllamaEngineRequired), whose runner
# refuses LoRA adapters at load ("loras are not yet implemented"), although /api/create accepts them.
GO_ENGINE_ARCHITECTURES = frozenset({
    "bert", "deepseek2", "deepseekocr", "gemma3", "gemma3n", "gemma4", "gptoss", "gpt-oss", "laguna", "llama4",
    "mistral3", "mllama", "nemotron_h", "nemotron_h_moe", "nemotron_h_omni", "nomic-bert", "olmo3", "qwen25vl",
    "qwen3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next", "qwen3vl", "qwen3vlmoe", "glm4moelite", "glmocr",
    "lfm2", "lfm2moe"})


# PARAMETERs that older servers refuse at create ("unknown parameter"): the first version that takes them
# (read from api/types.go: v0.24.0 lacks draft_num_predict, v0.30 has it).
PARAMETER_SINCE = {"draft_num_predict": (0, 30, 0)}


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", (version or "").split("-")[0])[:3]
    return tuple(int(p) for p in parts) if parts else None


def refuse_newer_parameters(req: dict[str, Any], version: str | None) -> None:
    """Stop before any upload when the Modelfile sets a PARAMETER the server's version does not know."""
    have = _version_tuple(version)
    if have is None:
        return  # unknown version: the server itself reports what it refuses
    newer = {k: v for k, v in PARAMETER_SINCE.items() if k in (req.get("parameters") or {}) and have < v}
    if newer:
        names = ", ".join(f"{k} (Ollama >= {'.'.join(map(str, v))})" for k, v in newer.items())
        raise UserError(f"Ollama {version} does not know PARAMETER {names}; nothing was uploaded",
                        hint="remove it from ollama.parameters, or upgrade Ollama")


def refuse_unloadable_adapters(req: dict[str, Any], local: dict[str, Path], version: str | None) -> None:
    """ADAPTER on a base the server cannot combine with a LoRA: stop before any upload, say why and what
    works instead (register the merged model, the default)."""
    if not req.get("adapters"):
        return
    from .store import gguf_facts

    for rel, digest in (req.get("files") or {}).items():
        path = local.get(digest)
        if path is None or not rel.endswith(".gguf"):
            continue
        try:
            arch = gguf_facts(path).get("architecture")
        except UserError:  # unreadable (gguf_facts says so): _check_gguf_blobs / the server report it
            continue
        if arch in GO_ENGINE_ARCHITECTURES:
            raise UserError(
                f"Ollama {version or '(unknown version)'} cannot load a LoRA ADAPTER on a {arch} model: its Go "
                "engine refuses adapters at load (\"loras are not yet implemented\", read from v0.24.0), although "
                "create would accept it; nothing was uploaded",
                hint="register the merged model instead (the default: FROM the run's merged GGUF, no ADAPTER)")


def gguf_template_override_risk(req: dict[str, Any], local: dict[str, Path]) -> list[str]:
    from .capabilities import jinja_override_reasons
    from .store import gguf_facts

    for rel, digest in (req.get("files") or {}).items():
        path = local.get(digest)
        if not rel.endswith(".gguf") or path is None:
            continue
        try:
            jinja = gguf_facts(path).get("chat_template")
        except UserError:  # unreadable metadata: Ollama itself will report the file
            continue
        reasons = jinja_override_reasons(jinja, req.get("template"))
        if reasons:
            ui.warn(f"{path.name} carries a chat template with {' and '.join(reasons)} that the TEMPLATE lacks; "
                    "Ollama v0.30+ may then use the GGUF's template instead. Set OLLAMA_GO_TEMPLATE=1 on the "
                    "server, or re-export the GGUF with the training template")
        return reasons
    return []
