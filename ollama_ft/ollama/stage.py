"""The `modelfile` stage (`build_modelfile`: runs/<run>/modelfile/Modelfile and modelfiles/<name>.Modelfile,
after proving the TEMPLATE renders like training) and `ollama-ft modelfile RUN --check`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from .fidelity import check_templates, fidelity_error, run_templates
from .modelfile import Modelfile, ModelfileError, expand_path, format_parameter, parse, parse_file


def _pick_gguf(gguf_dir: Path, name: str, quant: str) -> Path:
    want = gguf_dir / f"{name}-{quant}.gguf"
    if want.is_file():
        return want
    # The export may have run under another model name (e.g. `modelfile --name` later): same quant.
    same_quant = sorted(p for p in gguf_dir.glob(f"*-{quant}.gguf") if not p.name.endswith(f"-lora-{quant}.gguf"))
    if len(same_quant) == 1:
        return same_quant[0]
    have = ", ".join(sorted(p.name for p in gguf_dir.glob("*.gguf"))) or "none"
    raise UserError(f"{want} does not exist (GGUF files in {gguf_dir}: {have})",
                    hint=f"export that quantization (`ollama-ft export RUN --quant {quant}`) or set ollama.quant")


VERSION_DEPENDENT_DEFAULTS = {"repeat_penalty": 1.0}


def think_filter_applies(model_name: str, architecture_family: str | None = None) -> bool:
    """Whether Ollama rewrites earlier assistant turns for this model (server/routes.go filterThinkTags):
    it does for a model whose name (without host, namespace and tag) is exactly `deepseek-r1`, and for
    the qwen3 architecture."""
    bare = model_name.rsplit("/", 1)[-1].split(":", 1)[0].lower()
    return bare == "deepseek-r1" or (architecture_family or "") == "qwen3"


def warn_think_filter(model_name: str, family: str) -> None:
    if think_filter_applies(model_name):
        ui.warn(f"Ollama treats a model named {model_name!r} as deepseek-r1: it cuts earlier assistant turns to "
                "the text after </think> and strips their leading whitespace, which training did not do, so "
                f"multi-turn prompts would differ from training; name it e.g. {model_name.split(':')[0]}-tuned")


def build_modelfile(cfg, run, out: Path) -> dict[str, Any]:
    """Stage `modelfile`: write out/Modelfile (FROM ../gguf/<file>) and modelfiles/<name>.Modelfile
    (relative to the current directory), after proving the TEMPLATE matches the training template."""
    from ..core.runs import atomic_write_text

    out = Path(out)
    name = cfg.ollama_name
    gguf_dir = run.require("export")
    gguf = _pick_gguf(gguf_dir, name, cfg.ollama.quant)
    with ui.status("modelfile: detecting the chat family and loading the tokenizer"):
        tpl = run_templates(run, gguf)
    system = cfg.ollama.system if cfg.ollama.system is not None else cfg.data.system_prompt
    params: dict[str, list[str]] = {}
    user_params = {k: [] for k in ("stop",)} | dict(cfg.ollama.parameters or {})
    for k, v in user_params.items():
        try:
            params[k] = format_parameter(k, v)
        except ModelfileError as e:
            raise UserError(f"ollama.parameters.{k}: {e.message}", hint=e.hint) from None
    # The family's turn markers always stop generation; user stops come on top.
    params["stop"] = list(dict.fromkeys([*tpl.family.stop, *params["stop"]]))
    # Defaults that differ between Ollama versions are written out, so every version decodes alike and as
    # `eval` scored it (llama.cpp, no repeat penalty): v0.24.0 defaults repeat_penalty to 1.1, later ones 1.0.
    for k, v in VERSION_DEPENDENT_DEFAULTS.items():
        params.setdefault(k, format_parameter(k, v))
    warn_think_filter(name, tpl.family.name)
    from ..core.files import read_base_meta

    lic = read_base_meta(run.root / "base").get("license")
    licenses = [lic] if isinstance(lic, str) and lic.strip() else []
    with ui.status(f"modelfile: checking the {tpl.family.name} TEMPLATE against {tpl.jinja_path.name}"):
        rep = check_templates(tpl, system, run, require_go=False)
    if not rep.ok:
        raise fidelity_error(rep, str(tpl.jinja_path))

    def make(from_path: str) -> Modelfile:
        return Modelfile(from_=from_path, template=tpl.template, system=system, parameters=params,
                         license=licenses)

    header = (f"Written by ollama-ft for run {run.root.name}: chat family {tpl.family.name}.\n"
              f"Register: ollama create {name} -f <this file>")
    run_mf = make(f"../{gguf_dir.name}/{gguf.name}")
    text = run_mf.render(header)
    if parse(text) != run_mf:  # the writer's promise, checked on the real content
        raise UserError("internal error: the Modelfile does not parse back to what was written")
    atomic_write_text(out / "Modelfile", text)
    atomic_write_text(out / "fidelity.json", json.dumps({
        "family": tpl.family.name, "training_template": str(tpl.jinja_path), "add_bos": tpl.add_bos,
        "template_writes_bos": tpl.emit_bos, **rep.counts(),
        "results": [{"conversation": r.name, "status": r.status, "detail": r.detail, "tokens": r.tokens}
                    for r in rep.results]}, indent=2, ensure_ascii=False) + "\n")
    shared_dir = Path.cwd() / "modelfiles"
    shared = shared_dir / f"{name}.Modelfile"
    final_gguf = run.root / gguf_dir.name / gguf.name
    rel = os.path.relpath(final_gguf.resolve(), shared_dir.resolve())
    atomic_write_text(shared, make(Path(rel).as_posix()).render(header))
    how = "Go text/template" if rep.go_checked else "family reference (no Go)"
    summary = (f"{tpl.family.name} TEMPLATE matches training on {rep.matched} conversations ({how}, strings and "
               f"token ids; {rep.skipped} the template refuses); wrote {shared}")
    return {"modelfile": str(shared), "family": tpl.family.name, "gguf": gguf.name,
            "fidelity": rep.counts(), "summary": summary}


def check_run_command(run_ref: str) -> None:
    """`ollama-ft modelfile RUN --check`: render the run's Modelfile TEMPLATE with Go's text/template and
    the training template with transformers, print a table, and fail on any difference."""
    from ..core.runs import Run

    run = Run.open(run_ref)
    mf_path = run.root / "modelfile" / "Modelfile"
    if not mf_path.is_file():
        raise UserError(f"{mf_path} does not exist", hint=f"write it first: `ollama-ft modelfile {run_ref}`")
    mf = parse_file(mf_path)
    if mf.template is None:
        raise UserError(f"{mf_path} has no TEMPLATE", hint=f"rewrite it: `ollama-ft modelfile {run_ref} --force`")
    gguf = expand_path(mf.from_, mf_path.parent)
    if not gguf.is_file():
        raise UserError(f"the Modelfile's FROM {mf.from_} does not exist ({gguf})",
                        hint=f"run `ollama-ft export {run_ref}`")
    tpl = run_templates(run, gguf)
    tpl.template = mf.template  # check what the user will register, not a fresh build
    with ui.status("checking the TEMPLATE with Go's text/template"):
        rep = check_templates(tpl, mf.system, run, require_go=True)
    rows = [[r.name, r.status, r.tokens if r.tokens is not None else "", r.detail[:90]] for r in rep.results]
    ui.table(f"TEMPLATE fidelity: {mf_path.relative_to(run.root)} vs {tpl.jinja_path.relative_to(run.root)} "
             f"in {run.root.name} ({tpl.family.name}, GGUF adds BOS: {'yes' if tpl.add_bos else 'no'})",
             ["conversation", "result", "tokens", "detail"], rows)
    if not rep.ok:
        raise fidelity_error(rep, str(tpl.jinja_path))
    ui.success(f"{rep.matched} conversations render to identical strings and token ids "
               f"({rep.skipped} refused by the training template)")
