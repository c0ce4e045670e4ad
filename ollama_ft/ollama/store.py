"""Ollama's on-disk store layout (../shared/docs/ollama-contract.md §4.1-4.2); model names are in core/names.py.

A store is `<models>/manifests/<host>/<namespace>/<model>/<tag>` (schema2 manifest JSON) plus
`<models>/blobs/sha256-<hex>` (content-addressed layers and the config blob). This module reads
and writes that layout without an Ollama server: publish/install use it directly, and the
test stand-in server stores what it receives through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..core.errors import UserError
from ..core.names import ModelName, parse_name
from ..core.runs import atomic_write_bytes

# -------------------------------------------------------------------------------------------
# Media types (§4.2)

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
_OLLAMA = "application/vnd.ollama.image."
MEDIA_MODEL = _OLLAMA + "model"
MEDIA_ADAPTER = _OLLAMA + "adapter"
MEDIA_PROJECTOR = _OLLAMA + "projector"
MEDIA_TEMPLATE = _OLLAMA + "template"
MEDIA_PROMPT = _OLLAMA + "prompt"  # legacy alias of template, still read by Ollama
MEDIA_SYSTEM = _OLLAMA + "system"
MEDIA_PARAMS = _OLLAMA + "params"
MEDIA_MESSAGES = _OLLAMA + "messages"
MEDIA_LICENSE = _OLLAMA + "license"

# -------------------------------------------------------------------------------------------
# Digests

_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


def parse_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> lower-case hex. Anything else: UserError."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise UserError(f"invalid digest format: {digest!r}", hint="digests look like sha256:<64 hex characters>")
    return m.group(1).lower()


def is_valid_digest(digest: str) -> bool:
    return bool(_DIGEST_RE.match(digest or ""))


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DigestMismatch(UserError):
    """Content did not hash to the digest it was announced with."""

    def __init__(self, expected: str, actual: str, what: str = "blob"):
        super().__init__(f"digest mismatch for {what}, expected {expected!r}, got {actual!r}",
                         hint="the file changed or was corrupted in transit; rebuild or re-download it")
        self.expected = expected
        self.actual = actual


# -------------------------------------------------------------------------------------------
# Manifest and config blob (§4.2)


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str | None = None
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            d["from"] = self.from_
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layer:
        return cls(d["mediaType"], d["digest"], int(d["size"]), d.get("from"), d.get("name"))


def go_json(obj: Any) -> bytes:
    """JSON as Go's json.Encoder writes it: compact, HTML characters escaped, trailing newline."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return (text + "\n").encode("utf-8")


