"""The pipeline: config -> stages -> `ollama run NAME` (eval runs before register: it is the gate).

Each stage is one `build_*` function in its stage package (the signatures are listed in
docs/ARCHITECTURE.md, "Stage functions"); this module only decides which stages run (fingerprints, --until/--from/--force), shows the overall
progress, and prints what to type next.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .core import ui
from .core.config import LoadedConfig, RunConfig, load_config
from .core.errors import UserError
from .core.runs import STAGES, Run

# Training settings that change how it is run or shown, not the adapter it writes.
_NOT_TRAIN = ("tensorboard", "logging_steps", "nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend",
              "rdzv_id")


def stage_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The config values a stage's output depends on (part of its fingerprint)."""
    dump = cfg.model_dump(mode="json")
    m = dump["model"]
    settings = {
        "pull": {k: m[k] for k in ("base", "revision", "trust_remote_code", "dtype")},
        "data": {"data": dump["data"], "chat_template": m["chat_template"]},
        "train": {"lora": dump["lora"], "training": {k: v for k, v in dump["training"].items() if k not in _NOT_TRAIN},
                  "optimizer": dump["optimizer"], "adapter": m["adapter"], "quantization": m["quantization"],
                  "compute_dtype": m["compute_dtype"], "attn_implementation": m["attn_implementation"],
                  "stages": dump["stages"]},
        "merge": {"merge_base": m["merge_base"]},
        "export": {"export": dump["export"], "name": cfg.ollama_name},
        "modelfile": {"ollama": {k: v for k, v in dump["ollama"].items() if k != "host"}, "name": cfg.ollama_name},
        "register": {"ollama": dump["ollama"], "name": cfg.ollama_name},
        "eval": {"eval": dump["eval"], "quant": dump["ollama"]["quant"], "name": cfg.ollama_name},
    }[stage]
    if stage == "data":  # an edited data file must re-run the data stage
        from .data.stage import data_files_digest

        settings = {**settings, "files": data_files_digest(cfg)}
    if stage == "train":  # each stage's own data files, and the adapter a continued run starts from
        from .data.stage import data_files_digest

        settings = {**settings, "stage_files": {st.name: data_files_digest(_stage_data_config(cfg, st.data))
                                                for st in cfg.stages if st.data}}
        if cfg.training.from_adapter:
            settings["from_adapter"] = Run.open(cfg.training.from_adapter, cfg.runs_dir).output_digest("train")
    from .core.runs import STAGE_TOOLS, versions_of

    if stage in STAGE_TOOLS:  # an upgraded library re-runs the stages whose output it shapes
        settings = {**settings, "tools": versions_of(STAGE_TOOLS[stage])}
    return settings


def _build(stage: str, run: Run, cfg: RunConfig, *, resume: bool = True, gate_force: bool = False):
    """Return the build(tmp_dir) callable for a stage. Imports are lazy: torch only when needed."""
    if stage == "pull":
        from .base.stage import build_base

        return lambda out: build_base(cfg, out)
    if stage == "data":
        from .data.stage import build_data

        return lambda out: build_data(cfg, run.require("pull"), out)
    if stage == "train":
        from .train.stage import build_adapter

        def train(out):
            check_exportable(cfg, run.require("pull"))
            init, lineage = from_adapter(cfg, run)
            info = build_adapter(cfg, run.require("pull"), run.require("data"), out,
                                 checkpoints_dir=run.root / "checkpoints", resume=resume, init_adapter=init,
                                 stage_data=build_stage_data(cfg, run))
            if lineage:
                run.record_lineage("from_adapter", lineage)
                info = {**info, "from_adapter": lineage}
            return info

        return train
    if stage == "merge":
        from .merge.stage import build_merged

        return lambda out: build_merged(cfg, run.require("pull"), run.require("train"), run.require("data"), out)
    if stage == "export":
        from .export.stage import build_gguf

        return lambda out: build_gguf(cfg, run, run.require("merge"), out)
    if stage == "modelfile":
        from .ollama.stage import build_modelfile

        return lambda out: build_modelfile(cfg, run, out)
    if stage == "eval":
        from .eval.stage import build_report

        return lambda out: build_report(cfg, run, out)
    raise ValueError(stage)


