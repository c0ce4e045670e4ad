"""`ollama-ft run`: chat once through Ollama (tokens streamed to stdout), or with --local on the run's GGUF in
llama.cpp, prompted as Ollama would prompt it (the Modelfile's TEMPLATE rendered by Go's text/template)."""

from __future__ import annotations

from pathlib import Path

from ..core import ui
from ..core.errors import UserError
from ..core.names import parse_name
from .api import resolve_host


def run_command(name: str, prompt: str, local: bool = False, system: str | None = None,
                max_tokens: int = 256, host: str | None = None) -> str:
    """Chat once: through Ollama (streaming tokens to stdout), or on the run's GGUF with --local."""
    if local:
        return _run_local(name, prompt, system, max_tokens)
    import httpx
    import ollama

    host = resolve_host(host)
    model = parse_name(name).display
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    client = ollama.Client(host=host, timeout=httpx.Timeout(30.0, read=600.0))
    pieces = []
    try:
        for part in client.chat(model=model, messages=messages, stream=True, options={"num_predict": max_tokens}):
            piece = part.message.content or ""
            pieces.append(piece)
            ui.out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        ui.out.print()
    except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError):
        raise UserError(f"cannot connect to Ollama at {host}",
                        hint=f"start it with `ollama serve`, or run the GGUF without Ollama: "
                             f"`ollama-ft run RUN \"{prompt[:20]}\" --local`") from None
    except ollama.ResponseError as e:
        if e.status_code == 404:
            raise UserError(f"model {model!r} is not in Ollama at {host}",
                            hint=f"register it with `ollama-ft register RUN --name {name}`, or list models with `ollama list`") from None
        raise UserError(f"Ollama failed to chat with {model} (HTTP {e.status_code}): {e.error}") from None
    finally:
        client._client.close()
    return "".join(pieces)


def _run_local(run_ref: str, prompt: str, system: str | None, max_tokens: int) -> str:
    """Run the run's GGUF with llama-cpp-python, prompting as Ollama would.

    With the run's Modelfile, the prompt is rendered from its TEMPLATE by Go's own text/template
    (Ollama's data model) and its stop parameters apply; without Go or a Modelfile it falls back to
    the GGUF's embedded jinja chat template, which the export stage keeps equal to the training one.
    """
    from ..core.runs import Run

    run = Run.open(run_ref)
    gguf = _pick_gguf(run)
    template, stops, mf_system = None, [], None
    mf_entry = run.entry("modelfile")
    mf_path = Path(mf_entry["info"]["modelfile"]) if mf_entry else None
    if mf_path is None or not mf_path.is_file():
        mf_path = run.root / "modelfile" / "Modelfile"
    if mf_path.is_file():
        from .modelfile import parse_file

        mf = parse_file(mf_path)
        template = mf.template
        stops = list(mf.typed_parameters().get("stop") or [])
        mf_system = mf.system
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = None
    if template:
        from .templates import render_go

        try:
            text = render_go(template, messages, system=mf_system)
        except UserError as e:
            ui.warn(f"{e.message}; using the GGUF's own chat template instead")
    if text is None and mf_system and not system:
        messages.insert(0, {"role": "system", "content": mf_system})
    from ..core.native_worker import Contained

    log = gguf.parent.parent / "logs" / "llama.log" if gguf.parent.name == "gguf" else gguf.with_suffix(".log")
    with ui.status(f"loading {gguf.name}"):
        # a child process: a llama.cpp crash becomes a message, and its log stays out of the answer
        llm = Contained("ollama_ft.eval.engines:LocalChat", gguf, what=f"llama.cpp ({gguf.name})", log_path=log)
    pieces = []
    try:
        for piece in llm.stream("stream", text, messages, max_tokens, stops):
            pieces.append(piece)
            ui.out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        ui.out.print()
    finally:
        llm.close()
    return "".join(pieces)


def _pick_gguf(run) -> Path:
    d = run.root / "gguf"
    if not d.is_dir():
        raise UserError(f"{run.root} has no GGUF yet", hint=f"run `ollama-ft export {run.root}`")
    quant = "Q4_K_M"
    try:
        from ..core.config import load_config

        quant = load_config(run.root / "run.yaml", []).config.ollama.quant
    except Exception:  # no or unreadable run.yaml: fall back to the usual default
        pass
    models = [p for p in sorted(d.glob("*.gguf")) if "-lora-" not in p.name]
    for want in (f"-{quant}.gguf", "-F16.gguf"):
        for p in models:
            if p.name.endswith(want):
                return p
    if models:
        return models[0]
    raise UserError(f"no model GGUF in {d}", hint=f"run `ollama-ft export {run.root}`")