def build_manifest(config_desc: Layer, layers: Iterable[Layer]) -> bytes:
    """Schema2 manifest bytes in Ollama's key order, as `manifest.WriteManifest` writes them."""
    return go_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_desc.digest, "size": config_desc.size},
        "layers": [layer.to_json() for layer in layers],
    })


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 8.0B, 494.03M, 135M, 12K."""
    if n >= 1_000_000_000:
        v = n / 1_000_000_000
        return f"{v:.0f}B" if v == int(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f}M" if v == int(v) else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


def build_config_blob(model_format: str = "gguf", model_family: str = "unknown",
                      model_families: list[str] | None = None, model_type: str = "", file_type: str = "",
                      **optional: Any) -> bytes:
    """Ollama's ConfigV2 (without `rootfs`, dropped in v0.32.10), in Go's field order.

    `optional` may carry renderer, parser, requires, remote_host, remote_model, capabilities,
    context_length, embedding_length, base_name; empty values are omitted like `omitempty`.
    """
    allowed = ("renderer", "parser", "requires", "remote_host", "remote_model", "capabilities",
               "context_length", "embedding_length", "base_name")
    unknown = set(optional) - set(allowed)
    if unknown:
        raise TypeError(f"unknown config fields: {sorted(unknown)}")
    cfg: dict[str, Any] = {
        "model_format": model_format,
        "model_family": model_family,
        "model_families": list(model_families if model_families is not None else [model_family]),
        "model_type": model_type,
        "file_type": file_type,
    }
    for k in allowed:
        if optional.get(k):
            cfg[k] = optional[k]
    cfg["architecture"] = "amd64"  # constants the OCI spec requires; they describe nothing
    cfg["os"] = "linux"
    return go_json(cfg)


# Where Ollama's name for a GGUF general.file_type (fs/ggml FileType) differs from llama.cpp's
# (gguf.LlamaFileType, core/gguf_meta.file_type_name): 0 (F32) reads as "unknown" in Ollama because it
# is also the zero value (§7.1), and 38 is Ollama's MXFP4.
_OLLAMA_FILE_TYPES = {0: "unknown", 38: "MXFP4"}


def ollama_file_type(ft: int | None) -> str:
    """The file type name Ollama shows for a GGUF general.file_type."""
    from ..core.gguf_meta import file_type_name

    if ft is None:
        return "unknown"
    return _OLLAMA_FILE_TYPES.get(int(ft)) or file_type_name(int(ft))


GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path | str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_facts(path: Path | str) -> dict[str, Any]:
    """What Ollama reads from a GGUF for the config blob and `details` (§7.1).

    Returns {architecture, file_type, parameter_count, parameter_size, general_type,
    context_length, embedding_length, chat_template, kv}. `kv` holds scalar/short-array metadata
    for `/api/show`'s model_info (arrays of more than 5 items as [], as Ollama shows them).
    """
    from ..core.gguf_meta import BigArray, GGUFDamaged, read_gguf_meta

    try:
        meta = read_gguf_meta(path)
    except (GGUFDamaged, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})",
                        hint="the file is truncated or damaged: export or download it again") from None
    kv = {k: [] if isinstance(v, BigArray) or (isinstance(v, list) and len(v) > 5) else v
          for k, v in meta.fields.items()}
    arch = str(kv.get("general.architecture") or "unknown")
    params = meta.parameter_count
    return {
        "architecture": arch,
        "general_type": kv.get("general.type", ""),
        "file_type": ollama_file_type(meta.get("general.file_type")),
        "parameter_count": params,
        "parameter_size": human_number(params),
        "context_length": kv.get(f"{arch}.context_length"),
        "embedding_length": kv.get(f"{arch}.embedding_length"),
        "chat_template": kv.get("tokenizer.chat_template"),
        "kv": kv,
    }


# -------------------------------------------------------------------------------------------
# The store


def default_store_dir() -> Path:
    """$OLLAMA_MODELS, else ~/.ollama/models (what a local Ollama uses, §4.1)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


