"""Rendering a conversation: HF jinja exactly as transformers does, and Go text/template exactly as
Ollama does (ollama_ft/ollama/go_render/main.go, built once with the local Go and cached)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import cache_root, sha256_file

# ------------------------------------------------------------------------------------------
# Rendering: HF jinja (transformers) and Go text/template (ollama_ft/ollama/go_render, shipped as package data)


def render_hf(jinja: str, messages: list[dict[str, str]], *, bos_token: str | None = None,
              eos_token: str | None = None, prefill: bool = False, **kwargs: Any) -> str:
    """Render messages with an HF chat template exactly as transformers does (its sandboxed jinja
    environment). prefill: continue the final assistant message instead of adding a generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    rendered, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=not prefill,
                                        continue_final_message=prefill, **special, **kwargs)
    return rendered[0]


_GO_SRC_ENV = "OLLAMA_FT_GO_RENDER_SRC"


def _go_source() -> Path:
    env = os.environ.get(_GO_SRC_ENV)
    p = Path(env) if env else Path(__file__).resolve().parent / "go_render" / "main.go"
    if not p.is_file():
        raise UserError(f"the Go renderer source is missing: {p}",
                        hint=f"reinstall ollama-ft, or set {_GO_SRC_ENV} to ollama_ft/ollama/go_render/main.go")
    return p


def go_render_binary() -> Path:
    """Build (once per source version) and return the Go renderer binary."""
    go = shutil.which("go")
    if go is None:
        raise UserError("Go is not installed: the TEMPLATE fidelity check renders with Go's own text/template",
                        hint="install it: `sudo apt-get install golang-go` (or `make system-deps`)")
    src = _go_source()
    digest = sha256_file(src)[:16]
    cache = cache_root() / "go_render"
    binary = cache / f"go_render-{digest}"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".go_render-{digest}.tmp-{os.getpid()}"
    env = dict(os.environ, GOCACHE=str(cache / "gocache"), GO111MODULE="off", GOFLAGS="", CGO_ENABLED="0")
    env.setdefault("HOME", str(Path.home()))
    proc = subprocess.run([go, "build", "-o", str(tmp), str(src)], capture_output=True, text=True, env=env,
                          cwd=str(cache))
    if proc.returncode != 0:
        raise UserError(f"building the Go renderer failed: {proc.stderr.strip()[:500]}",
                        hint=f"check the Go installation (`go version`); source: {src}")
    os.replace(tmp, binary)
    return binary


def render_go_batch(template: str, conversations: list[tuple[list[dict[str, str]], str | None]]) -> list[str | Exception]:
    """Render many (messages, system) pairs with the Go TEMPLATE; a per-conversation error is returned
    as an exception in its slot. A template that does not parse raises UserError."""
    binary = go_render_binary()
    payload = {"template": template,
               "batch": [{"messages": msgs, "system": system or ""} for msgs, system in conversations]}
    proc = subprocess.run([str(binary)], input=json.dumps(payload).encode(), capture_output=True)
    if proc.returncode != 0:
        raise UserError(f"the Go TEMPLATE does not work in Ollama's engine: {proc.stderr.decode().strip()}",
                        hint="fix the TEMPLATE (Go text/template syntax)")
    out: list[str | Exception] = []
    for r in json.loads(proc.stdout):
        out.append(r["output"] if "output" in r else RuntimeError(r.get("error", "unknown error")))
    return out


def render_go(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """Render one conversation with the Go TEMPLATE as Ollama's chat does."""
    res = render_go_batch(template, [(messages, system)])[0]
    if isinstance(res, Exception):
        raise UserError(f"the Go TEMPLATE failed to render: {res}")
    return res
