"""The only module that talks to an Ollama server (HTTP API, ../shared/docs/ollama-contract.md §1 and §3).

Registration does what `ollama create -f modelfiles/<name>.Modelfile` does, but carefully:
validate the name (§4.4) before anything else, HEAD each blob and upload only missing ones
(a re-register of a 4 GB model sends nothing), POST the structured /api/create and show its
NDJSON progress, then verify with /api/show (template and parameters as sent) and one chat.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import human_bytes
from ..core.names import ModelName, parse_name
from .compat import gguf_template_override_risk, refuse_newer_parameters, refuse_unloadable_adapters

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
UPLOAD_CHUNK = 1 << 20
VERIFY_PROMPT = "Hello! Who are you?"


# -------------------------------------------------------------------------------------------
# Host and reachability


def resolve_host(host: str | None) -> str:
    """`--host` flag, else $OLLAMA_HOST, else http://127.0.0.1:11434, normalised like ollama-python.

    A bare host gets port 11434 (`example.com` -> `http://example.com:11434`); an explicit
    scheme without a port gets that scheme's default port; a trailing slash is dropped.
    """
    raw = (host or os.environ.get("OLLAMA_HOST") or "").strip()
    if not raw:
        return DEFAULT_HOST
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    if scheme not in ("http", "https"):
        raise UserError(f"Ollama host {raw!r} has an unsupported scheme {scheme!r}",
                        hint="use http://HOST:PORT, e.g. http://127.0.0.1:11434")
    hostport, _, path = rest.partition("/")
    default_port = DEFAULT_PORT if not sep else (443 if scheme == "https" else 80)
    if hostport.startswith("[") and "]" not in hostport:
        raise UserError(f"Ollama host {raw!r} has an unclosed IPv6 bracket", hint="e.g. http://[::1]:11434")
    if hostport.startswith("["):  # IPv6 literal
        end = hostport.find("]")
        h, port = hostport[: end + 1], hostport[end + 2:] if hostport[end + 1:end + 2] == ":" else ""
    else:
        h, _, port = hostport.partition(":")
    h = h or "127.0.0.1"
    if (port and not (port.isdigit() and 0 < int(port) < 65536)) or (h.startswith("[") and not h.endswith("]")):
        what = f"an invalid port {port!r}" if port else "an unclosed IPv6 bracket"
        raise UserError(f"Ollama host {raw!r} has {what}", hint="e.g. http://127.0.0.1:11434")
    if any(c.isspace() for c in h):
        raise UserError(f"Ollama host {raw!r} has a space in the host name", hint="e.g. http://127.0.0.1:11434")
    url = f"{scheme}://{h}:{port or default_port}"
    path = path.strip("/")
    return f"{url}/{path}" if path else url


def is_reachable(host: str, timeout: float = 2.0) -> bool:
    """True when GET /api/version answers 200 within `timeout` seconds."""
    import httpx

    try:
        r = httpx.get(f"{host}/api/version", timeout=timeout)
    except Exception:  # refused, timed out, bad URL, blocked socket: all mean "not reachable"
        return False
    return r.status_code == 200


def server_version(host: str, timeout: float = 5.0) -> str | None:
    import httpx

    try:
        r = httpx.get(f"{host}/api/version", timeout=timeout)
        return r.json().get("version") if r.status_code == 200 else None
    except (httpx.HTTPError, OSError, ValueError):
        return None


def manual_register_hint(name: str, modelfile_path: Path | str | None) -> str:
    """What to do when Ollama is not reachable: start it, or register by hand with the CLI."""
    mf = Path(modelfile_path) if modelfile_path else Path("modelfiles") / f"{Path(str(name)).name}.Modelfile"
    try:
        mf = mf.relative_to(Path.cwd())
    except ValueError:
        pass
    return (f"start Ollama with `ollama serve` (or set OLLAMA_HOST / --host to where it runs), then run "
            f"`ollama-ft register` again; or register by hand: `ollama create {name} -f {mf}`")


def _unreachable(host: str, name: str, modelfile_path: Path | str | None) -> UserError:
    return UserError(f"cannot connect to Ollama at {host} (connection refused or timed out)",
                     hint=manual_register_hint(name, modelfile_path))


def _http_error(what: str, status: int, text: str) -> UserError:
    try:
        text = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        pass
    return UserError(f"Ollama refused {what} (HTTP {status}): {str(text).strip() or '(empty answer)'}")


# -------------------------------------------------------------------------------------------
# Blobs


def head_blob(http, digest: str) -> bool:
    """True if the server already has the blob (200), False on 404; anything else is an error."""
    r = http.head(f"/api/blobs/{digest}")
    if r.status_code == 200:
        return True
    if r.status_code == 404:
        return False
    raise _http_error(f"HEAD /api/blobs/{digest}", r.status_code, r.text)


def upload_blob(http, path: Path, digest: str, progress=None, task=None) -> int:
    """POST the file to /api/blobs/<digest>, streamed in 1 MiB chunks. Returns bytes sent."""
    size = path.stat().st_size
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        with open(path, "rb") as f:
            while b := f.read(UPLOAD_CHUNK):
                sent += len(b)
                if progress is not None:
                    progress.update(task, advance=len(b))
                yield b

    r = http.post(f"/api/blobs/{digest}", content=chunks(),
                  headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
    if r.status_code not in (200, 201):
        raise _http_error(f"the upload of {path.name} ({digest})", r.status_code, r.text)
    return sent


# -------------------------------------------------------------------------------------------
# The create request from the run's Modelfile


def model_name_for(cfg) -> ModelName:
    """`ollama.name` (or the run name) plus `ollama.tag` unless the name carries one; validated."""
    raw = cfg.ollama_name
    if raw.rfind(":") <= raw.rfind("/"):
        raw = f"{raw}:{cfg.ollama.tag}"
    return parse_name(raw)


def load_create_request(modelfile_path: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Parse the Modelfile (Ollama's grammar) and build the structured create request, as
    `ollama create -f` does (§3). Returns (fields without `model`, {digest: local file})."""
    from .modelfile import parse_file

    mf = parse_file(modelfile_path)
    req = mf.to_create_request(modelfile_path.parent)
    fields, blobs = dict(req.fields), dict(req.blobs)
    if not fields.get("files"):
        raise UserError(f"{modelfile_path}: FROM {mf.from_!r} is not an existing local file "
                        f"(resolved against {modelfile_path.parent})",
                        hint="run `ollama-ft export RUN` and `ollama-ft modelfile RUN --force` to write it again")
    unsupported = sorted(k for k in ("draft_files", "renderer", "parser", "requires") if fields.get(k))
    if unsupported:
        raise UserError(f"{modelfile_path}: {', '.join(unsupported)} cannot be sent through the ollama client",
                        hint="remove those lines, or register with `ollama create -f` instead")
    return fields, blobs


