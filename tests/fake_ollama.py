"""A stand-in Ollama server for tests, faithful to ../shared/docs/ollama-contract.md section 1.

It listens on 127.0.0.1 (free port) in a thread, stores what it receives in Ollama's store
layout through `ollama_ft.ollama.store.Store`, and answers /api/chat and /api/generate by running
the stored model GGUF with llama-cpp-python on a prompt rendered from the STORED Go template
(Go's own text/template, via `ollama_ft.ollama.templates.render_go`). With no template layer it chats
natively on the GGUF's jinja template, as Ollama v0.30+ does (§6.3).

What it does not do: pull/push, safetensors conversion, template auto-detection from the GGUF
(§6.2), the v0.30 `llama-quantize COPY` re-write (it keeps the uploaded blob as the model layer,
like Ollama up to v0.24), the Host check.

Use the `fake_ollama` fixture (tests/conftest.py) or the `running_fake_ollama(store_dir)` context manager: `.url`, `.store_dir`, `.store`, `.requests` (one `Req` per request:
method, path, received body bytes, status) and fault switches:
  `.fail_create_midstream = "message"`  error line after the progress lines of /api/create
  `.fail_status[path] = (500, "message")`  answer that path with that status and JSON error
  `.drop_uploads = True`  the connection closes during a blob upload, with no answer
  `.prune_before_create = True`  the uploaded GGUF vanishes before /api/create reads it
  `.rewrite_template = fn`  store fn(TEMPLATE) instead of the TEMPLATE sent
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

from ollama_ft.core.errors import UserError
from ollama_ft.ollama.store import (
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    DigestMismatch,
    Layer,
    Store,
    build_config_blob,
    build_manifest,
    digest_bytes,
    gguf_facts,
    is_gguf,
    is_valid_digest,
    parse_name,
)

VERSION = "0.33.0-rc2"
_DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")


@dataclass
class Req:
    method: str
    path: str
    received: int  # request body bytes the server actually read
    status: int = 0


class _Fail(Exception):
    """An error answer: `status` applies if nothing was streamed yet (§1.1)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class FakeOllama:
    store_dir: Path
    url: str = ""
    requests: list[Req] = field(default_factory=list)
    fail_create_midstream: str | None = None
    fail_status: dict[str, tuple[int, str]] = field(default_factory=dict)
    drop_uploads: bool = False  # close the connection during POST /api/blobs, answering nothing
    prune_before_create: bool = False  # delete the `files` blobs when /api/create arrives (a prune)
    rewrite_template: Any = None  # callable(str) -> str applied to a stored TEMPLATE (a "newer server")
    n_ctx: int = 512
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _llms: dict[str, Any] = field(default_factory=dict)
    _llm_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.store = Store(self.store_dir)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeOllama:
        handler = type("H", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        for llm in self._llms.values():
            close = getattr(llm, "close", None)
            if close:
                close()
        self._llms.clear()

    # -- helpers for tests -------------------------------------------------------------------
    def bytes_received(self, prefix: str = "/api/blobs/", method: str = "POST") -> int:
        return sum(r.received for r in self.requests if r.method == method and r.path.startswith(prefix))

    def blob_bytes_received(self) -> int:
        """Body bytes the server read from POST /api/blobs/* (0 for a re-register that skips uploads)."""
        return self.bytes_received("/api/blobs/", "POST")

    def calls(self, method: str, prefix: str) -> list[Req]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def llm(self, gguf: Path):
        """One llama-cpp-python model per blob, loaded on first use (small context, fixed seed)."""
        key = str(gguf)
        if key not in self._llms:
            from llama_cpp import Llama

            # One thread: on a shared, oversubscribed CPU, ggml's spinning threads are 50x slower.
            self._llms[key] = Llama(model_path=key, n_ctx=self.n_ctx, seed=0, n_threads=1, n_threads_batch=1,
                                    n_batch=self.n_ctx, verbose=False)
        return self._llms[key]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _go_quote(s: str) -> str:
    """Go's %#v of a string (strconv.Quote): printable runes kept, the rest escaped."""
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _go_value(v: Any) -> str:
    """Go's %#v of a JSON-decoded value. Numbers are float64, printed like strconv 'g' shortest:
    4096 -> 4096, 0.7 -> 0.7, 1000000 -> 1e+06, 0.00001 -> 1e-05."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _go_quote(v)
    if isinstance(v, (int, float)):
        import decimal

        d = decimal.Decimal(repr(float(v)))
        exp = d.adjusted()
        if exp < -4 or exp >= 6:
            digits = "".join(map(str, d.as_tuple().digits)).rstrip("0") or "0"
            mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
            return f"{'-' if d < 0 else ''}{mant}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
        s = format(d, "f")
        return s.rstrip("0").rstrip(".") if "." in s else s
    return json.dumps(v)


def format_parameters(params: dict[str, Any]) -> str:
    """`/api/show` parameters text: `%-30s %#v` per value, one line per stop string."""
    lines = []
    for k in sorted(params):  # Go ranges over a map (random order); sorted is one valid order
        v = params[k]
        for item in (v if isinstance(v, list) else [v]):
            lines.append(f"{k:<30} {_go_value(item)}")
    return "\n".join(lines)


def _basic_template_check(t: str) -> str | None:
    """A cheap stand-in for Go's template.Parse: balanced actions and block keywords."""
    if t.count("{{") != t.count("}}"):
        return "template: :1: unclosed action"
    depth = 0
    for m in re.finditer(r"\{\{-?\s*(if|range|with|block|define|end)\b", t):
        depth += -1 if m.group(1) == "end" else 1
        if depth < 0:
            return "template: :1: unexpected {{end}}"
    if depth:
        return "template: :1: unexpected EOF"
    return None


def _valid_path(p: str) -> bool:
    """Go's fs.ValidPath: relative, '/'-separated, no '.', '..' or empty elements."""
    if p == ".":
        return True
    if not p or p.startswith("/") or p.endswith("/") or "\\" in p:
        return False
    return all(e not in ("", ".", "..") for e in PurePosixPath(p).parts) and "//" not in p


# -------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOllama
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate small writes

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _begin(self) -> Req:
        req = Req(self.command, self.path.split("?", 1)[0], 0)
        self.fake.requests.append(req)
        self._req = req
        self._streaming = False
        return req

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = self._read_chunked()
        else:
            data = self.rfile.read(n) if n else b""
        self._req.received += len(data)
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        return b"".join(parts)

    def _json_body(self) -> dict[str, Any]:
        raw = self._body()
        try:
            data = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise _Fail(f"invalid character in request body: {e.msg}", 400) from None
        if not isinstance(data, dict):
            raise _Fail("json: cannot unmarshal into request", 400)
        return data

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", close: bool = False) -> None:
        self._req.status = status
        self.send_response(status)
        if body or ctype:
            self.send_header("Content-Type", ctype if body else "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._send(status, json.dumps({"error": message}).encode(), close=close)

    def _stream_start(self) -> None:
        self._req.status = 200
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _stream_line(self, obj: Any) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream_end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _route(self, method: str) -> None:
        req = self._begin()
        path = req.path
        fail = self.fake.fail_status.get(path)
        try:
            if fail:
                if method in ("POST", "PUT", "DELETE") and not path.startswith("/api/blobs/"):
                    self._body()
                self._error(fail[0], fail[1], close=True)
                return
            if path == "/" and method in ("GET", "HEAD"):
                self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
            elif path == "/api/version" and method in ("GET", "HEAD"):
                self._json(200, {"version": VERSION})
            elif path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
                self._blob(method, path[len("/api/blobs/"):])
            elif path == "/api/create" and method == "POST":
                self._create()
            elif path == "/api/show" and method == "POST":
                self._show()
            elif path == "/api/tags" and method in ("GET", "HEAD"):
                self._tags()
            elif path == "/api/delete" and method == "DELETE":
                self._delete()
            elif path in ("/api/chat", "/api/generate") and method == "POST":
                self._generate(chat=path == "/api/chat")
            elif path.startswith("/api/"):
                # gin's own answers are plain text (§1.1)
                self._send(404, b"404 page not found", "text/plain; charset=utf-8")
            else:
                self._send(404, b"404 page not found", "text/plain; charset=utf-8")
        except _Fail as e:
            if self._streaming:
                self._stream_line({"error": e.message})
                self._stream_end()
            else:
                self._error(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):  # noqa: N802
        self._route("GET")

    def do_HEAD(self):  # noqa: N802
        self._route("HEAD")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_DELETE(self):  # noqa: N802
        self._route("DELETE")

    # -- blobs (§1.2) ------------------------------------------------------------------------
    def _blob(self, method: str, digest: str) -> None:
        store = self.fake.store
        if not _DIGEST_RE.match(digest):
            if method == "POST":
                self.close_connection = True
            self._error(400, "invalid digest format", close=method == "POST")
            return
        if method == "HEAD":
            if store.has_blob(digest):
                self._send(200, b"", ctype="")
            else:
                self._error(404, f'blob "{digest}" not found')
            return
        if store.has_blob(digest):
            # The body is not read; the connection cannot be reused after an unread body.
            self._send(200, b"", ctype="", close=True)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if self.fake.drop_uploads:  # a server that dies mid-upload
            self._req.received += len(self.rfile.read(min(length, 1024)))
            self.close_connection = True
            return
        counting = _CountingReader(self.rfile, self._req)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            import io

            counting = _CountingReader(io.BytesIO(self._read_chunked()), self._req)
            length = None
        try:
            store.add_blob_stream(counting, expected_digest=digest, keep_on_mismatch=True, length=length)
        except DigestMismatch as e:
            self._error(400, f'digest mismatch, expected "{digest}", got "{e.actual}"')
            return
        self._send(201, b"", ctype="")

    # -- create (§1.3) -----------------------------------------------------------------------
    def _create(self) -> None:
        r = self._json_body()
        stream = r.get("stream", True) is not False
        model = r.get("model") or r.get("name") or ""
        try:
            name = parse_name(model)
        except UserError:
            raise _Fail("invalid model name", 400) from None
        files = r.get("files") or {}
        base = r.get("from") or ""
        if not files and not base:
            raise _Fail("neither 'from' or 'files' was specified", 400)
        for key, dig in files.items():
            if not _valid_path(key):
                raise _Fail("file path must be relative", 400)
            if not dig:
                raise _Fail("invalid digest format", 400)
        ggufs = {k: v for k, v in files.items() if k.endswith(".gguf")}
        others = {k: v for k, v in files.items() if not k.endswith((".gguf", ".safetensors"))}
        for _key, dig in others.items():
            if not (is_valid_digest(dig) and is_gguf(self.fake.store.blob_path(dig))):
                raise _Fail("unknown type", 400)
            ggufs[_key] = dig
        if any(k.endswith(".safetensors") for k in files):
            raise _Fail("the stand-in server does not convert safetensors", 500)

        lines: list[dict[str, Any]] = []
        if stream:
            self._stream_start()

        def emit(obj: dict[str, Any]) -> None:
            lines.append(obj)
            if stream:
                self._stream_line(obj)

        try:
            self._create_model(r, name, base, ggufs, emit)
        except _Fail as e:
            if stream:
                self._stream_line({"error": e.message})
                self._stream_end()
                return
            raise
        if stream:
            self._stream_end()
        else:
            self._json(200, lines[-1])

    def _create_model(self, r: dict[str, Any], name, base: str, ggufs: dict[str, str], emit) -> None:
        store = self.fake.store
        layers: list[Layer] = []
        inherited_params: dict[str, Any] = {}
        inherited_licenses: list[Layer] = []
        keep: dict[str, Layer] = {}
        if base:
            try:
                base_name = parse_name(base)
            except UserError:
                raise _Fail("invalid model name", 400) from None
            if not store.has_manifest(base_name):
                emit({"status": "pulling manifest"})
                raise _Fail("pull model manifest: file does not exist", 500)
            for layer in store.layers(base_name):
                if layer.media_type == MEDIA_PARAMS:
                    inherited_params = json.loads(store.read_blob_bytes(layer.digest))
                elif layer.media_type == MEDIA_LICENSE:
                    inherited_licenses.append(layer)
                elif layer.media_type in (MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_MESSAGES):
                    keep[layer.media_type] = layer
                else:
                    layers.append(Layer(layer.media_type, layer.digest, layer.size, base_name.display))
        if self.fake.prune_before_create:
            for dig in ggufs.values():
                if is_valid_digest(dig) and store.has_blob(dig):
                    store.blob_path(dig).unlink()
        if ggufs:
            emit({"status": "parsing GGUF"})
        facts = None
        for key, dig in ggufs.items():
            if not is_valid_digest(dig):
                raise _Fail("invalid digest format", 500)
            path = store.blob_path(dig)
            if not path.exists():
                raise _Fail(f"open {path}: no such file or directory", 500)
            if not is_gguf(path):
                raise _Fail("supplied file was not in GGUF format", 400)
            facts = gguf_facts(path)
            media = MEDIA_MODEL
            if facts["general_type"] == "adapter":
                from ollama_ft.ollama.store import MEDIA_ADAPTER

                media = MEDIA_ADAPTER
            layers.append(Layer(media, dig, path.stat().st_size, key))
            emit({"status": f"using existing layer {dig}"})

        template = r.get("template")
        if template:
            problem = _basic_template_check(template)
            if problem:
                raise _Fail(f"template error: {problem}", 400)

        def text_layer(media: str, data: bytes) -> Layer:
            exists = store.has_blob(digest_bytes(data))
            d = store.add_blob_bytes(data)
            emit({"status": f"{'using existing' if exists else 'creating new'} layer {d}"})
            return Layer(media, d, len(data))

        if template:
            if self.fake.rewrite_template:
                template = self.fake.rewrite_template(template)
            keep[MEDIA_TEMPLATE] = text_layer(MEDIA_TEMPLATE, template.encode())
        if r.get("system"):
            keep[MEDIA_SYSTEM] = text_layer(MEDIA_SYSTEM, r["system"].encode())
        licenses = list(inherited_licenses)
        lic = r.get("license")
        for text in ([lic] if isinstance(lic, str) else list(lic or [])):
            licenses.append(text_layer(MEDIA_LICENSE, text.encode()))
        params = dict(inherited_params)
        params.update(r.get("parameters") or {})
        if r.get("messages"):
            msgs = [{"role": m.get("role"), "content": m.get("content", "")} for m in r["messages"]]
            keep[MEDIA_MESSAGES] = text_layer(MEDIA_MESSAGES, json.dumps(msgs).encode())
        for media in (MEDIA_TEMPLATE, MEDIA_SYSTEM):
            if media in keep:
                layers.append(keep[media])
        layers.extend(licenses)
        if params:
            layers.append(text_layer(MEDIA_PARAMS, json.dumps(params).encode()))
        if MEDIA_MESSAGES in keep:
            layers.append(keep[MEDIA_MESSAGES])

        if self.fake.fail_create_midstream:
            raise _Fail(self.fake.fail_create_midstream, 500)

        if facts is None:
            model_layer = next((la for la in reversed(layers) if la.media_type == MEDIA_MODEL), None)
            facts = gguf_facts(store.blob_path(model_layer.digest)) if model_layer else {
                "architecture": "unknown", "parameter_size": "", "file_type": "unknown"}
        cfg = build_config_blob("gguf", facts["architecture"], [facts["architecture"]],
                                facts.get("parameter_size", ""), facts.get("file_type", ""))
        cfg_digest = store.add_blob_bytes(cfg)
        emit({"status": "writing manifest"})
        store.write_manifest(name, build_manifest(Layer(MEDIA_CONFIG, cfg_digest, len(cfg)), layers))
        emit({"status": "success"})

    # -- show / tags / delete (§1.4) ---------------------------------------------------------
    def _lookup(self, model: str):
        try:
            name = parse_name(model)
        except UserError:
            raise _Fail(f"model '{model}' not found", 404) from None
        if not self.fake.store.has_manifest(name):
            raise _Fail(f"model '{model}' not found", 404)
        return name

    def _model_parts(self, name) -> dict[str, Any]:
        store = self.fake.store
        manifest, raw = store.read_manifest(name)
        out: dict[str, Any] = {"template": "", "system": "", "license": [], "params": {}, "messages": [],
                               "model_layer": None, "manifest": manifest, "raw": raw}
        for x in manifest.get("layers", []):
            layer = Layer.from_json(x)
            data = store.read_blob_bytes(layer.digest) if layer.media_type != MEDIA_MODEL else b""
            if layer.media_type == MEDIA_MODEL:
                out["model_layer"] = layer
            elif layer.media_type in (MEDIA_TEMPLATE, "application/vnd.ollama.image.prompt"):
                out["template"] = data.decode()
            elif layer.media_type == MEDIA_SYSTEM:
                out["system"] = data.decode()
            elif layer.media_type == MEDIA_LICENSE:
                out["license"].append(data.decode())
            elif layer.media_type == MEDIA_PARAMS:
                out["params"] = json.loads(data)
            elif layer.media_type == MEDIA_MESSAGES:
                out["messages"] = json.loads(data)
        cfg = json.loads(store.read_blob_bytes(manifest["config"]["digest"]))
        out["details"] = {
            "parent_model": (out["model_layer"].from_ or "") if out["model_layer"] else "",
            "format": cfg.get("model_format", "gguf"),
            "family": cfg.get("model_family", ""),
            "families": cfg.get("model_families"),
            "parameter_size": cfg.get("model_type", ""),
            "quantization_level": cfg.get("file_type", ""),
        }
        out["size"] = manifest["config"]["size"] + sum(x["size"] for x in manifest.get("layers", []))
        return out

    def _show(self) -> None:
        r = self._json_body()
        model = r.get("model") or r.get("name") or ""
        if not model:
            raise _Fail("model is required", 400)
        name = self._lookup(model)
        p = self._model_parts(name)
        store = self.fake.store
        model_info: dict[str, Any] = {}
        blob = ""
        if p["model_layer"]:
            blob = str(store.blob_path(p["model_layer"].digest))
            kv = gguf_facts(blob)["kv"]
            model_info = {k: v for k, v in kv.items() if k not in ("general.name", "tokenizer.chat_template")}
            if not r.get("verbose"):
                model_info = {k: ([] if isinstance(v, list) and len(v) > 5 else v) for k, v in model_info.items()}
        mf = ['# Modelfile generated by "ollama show"',
              "# To build a new Modelfile based on this, replace FROM with:",
              f"# FROM {name.display}", "", f"FROM {blob}"]
        if p["template"]:
            mf.append(f'TEMPLATE """{p["template"]}"""')
        if p["system"]:
            mf.append(f'SYSTEM """{p["system"]}"""')
        for k in sorted(p["params"]):
            v = p["params"][k]
            for item in (v if isinstance(v, list) else [v]):
                mf.append(f"PARAMETER {k} {item}")
        for lic in p["license"]:
            mf.append(f'LICENSE """{lic}"""')
        for m in p["messages"]:
            mf.append(f"MESSAGE {m['role']} {m['content']}")
        caps = ["completion"]
        if ".Tools" in p["template"]:
            caps.append("tools")
        mtime = store.manifest_path(name).stat().st_mtime
        self._json(200, {
            "license": "\n".join(p["license"]),
            "modelfile": "\n".join(mf) + "\n",
            "parameters": format_parameters(p["params"]),
            "template": p["template"],
            "system": p["system"],
            "details": p["details"],
            "messages": p["messages"],
            "model_info": model_info,
            "capabilities": caps,
            "modified_at": _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(),
        })

    def _tags(self) -> None:
        store = self.fake.store
        models = []
        for name in store.list_models():
            p = self._model_parts(name)
            mtime = store.manifest_path(name).stat().st_mtime
            models.append({
                "name": name.display, "model": name.display,
                "modified_at": _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(),
                "size": p["size"], "digest": hashlib.sha256(p["raw"]).hexdigest(), "details": p["details"],
            })
        self._json(200, {"models": models})

    def _delete(self) -> None:
        r = self._json_body()
        model = r.get("model") or r.get("name") or ""
        name = self._lookup(model)
        self.fake.store.delete_model(name)
        self._send(200, b"", ctype="")

    # -- generate / chat (§1.4) --------------------------------------------------------------
    def _generate(self, chat: bool) -> None:
        r = self._json_body()
        model = r.get("model") or ""
        name = self._lookup(model)
        p = self._model_parts(name)
        if p["model_layer"] is None:
            raise _Fail(f'"{model}" does not support {"chat" if chat else "generate"}', 400)
        stream = r.get("stream", True) is not False
        opts = dict(p["params"])
        opts.update(r.get("options") or {})
        # Stored MESSAGEs go before the request's; the stored SYSTEM is prepended unless the
        # conversation starts with a system message (generate: the request's `system` wins).
        if chat:
            msgs = list(p["messages"]) + [{"role": str(m.get("role", "")).lower(), "content": m.get("content", "")}
                                          for m in r.get("messages") or []]
            system = p["system"]
        else:
            if r.get("raw") and (r.get("template") or r.get("system") or r.get("context")):
                raise _Fail("raw mode does not support template, system, or context", 400)
            msgs = [{"role": "user", "content": r.get("prompt", "")}]
            system = r.get("system") or p["system"]
        gguf = self.fake.store.blob_path(p["model_layer"].digest)
        t0 = time.monotonic_ns()
        llm = self.fake.llm(gguf)
        load_ns = time.monotonic_ns() - t0
        template = r.get("template") or p["template"]
        if not chat and r.get("raw"):
            prompt = r.get("prompt", "")
        elif template:
            from ollama_ft.ollama.templates import render_go

            try:
                prompt = render_go(template, msgs, system=system or None)
            except UserError as e:
                raise _Fail(f"template: {e.message}", 500) from None
        else:
            prompt = None  # native chat on the GGUF's jinja template (§6.3)
            if system and not (msgs and msgs[0]["role"] == "system"):
                msgs.insert(0, {"role": "system", "content": system})

        stop = opts.get("stop") or []
        if isinstance(stop, str):
            raise _Fail('option "stop" must be of type array', 500)
        num_predict = int(opts.get("num_predict", -1))
        kwargs = dict(max_tokens=num_predict if num_predict > 0 else None, stop=list(stop),
                      temperature=float(opts.get("temperature", 0.8)), top_k=int(opts.get("top_k", 40)),
                      top_p=float(opts.get("top_p", 0.9)), repeat_penalty=float(opts.get("repeat_penalty", 1.0)),
                      seed=int(opts.get("seed", 0)) if int(opts.get("seed", 0)) >= 0 else 0)
        if stream:
            self._stream_start()

        def line(text: str, done: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": model, "created_at": _now()}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj["done"] = done
            obj.update(extra or {})
            return obj

        pieces: list[str] = []
        finish = "stop"
        n_prompt = 0
        n_eval = 0
        t1 = time.monotonic_ns()
        with self.fake._llm_lock:
            llm.reset()
            if prompt is not None:
                n_prompt = len(llm.tokenize(prompt.encode(), special=True))
                it = llm.create_completion(prompt, stream=True, **kwargs)
                get = lambda c: c["choices"][0].get("text", "")  # noqa: E731
            else:
                it = llm.create_chat_completion(messages=msgs, stream=True, **kwargs)
                get = lambda c: c["choices"][0].get("delta", {}).get("content", "") or ""  # noqa: E731
            for chunk in it:
                piece = get(chunk)
                fr = chunk["choices"][0].get("finish_reason")
                if piece:
                    n_eval += 1
                    pieces.append(piece)
                    if stream:
                        self._stream_line(line(piece, False))
                if fr:
                    finish = "length" if fr == "length" else "stop"
        total = time.monotonic_ns() - t0
        final = {"done_reason": finish, "total_duration": total, "load_duration": load_ns,
                 "prompt_eval_count": n_prompt, "prompt_eval_duration": 0, "eval_count": n_eval,
                 "eval_duration": time.monotonic_ns() - t1}
        if not chat:
            final["context"] = []
        if stream:
            self._stream_line(line("", True, final))
            self._stream_end()
        else:
            self._json(200, line("".join(pieces), True, final))


class _CountingReader:
    """Reads from the socket and counts body bytes into the request log."""

    def __init__(self, raw, req: Req):
        self.raw = raw
        self.req = req

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        self.req.received += len(b)
        return b


@contextlib.contextmanager
def running_fake_ollama(store_dir: Path) -> Iterator[FakeOllama]:
    """A started stand-in server with its store at `store_dir`; stopped on exit."""
    fake = FakeOllama(store_dir=Path(store_dir)).start()
    try:
        yield fake
    finally:
        fake.stop()