def _stage_data_config(cfg: RunConfig, path: str) -> RunConfig:
    dup = cfg.model_copy(deep=True)
    dup.data.path = path
    return dup


def build_stage_data(cfg: RunConfig, run: Run) -> dict[str, Path]:
    """The data directory of every stage of `stages:` with its own data: runs/<run>/stage-data/<name>/,
    built by the data stage's own code with the data section's settings, rebuilt when they or the files
    change."""
    from .core.runs import digest_of, replace_dir, temp_dir_beside
    from .data.stage import build_data, data_files_digest

    dirs: dict[str, Path] = {}
    for st in cfg.stages:
        if not st.data:
            continue
        cfg_k = _stage_data_config(cfg, st.data)
        d = run.root / "stage-data" / st.name
        key = digest_of({"data": cfg_k.data.model_dump(mode="json"), "files": data_files_digest(cfg_k),
                         "base": run.output_digest("pull"), "chat_template": cfg.model.chat_template})
        if not ((d / ".fingerprint").is_file() and (d / ".fingerprint").read_text() == key):
            ui.info(f"data of training stage {st.name}: {st.data}")
            with temp_dir_beside(d) as tmp:
                build_data(cfg_k, run.require("pull"), tmp)
                (tmp / ".fingerprint").write_text(key)
                replace_dir(tmp, d)
        dirs[st.name] = d
    return dirs


def from_adapter(cfg: RunConfig, run: Run) -> tuple[Path | None, dict[str, Any] | None]:
    """training.from_adapter (`--from-adapter RUN`): that run's adapter and the lineage to record."""
    ref = cfg.training.from_adapter
    if not ref:
        return None, None
    from .core.runs import sha256_file

    src = Run.open(ref, cfg.runs_dir)
    if src.root.resolve() == run.root.resolve():
        raise UserError(f"--from-adapter {ref} is this run itself",
                        hint="continue another run's adapter, or give this run a new name (--set name=...)")
    adapter = src.require("train")
    ours, theirs = run.require("pull") / "config.json", src.root / "base" / "config.json"
    if theirs.is_file() and ours.is_file() and sha256_file(ours) != sha256_file(theirs):
        raise UserError(f"--from-adapter {ref}: that adapter was trained on another base model "
                        f"({theirs} differs from {ours})",
                        hint="use the same model.base as that run, or start a fresh adapter")
    entry = src.entry("train") or {}
    return adapter, {"run": str(src.root), "adapter": str(adapter), "train_digest": entry.get("output_digest"),
                     "trained": entry.get("started"), "steps": entry.get("info", {}).get("steps"),
                     "lineage": src.lineage()}


def _checked(cfg: RunConfig, run: Run, stage: str, builder):
    """The stage builder, preceded by the free-space check (only runs when the stage is not skipped)."""
    def build(out):
        check_free_space(cfg, run, stage)
        return builder(out)

    return build


def check_exportable(cfg: RunConfig, base_dir: Path) -> dict[str, Any]:
    """Before hours of training: will llama.cpp's converter take this architecture and tokenizer?"""
    from .export.converter import preflight

    res = preflight(base_dir, pre_tokenizer=cfg.export.pre_tokenizer)
    tok = res.get("tokenizer") or {}
    pre = f", pre-tokenizer {tok['pre']} ({tok.get('pre_source', 'converter')})" if tok.get("pre") else ""
    ui.info(f"GGUF pre-flight: llama.cpp's converter supports {res.get('architecture')} "
            f"with its {tok.get('kind', 'unknown')} tokenizer{pre}")
    return res


def check_free_space(cfg: RunConfig, run: Run, stage: str) -> None:
    """Stop before a stage whose output would not fit on the disk it writes to (plan's figure for it)."""
    import shutil

    from .core.files import human_bytes
    from .train.plan import ModelDims, model_config_for, stage_disk_need

    try:
        cfg_dict, _ = model_config_for(cfg.model.base, Path(cfg.runs_dir), cfg.run_name)
        dims = ModelDims.from_config(cfg_dict)
    except Exception:  # no config to size from (an unusual base): the stage's own ENOSPC report still applies
        return
    need = stage_disk_need(dims, stage, cfg.export.quants, cfg.lora.r)
    free = shutil.disk_usage(run.root).free
    if need > free:
        raise UserError(f"not enough disk space for the {stage} stage at {run.root}: it needs about "
                        f"{human_bytes(need)}, {human_bytes(free)} are free",
                        hint="free some space or set runs_dir to a larger disk, then re-run the same command "
                             "(finished stages are kept); `ollama-ft plan CONFIG` lists every stage's need")


