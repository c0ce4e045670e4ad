"""The `pull` stage: a resolved base spec (sources.py) into runs/<run>/base/ (`build_base`), the report of
what it will produce (`describe`, also `pull --dry-run`) and the `ollama-ft pull` command; disk space is
checked before anything is fetched."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.files import BASE_META, cache_root, human_bytes
from ..core.hf_dir import read_json, safetensors_summary
from . import catalog
from .gguf_import import (
    _GGUF_TO_HF,
    _cached_facts,
    _gguf_facts_for,
    _gguf_path,
    _gguf_sha256,
    dequantize_gguf,
    gguf_info,
)
from .hub import _check_weights_and_code, _copy_hf_dir, _hf_download, _link_or_copy, _remote_facts
from .sources import (
    _DTYPE_BYTES,
    Resolved,
    _family_for,
    _family_template,
    read_chat_template,
    readme_license,
    resolve,
    runtime_support,
)

# ------------------------------------------------------------------------------------------
# Disk space


def _existing_ancestor(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists():
        p = p.parent
    return p


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(_existing_ancestor(a)).st_dev == os.stat(_existing_ancestor(b)).st_dev


def check_disk(needs: list[tuple[Path, int]], *, raise_error: bool = True) -> list[dict[str, Any]]:
    """Sum the bytes needed per filesystem and compare with free space (5% + 256 MB margin).

    Returns one row per filesystem; raises UserError naming the numbers when one is too small.
    """
    per_dev: dict[int, dict[str, Any]] = {}
    for path, n in needs:
        anc = _existing_ancestor(path)
        dev = os.stat(anc).st_dev
        row = per_dev.setdefault(dev, {"path": str(anc), "needed": 0})
        row["needed"] += int(n)
    rows = []
    for row in per_dev.values():
        free = shutil.disk_usage(row["path"]).free
        need = int(row["needed"] * 1.05) + (256 << 20 if row["needed"] else 0)
        row.update(free=free, needed_with_margin=need, ok=free >= need)
        rows.append(row)
        if raise_error and not row["ok"]:
            raise UserError(
                f"not enough disk space in {row['path']}: the base model needs {human_bytes(need)} "
                f"(including a 5% margin), {human_bytes(free)} free",
                hint="free some space, or point --out / OLLAMA_FT_CACHE / HF_HUB_CACHE at a larger disk",
            )
    return rows


# ------------------------------------------------------------------------------------------
# Report (no download for catalog entries)


def describe(r: Resolved, trust_remote_code: bool = False, configured_family: str | None = None) -> dict[str, Any]:
    """What pull will produce: architecture, parameters, dtype, licence, chat template, runtimes."""
    info: dict[str, Any] = {"source": r.source_kind, "from": r.describe(), "family_source": None}
    e = r.entry
    if r.kind == "hf":
        info.update(hf_architecture=e.hf_architecture if e else None, parameters=e.parameters if e else None,
                    dtype=e.dtype if e else None, license=e.license if e else None,
                    template="from the repo's tokenizer_config.json (downloaded with the weights)"
                    if e else "read from the repo after download",
                    family=configured_family or (e.family if e else None),
                    download_bytes=e.download_bytes if e else None)
        if e is None:
            info.update(_remote_facts(r))
    elif r.kind == "local_dir":
        cfg = read_json(r.path / "config.json")
        st = safetensors_summary(r.path)
        tmpl, where = read_chat_template(r.path)
        info.update(hf_architecture=(cfg.get("architectures") or [None])[0], parameters=st["parameters"],
                    dtype=st["dtype"] or cfg.get("torch_dtype") or cfg.get("dtype"),
                    license=readme_license(r.path), template=f"found in {where}" if tmpl else None,
                    family=_family_for(tmpl, None, configured_family)[0], download_bytes=st["bytes"])
        if st["files"] == 0:
            info["problem"] = "no *.safetensors weights in the directory"
    else:  # gguf, ollama, embedded
        path = _gguf_path(r)
        facts = _gguf_facts_for(r, path, "auto")
        arch = facts["architecture"]
        tmpl = facts.get("chat_template")
        fam, _ = _family_for(tmpl, e, configured_family)
        info.update(gguf_architecture=arch, hf_architecture=_GGUF_TO_HF.get(arch),
                    parameters=facts["parameter_count"],
                    dtype=f"{facts['file_type']} GGUF -> {facts['save_dtype']} (dequantized)",
                    license=(e.license if e else None) or facts.get("license"),
                    template="found in the GGUF (tokenizer.chat_template)" if tmpl else None, family=fam,
                    download_bytes=facts["parameter_count"] * _DTYPE_BYTES.get(facts["save_dtype"], 2),
                    gguf_path=str(path), gguf_file_type=facts["file_type"])
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            info["problem"] = f"transformers cannot dequantize GGUF architecture '{arch}' (it reads: {readable})"
    if not info.get("template") and info.get("family"):
        info["template"] = f"none in the model; will use the '{info['family']}' family template"
        info["family_source"] = "fallback"
    info["runtime"] = runtime_support(info.get("hf_architecture"))
    return info


# ------------------------------------------------------------------------------------------
# The pull stage


def _needs(r: Resolved, out: Path, dtype: str = "auto", sha256: str | None = None) -> list[tuple[Path, int]]:
    """(where, bytes) for everything this pull writes, before it starts."""
    if r.kind == "hf":
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = Path(HF_HUB_CACHE)
        n = r.entry.download_bytes if r.entry else (_remote_facts(r).get("download_bytes") or 0)
        return [(cache, n)] + ([] if _same_fs(cache, out) else [(out, n)])
    if r.kind == "local_dir":
        n = sum(p.stat().st_size for p in r.path.glob("*.safetensors"))
        return [] if _same_fs(r.path, out) else [(out, n)]
    # GGUF: the dequantized copy in the cache (nothing if cached), linked into out.
    path = _gguf_path(r)
    cache = cache_root() / "base"
    if r.kind in ("embedded", "ollama") and sha256 is None:
        sha256 = _gguf_sha256(r, path)  # free for these two: a known digest
    if sha256 and _cached_facts(sha256, dtype) is not None:
        return []
    facts = gguf_info(path)
    save_dtype = dtype if dtype and dtype != "auto" else facts["save_dtype"]
    n = facts["parameter_count"] * _DTYPE_BYTES.get(save_dtype, 2) + (50 << 20)
    return [(cache, n)] + ([] if _same_fs(cache, out) else [(out, n)])


def build_base(cfg, out: Path) -> dict[str, Any]:
    """The `pull` stage: write the HF directory for cfg.model.base into `out`.

    out gets config.json, *.safetensors, tokenizer files, chat_template.jinja (the model's own,
    or the chat family's when the model has none) and ollama_ft_base.json.
    """
    from ..core.runs import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ms = cfg.model
    r = resolve(ms.base, ms.revision)
    if r.note:
        ui.info(f"[cyan]{r.note}[/]")
    sha = _gguf_sha256(r, _gguf_path(r)) if r.kind in ("gguf", "ollama", "embedded") else None
    check_disk(_needs(r, out, ms.dtype, sha))
    counts, gguf_source, entry = _fetch(r, ms, out, sha)
    gguf_license = gguf_source.pop("license", None) if gguf_source else None
    config = read_json(out / "config.json")
    st = safetensors_summary(out)
    template, where = read_chat_template(out)
    # model.chat_template is not used here: it is not part of this stage's fingerprint, and the data
    # stage applies it (a configured family wins over what is recorded here).
    family, family_source = _family_for(template, entry, None)
    template_source = _write_template(out, template, where, family)
    arch = (config.get("architectures") or [None])[0]
    meta = {
        "spec": ms.base,
        "source_kind": r.source_kind,
        "hf_repo": r.hf_repo or (entry.hf_repo if entry else None),
        "revision": r.revision,
        "revision_verified": r.revision_verified,
        "catalog_name": entry.name if entry else None,
        "architecture": arch,
        "model_type": config.get("model_type"),
        "llama_cpp_arch": entry.llama_cpp_arch if entry else None,
        "family": family,
        "family_source": family_source,
        "chat_template_source": template_source,
        "license": (entry.license if entry else None) or readme_license(out) or gguf_license,
        "parameters": st["parameters"],
        "dtype": st["dtype"],
        "context_length": config.get("max_position_embeddings")
        or (config.get("text_config") or {}).get("max_position_embeddings"),
        "lora_target_modules": list(entry.lora_target_modules) if entry else None,
        "trust_remote_code": bool(ms.trust_remote_code),
        "resolution_note": r.note,
    }
    if gguf_source:
        meta["gguf_source"] = gguf_source
    atomic_write_text(out / BASE_META, json.dumps(meta, indent=2) + "\n")
    support = runtime_support(arch)
    if support["llama_cpp"] is False:
        ui.warn(support["text"])
    if template is None and template_source is None:
        ui.warn(f"{ms.base}: no chat template in the model and no chat family known; "
                "set model.chat_template to a family (chatml, llama3, gemma3, ...)")
    summary = (f"{arch} · {_human_params(st['parameters'])} parameters · {st['dtype']} · "
               f"template: {template_source or 'none'} · family: {family or 'unknown'} · "
               f"{counts['link']} linked, {counts['copy']} copied")
    return {**meta, "summary": summary, "files_linked": counts["link"], "files_copied": counts["copy"]}


def _fetch(r: Resolved, ms, out: Path, sha: str | None) -> tuple[dict[str, int], dict[str, Any] | None, Any]:
    """Put the model's files into out: ({link, copy} counts, the GGUF source record or None, catalog entry).
    The GGUF record carries the GGUF's own licence under "license" for build_base to fall back on."""
    entry = r.entry
    if r.kind == "hf":
        if not r.revision_verified:
            ui.warn(f"{r.hf_repo}: revision '{r.revision}' is not a verified commit; the download may change "
                    "over time (pin model.revision to a commit hash for a reproducible run)")
        ui.info(f"downloading {r.hf_repo}@{r.revision} (resumable; weights, config and tokenizer only)")
        src = _hf_download(r, ms.trust_remote_code)
        _check_weights_and_code(src, ms.trust_remote_code, f"{r.hf_repo}@{r.revision}")
        return _copy_hf_dir(src, out, ms.trust_remote_code), None, entry
    if r.kind == "local_dir":
        _check_weights_and_code(r.path, ms.trust_remote_code, str(r.path))
        return _copy_hf_dir(r.path, out, ms.trust_remote_code), None, entry
    path = _gguf_path(r)
    cached, facts = dequantize_gguf(path, sha, ms.dtype)
    counts = {"link": 0, "copy": 0}
    for f in sorted(cached.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            counts[_link_or_copy(f, out / f.name)] += 1
    gguf_source = {"path": str(path), "sha256": sha, "file_type": facts["file_type"],
                   "architecture": facts["architecture"], "license": facts.get("license")}
    if r.kind == "ollama":
        gguf_source["ollama_model"] = r.ollama_name
        if entry is None:
            with contextlib.suppress(Exception):
                entry = catalog.find(r.ollama_name)
    return counts, gguf_source, entry


def _write_template(out: Path, template: str | None, where: str | None, family: str | None) -> str | None:
    """chat_template.jinja in out (the model's own, or its family's when it has none); where it came from."""
    if template is None and family:
        fam_t = _family_template(family)
        if fam_t:
            # Written so tokenizer.apply_chat_template works on base/; recorded as a fallback.
            (out / "chat_template.jinja").write_text(fam_t, encoding="utf-8")
            return f"family:{family}"
    elif template is not None and where != "chat_template.jinja":
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return where


def _human_params(n: int | None) -> str:
    if not n:
        return "?"
    from ..ollama.store import human_number

    return human_number(int(n))


# ------------------------------------------------------------------------------------------
# `ollama-ft pull`


def default_pull_dir(r: Resolved) -> Path:
    if r.entry is not None:
        slug = r.entry.name
    elif r.kind == "hf":
        slug = f"{r.hf_repo}@{r.revision}"
    elif r.kind == "ollama":
        slug = f"ollama-{r.ollama_name}"
    else:
        slug = (r.path.stem if r.path else "model")
    return cache_root() / "pulled" / re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-")


def pull_command(spec: str, out: Path | None = None, revision: str | None = None, trust_remote_code: bool = False,
                 dry_run: bool = False) -> dict[str, Any] | None:
    """`ollama-ft pull SPEC`: report what the base model is and, unless --dry-run, fetch it into `out`."""
    from ..core.config import ModelSettings, RunConfig

    r = resolve(spec, revision)
    if r.note:
        ui.info(f"[cyan]{r.note}[/]")
    target = Path(out) if out else default_pull_dir(r)
    info = describe(r, trust_remote_code)
    needs = _needs(r, target)
    disk = check_disk(needs, raise_error=False)
    rt = info["runtime"]
    rows = [
        ["source", f"{info['source']}: {info['from']}"],
        ["revision", "-" if r.kind != "hf" else f"{r.revision} ({'verified commit' if r.revision_verified else 'NOT a verified commit'})"],
        ["architecture", info.get("hf_architecture") or info.get("gguf_architecture") or "unknown until downloaded"],
        ["parameters", _human_params(info.get("parameters"))],
        ["dtype", info.get("dtype") or "unknown until downloaded"],
        ["licence", info.get("license") or "unknown (check the model card)"],
        ["chat template", info.get("template") or "none found, no family known (set model.chat_template)"],
        ["chat family", info.get("family") or "unknown"],
        ["llama.cpp", rt["text"]],
        ["Ollama", "yes (runs the GGUF this pipeline exports)" if rt["ollama"] else
         ("unknown" if rt["ollama"] is None else "no: llama.cpp cannot convert this architecture")],
        ["output", str(target)],
    ]
    for row in disk if info.get("download_bytes") or r.kind != "hf" else []:
        rows.append(["disk", f"{human_bytes(row['needed_with_margin'])} needed in {row['path']}, {human_bytes(row['free'])} free"
                     + ("" if row["ok"] else "  [red]TOO SMALL[/]")])
    if r.kind == "hf" and r.entry is None and not (info.get("download_bytes") or 0):
        rows.append(["disk", f"size unknown: {info.get('remote_error') or 'the Hub did not say'}"])
    elif not disk:
        rows.append(["disk", "nothing to write beyond links (same filesystem)"])
    if info.get("problem"):
        rows.append(["problem", f"[red]{info['problem']}[/]"])
    ui.table(f"ollama-ft pull {spec}", ["", ""], rows)
    if dry_run:
        return info
    if info.get("problem"):
        raise UserError(f"cannot pull {spec}: {info['problem']}")
    check_disk(needs)
    if target.exists() and any(target.iterdir()) and not (target / BASE_META).is_file():
        raise UserError(f"{target} exists and is not a directory written by `ollama-ft pull`",
                        hint="choose another --out, or empty that directory")
    cfg = RunConfig(model=ModelSettings(base=spec, revision=revision, trust_remote_code=trust_remote_code))
    from ..core.runs import replace_dir, temp_dir_beside

    with temp_dir_beside(target) as tmp:
        meta = build_base(cfg, tmp)
        replace_dir(tmp, target)
    ui.success(f"pulled {spec} -> {target}")
    ui.info(f"  [dim]{meta['summary']}[/]")
    ui.out.print(f"use it as a base: set `model.base: {target}` in your config (or --set model.base={target})")
    return meta
