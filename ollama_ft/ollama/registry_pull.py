"""`ollama-ft install`: fetch a model from a registry, verify every digest, then register it.

The pull lands in a staging store (a temp directory) and nothing is registered until every blob
hashed to its digest. Then either the blobs move into an Ollama models directory (`--store DIR`,
Ollama's own layout) or they go to the local Ollama through its API (blobs it lacks, then
/api/create), because Ollama cannot pull new blobs from a plain distribution registry
(../shared/docs/ollama-contract.md §5.5).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..core import ui
from ..core.errors import UserError
from ..core.names import ModelName, parse_name
from .registry_client import (
    MEDIA_OCI_MANIFEST,
    OLLAMA_MEDIA_PREFIX,
    READ_SIZE,
    RegistryAccess,
    RegistryClient,
    Target,
    parse_ref,
    registry_access,
    validate_target,
)
from .store import (
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MANIFEST,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    DigestMismatch,
    Store,
    digest_bytes,
    is_valid_digest,
)


@dataclass
class Pulled:
    """A verified model in a staging store: manifest bytes and every blob, nothing registered yet."""

    target: Target
    manifest: dict[str, Any]
    manifest_bytes: bytes
    staging: Store
    bytes_downloaded: int = 0
    reused: list[str] = field(default_factory=list)


def _check_manifest(data: bytes, media_type: str, where: str) -> dict[str, Any]:
    try:
        m = json.loads(data)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: manifest is not JSON ({e.msg})") from None
    problems = []
    if m.get("schemaVersion") != 2:
        problems.append(f"schemaVersion is {m.get('schemaVersion')!r}, expected 2")
    mt = m.get("mediaType") or media_type.split(";")[0].strip()
    if mt not in (MEDIA_MANIFEST, MEDIA_OCI_MANIFEST):
        problems.append(f"manifest media type {mt!r} is not an image manifest")
    layers = m.get("layers")
    if not isinstance(layers, list) or not layers:
        problems.append("no layers")
        layers = []
    for d in [*layers, m.get("config") or {}]:
        if not is_valid_digest(d.get("digest", "")) or not str(d.get("digest", "")).startswith("sha256:"):
            problems.append(f"invalid digest {d.get('digest')!r}")
        if not isinstance(d.get("size"), int) or d["size"] < 0:
            problems.append(f"invalid size {d.get('size')!r} for {d.get('digest')}")
    foreign = [d.get("mediaType") for d in layers if not str(d.get("mediaType", "")).startswith(OLLAMA_MEDIA_PREFIX)]
    if foreign:
        problems.append(f"layers that are not Ollama's: {sorted(set(map(str, foreign)))}")
    if not any(d.get("mediaType") == MEDIA_MODEL for d in layers):
        problems.append(f"no {MEDIA_MODEL} layer")
    if problems:
        raise UserError(f"{where} is not an Ollama model manifest", details=problems,
                        hint="publish it with `ollama-ft publish` or `ollama push`")
    return m


def pull(target: Target, staging: Store, *, have: Callable[[str], bool] | None = None,
         client: httpx.Client | None = None, access: RegistryAccess | None = None) -> Pulled:
    """Fetch the manifest and every blob `have` does not report, verifying sha256 while streaming.

    Blobs land in `staging` (a store in a temp dir); a mismatch raises DigestMismatch and the
    partial file is removed. Nothing is registered here.
    """
    validate_target(target)
    with RegistryClient(target.base_url, target.repository, client, access=access) as reg:
        reg.ping()
        data, ctype = reg.get_manifest(target.tag)
        m = _check_manifest(data, ctype, f"{target.base_url}/{target.repository}:{target.tag}")
        pulled = Pulled(target, m, data, staging)
        descs = [*m["layers"], m["config"]]
        with ui.progress_bytes() as progress:
            for d in descs:
                digest, size = d["digest"], int(d["size"])
                task = progress.add_task(f"pulling {digest[7:19]} ({str(d.get('mediaType')).rsplit('.', 1)[-1]})",
                                         total=size)
                if staging.has_blob(digest) or (have is not None and _skippable(d) and have(digest)):
                    pulled.reused.append(digest)
                    progress.update(task, completed=size)
                    continue
                with reg.get_blob(digest) as r:
                    src = _ResponseReader(r, lambda n, t=task: progress.advance(t, n))
                    try:
                        staging.add_blob_stream(src, digest, length=size + 1)  # +1: detect a longer body
                    except DigestMismatch as e:
                        raise UserError(
                            f"digest mismatch for blob {digest} from {reg.url('blobs/' + digest)}: "
                            f"the bytes hash to {e.actual}; nothing was installed",
                            hint="the registry's copy is corrupt: re-publish the model, then install again",
                        ) from None
                    pulled.bytes_downloaded += src.count
                if src.count != size:
                    staging.blob_path(digest).unlink(missing_ok=True)
                    raise UserError(f"blob {digest} from {target.base_url}: got {src.count} bytes, manifest says {size}",
                                    hint="the registry content is inconsistent; re-publish the model")
    return pulled


def _skippable(d: dict[str, Any]) -> bool:
    """Text layers are always fetched (their content feeds /api/create); weights can be skipped."""
    return d.get("mediaType") in (MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_PROJECTOR)


class _ResponseReader:
    """File-like `read(n)` over a streamed httpx response, counting bytes for progress."""

    def __init__(self, r: httpx.Response, on_bytes: Callable[[int], None]):
        self._it = r.iter_raw(READ_SIZE)
        self._buf = b""
        self.count = 0
        self._on = on_bytes

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n):
            try:
                piece = next(self._it)
            except StopIteration:
                break
            self._buf += piece
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        self.count += len(out)
        self._on(len(out))
        return out


@contextlib.contextmanager
def _staging_store(beside: Path) -> Iterator[Store]:
    """A temp store on the destination's filesystem (so blobs move by rename), always removed."""
    beside = Path(beside)
    beside.mkdir(parents=True, exist_ok=True)
    tmp = beside / f".ollama-ft-install-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield Store(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_into_store(pulled: Pulled, store: Store, local: ModelName) -> Path:
    """Move the verified blobs into `store` and write the manifest verbatim (as Ollama's pull does)."""
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    for d in [*pulled.manifest["layers"], pulled.manifest["config"]]:
        digest = d["digest"]
        if store.has_blob(digest):
            continue
        src = pulled.staging.blob_path(digest)
        os.replace(src, store.blob_path(digest))
    return store.write_manifest(local, pulled.manifest_bytes)