# -------------------------------------------------------------------------------------------
# Registration


def _check_gguf_blobs(run, local: dict[str, Path]) -> None:
    """Refuse GGUFs that are damaged (structure check) or differ from what the export stage verified."""
    from ..core.gguf_meta import check_gguf

    exported = {}
    e = run.entry("export")
    if e:
        gdir = run.root / "gguf"
        exported = {str((gdir / rel).resolve()): sha for rel, sha in e.get("outputs", {}).items()}
    for digest, path in local.items():
        if not str(path).endswith(".gguf"):
            continue
        check_gguf(path)
        want = exported.get(str(Path(path).resolve()))
        if want and digest.split(":", 1)[-1] != want:
            raise UserError(f"{path} changed since the export stage verified it (sha256 {digest[7:19]}… "
                            f"vs {want[:12]}…)",
                            hint=f"re-export it: `ollama-ft export {run.root} --force`")


def gate_refusal(run) -> str | None:
    """Why the eval stage's gate refuses registration, or None when it passed (or eval did not run)."""
    e = run.entry("eval")
    gate = ((e or {}).get("info") or {}).get("gate") if e else None
    if isinstance(gate, dict) and gate.get("passed") is False:
        return gate.get("reason") or "the tuned model did worse than the base model"
    return None


def gate_override_hint(run) -> str:
    return f"see {run.root}/report/report.html; register anyway with `ollama-ft register {run.root} --force`"


