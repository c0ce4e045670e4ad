"""`ollama-ft publish`: push a PushSource's blobs and manifest to a registry, resumably.

Resume: after each acknowledged chunk the upload URL and offset go to `.publish-state.json`
beside the run (or the store). A retry skips blobs the registry has (HEAD), asks the registry for
the offset of a known upload (GET upload URL -> `Range`) and sends only the rest. A registry
refuses an upload URL whose signed state no longer matches its data (a chunk cut off in the
middle); that blob alone then starts again.

Nothing is written to the registry before every local blob has been checked against its digest,
and a login failure (no credentials, wrong password, untrusted certificate) stops at the first
request (`GET /v2/`); missing push rights stop at the first write (opening an upload).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..core import ui
from ..core.errors import UserError
from ..core.files import digest_file, human_bytes
from ..core.runs import atomic_write_text
from .registry_client import (
    DEFAULT_CHUNK_SIZE,
    READ_SIZE,
    RegistryAccess,
    RegistryClient,
    Target,
    is_loopback,
    parse_registry,
    registry_access,
    validate_target,
)
from .registry_source import Blob, PushSource, resolve_source
from .store import DigestMismatch, digest_bytes

# -------------------------------------------------------------------------------------------
# Upload state (resume)


class UploadState:
    """Known upload URLs and offsets per (registry, repository, digest), in a small JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.disabled = False
        self.data: dict[str, Any] = {"version": 1, "uploads": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if isinstance(loaded, dict) and isinstance(loaded.get("uploads"), dict):
                    self.data = loaded
            except (OSError, json.JSONDecodeError):
                ui.warn(f"ignoring unreadable upload state {self.path}")

    @staticmethod
    def key(reg: RegistryClient, digest: str) -> str:
        return f"{reg.base_url}/{reg.repository}@{digest}"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data["uploads"].get(key)

    def put(self, key: str, location: str, offset: int, size: int) -> None:
        self.data["uploads"][key] = {"location": location, "offset": offset, "size": size,
                                     "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self._save()

    def drop(self, key: str) -> None:
        if self.data["uploads"].pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.disabled:
            return
        try:
            if self.data["uploads"]:
                atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        except OSError as e:  # e.g. a system store owned by the ollama user: publish still works
            self.disabled = True
            ui.warn(f"cannot write {self.path} ({e.strerror}); an interrupted publish will restart its blobs")



# -------------------------------------------------------------------------------------------
# Push


@dataclass
class PushStats:
    bytes_sent: int = 0  # blob bytes sent in PATCH bodies by this call (a chunk resent after a refresh: once)
    bytes_total: int = 0
    skipped: list[str] = field(default_factory=list)  # digests the registry already had
    resumed: dict[str, int] = field(default_factory=dict)  # digest -> offset resumed from
    restarted: list[str] = field(default_factory=list)  # known uploads the registry had dropped
    uploaded: list[str] = field(default_factory=list)
    token_refreshes: int = 0  # tokens fetched again after the registry refused an expired one


def verify_source(source: PushSource) -> None:
    """Every blob must hash to its digest and have its size before anything is sent."""
    bad = []
    for b in source.blobs:
        if b.path is not None:
            actual, size = digest_file(b.path), b.path.stat().st_size
        else:
            actual, size = digest_bytes(b.data or b""), len(b.data or b"")
        if actual != b.digest:
            bad.append(f"{b.path or b.media_type}: expected {b.digest}, got {actual}")
        elif size != b.size:
            bad.append(f"{b.path or b.media_type}: manifest says {b.size} bytes, file has {size}")
    if bad:
        raise UserError(f"refusing to publish from {source.origin}: {len(bad)} blob(s) do not match their digest",
                        details=bad, hint="the model files were changed or corrupted; rebuild or re-create the model")


def push(source: PushSource, target: Target, *, client: httpx.Client | None = None,
         chunk_size: int = DEFAULT_CHUNK_SIZE, access: RegistryAccess | None = None) -> tuple[str, PushStats]:
    """Push the source's blobs and manifest to target. Returns (manifest digest, stats)."""
    validate_target(target)  # before any byte goes out
    verify_source(source)
    stats = PushStats(bytes_total=source.total_bytes)
    state = UploadState(source.state_path)
    with RegistryClient(target.base_url, target.repository, client, access=access, actions=("pull", "push")) as reg:
        reg.ping()
        with ui.progress_bytes() as progress:
            for b in source.blobs:
                _push_blob(reg, b, state, stats, progress, chunk_size)
        digest = reg.put_manifest(target.tag, source.manifest)
        stats.token_refreshes = reg.auth.refreshes
    return digest, stats


class _Chunk:
    """Bytes [start, start + length) of a blob as a PATCH body that can be sent twice.

    httpx iterates a body again when it is not a generator, which the auth flow does after fetching
    a fresh token for an expired one. Each pass starts from the hash state and progress before the
    chunk, so a resent chunk is hashed and counted once.
    """

    def __init__(self, blob: Blob, start: int, length: int, h: Any, on_bytes: Callable[[int], None]):
        self.blob, self.start, self.length = blob, start, length
        self._h0, self.h = h.copy(), h.copy()
        self.sent = 0
        self._on_bytes = on_bytes

    def __iter__(self) -> Iterator[bytes]:
        self.h = self._h0.copy()
        self._on_bytes(-self.sent)
        self.sent = 0
        with self.blob.open(self.start) as f:
            left = self.length
            while left:
                piece = f.read(min(READ_SIZE, left))
                if not piece:
                    raise UserError(f"{self.blob.path} shrank while uploading")
                self.h.update(piece)
                self.sent += len(piece)
                self._on_bytes(len(piece))
                left -= len(piece)
                yield piece


def _resume_point(reg: RegistryClient, b: Blob, state: UploadState, key: str, stats: PushStats) -> tuple[int, str]:
    """(offset, upload URL): a known upload the registry still holds, else a new one at 0."""
    known = state.get(key)
    if known and known.get("size") == b.size:
        got = reg.upload_offset(known["location"])
        if got is None or got[0] > b.size:
            stats.restarted.append(b.digest)
        else:
            if got[0]:
                stats.resumed[b.digest] = got[0]
            return got
    location = reg.start_upload()
    state.put(key, location, 0, b.size)
    return 0, location


def _hash_prefix(b: Blob, offset: int) -> Any:
    """sha256 state over the first `offset` bytes, which went out in an earlier call: the digest
    check covers the whole blob without resending them."""
    h = hashlib.sha256()
    with b.open(0) as f:
        left = offset
        while left:
            piece = f.read(min(READ_SIZE, left))
            if not piece:
                raise UserError(f"{b.path} is shorter than the {offset} bytes already uploaded")
            h.update(piece)
            left -= len(piece)
    return h


def _push_blob(reg: RegistryClient, b: Blob, state: UploadState, stats: PushStats, progress: Any,
               chunk_size: int) -> None:
    key = UploadState.key(reg, b.digest)
    task = progress.add_task(f"pushing {b.digest[7:19]} ({b.media_type.rsplit('.', 1)[-1]})", total=b.size)
    if reg.has_blob(b.digest):
        stats.skipped.append(b.digest)
        state.drop(key)
        progress.update(task, completed=b.size)
        return
    offset, location = _resume_point(reg, b, state, key, stats)
    h = _hash_prefix(b, offset)
    progress.update(task, completed=offset)
    while offset < b.size:
        n = min(chunk_size, b.size - offset)
        chunk = _Chunk(b, offset, n, h, lambda k: progress.advance(task, k))
        held, location = reg.patch(location, offset, chunk, n)
        if held != offset + n:
            raise UserError(f"registry holds {held} bytes of {b.digest} after sending up to {offset + n}",
                            hint="retry; the upload restarts from what the registry reports")
        h, offset = chunk.h, held
        stats.bytes_sent += chunk.sent
        state.put(key, location, offset, b.size)
    if "sha256:" + h.hexdigest() != b.digest:
        state.drop(key)
        raise DigestMismatch(b.digest, "sha256:" + h.hexdigest(), what=str(b.path or b.media_type))
    reg.commit(location, b.digest)
    state.drop(key)
    stats.uploaded.append(b.digest)


def publish_command(name: str, registry: str, tag: str | None = None, insecure: bool = False,
                    store: Path | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    client: httpx.Client | None = None, username: str | None = None,
                    password_stdin: bool = False, ca_cert: Path | None = None) -> dict[str, Any]:
    """`ollama-ft publish NAME --registry HOST:PORT[/namespace]`: push a run's model or a stored model.

    NAME is a run (runs/NAME, or a run directory) whose export and modelfile stages are done,
    else a model in the Ollama store (--store DIR, default $OLLAMA_MODELS or ~/.ollama/models).
    The target is HOST:PORT/namespace/<model>:<tag> (namespace default `library`).
    """
    host, namespace, scheme = parse_registry(registry, insecure, tls=ca_cert is not None)
    validate_target(Target(host, namespace or "library", "", tag or "latest", scheme))  # before reading the model
    access = registry_access(Target(host, "", "", "", scheme), username, password_stdin, ca_cert, insecure)
    source = resolve_source(name, store)
    target = Target(host, namespace or "library", source.default_model, tag or source.default_tag, scheme)
    validate_target(target)
    started = time.time()
    ui.info(f"publishing {source.origin} -> {target.base_url}/{target.repository}:{target.tag} "
            f"({len(source.blobs)} blobs, {human_bytes(source.total_bytes)})"
            + (f" as {access.credentials.who}" if access.credentials else ""))
    digest, stats = push(source, target, client=client, chunk_size=chunk_size, access=access)
    info = {
        "target": target.display,
        "url": f"{target.base_url}/v2/{target.repository}/manifests/{target.tag}",
        "manifest_digest": digest,
        "bytes_sent": stats.bytes_sent,
        "bytes_total": stats.bytes_total,
        "skipped": len(stats.skipped),
        "resumed": stats.resumed,
        "user": access.credentials.username if access.credentials else None,
        "token_refreshes": stats.token_refreshes,
        "seconds": round(time.time() - started, 3),
        "summary": f"published {target.display} ({digest})",
    }
    if source.run is not None:
        source.run.record("publish", info, settings={"target": target.display})
    ui.success(f"published {target.display}  {digest}  (sent {human_bytes(stats.bytes_sent)}, "
               f"{len(stats.skipped)} blob(s) already there)")
    flags = (" --insecure" if target.scheme == "http" and not is_loopback(target.host) else "") + \
        (f" --ca-cert {ca_cert}" if ca_cert else "")
    ref = f"https://{target.display}" if target.scheme == "https" and is_loopback(target.host) and not ca_cert \
        else target.display
    ui.out.print(f"install elsewhere with:  ollama-ft install {ref}{flags}", highlight=False, soft_wrap=True)
    return info
