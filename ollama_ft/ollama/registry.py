"""OCI distribution push/pull of Ollama models: `ollama-ft publish` and `ollama-ft install`.

The wire format is Ollama's (../shared/docs/ollama-contract.md §4.2, §5): a schema2 manifest
(`application/vnd.docker.distribution.manifest.v2+json`), Ollama's config blob and layers typed
`application/vnd.ollama.image.*`, pushed to `/v2/<namespace>/<model>/...` of any plain
distribution registry. No Ollama server is needed to publish, and install does the pull itself
because Ollama cannot pull new blobs from such a registry (§5.5).

Why httpx and not PyPI `oras`: oras-py builds and validates OCI image manifests
(`application/vnd.oci.image.manifest.v1+json`, checked against the OCI JSON schema) while Ollama
pulls with `Accept: ...manifest.v2+json` only, and its chunked upload cannot resume from the
registry's offset. The distribution protocol used here is small: HEAD blob, POST uploads/,
PATCH chunks, GET upload status, PUT ?digest=, PUT/GET manifest.

Resume: after each acknowledged chunk the upload URL and offset go to `.publish-state.json`
beside the run (or the store). A retry skips blobs the registry has (HEAD), asks the registry for
the offset of a known upload (GET upload URL -> `Range`) and sends only the rest. A registry
refuses an upload URL whose signed state no longer matches its data (a chunk cut off in the
middle); that blob alone then starts again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from ..core import ui
from ..core.errors import UserError
from ..core.names import ModelName, parse_name
from ..core.runs import Run, atomic_write_text
from .store import (
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
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
    Layer,
    Store,
    build_config_blob,
    build_manifest,
    default_store_dir,
    digest_bytes,
    gguf_facts,
    is_valid_digest,
)

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OLLAMA_MEDIA_PREFIX = "application/vnd.ollama.image."
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_CHUNK_SIZE = 64 << 20  # resume granularity; one chunk is held by the socket, not in memory
STATE_FILE = ".publish-state.json"
_READ = 1 << 20

# Distribution's reference grammar: lower-case path components joined by '.', '_', '__' or '-'s.
_OCI_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# -------------------------------------------------------------------------------------------
# Targets: where a model lives in a registry


@dataclass(frozen=True)
class Target:
    """`host[:port]/namespace/model:tag` in a registry, with the scheme to reach it."""

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.model}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def display(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def hostname_of(host: str) -> str:
    """`127.0.0.1:5000` -> `127.0.0.1`; `[::1]:5000` -> `::1`."""
    return urlsplit(f"//{host}").hostname or host


def is_loopback(host: str) -> bool:
    return hostname_of(host).lower() in LOOPBACK_HOSTS


def scheme_for(host: str, insecure: bool) -> str:
    """Plain HTTP for loopback registries, or anywhere with --insecure; https otherwise."""
    return "http" if insecure or is_loopback(host) else "https"


def _split_scheme(s: str, insecure: bool) -> tuple[str, bool]:
    s = s.strip()
    for prefix in ("https://", "http://"):
        if s.lower().startswith(prefix):
            rest = s[len(prefix):]
            if prefix == "http://" and not insecure and not is_loopback(rest.split("/", 1)[0]):
                raise UserError(f"refusing plain HTTP to {rest.split('/', 1)[0]!r} (from {s!r})",
                                hint="only loopback registries use http by default; add --insecure to allow it")
            return rest, (prefix == "http://") or insecure
    return s, insecure


def parse_registry(registry: str, insecure: bool = False) -> tuple[str, str | None, str]:
    """`HOST[:PORT][/namespace]` -> (host, namespace or None, scheme)."""
    rest, insecure = _split_scheme(registry, insecure)
    rest = rest.strip("/")
    host, _, ns = rest.partition("/")
    if not host:
        raise UserError(f"invalid --registry {registry!r}: no host",
                        hint="write HOST:PORT[/namespace], e.g. 127.0.0.1:5000/team")
    if "/" in ns:
        raise UserError(f"invalid --registry {registry!r}: one namespace level only ({ns!r})",
                        hint="write HOST:PORT/namespace; the model name comes from the NAME argument")
    return host, (ns or None), scheme_for(host, insecure)


def parse_ref(ref: str, insecure: bool = False) -> Target:
    """`HOST[:PORT]/namespace/model[:tag]` (as `install` takes it) -> Target, validated."""
    rest, insecure = _split_scheme(ref, insecure)
    parts = rest.split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"invalid reference {ref!r}: expected HOST:PORT/namespace/NAME[:TAG]",
                        hint="e.g. 127.0.0.1:5000/team/my-model:v1 (Ollama needs the namespace level too)")
    host, ns, model = parts
    tag = "latest"
    if ":" in model:
        model, _, tag = model.rpartition(":")
    t = Target(host, ns, model, tag, scheme_for(host, insecure))
    validate_target(t)
    return t


def validate_target(t: Target) -> None:
    """Refuse, before any upload, a name the registry or Ollama would reject (all problems at once)."""
    problems = []
    model = t.model or "NAME"  # an empty model: check host, namespace and tag only (early, cheap)
    try:
        parse_name(f"{t.host}/{t.namespace}/{model}:{t.tag}")
    except UserError as e:
        problems.append(f"Ollama would reject it: {e.message}")
    for part, value in (("namespace", t.namespace), ("model", t.model or "name")):
        if not _OCI_COMPONENT.match(value):
            why = "upper case is not allowed" if value.lower() != value else \
                "only lower-case letters, digits and single '.', '_', '-' between them are allowed"
            problems.append(f"the registry would reject {part} {value!r}: {why}")
    if not _OCI_TAG.match(t.tag):
        problems.append(f"the registry would reject tag {t.tag!r}: 1-128 of letters, digits, '_', '.', '-', "
                        "not starting with '.' or '-'")
    if len(t.repository) > 255:
        problems.append(f"repository {t.repository!r} is longer than 255 characters")
    if problems:
        suggestion = f"{t.host}/{t.namespace.lower()}/{(t.model or 'NAME').lower()}:{t.tag}"
        shown = t.display if t.model else f"{t.host}/{t.namespace} (tag {t.tag})"
        raise UserError(f"invalid registry name {shown!r}", details=problems,
                        hint=f"use lower-case names, e.g. {suggestion!r}")


# -------------------------------------------------------------------------------------------
# The distribution API


class RegistryClient:
    """The OCI distribution calls publish/install need, with errors the user can act on."""

    def __init__(self, base_url: str, repository: str, client: httpx.Client | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.repository = repository
        self._own = client is None
        self.http = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/v2/{self.repository}/{path}"

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        url = urljoin(self.base_url + "/", url)
        try:
            r = self.http.request(method, url, **kw)
        except httpx.ConnectError as e:
            tls = "ssl" in str(e).lower() or "tls" in str(e).lower()
            raise UserError(
                f"cannot reach the registry at {self.base_url} ({method} {url}): {e}",
                hint=("the registry may speak plain HTTP: add --insecure" if tls else
                      "is it running? start one with `docker-registry serve CONFIG.yml` or "
                      "`docker run -p 5000:5000 registry:2`, and check --registry HOST:PORT"),
            ) from None
        except httpx.TimeoutException as e:
            raise UserError(f"the registry at {self.base_url} timed out ({method} {url}): {e}",
                            hint="retry; an interrupted publish resumes where it stopped") from None
        except httpx.TransportError as e:
            raise UserError(f"connection to the registry at {self.base_url} failed ({method} {url}): {e}",
                            hint="retry; an interrupted publish resumes where it stopped") from None
        if r.status_code == 401:
            raise UserError(f"the registry at {self.base_url} asks for authentication ({method} {url})",
                            hint="ollama-ft (like Ollama with self-hosted registries) pushes to unauthenticated "
                                 "registries only; protect the registry at the network level")
        return r

    def fail(self, what: str, r: httpx.Response) -> UserError:
        body = r.text.strip().replace("\n", " ")[:300]
        return UserError(f"registry {self.base_url}: {what} failed: HTTP {r.status_code} {body}".rstrip(),
                         hint=f"request was {r.request.method} {r.request.url}")

    def ping(self) -> None:
        """GET /v2/: is this an OCI registry at all?"""
        r = self.request("GET", f"{self.base_url}/v2/")
        if r.status_code != 200:
            raise self.fail("GET /v2/ (API version check)", r)

    # -- blobs ------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        r = self.request("HEAD", self.url(f"blobs/{digest}"))
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        raise self.fail(f"HEAD blob {digest}", r)

    def start_upload(self) -> str:
        r = self.request("POST", self.url("blobs/uploads/"))
        if r.status_code != 202:
            raise self.fail("opening an upload", r)
        return self._location(r)

    def upload_offset(self, location: str) -> tuple[int, str] | None:
        """Bytes the registry holds for a known upload, or None when it no longer knows it."""
        r = self.request("GET", location)
        if r.status_code in (404, 400, 410):
            return None
        if r.status_code not in (200, 204):
            raise self.fail("upload status", r)
        return _range_end(r.headers.get("Range")), self._location(r, default=location)

    def patch(self, location: str, start: int, body: Iterator[bytes], length: int) -> tuple[int, str]:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Range": f"{start}-{start + length - 1}",  # no "bytes " prefix (distribution's form)
        }
        r = self.request("PATCH", location, content=body, headers=headers)
        if r.status_code != 202:
            raise self.fail(f"uploading bytes {start}-{start + length - 1}", r)
        return _range_end(r.headers.get("Range"), start + length), self._location(r, default=location)

    def commit(self, location: str, digest: str) -> None:
        sep = "&" if "?" in location else "?"
        r = self.request("PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"})
        if r.status_code != 201:
            raise self.fail(f"committing blob {digest}", r)

    @contextlib.contextmanager
    def get_blob(self, digest: str) -> Iterator[httpx.Response]:
        url = urljoin(self.base_url + "/", self.url(f"blobs/{digest}"))
        try:
            with self.http.stream("GET", url, follow_redirects=True) as r:
                if r.status_code != 200:
                    r.read()
                    raise self.fail(f"downloading blob {digest}", r)
                yield r
        except httpx.TransportError as e:
            raise UserError(f"download of {digest} from {self.base_url} failed: {e}",
                            hint="retry `ollama-ft install`; nothing was registered") from None

    # -- manifests --------------------------------------------------------------------------
    def put_manifest(self, tag: str, data: bytes, media_type: str = MEDIA_MANIFEST) -> str:
        r = self.request("PUT", self.url(f"manifests/{tag}"), content=data, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201):
            raise self.fail(f"writing manifest {self.repository}:{tag}", r)
        return r.headers.get("Docker-Content-Digest") or digest_bytes(data)

    def get_manifest(self, tag: str) -> tuple[bytes, str]:
        r = self.request("GET", self.url(f"manifests/{tag}"),
                         headers={"Accept": f"{MEDIA_MANIFEST}, {MEDIA_OCI_MANIFEST};q=0.5"})
        if r.status_code == 404:
            raise UserError(f"{self.base_url}/{self.repository}:{tag} not found in the registry",
                            hint=f"list the tags with GET {self.url('tags/list')}; check the name and tag")
        if r.status_code != 200:
            raise self.fail(f"reading manifest {self.repository}:{tag}", r)
        return r.content, r.headers.get("Content-Type", "")

    def _location(self, r: httpx.Response, default: str | None = None) -> str:
        loc = r.headers.get("Docker-Upload-Location") or r.headers.get("Location") or default
        if not loc:
            raise self.fail("upload (no Location header)", r)
        return urljoin(str(r.request.url), loc)  # registries may answer with relative URLs


def _range_end(header: str | None, fallback: int | None = None) -> int:
    """`Range: 0-999` -> 1000 bytes held (`0-0` is what distribution says for an empty upload)."""
    if header:
        m = re.match(r"^(?:bytes=)?(\d+)-(\d+)$", header.strip())
        if m:
            end = int(m.group(2))
            # distribution answers `0-0` both for an empty upload and for one byte held
            return (1 if fallback == 1 else 0) if end == 0 else end + 1
    if fallback is None:
        raise UserError(f"registry answered an upload status without a usable Range header ({header!r})")
    return fallback


# -------------------------------------------------------------------------------------------
# What is pushed


@dataclass
class Blob:
    """A manifest entry and where its bytes are (a file, or bytes built in memory)."""

    media_type: str
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None
    from_: str | None = None  # the manifest's `from` (the create `files` key), as Ollama records it

    def open(self, offset: int = 0) -> Any:
        if self.path is not None:
            f = open(self.path, "rb")  # noqa: SIM115 - closed by the caller's context
            f.seek(offset)
            return f
        import io

        b = io.BytesIO(self.data or b"")
        b.seek(offset)
        return b


@dataclass
class PushPlan:
    config: Blob
    layers: list[Blob]
    manifest: bytes
    source: str  # for messages: "run runs/demo" / "store ~/.ollama/models (demo:latest)"
    state_path: Path
    default_model: str
    default_tag: str
    run: Run | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def blobs(self) -> list[Blob]:
        return [*self.layers, self.config]

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


def _blob_from_bytes(media_type: str, data: bytes) -> Blob:
    return Blob(media_type, digest_bytes(data), len(data), data=data)


def plan_from_store(store: Store, name: str) -> PushPlan:
    """Push an existing Ollama model exactly as stored (the manifest bytes, so the digest, stay)."""
    mname = parse_name(name)
    manifest, data = store.read_manifest(mname)
    if manifest.get("schemaVersion") != 2 or not isinstance(manifest.get("layers"), list):
        raise UserError(f"{store.manifest_path(mname)}: not a schema2 manifest")
    blobs = []
    for d in [*manifest["layers"], manifest.get("config") or {}]:
        digest = d.get("digest", "")
        if not is_valid_digest(digest):
            raise UserError(f"{store.manifest_path(mname)}: invalid digest {digest!r}")
        p = store.blob_path(digest)
        if not p.is_file():
            raise UserError(f"blob {digest} of '{mname.display}' is missing from {store.blobs_dir}",
                            hint="the store is incomplete; re-create the model (`ollama-ft register`) or pull it again")
        blobs.append(Blob(d.get("mediaType", ""), digest, int(d.get("size", -1)), path=p))
    return PushPlan(config=blobs[-1], layers=blobs[:-1], manifest=data,
                    source=f"Ollama store {store.root} ({mname.display})",
                    state_path=store.root / STATE_FILE, default_model=mname.model, default_tag=mname.tag)


def _run_model_name(run: Run) -> tuple[str, str]:
    e = run.entry("modelfile") or {}
    settings = e.get("settings") or {}
    name = str(settings.get("name") or run.root.name)
    tag = str((settings.get("ollama") or {}).get("tag") or "latest")
    # `ollama.name` may carry a namespace or a tag ("team/demo:v2"), as register accepts it.
    n = parse_name(name if name.rfind(":") > name.rfind("/") else f"{name}:{tag}")
    return n.model, n.tag


def plan_from_run(run: Run) -> PushPlan:
    """Build Ollama's layers from a run: the GGUF its Modelfile names, plus template/system/params/license.

    The Modelfile is read with modelfile.py's parser and turned into the same create request
    `register` sends, so a published model carries what a registered one does.
    """
    from .modelfile import parse_file

    mf_dir = run.require("modelfile")
    run.require("export")
    mf_path = mf_dir / "Modelfile"
    if not mf_path.is_file():
        raise UserError(f"{mf_path} is missing", hint=f"run `ollama-ft modelfile {run.root} --force`")
    created = parse_file(mf_path).to_create_request(mf_path.parent)
    req, local = created.fields, created.blobs
    if not req.get("files"):
        raise UserError(f"{mf_path}: FROM names the model {req.get('from')!r}, not a GGUF file",
                        hint="publish that model from the Ollama store: `ollama-ft publish NAME --store DIR`")
    unsupported = [k for k in [*req["files"], *(req.get("adapters") or {})] if not k.endswith(".gguf")]
    if unsupported or req.get("draft_files"):
        raise UserError(f"{mf_path}: publish handles GGUF weights only, not {unsupported or ['DRAFT']}",
                        hint="export the model to GGUF (`ollama-ft export RUN`) and point FROM at it")
    layers: list[Blob] = []
    gguf = None
    facts: dict[str, Any] = {}
    # to_create_request hashed the files already; verify_plan hashes them again right before sending.
    for key, digest in req["files"].items():
        path = local[digest]
        f = gguf_facts(path)
        kind = {"adapter": MEDIA_ADAPTER, "mmproj": MEDIA_PROJECTOR}.get(str(f.get("general_type")), MEDIA_MODEL)
        if kind == MEDIA_MODEL:
            gguf, facts = path, f
            _check_export_digest(run, path, digest)
        layers.append(Blob(kind, digest, path.stat().st_size, path=path, from_=key))
    for key, digest in (req.get("adapters") or {}).items():
        layers.append(Blob(MEDIA_ADAPTER, digest, local[digest].stat().st_size, path=local[digest], from_=key))
    if gguf is None:
        raise UserError(f"{mf_path}: FROM names no model GGUF (only adapters or projectors)")
    # Ollama's layer order (server/create.go): weights, template, system, licenses, params, messages.
    if req.get("template"):
        layers.append(_blob_from_bytes(MEDIA_TEMPLATE, req["template"].encode()))
    if req.get("system"):
        layers.append(_blob_from_bytes(MEDIA_SYSTEM, req["system"].encode()))
    lic = req.get("license")
    for text in ([lic] if isinstance(lic, str) else list(lic or [])):
        layers.append(_blob_from_bytes(MEDIA_LICENSE, text.encode()))
    if req.get("parameters"):
        layers.append(_blob_from_bytes(MEDIA_PARAMS, _go_json_compact(req["parameters"])))
    if req.get("messages"):
        msgs = [{"role": m["role"], "content": m["content"]} for m in req["messages"]]
        layers.append(_blob_from_bytes(MEDIA_MESSAGES, _go_json_compact(msgs)))
    config = _blob_from_bytes(MEDIA_CONFIG, build_config_blob(
        model_format="gguf", model_family=facts["architecture"], model_families=[facts["architecture"]],
        model_type=facts["parameter_size"], file_type=facts["file_type"],
        **{k: req[k] for k in ("renderer", "parser", "requires") if req.get(k)}))
    manifest = build_manifest(Layer(config.media_type, config.digest, config.size),
                              [Layer(b.media_type, b.digest, b.size, b.from_) for b in layers])
    model, tag = _run_model_name(run)
    return PushPlan(config=config, layers=layers, manifest=manifest, source=f"run {run.root}",
                    state_path=run.root / STATE_FILE, default_model=model, default_tag=tag, run=run)


def _go_json_compact(obj: Any) -> bytes:
    """Go's json.Marshal (no trailing newline; map keys sorted), as Ollama writes params/messages layers."""
    from .store import go_json

    return go_json(json.loads(json.dumps(obj, sort_keys=True)))[:-1]