def _stage_range(until: str | None, from_stage: str | None) -> tuple[int, int]:
    for s in (until, from_stage):
        if s is not None and s not in STAGES:
            raise UserError(f"unknown stage '{s}'", hint=f"stages are: {', '.join(STAGES)}")
    lo = STAGES.index(from_stage) if from_stage else 0
    hi = STAGES.index(until) if until else len(STAGES) - 1
    return lo, hi


def open_run(loaded: LoadedConfig) -> Run:
    cfg = loaded.config
    run = Run.open(cfg.run_name, cfg.runs_dir, create=True)
    loaded.save(run.root)
    return run


def run_pipeline(
    config_path: Path | str | None,
    overrides: list[str],
    *,
    until: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    resume: bool = True,
) -> Run:
    loaded = load_config(config_path, overrides)
    cfg = loaded.config
    run = open_run(loaded)
    force_set = set(force or [])
    for s in force_set:
        if s not in STAGES:
            raise UserError(f"--force {s}: unknown stage", hint=f"stages are: {', '.join(STAGES)}")
    lo, hi = _stage_range(until, from_stage)
    force_set |= set(STAGES[lo:hi + 1]) if from_stage else set()
    if cfg.training.from_adapter:  # a wrong run name stops now, not after pull and data
        Run.open(cfg.training.from_adapter, cfg.runs_dir).require("train")
    ui.info(f"[bold]ollama-ft[/] run [cyan]{run.root}[/] · base [cyan]{cfg.model.base}[/] · model name [cyan]{cfg.ollama_name}[/]")
    t0 = time.time()
    registered = False
    for i, stage in enumerate(STAGES[: hi + 1]):
        left = ", ".join(STAGES[i + 1: hi + 1]) or "nothing"
        ui.err.rule(f"[bold]{i + 1}/{hi + 1} {stage}[/] [dim](then: {left})[/]")
        if stage == "register":
            _stop_if_gate_refused(run)
            registered = _register_or_explain(cfg, run, force="register" in force_set)
            continue
        builder = _build(stage, run, cfg, resume=resume)
        res = run.run_stage(stage, stage_settings(cfg, stage), _checked(cfg, run, stage, builder),
                            force=stage in force_set)
        if res.skipped:
            ui.success(f"{stage}: up to date, skipped ({res.path})")
        else:
            ui.success(f"{stage}: done in {res.entry['seconds']:.1f}s -> {res.path}")
        _stage_summary(stage, res.entry.get("info", {}))
    ui.err.rule()
    ui.success(f"pipeline finished in {time.time() - t0:.0f}s; `ollama-ft status {run.root}` shows every stage")
    _next_steps(cfg, run, registered, hi)
    return run


def run_single_stage(run_ref: str, stage: str, *, force: bool = False, overrides: list[str] | None = None,
                     gate_force: bool = False) -> Run:
    """Run one stage on an existing run directory, using its saved run.yaml plus overrides."""
    run = Run.open(run_ref)
    cfg_path = run.root / "run.yaml"
    if not cfg_path.exists():
        raise UserError(f"{run.root} has no run.yaml", hint="start the run with `ollama-ft train CONFIG --until pull`")
    loaded = load_config(cfg_path, overrides)
    loaded.config.name = run.root.name
    loaded.config.runs_dir = str(run.root.parent)
    loaded.save(run.root)
    cfg = loaded.config
    if stage == "register":
        ok = _register_or_explain(cfg, run, force=True, gate_force=gate_force, required=True)
        if ok:
            _next_steps(cfg, run, True, STAGES.index("register"))
        return run
    res = run.run_stage(stage, stage_settings(cfg, stage), _checked(cfg, run, stage, _build(stage, run, cfg)),
                        force=force)
    if res.skipped:
        ui.success(f"{stage}: up to date, skipped ({res.path}); use --force to redo")
    else:
        ui.success(f"{stage}: done in {res.entry['seconds']:.1f}s -> {res.path}")
    _stage_summary(stage, res.entry.get("info", {}))
    return run


