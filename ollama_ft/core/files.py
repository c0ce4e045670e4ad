"""Files shared by every stage: the cache directory, file digests, byte sizes, the base's metadata.

One of each, so they cannot disagree: every cache lives under `cache_root()` (the only place that reads
$OLLAMA_FT_CACHE), every file digest comes from `sha256_file`, every size a person reads comes from
`human_bytes`, and `ollama_ft_base.json` is read by `read_base_meta` alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .hf_dir import read_json

BASE_META = "ollama_ft_base.json"  # written by the pull stage next to the base model (docs/ARCHITECTURE.md)


def cache_root() -> Path:
    """$OLLAMA_FT_CACHE, else $XDG_CACHE_HOME/ollama-ft, else ~/.cache/ollama-ft."""
    env = os.environ.get("OLLAMA_FT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ollama-ft"


# -------------------------------------------------------------------------------------------
# Digests

# Files this big are worth remembering: hashing a multi-GB GGUF takes seconds to minutes, and export,
# register, publish and `pull` of the same file would each hash it again. Smaller files are re-hashed
# (cheaper than the cache bookkeeping).
DIGEST_CACHE_MIN_BYTES = 64 << 20
_DIGEST_CACHE_FILE = "digests.json"
_DIGEST_CACHE_ENTRIES = 512


def _stat_key(path: Path) -> str:
    """The file's identity and last change: device, inode, size, mtime and ctime in nanoseconds. ctime
    cannot be set back by a program (unlike mtime), so any write to the file gives a new key; renaming
    the directory it is in (how a finished stage is put in place) keeps it."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _digest_cache_path() -> Path:
    return cache_root() / _DIGEST_CACHE_FILE


def _load_digest_cache() -> dict[str, str]:
    try:
        data = json.loads(_digest_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash
    return data if isinstance(data, dict) else {}


def remember_digest(path: Path | str, hexdigest: str) -> None:
    """Record the sha256 of a big file computed elsewhere (e.g. while streaming it into place)."""
    path = Path(path)
    target = _digest_cache_path()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if path.stat().st_size < DIGEST_CACHE_MIN_BYTES:
            return
        key = _stat_key(path)
        cache = _load_digest_cache()
        cache.pop(key, None)
        cache[key] = hexdigest.split(":", 1)[-1]
        keep = dict(list(cache.items())[-_DIGEST_CACHE_ENTRIES:])  # insertion order: newest last
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(keep), encoding="utf-8")
        os.replace(tmp, target)  # concurrent writers: the last one wins, the other's entry is re-hashed later
    except OSError:  # a read-only cache only costs a re-hash next time
        with contextlib.suppress(OSError):
            tmp.unlink()


def sha256_file(path: Path | str, known_digests: Mapping[str, str] | None = None, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed.

    `known_digests` ({path: hex or "sha256:hex"}) are digests the caller already has for these exact
    files (e.g. the export stage's manifest): used as given. Big files are also looked up in a cache
    under cache_root() keyed by the file's inode, size, mtime and ctime, so register and publish do not
    re-hash a multi-GB GGUF the export stage already hashed, and any change to the file re-hashes it.
    """
    path = Path(path)
    if known_digests:
        resolved = str(path.resolve())
        for k, v in known_digests.items():
            if str(Path(k).resolve()) == resolved:
                return v.split(":", 1)[-1]
    big = path.stat().st_size >= DIGEST_CACHE_MIN_BYTES
    if big:
        hit = _load_digest_cache().get(_stat_key(path))
        if hit:
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    if big:
        remember_digest(path, h.hexdigest())
    return h.hexdigest()


def digest_file(path: Path | str, known_digests: Mapping[str, str] | None = None) -> str:
    """`sha256:<hex>` of a file (Ollama's and OCI's digest form); see sha256_file."""
    return "sha256:" + sha256_file(path, known_digests)


# -------------------------------------------------------------------------------------------
# Sizes


def human_bytes(n: float) -> str:
    """A byte count for people: binary multiples (what `df -h`, `du -h` and free-space checks report),
    written B, KB, MB, GB, TB as `df -h` does; one decimal above bytes. The one size format of ollama-ft."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"


# -------------------------------------------------------------------------------------------
# The base model's metadata


def read_base_meta(base_dir: Path | str) -> dict[str, Any]:
    """`ollama_ft_base.json` of a pull-stage directory ({} when there is none: a base from before it existed,
    or a directory not made by `pull`); a damaged file is a UserError naming file:line."""
    return read_json(Path(base_dir) / BASE_META)


def iter_jsonl(path: Path, hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line of a JSON Lines file the project wrote or
    the user pointed at; a bad line stops with `path:line` and `hint` (what the line should hold)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                                hint="re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})", hint=hint) from None