def _check_export_digest(run: Run, gguf: Path, digest: str | None = None) -> None:
    """The GGUF must be the one the export stage recorded (sha256 in manifest.json)."""
    from ..core.runs import sha256_file

    e = run.entry("export") or {}
    gguf_dir = run.root / "gguf"
    try:
        rel = gguf.resolve().relative_to(gguf_dir.resolve()).as_posix()
    except ValueError:
        return  # a FROM outside the run (an external GGUF): nothing recorded to compare with
    want = (e.get("outputs") or {}).get(rel)
    if want and (digest[7:] if digest else sha256_file(gguf)) != want:
        raise UserError(f"{gguf} does not match the digest the export stage recorded (sha256:{want})",
                        hint=f"the file changed since export; re-run `ollama-ft export {run.root} --force`")


def resolve_source(name: str, store: Path | None, runs_dir: str | Path = "runs") -> PushPlan:
    """NAME is a run (runs/NAME or a run dir with export+modelfile done) or a model in an Ollama store."""
    if store is None:
        p = Path(name)
        run_dir = p if p.is_dir() else Path(runs_dir) / name
        if (run_dir / "manifest.json").is_file():
            run = Run(run_dir)
            if run.entry("export") and run.entry("modelfile"):
                return plan_from_run(run)
            raise UserError(f"run {run_dir} has not finished export and modelfile",
                            hint=f"run `ollama-ft train CONFIG --until modelfile` (or `ollama-ft modelfile {run_dir}`)")
    st = Store(store if store is not None else default_store_dir())
    if store is not None and not st.root.is_dir():
        raise UserError(f"--store {store}: no such directory", hint="point --store at an Ollama models directory "
                        "(the one holding manifests/ and blobs/, e.g. ~/.ollama/models)")
    if not st.root.is_dir():
        raise UserError(f"{name!r} is neither a run under {runs_dir}/ nor a model: the Ollama store {st.root} does not exist",
                        hint="give a run name, or --store DIR pointing at an Ollama models directory")
    return plan_from_store(st, name)


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
    bytes_sent: int = 0  # blob bytes sent in PATCH bodies by this call
    bytes_total: int = 0
    skipped: list[str] = field(default_factory=list)  # digests the registry already had
    resumed: dict[str, int] = field(default_factory=dict)  # digest -> offset resumed from
    restarted: list[str] = field(default_factory=list)  # known uploads the registry had dropped
    uploaded: list[str] = field(default_factory=list)