def _stop_if_gate_refused(run: Run) -> None:
    """A refused model stops the pipeline with exit status 1 whether or not Ollama is running (scripts
    see the same outcome either way); the held-out example is shown first, it is what a user judges by."""
    from .ollama.api import check_gate, gate_refusal

    if gate_refusal(run) is not None:
        ui.err.rule()
        _show_example(run)
        check_gate(run)


def _register_or_explain(cfg: RunConfig, run: Run, *, force: bool, gate_force: bool = False,
                         required: bool = False) -> bool:
    from .ollama import api as ollama_api

    modelfile_path = Path(run.entry("modelfile")["info"]["modelfile"]) if run.entry("modelfile") else None
    host = ollama_api.resolve_host(cfg.ollama.host)
    if not ollama_api.is_reachable(host):
        msg = f"Ollama is not reachable at {host}; stopping before registration."
        how = ollama_api.manual_register_hint(cfg.ollama_name, modelfile_path)
        if required:
            raise UserError(msg, hint=how)
        ui.warn(msg)
        ui.info(how)
        return False
    info = ollama_api.register_run(cfg, run, host=host, gate_force=gate_force)
    run.record("register", info, stage_settings(cfg, "register"))
    ui.success(f"registered {info['model']} in Ollama at {host} (digest {info.get('digest', '')[:12]})")
    return True


def _stage_summary(stage: str, info: dict[str, Any]) -> None:
    summary = info.get("summary")
    if summary:
        ui.info(f"  [dim]{summary}[/]")


def _show_example(run: Run) -> None:
    """One held-out question answered by the base and by the tuned model (from the eval stage)."""
    e = run.entry("eval")
    ex = (e or {}).get("info", {}).get("example")
    if not ex:
        return
    ui.out.print("\n[bold]A held-out test question[/]")
    if ex.get("rule"):
        ui.out.print(f"  picked:    {ex['rule']}", markup=False)
    ui.out.print(f"  question:  {ex.get('question', '')}", markup=False)
    ui.out.print(f"  reference: {ex.get('reference', '')}", markup=False)
    if ex.get("facts"):
        ui.out.print(f"  key facts: {', '.join(ex['facts'])}", markup=False)
    ui.out.print(f"  base:      {str(ex.get('base', '')).strip()[:300]}", markup=False)
    ui.out.print(f"  tuned:     {str(ex.get('tuned', '')).strip()[:300]}", markup=False)
    summary = e["info"].get("summary")
    if summary:
        ui.out.print(f"  eval: {summary}", markup=False)


def _next_steps(cfg: RunConfig, run: Run, registered: bool, hi: int) -> None:
    name = cfg.ollama_name
    _show_example(run)
    if hi < STAGES.index("modelfile"):
        ui.out.print("next: run the same `ollama-ft train CONFIG` command without --until to continue")
        return
    mf = run.entry("modelfile")
    from rich.markup import escape

    from .ollama.api import gate_override_hint, gate_refusal

    refused = None if registered else gate_refusal(run)
    if registered:
        ui.out.print(f"\n[bold green]Ready.[/] Chat with your model:\n\n    ollama run {name}\n")
        ui.out.print(f"Share it:  ollama-ft publish {name} --registry 127.0.0.1:5000/team   (or: make publish NAME={name})")
    elif mf and refused:
        # `ollama create` would bypass the gate: say why it refused and how to override on purpose.
        ui.out.print(f"\n[bold yellow]Your model is built, but the evaluation gate refuses it:[/] {escape(refused)}",
                     markup=True, highlight=False)
        ui.out.print(f"  {gate_override_hint(run)}", markup=False)
    elif mf:
        ui.out.print("\n[bold]Your model is built.[/] Register it when Ollama is running:\n")
        ui.out.print(f"    ollama create {name} -f {mf['info']['modelfile']}")
        ui.out.print(f"    ollama run {name}\n")
        ui.out.print(f"or, without Ollama:  ollama-ft run {run.root} \"your question\" --local")