class Store:
    """An Ollama models directory: manifests/ and blobs/."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_store_dir()

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    # -- blobs ------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{parse_digest(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def add_blob_stream(self, src: IO[bytes], expected_digest: str | None = None, *,
                        keep_on_mismatch: bool = False, length: int | None = None,
                        chunk: int = 1 << 20) -> str:
        """Hash `src` while copying it into a temp file, then rename it to its digest.

        On a mismatch with `expected_digest` the temp file is removed (or, with
        keep_on_mismatch, kept under its true digest as Ollama does) and DigestMismatch is raised.
        `length` limits how many bytes are read (an HTTP body).
        """
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs_dir / f"sha256-{secrets.randbelow(10**18)}-tmp"
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                left = length
                while left is None or left > 0:
                    b = src.read(chunk if left is None else min(chunk, left))
                    if not b:
                        break
                    h.update(b)
                    out.write(b)
                    if left is not None:
                        left -= len(b)
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + h.hexdigest()
            if expected_digest is not None and expected_digest != actual:
                if keep_on_mismatch:
                    self._place(tmp, actual)
                raise DigestMismatch(expected_digest, actual)
            self._place(tmp, actual)
            return actual
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _place(self, tmp: Path, digest: str) -> None:
        final = self.blob_path(digest)
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)

    def add_blob_file(self, src: Path | str, expected_digest: str | None = None) -> str:
        """Copy a file into the store (skipped when `expected_digest` is already present)."""
        if expected_digest is not None and is_valid_digest(expected_digest) and self.has_blob(expected_digest):
            return expected_digest
        with open(src, "rb") as f:
            return self.add_blob_stream(f, expected_digest)

    def add_blob_bytes(self, data: bytes) -> str:
        d = digest_bytes(data)
        if not self.has_blob(d):
            import io

            self.add_blob_stream(io.BytesIO(data), d)
        return d

    def read_blob_bytes(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- manifests --------------------------------------------------------------------------
    def manifest_path(self, name: ModelName | str) -> Path:
        n = parse_name(name) if isinstance(name, str) else name
        exact = self.root / n.manifest_relpath
        if exact.is_file():
            return exact
        for other in self.list_models():  # lookups are case-insensitive (§4.4)
            if other.same_as(n):
                return self.root / other.manifest_relpath
        return exact

    def write_manifest(self, name: ModelName | str, manifest_bytes: bytes) -> Path:
        n = parse_name(name) if isinstance(name, str) else name
        path = self.manifest_path(n)  # keeps an existing model's casing
        atomic_write_bytes(path, manifest_bytes)
        return path

    def has_manifest(self, name: ModelName | str) -> bool:
        return self.manifest_path(name).is_file()

    def read_manifest(self, name: ModelName | str) -> tuple[dict[str, Any], bytes]:
        path = self.manifest_path(name)
        if not path.is_file():
            raise UserError(f"model '{name}' not found in the Ollama store {self.root}",
                            hint="`ollama list` (or GET /api/tags) shows the models there")
        data = path.read_bytes()
        try:
            return json.loads(data), data
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: manifest is not valid JSON ({e.msg})",
                            hint="the store entry is damaged: re-pull or re-register that model") from None

    def manifest_digest(self, name: ModelName | str) -> str:
        """Hex sha256 of the manifest file bytes: the model ID Ollama shows (no prefix)."""
        _, data = self.read_manifest(name)
        return hashlib.sha256(data).hexdigest()

    def list_models(self) -> list[ModelName]:
        out = []
        if not self.manifests_dir.is_dir():
            return out
        for p in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            host, ns, model, tag = p.relative_to(self.manifests_dir).parts
            out.append(ModelName(host, ns, model, tag))
        return out

    def layers(self, name: ModelName | str) -> list[Layer]:
        m, _ = self.read_manifest(name)
        return [Layer.from_json(x) for x in m.get("layers", [])]

    def layer_of(self, name: ModelName | str, media_type: str) -> Layer | None:
        """The last layer of a media type (the last model layer wins in Ollama)."""
        found = None
        for layer in self.layers(name):
            if layer.media_type == media_type or (media_type == MEDIA_TEMPLATE and layer.media_type == MEDIA_PROMPT):
                found = layer
        return found

    def model_gguf_path(self, name: ModelName | str) -> Path:
        layer = self.layer_of(name, MEDIA_MODEL)
        if layer is None:
            raise UserError(f"model '{name}' has no model layer in {self.root}")
        return self.blob_path(layer.digest)

    def delete_model(self, name: ModelName | str) -> None:
        """Remove the manifest, then every blob no other manifest references."""
        path = self.manifest_path(name)
        if not path.is_file():
            raise UserError(f"model '{name}' not found in the Ollama store {self.root}")
        m, _ = self.read_manifest(name)
        mine = {x["digest"] for x in m.get("layers", [])} | {m.get("config", {}).get("digest")}
        path.unlink()
        for parent in (path.parent, path.parent.parent, path.parent.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        still_used: set[str] = set()
        for other in self.list_models():
            om, _ = self.read_manifest(other)
            still_used |= {x["digest"] for x in om.get("layers", [])} | {om.get("config", {}).get("digest")}
        for d in mine - still_used:
            if d and is_valid_digest(d):
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(d).unlink()