def verify_plan(plan: PushPlan) -> None:
    """Every blob must hash to its digest and have its size before anything is sent."""
    bad = []
    for b in plan.blobs:
        if b.path is not None:
            from .store import digest_file

            actual, size = digest_file(b.path), b.path.stat().st_size
        else:
            actual, size = digest_bytes(b.data or b""), len(b.data or b"")
        if actual != b.digest:
            bad.append(f"{b.path or b.media_type}: expected {b.digest}, got {actual}")
        elif size != b.size:
            bad.append(f"{b.path or b.media_type}: manifest says {b.size} bytes, file has {size}")
    if bad:
        raise UserError(f"refusing to publish from {plan.source}: {len(bad)} blob(s) do not match their digest",
                        details=bad, hint="the model files were changed or corrupted; rebuild or re-create the model")


def push(plan: PushPlan, target: Target, *, client: httpx.Client | None = None,
         chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[str, PushStats]:
    """Push plan's blobs and manifest to target. Returns (manifest digest, stats)."""
    validate_target(target)  # before any byte goes out
    verify_plan(plan)
    stats = PushStats(bytes_total=plan.total_bytes)
    state = UploadState(plan.state_path)
    with RegistryClient(target.base_url, target.repository, client) as reg:
        reg.ping()
        with ui.progress_bytes() as progress:
            for b in plan.blobs:
                _push_blob(reg, b, state, stats, progress, chunk_size)
        digest = reg.put_manifest(target.tag, plan.manifest)
    return digest, stats


def _push_blob(reg: RegistryClient, b: Blob, state: UploadState, stats: PushStats, progress: Any,
               chunk_size: int) -> None:
    key = UploadState.key(reg, b.digest)
    label = f"pushing {b.digest[7:19]} ({b.media_type.rsplit('.', 1)[-1]})"
    task = progress.add_task(label, total=b.size)
    if reg.has_blob(b.digest):
        stats.skipped.append(b.digest)
        state.drop(key)
        progress.update(task, completed=b.size)
        return
    offset, location = 0, None
    known = state.get(key)
    if known and known.get("size") == b.size:
        got = reg.upload_offset(known["location"])
        if got is None or got[0] > b.size:
            stats.restarted.append(b.digest)
        else:
            offset, location = got
            if offset:
                stats.resumed[b.digest] = offset
    if location is None:
        offset, location = 0, reg.start_upload()
        state.put(key, location, 0, b.size)
    # The bytes before `offset` went out in an earlier call: hash them locally so the digest
    # check below covers the whole blob without resending them.
    h = hashlib.sha256()
    with b.open(0) as f:
        left = offset
        while left:
            chunk = f.read(min(_READ, left))
            if not chunk:
                raise UserError(f"{b.path} is shorter than the {offset} bytes already uploaded")
            h.update(chunk)
            left -= len(chunk)
        progress.update(task, completed=offset)
        while offset < b.size:
            n = min(chunk_size, b.size - offset)

            def body(n: int = n) -> Iterator[bytes]:
                left = n
                while left:
                    piece = f.read(min(_READ, left))
                    if not piece:
                        raise UserError(f"{b.path} shrank while uploading")
                    h.update(piece)
                    stats.bytes_sent += len(piece)
                    progress.advance(task, len(piece))
                    left -= len(piece)
                    yield piece

            held, location = reg.patch(location, offset, body(), n)
            if held != offset + n:
                raise UserError(f"registry holds {held} bytes of {b.digest} after sending up to {offset + n}",
                                hint="retry; the upload restarts from what the registry reports")
            offset = held
            state.put(key, location, offset, b.size)
    if "sha256:" + h.hexdigest() != b.digest:
        state.drop(key)
        raise DigestMismatch(b.digest, "sha256:" + h.hexdigest(), what=str(b.path or b.media_type))
    reg.commit(location, b.digest)
    state.drop(key)
    stats.uploaded.append(b.digest)


def publish_command(name: str, registry: str, tag: str | None = None, insecure: bool = False,
                    store: Path | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    client: httpx.Client | None = None) -> dict[str, Any]:
    """`ollama-ft publish NAME --registry HOST:PORT[/namespace]`: push a run's model or a stored model.

    NAME is a run (runs/NAME, or a run directory) whose export and modelfile stages are done,
    else a model in the Ollama store (--store DIR, default $OLLAMA_MODELS or ~/.ollama/models).
    The target is HOST:PORT/namespace/<model>:<tag> (namespace default `library`).
    """
    host, namespace, scheme = parse_registry(registry, insecure)
    validate_target(Target(host, namespace or "library", "", tag or "latest", scheme))  # before reading the model
    plan = resolve_source(name, store)
    target = Target(host, namespace or "library", plan.default_model, tag or plan.default_tag, scheme)
    validate_target(target)
    started = time.time()
    ui.info(f"publishing {plan.source} -> {target.base_url}/{target.repository}:{target.tag} "
            f"({len(plan.blobs)} blobs, {_human(plan.total_bytes)})")
    digest, stats = push(plan, target, client=client, chunk_size=chunk_size)
    info = {
        "target": target.display,
        "url": f"{target.base_url}/v2/{target.repository}/manifests/{target.tag}",
        "manifest_digest": digest,
        "bytes_sent": stats.bytes_sent,
        "bytes_total": stats.bytes_total,
        "skipped": len(stats.skipped),
        "resumed": stats.resumed,
        "seconds": round(time.time() - started, 3),
        "summary": f"published {target.display} ({digest})",
    }
    if plan.run is not None:
        plan.run.record("publish", info, settings={"target": target.display})
    ui.success(f"published {target.display}  {digest}  (sent {_human(stats.bytes_sent)}, "
               f"{len(stats.skipped)} blob(s) already there)")
    ui.out.print(f"install elsewhere with:  ollama-ft install {target.display}"
                 + (" --insecure" if target.scheme == "http" and not is_loopback(target.host) else ""),
                 highlight=False)
    return info


# -------------------------------------------------------------------------------------------
# Pull / install


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
         client: httpx.Client | None = None) -> Pulled:
    """Fetch the manifest and every blob `have` does not report, verifying sha256 while streaming.

    Blobs land in `staging` (a store in a temp dir); a mismatch raises DigestMismatch and the
    partial file is removed. Nothing is registered here.
    """
    validate_target(target)
    with RegistryClient(target.base_url, target.repository, client) as reg:
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
        self._it = r.iter_raw(_READ)
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
                    name: str | None = None, client: httpx.Client | None = None) -> dict[str, Any]:
    """`ollama-ft install HOST:PORT/namespace/NAME:TAG`: pull (digests verified), then register.

    With --store DIR the model is written into that Ollama models directory (Ollama's layout);
    otherwise it goes to the local Ollama through its API (blobs, then /api/create).
    """
    target = parse_ref(ref, insecure)
    local = parse_name(name or f"{target.model}:{target.tag}")
    started = time.time()
    if store is not None:
        st = Store(store)
        with _staging_store(st.root) as staging:
            pulled = pull(target, staging, have=st.has_blob, client=client)
            path = install_into_store(pulled, st, local)
        result = {"model": local.display, "store": str(st.root), "manifest": str(path)}
    else:
        result = _install_via_api(target, local, host, client)
        pulled = result.pop("_pulled")
    result.update({"source": target.display, "manifest_digest": digest_bytes(pulled.manifest_bytes),
                   "bytes_downloaded": pulled.bytes_downloaded, "seconds": round(time.time() - started, 3)})
    ui.success(f"installed {target.display} as {local.display}")
    ui.out.print(f"chat with it:  ollama run {local.display}", highlight=False)
    return result