def check_gate(run, gate_force: bool = False) -> None:
    """Raise the gate's refusal (its reason and the deliberate override) unless gate_force."""
    reason = gate_refusal(run)
    if reason is not None and not gate_force:
        raise UserError(f"the evaluation gate refused this model: {reason}", hint=gate_override_hint(run))


def register_run(cfg, run, host: str, gate_force: bool = False) -> dict[str, Any]:
    """Register the run's Modelfile + GGUF in Ollama at `host`; verify it; return the stage info."""
    import httpx
    import ollama

    t0 = time.time()
    name = model_name_for(cfg)  # before any upload
    check_gate(run, gate_force)
    mf_entry = run.entry("modelfile")
    if not mf_entry:
        raise UserError(f"no Modelfile for {run.root}", hint=f"run `ollama-ft modelfile {run.root}` first")
    modelfile_path = Path(mf_entry["info"]["modelfile"])
    if not modelfile_path.is_absolute() and not modelfile_path.exists():
        modelfile_path = run.root / modelfile_path
    if not modelfile_path.is_file():
        raise UserError(f"the Modelfile {modelfile_path} is missing",
                        hint=f"run `ollama-ft modelfile {run.root} --force` to write it again")
    req, local = load_create_request(modelfile_path)
    _check_gguf_blobs(run, local)  # a truncated or corrupted GGUF is never registered
    override = gguf_template_override_risk(req, local)

    http = httpx.Client(base_url=host, timeout=httpx.Timeout(30.0, read=600.0, write=600.0))
    client = ollama.Client(host=host, timeout=httpx.Timeout(30.0, read=600.0))
    try:
        version = _server_version(http)
        refuse_unloadable_adapters(req, local, version)
        refuse_newer_parameters(req, version)
        uploaded, skipped = _sync_blobs(http, local, host, name, modelfile_path)
        statuses = create_model(client, name, req)
        verify = _verify(http, client, name, req)
        verify["served_prompt"] = verify_served_prompt(http, name.display, req, required=cfg.ollama.verify_prompt)
        digest = _manifest_digest(client, name)
    except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError):
        raise _unreachable(host, name.display, modelfile_path) from None
    except httpx.TimeoutException as e:
        raise UserError(f"Ollama at {host} stopped answering ({type(e).__name__})",
                        hint="check the server log (`journalctl -u ollama` or the `ollama serve` terminal)") from None
    except httpx.TransportError as e:
        raise UserError(f"lost the connection to Ollama at {host}: {e or type(e).__name__}",
                        hint="check that `ollama serve` is still running, then run `ollama-ft register` again; "
                             "blobs already uploaded are not sent twice") from None
    finally:
        http.close()
        client._client.close()
    seconds = round(time.time() - t0, 2)
    summary = (f"{name.display} registered at {host}: "
               f"{'no upload needed (blobs already there)' if skipped else f'{human_bytes(uploaded)} uploaded'}; "
               f"show matches; chat answered {len(verify['chat_reply'])} characters")
    return {
        "model": name.display,
        "host": host,
        "digest": digest,
        "uploaded_bytes": uploaded,
        "skipped_upload": skipped,
        "create_statuses": statuses,
        "gguf_template_override_risk": override,
        "verify": verify,
        "seconds": seconds,
        "summary": summary,
    }


def _server_version(http) -> str | None:
    try:
        r = http.get("/api/version")
        return str(r.json().get("version")) if r.status_code == 200 else None
    except Exception:  # an old server without /api/version: nothing to gate on
        return None