def create_request(pulled: Pulled) -> dict[str, Any]:
    """The /api/create fields that rebuild the pulled model (files/adapters by digest + text layers)."""
    req: dict[str, Any] = {"files": {}, "adapters": {}, "license": []}
    for d in pulled.manifest["layers"]:
        mt, digest = d["mediaType"], d["digest"]
        if mt == MEDIA_MODEL:
            req["files"] = {"model.gguf": digest}  # the last model layer wins, as in Ollama
        elif mt == MEDIA_ADAPTER:
            req["adapters"][f"adapter-{len(req['adapters'])}.gguf"] = digest
        elif mt in (MEDIA_TEMPLATE, MEDIA_PROMPT):
            req["template"] = _text(pulled, digest)
        elif mt == MEDIA_SYSTEM:
            req["system"] = _text(pulled, digest)
        elif mt == MEDIA_LICENSE:
            req["license"].append(_text(pulled, digest))
        elif mt == MEDIA_PARAMS:
            req["parameters"] = _json_layer(pulled, digest, dict)
        elif mt == MEDIA_MESSAGES:
            req["messages"] = _json_layer(pulled, digest, list)
        else:
            raise UserError(f"layer type {mt!r} cannot be registered through the Ollama API",
                            hint="install into the store directly with --store DIR")
    # Fields of the config blob that /api/create takes (a model pushed by a real Ollama may carry them;
    # dropping them changes how the server renders and parses, e.g. a built-in renderer).
    cfg_desc = pulled.manifest.get("config") or {}
    config = _json_layer(pulled, cfg_desc["digest"], dict) if cfg_desc.get("digest") else {}
    for k in API_CONFIG_FIELDS:
        if config.get(k):
            req[k] = config[k]
    lost = sorted(k for k in STORE_ONLY_CONFIG_FIELDS if config.get(k))
    if lost:
        ui.warn(f"the config fields {', '.join(lost)} cannot be set through Ollama's API; "
                "install with --store DIR to keep them")
    return {k: v for k, v in req.items() if v not in ({}, [], None)}


