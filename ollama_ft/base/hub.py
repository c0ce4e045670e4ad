"""Hugging Face repos into `base/`: what a repo holds (before downloading), the download (pinned
revision; a token only from HF_TOKEN, never printed), then the files a base needs linked or copied
(weights as safetensors, tokenizer, template, licence), refusing pickled weights and, unless allowed,
repository code."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.hf_dir import read_json
from .sources import Resolved

# What a base model needs from a repo; pickled weights (*.bin, *.pth) are never fetched.
HF_ALLOW = [
    "*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja",
    "README.md", "LICENSE*", "NOTICE*", "USE_POLICY*",
]
# Mistral ships consolidated.safetensors (its own format) beside the HF shards; Llama keeps the
# original checkpoint under original/. Both would double the download.
HF_IGNORE = ["consolidated*", "original/*", "*.pth", "*.bin", "*.pt", "*.onnx", "*.msgpack", "*.h5", "*.gguf"]



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