def _sync_blobs(http, local: dict[str, Path], host: str, name: ModelName, modelfile_path: Path) -> tuple[int, bool]:
    """HEAD every blob; upload the missing ones with a byte progress bar."""
    # The digests were computed from these files just now (Modelfile.to_create_request).
    missing = [(digest, path) for digest, path in local.items() if not head_blob(http, digest)]
    if not missing:
        ui.success(f"blobs already in Ollama at {host}: nothing to upload")
        return 0, True
    sent = 0
    t0 = time.time()
    with ui.progress_bytes() as prog:
        for digest, path in missing:
            size = path.stat().st_size
            if not ui.err.is_terminal:
                ui.info(f"uploading {path.name} ({human_bytes(size)}) to {host}")
            task = prog.add_task(f"uploading {path.name}", total=size)
            sent += upload_blob(http, path, digest, prog, task)
    ui.success(f"uploaded {human_bytes(sent)} in {time.time() - t0:.1f}s")
    return sent, False


def create_model(client, name: ModelName, req: dict[str, Any], host: str = "", modelfile_path: Path | None = None
                 ) -> list[str]:
    """POST /api/create (structured fields of `req`) streaming through the official client; show the
    NDJSON progress; require a final `success`. Returns the status lines. (`host` and
    `modelfile_path` are accepted for callers' convenience and not used.)"""
    import ollama

    kwargs = {k: req[k] for k in ("files", "adapters", "template", "license", "system", "parameters", "messages")
              if req.get(k)}
    if req.get("from"):
        kwargs["from_"] = req["from"]
    # Config fields a real Ollama writes (renderer, parser, requires) that the official client cannot send.
    extra = {k: req[k] for k in ("renderer", "parser", "requires", "remote_host") if req.get(k)}
    statuses: list[str] = []
    try:
        with ui.progress_bytes() as prog:
            task = prog.add_task(f"creating {name.display}", total=None)
            progress = (_create_with_config_fields(client, name.display, kwargs, extra) if extra
                        else client.create(model=name.display, stream=True, **kwargs))
            for p in progress:
                status = p.status or ""
                statuses.append(status)
                prog.update(task, description=f"{name.display}: {status}",
                            **({"total": p.total, "completed": p.completed or 0} if p.total else {}))
                if not ui.err.is_terminal:
                    ui.err.print(f"  {status}", soft_wrap=True, highlight=False, markup=False)
    except ollama.ResponseError as e:
        if e.status_code == -1:  # an error line after progress lines, HTTP status already 200 (§1.1)
            after = f" after '{statuses[-1]}'" if statuses else ""
            raise UserError(f"Ollama failed while creating {name.display}{after}: {e.error}",
                            hint=_create_hint(e.error)) from None
        raise UserError(f"Ollama refused to create {name.display} (HTTP {e.status_code}): {e.error}",
                        hint=_create_hint(e.error)) from None
    if not statuses or statuses[-1] != "success":
        raise UserError(f"Ollama's create for {name.display} ended without 'success' (last status: "
                        f"{statuses[-1] if statuses else 'none'})", hint="check the Ollama server log")
    return statuses



