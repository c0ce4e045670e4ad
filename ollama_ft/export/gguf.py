"""llama.cpp on GGUF files, each call in a subprocess: structure read, load check, quantize, score.

A native crash (e.g. an AMX build in a VM) is then reported as an error about that file instead of
killing ollama-ft. The export stage (stage.py), registration (ollama/api.py) and the eval stage's
base-model quantization all use these, so they live here and not in stage.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from .llama_worker import RESULT_TAG

QUANT_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16"}

# ------------------------------------------------------------------------------------------
# The llama-cpp-python child process (export/llama_worker.py). It prints one tagged JSON line.


def _run_worker(command: str, args: list[str], what: str, timeout: float = 3600,
                on_line=None) -> Any:
    """Run `python -m ollama_ft.export.llama_worker COMMAND ARGS`; return its tagged JSON. A crash becomes
    a UserError about `what`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ollama_ft.export.llama_worker", command, *args],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True, errors="replace")
    tail: list[str] = []

    def _drain_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            del tail[:-40]
            if on_line:
                on_line(line)

    import threading

    out_parts: list[str] = []

    def _drain_out() -> None:
        assert proc.stdout is not None
        out_parts.append(proc.stdout.read())

    # One reader per pipe, each in its own thread. (communicate() would also read stderr, racing the
    # drain thread: it can block in read() on an emptied stderr while the worker blocks on a full stdout.)
    t = threading.Thread(target=_drain_err, daemon=True)
    t_out = threading.Thread(target=_drain_out, daemon=True)
    t.start()
    t_out.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise UserError(f"llama.cpp took longer than {timeout:.0f} s on {what}") from None
    t_out.join(30)
    t.join(5)
    stdout = "".join(out_parts)
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if proc.returncode != 0 and result is None:
        sig = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else f" (exit code {proc.returncode})"
        crash = "illegal instruction / AMX" if proc.returncode in (-4, -11) else "crash"
        raise UserError(
            f"llama.cpp failed on {what}{sig}",
            hint=("if this is a native-code crash, reinstall llama-cpp-python as a portable build "
                  "(`make install`, see README Troubleshooting); if the file is damaged, re-run `ollama-ft export RUN --force`"),
            details=[f"{crash}? last output:"] + tail[-8:],
        )
    return result


# ------------------------------------------------------------------------------------------
# Structural verification (usable on any GGUF; registration calls it)


def verify_gguf_file(path: str | Path, load: bool = True) -> dict[str, Any]:
    """Check that a GGUF file is whole and sane; raise UserError if it is truncated or corrupted.

    The structure check is core/gguf_meta.check_gguf (header, metadata, tensor index, every tensor's data
    inside the file, the basic keys); load=True adds llama.cpp loading it with tensor-data validation, in a
    subprocess. Returns check_gguf's summary, plus n_params, n_vocab, n_embd when loaded.
    """
    from ..core.gguf_meta import DAMAGED_HINT, check_gguf

    info = check_gguf(path)
    path, gtype, hint = Path(path), info["type"], DAMAGED_HINT
    if load and gtype != "adapter":
        res = _run_worker("check", [str(path)], f"loading {path.name}", timeout=1800)
        if not res or not res.get("loaded"):
            raise UserError(f"llama.cpp cannot load {path} (tensor validation failed or the file is damaged)",
                            hint=hint)
        info.update({k: res[k] for k in ("n_params", "n_vocab", "n_embd")})
    return info


# ------------------------------------------------------------------------------------------
# Quantization


def quantize(src: Path, targets: dict[str, Path]) -> dict[str, float]:
    """Quantize one F16/BF16 GGUF to several types in one llama.cpp call (subprocess).

    K-quants need rows that are multiples of 256; llama.cpp falls back per tensor (e.g. q5_0/q8_0) for
    smaller ones. Returns seconds per quant.
    """
    jobs = []
    tmp_of = {}
    for q, dst in targets.items():
        if q not in QUANT_FTYPES:
            raise UserError(f"unknown quantization {q!r}", hint=f"choose from {', '.join(QUANT_FTYPES)}")
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp_of[q] = (tmp, dst)
        jobs.append({"quant": q, "ftype": QUANT_FTYPES[q], "src": str(src), "dst": str(tmp)})
    tensor_re = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
    with ui.progress_steps() as prog:
        task = prog.add_task("quantize", total=None)
        state = {"q": ""}

        def on_line(line: str) -> None:
            if line.startswith("QUANT_START "):
                state["q"] = line.split()[1]
                prog.update(task, description=f"quantize {state['q']}", completed=0, total=None)
            m = tensor_re.match(line)
            if m:
                prog.update(task, description=f"quantize {state['q']}", completed=int(m.group(1)),
                            total=int(m.group(2)))

        try:
            res = _run_worker("quantize", [json.dumps(jobs)], f"quantizing {src.name}", on_line=on_line)
            seconds = {}
            for r in res or []:
                if r["rc"] != 0:
                    raise UserError(f"llama.cpp could not quantize {src.name} to {r['quant']} (code {r['rc']})")
                tmp, dst = tmp_of[r["quant"]]
                os.replace(tmp, dst)
                seconds[r["quant"]] = round(r["seconds"], 3)
            if len(seconds) != len(jobs):
                raise UserError(f"quantization of {src.name} stopped early", hint="see the log above")
        finally:
            for tmp, _ in tmp_of.values():
                if tmp.exists():
                    tmp.unlink()
    return seconds




def eval_gguf(path: Path, texts: list[str], seqs: list[list[int]], prompt_ids: list[int], n_gen: int = 24,
              lora_path: Path | None = None, stop_ids: list[int] | None = None,
              masks: list[list[int]] | None = None) -> dict[str, Any]:
    """Tokenize, score and generate with llama.cpp on one GGUF (subprocess)."""
    import tempfile

    n_ctx = max([len(s) for s in seqs] + [len(prompt_ids) + n_gen + 1, 64])
    job = {"path": str(path), "texts": texts, "seqs": seqs, "masks": masks, "prompt_ids": prompt_ids, "n_gen": n_gen,
           "n_ctx": n_ctx, "lora_path": str(lora_path) if lora_path else None, "stop_ids": stop_ids or [],
           "n_threads": max(1, min(8, os.cpu_count() or 1))}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    try:
        res = _run_worker("eval", [job_path], f"evaluating {path.name}")
    finally:
        os.unlink(job_path)
    if res is None:
        raise UserError(f"llama.cpp returned no result for {path.name}")
    return res