def _install_via_api(target: Target, local: ModelName, host: str | None,
                     client: httpx.Client | None) -> dict[str, Any]:
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
        with _staging_store(_install_tmp_root()) as staging:
            pulled = pull(target, staging, have=lambda d: ollama_api.head_blob(http, d), client=client)
            req = create_request(pulled)  # refuses layer kinds /api/create cannot express, before uploads
            uploaded = 0
            with ui.progress_bytes() as progress:
                for d in pulled.manifest["layers"]:
                    if _skippable(d) and not ollama_api.head_blob(http, d["digest"]):
                        task = progress.add_task(f"uploading {d['digest'][7:19]} to Ollama", total=d["size"])
                        uploaded += ollama_api.upload_blob(http, staging.blob_path(d["digest"]), d["digest"],
                                                           progress, task)
            statuses = ollama_api._create(api, local, req, url, Path(target.display))
    except httpx.TransportError as e:
        raise UserError(f"lost the connection to Ollama at {url}: {e}",
                        hint="check that `ollama serve` is running, then run `ollama-ft install` again") from None
    finally:
        http.close()
        api._client.close()
    return {"model": local.display, "host": url, "uploaded_bytes": uploaded, "create_statuses": statuses,
            "_pulled": pulled}


def _install_tmp_root() -> Path:
    import tempfile

    return Path(tempfile.gettempdir())


# -------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
