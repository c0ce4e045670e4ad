"""What `publish` sends: a model's manifest and where each blob's bytes are, from a run or an Ollama store.

`resolve_source(NAME, store)` decides: a run (runs/NAME or a run directory whose export and
modelfile stages are done) is turned into Ollama's layers the way `register` would create them;
anything else is a model in an Ollama store, pushed exactly as stored (same manifest bytes, so
the same model ID on the other side).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import sha256_file
from ..core.names import parse_name
from ..core.runs import Run
from .store import (
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Layer,
    Store,
    build_config_blob,
    build_manifest,
    default_store_dir,
    digest_bytes,
    gguf_facts,
    is_valid_digest,
)

STATE_FILE = ".publish-state.json"  # upload URLs and offsets for resume, beside the run or the store


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
        b = io.BytesIO(self.data or b"")
        b.seek(offset)
        return b


@dataclass
class PushSource:
    """A model ready to push: its blobs, the manifest bytes, and what it came from (a run or a store)."""

    config: Blob
    layers: list[Blob]
    manifest: bytes
    origin: str  # for messages: "run runs/demo" / "Ollama store ~/.ollama/models (demo:latest)"
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


def source_from_store(store: Store, name: str) -> PushSource:
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
    return PushSource(config=blobs[-1], layers=blobs[:-1], manifest=data,
                    origin=f"Ollama store {store.root} ({mname.display})",
                    state_path=store.root / STATE_FILE, default_model=mname.model, default_tag=mname.tag)


def _run_model_name(run: Run) -> tuple[str, str]:
    e = run.entry("modelfile") or {}
    settings = e.get("settings") or {}
    name = str(settings.get("name") or run.root.name)
    tag = str((settings.get("ollama") or {}).get("tag") or "latest")
    # `ollama.name` may carry a namespace or a tag ("team/demo:v2"), as register accepts it.
    n = parse_name(name if name.rfind(":") > name.rfind("/") else f"{name}:{tag}")
    return n.model, n.tag


def source_from_run(run: Run) -> PushSource:
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
    # to_create_request hashed the files already; push.verify_source hashes them again right before sending.
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
    return PushSource(config=config, layers=layers, manifest=manifest, origin=f"run {run.root}",
                    state_path=run.root / STATE_FILE, default_model=model, default_tag=tag, run=run)


def _go_json_compact(obj: Any) -> bytes:
    """Go's json.Marshal (no trailing newline; map keys sorted), as Ollama writes params/messages layers."""
    from .store import go_json

    return go_json(json.loads(json.dumps(obj, sort_keys=True)))[:-1]


def _check_export_digest(run: Run, gguf: Path, digest: str | None = None) -> None:
    """The GGUF must be the one the export stage recorded (sha256 in manifest.json)."""
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


def resolve_source(name: str, store: Path | None, runs_dir: str | Path = "runs") -> PushSource:
    """NAME is a run (runs/NAME or a run dir with export+modelfile done) or a model in an Ollama store."""
    if store is None:
        p = Path(name)
        run_dir = p if p.is_dir() else Path(runs_dir) / name
        if (run_dir / "manifest.json").is_file():
            run = Run(run_dir)
            if run.entry("export") and run.entry("modelfile"):
                return source_from_run(run)
            raise UserError(f"run {run_dir} has not finished export and modelfile",
                            hint=f"run `ollama-ft train CONFIG --until modelfile` (or `ollama-ft modelfile {run_dir}`)")
    st = Store(store if store is not None else default_store_dir())
    if store is not None and not st.root.is_dir():
        raise UserError(f"--store {store}: no such directory", hint="point --store at an Ollama models directory "
                        "(the one holding manifests/ and blobs/, e.g. ~/.ollama/models)")
    if not st.root.is_dir():
        raise UserError(f"{name!r} is neither a run under {runs_dir}/ nor a model: the Ollama store {st.root} does not exist",
                        hint="give a run name, or --store DIR pointing at an Ollama models directory")
    return source_from_store(st, name)