def _create_with_config_fields(client, model: str, kwargs: dict[str, Any], extra: dict[str, Any]):
    """/api/create with fields the official client has no parameter for, through the client's own HTTP
    connection; yields the NDJSON progress as ollama.ProgressResponse (errors as ollama.ResponseError)."""
    import ollama

    body = {"model": model, "stream": True, **{("from" if k == "from_" else k): v for k, v in kwargs.items()}, **extra}
    with client._client.stream("POST", "/api/create", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise ollama.ResponseError(r.text, r.status_code)
        for line in r.iter_lines():
            if not line.strip():
                continue
            part = json.loads(line)
            if part.get("error"):
                raise ollama.ResponseError(part["error"], -1)
            yield ollama.ProgressResponse(**part)


def _create_hint(error: str) -> str | None:
    e = error.lower()
    if "no such file" in e or "not found" in e:
        return "a blob is missing on the server (pruned or never uploaded); run `ollama-ft register` again"
    if "invalid model name" in e:
        return "model names are [host/namespace/]model[:tag] with letters, digits, '_', '-', '.'"
    if "gguf" in e:
        return "the uploaded file is not a usable GGUF; run `ollama-ft export RUN --force`"
    if "llama-quantize" in e:
        return "this Ollama build lacks llama-quantize; use an official Ollama release"
    return "check the Ollama server log for details"


def parse_show_parameters(text: str) -> dict[str, Any]:
    """Parse `/api/show` parameters (`name<pad> %#v` lines) back into values; `stop` is a list."""
    out: dict[str, Any] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        v: Any
        if value.startswith('"'):
            try:
                v = json.loads(value)
            except ValueError:
                v = value[1:-1]
        elif value in ("true", "false"):
            v = value == "true"
        else:
            try:
                f = float(value)
                v = int(f) if f.is_integer() and "." not in value and "e" not in value else f
            except ValueError:
                v = value
        if key == "stop":
            out.setdefault("stop", []).append(v)
        else:
            out[key] = v
    return out


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def _verify(http, client, name: ModelName, req: dict[str, Any]) -> dict[str, Any]:
    """/api/show must give back the template and parameters sent; then one short chat."""
    r = http.post("/api/show", json={"model": name.display})
    if r.status_code != 200:
        raise _http_error(f"/api/show for {name.display}", r.status_code, r.text)
    show = r.json()
    problems = []
    sent_template = req.get("template") or ""
    template_ok = (show.get("template") or "") == sent_template if sent_template else True
    if not template_ok:
        problems.append("TEMPLATE differs from the one sent")
    got = parse_show_parameters(show.get("parameters") or "")
    param_diffs = {k: {"sent": v, "shown": got.get(k)} for k, v in (req.get("parameters") or {}).items()
                   if not _same_value(v if k != "stop" else list(v), got.get(k))}
    if param_diffs:
        problems.append(f"parameters differ: {param_diffs}")
    system_ok = (show.get("system") or "") == (req.get("system") or "") if "system" in show else None
    if system_ok is False:
        problems.append("SYSTEM differs from the one sent")
    if problems:
        raise UserError(f"Ollama stored {name.display}, but /api/show does not match what was sent: "
                        + "; ".join(problems),
                        hint="a newer Ollama may rewrite the model; compare `ollama show --modelfile` with the Modelfile")
    import ollama

    t0 = time.time()
    try:
        resp = client.chat(model=name.display, messages=[{"role": "user", "content": VERIFY_PROMPT}],
                           options={"num_predict": 16, "temperature": 0, "seed": 0}, stream=False)
    except ollama.ResponseError as e:
        raise UserError(f"{name.display} was created, but a test chat failed (HTTP {e.status_code}): {e.error}",
                        hint=f"try `ollama run {name.display}` and check the Ollama server log") from None
    reply = resp.message.content or ""
    n_params = len(req.get("parameters") or {})
    ui.success(f"verified: /api/show matches the TEMPLATE and {n_params} parameters sent; "
               f"a test chat answered {reply[:60]!r}")
    if not reply.strip():
        ui.warn(f"{name.display} answered an empty string to a test chat; try `ollama run {name.display}`")
    return {
        "template_matches": template_ok,
        "parameters_match": True,
        "system_matches": system_ok,
        "shown_parameters": got,
        "chat_prompt": VERIFY_PROMPT,
        "chat_reply": reply,
        "chat_done_reason": resp.done_reason,
        "chat_seconds": round(time.time() - t0, 2),
    }


def served_prompt(http, model: str, messages: list[dict[str, str]], options: dict[str, Any] | None = None) -> str | None:
    """The exact prompt the server would run for `messages` (after its SYSTEM injection, think-tag
    filter and num_ctx truncation): `/api/chat` with `_debug_render_only`. None when the server does not
    report it (older versions, or servers that ignore the field)."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True}
    if options:
        body["options"] = options
    r = http.post("/api/chat", json=body)
    if r.status_code != 200:
        raise _http_error(f"/api/chat (_debug_render_only) for {model}", r.status_code, r.text)
    info = (r.json() or {}).get("_debug_info") or {}
    text = info.get("rendered_template")
    return text if isinstance(text, str) else None


def verify_served_prompt(http, model: str, req: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """The server's own render of a multi-turn sample conversation must equal the training render (the Go
    TEMPLATE render the modelfile stage proved equal to the HF chat template). A difference fails
    registration unless ollama.verify_prompt is false."""
    from .templates import CONVERSATIONS, render_go

    template = req.get("template")
    if not template:
        return {"checked": False, "why": "no TEMPLATE in the Modelfile"}
    conv = next(c for c in CONVERSATIONS if c.name == "multi-turn with system")
    messages = conv.as_dicts()
    served = served_prompt(http, model, messages)
    if served is None:
        ui.warn(f"the server did not report the prompt it renders for {model} (no _debug_render_only); "
                "the served prompt is unchecked")
        return {"checked": False, "why": "server does not support _debug_render_only"}
    try:
        expected = render_go(template, messages, system=req.get("system"))
    except UserError as e:
        return {"checked": False, "why": e.message}
    if served != expected:
        from .templates import _first_diff

        msg = (f"Ollama renders a different prompt for {model} than training did "
               f"({_first_diff(expected, served)})")
        if required:
            raise UserError(msg, hint="this server version renders the TEMPLATE differently; report it, or set "
                                      "ollama.verify_prompt=false (--set) to register anyway")
        ui.warn(msg)
        return {"checked": True, "equal": False}
    ui.success(f"verified: the server's prompt for a {len(messages)}-message conversation equals the training render")
    return {"checked": True, "equal": True, "conversation": conv.name, "characters": len(served)}


def _manifest_digest(client, name: ModelName) -> str:
    for m in client.list().models:
        if (m.model or "").lower() == name.display.lower():
            return m.digest or ""
    raise UserError(f"{name.display} is missing from Ollama's model list right after it was created",
                    hint="check the Ollama server log")


# -------------------------------------------------------------------------------------------
# One chat, for evaluation and scripts


def chat_once(host: str, model: str, messages: list[dict[str, str]], options: dict[str, Any] | None = None,
              timeout: float = 600.0) -> dict[str, Any]:
    """One non-streamed /api/chat (the eval stage uses it with eval.via=ollama). Returns {content,
    done_reason ("stop" | "length" | ...), eval_count, prompt_eval_count, eval_duration_ns,
    total_duration_ns}; Ollama's errors become UserError."""
    import httpx
    import ollama

    client = ollama.Client(host=host, timeout=httpx.Timeout(30.0, read=timeout))
    try:
        r = client.chat(model=model, messages=messages, options=options or {}, stream=False)
    except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError):
        raise UserError(f"cannot connect to Ollama at {host}", hint="start it with `ollama serve`") from None
    except ollama.ResponseError as e:
        if e.status_code == 404:
            raise UserError(f"model {model!r} is not in Ollama at {host}",
                            hint="register it first (`ollama-ft register RUN`), or `ollama pull` the base") from None
        raise UserError(f"Ollama failed to chat with {model} (HTTP {e.status_code}): {e.error}") from None
    finally:
        client._client.close()
    return {
        "content": r.message.content or "",
        "done_reason": r.done_reason,
        "eval_count": r.eval_count,
        "prompt_eval_count": r.prompt_eval_count,
        "eval_duration_ns": r.eval_duration,
        "total_duration_ns": r.total_duration,
    }