API_CONFIG_FIELDS = ("renderer", "parser", "requires", "remote_host")
STORE_ONLY_CONFIG_FIELDS = ("remote_model", "capabilities", "context_length", "embedding_length", "base_name")


def _text(pulled: Pulled, digest: str) -> str:
    return pulled.staging.read_blob_bytes(digest).decode("utf-8")


def _json_layer(pulled: Pulled, digest: str, kind: type) -> Any:
    try:
        v = json.loads(pulled.staging.read_blob_bytes(digest))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"layer {digest} is not valid JSON ({e})") from None
    if not isinstance(v, kind):
        raise UserError(f"layer {digest} should hold a JSON {kind.__name__}")
    return v


def install_command(ref: str, store: Path | None = None, host: str | None = None, insecure: bool = False,
                    name: str | None = None, client: httpx.Client | None = None, username: str | None = None,
                    password_stdin: bool = False, ca_cert: Path | None = None) -> dict[str, Any]:
    """`ollama-ft install HOST:PORT/namespace/NAME:TAG`: pull (digests verified), then register.

    With --store DIR the model is written into that Ollama models directory (Ollama's layout);
    otherwise it goes to the local Ollama through its API (blobs, then /api/create).
    """
    target = parse_ref(ref, insecure, tls=ca_cert is not None)
    local = parse_name(name or f"{target.model}:{target.tag}")
    access = registry_access(target, username, password_stdin, ca_cert, insecure)
    started = time.time()
    if store is not None:
        st = Store(store)
        with _staging_store(st.root) as staging:
            pulled = pull(target, staging, have=st.has_blob, client=client, access=access)
            path = install_into_store(pulled, st, local)
        result = {"model": local.display, "store": str(st.root), "manifest": str(path)}
    else:
        result = _install_via_api(target, local, host, client, access)
        pulled = result.pop("_pulled")
    result.update({"source": target.display, "manifest_digest": digest_bytes(pulled.manifest_bytes),
                   "bytes_downloaded": pulled.bytes_downloaded, "seconds": round(time.time() - started, 3)})
    ui.success(f"installed {target.display} as {local.display}")
    ui.out.print(f"chat with it:  ollama run {local.display}", highlight=False)
    return result


def _install_via_api(target: Target, local: ModelName, host: str | None, client: httpx.Client | None,
                     access: RegistryAccess) -> dict[str, Any]:
    """Pull into a temp store ($TMPDIR), upload the weights Ollama lacks (HEAD first), then /api/create."""
    import ollama

    from . import api as ollama_api

    url = ollama_api.resolve_host(host)
    if not ollama_api.is_reachable(url):
        raise UserError(f"cannot connect to Ollama at {url} (nothing was downloaded)",
                        hint="start it with `ollama serve` (or set OLLAMA_HOST / --host), "
                             "or write straight into a models directory with --store DIR")
    http = httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=600.0, write=600.0))
    api = ollama.Client(host=url, timeout=httpx.Timeout(30.0, read=600.0))
    try:
        with _staging_store(Path(tempfile.gettempdir())) as staging:
            pulled = pull(target, staging, have=lambda d: ollama_api.head_blob(http, d), client=client,
                          access=access)
            req = create_request(pulled)  # refuses layer kinds /api/create cannot express, before uploads
            uploaded = 0
            with ui.progress_bytes() as progress:
                for d in pulled.manifest["layers"]:
                    if _skippable(d) and not ollama_api.head_blob(http, d["digest"]):
                        task = progress.add_task(f"uploading {d['digest'][7:19]} to Ollama", total=d["size"])
                        uploaded += ollama_api.upload_blob(http, staging.blob_path(d["digest"]), d["digest"],
                                                           progress, task)
            statuses = ollama_api.create_model(api, local, req, url, Path(target.display))
    except httpx.TransportError as e:
        raise UserError(f"lost the connection to Ollama at {url}: {e}",
                        hint="check that `ollama serve` is running, then run `ollama-ft install` again") from None
    finally:
        http.close()
        api._client.close()
    return {"model": local.display, "host": url, "uploaded_bytes": uploaded, "create_statuses": statuses,
            "_pulled": pulled}
