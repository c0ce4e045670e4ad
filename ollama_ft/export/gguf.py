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

QUANT_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16"}
RESULT_TAG = "OLLAMA_FT_RESULT "

# ------------------------------------------------------------------------------------------
# Subprocess workers (llama-cpp-python). Each prints one tagged JSON line.

_QUANTIZE_WORKER = r"""
import ctypes, json, sys, time
import llama_cpp
jobs = json.loads(sys.argv[1])
out = []
for job in jobs:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, job["ftype"])
    p.nthread = job.get("nthread", 0)
    print("QUANT_START " + job["quant"], file=sys.stderr, flush=True)
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(p))
    out.append({"quant": job["quant"], "rc": int(rc), "seconds": time.perf_counter() - t})
    if rc != 0:
        break
print("OLLAMA_FT_RESULT " + json.dumps(out), flush=True)
"""

_CHECK_WORKER = r"""
import json, sys
import llama_cpp
path = sys.argv[1]
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_default_params()
p.check_tensors = True  # llama.cpp validates tensor data (NaN/inf, bad quant blocks)
p.n_gpu_layers = 0
m = llama_cpp.llama_model_load_from_file(path.encode(), p)
if not m:
    print("OLLAMA_FT_RESULT " + json.dumps({"loaded": False}), flush=True)
    sys.exit(2)
vocab = llama_cpp.llama_model_get_vocab(m)
res = {"loaded": True, "n_params": int(llama_cpp.llama_model_n_params(m)),
       "n_vocab": int(llama_cpp.llama_vocab_n_tokens(vocab)), "n_embd": int(llama_cpp.llama_model_n_embd(m))}
llama_cpp.llama_model_free(m)
print("OLLAMA_FT_RESULT " + json.dumps(res), flush=True)
"""

_EVAL_WORKER = r"""
import json, math, sys, time
import numpy as np
import llama_cpp
job = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
kw = {}
if job.get("lora_path"):
    kw["lora_path"] = job["lora_path"]
llm = llama_cpp.Llama(job["path"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_ubatch=job["n_ctx"],
                      logits_all=True, verbose=False, n_threads=job.get("n_threads"), seed=0, **kw)
res = {"load_s": time.perf_counter() - t0}
res["tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
nll, n, ans_nll, ans_n = 0.0, 0, 0.0, 0
first_logits = None
masks = job.get("masks")
for i, ids in enumerate(job["seqs"]):
    llm.reset()
    llm.eval(ids)
    sc = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    if not np.isfinite(sc).all():
        res["nonfinite"] = True
        break
    if first_logits is None:
        first_logits = sc[:8].tolist()
    m = sc.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(sc - m).sum(axis=1)))
    tgt = np.asarray(ids[1:])
    losses = lse[:-1] - sc[np.arange(len(ids) - 1), tgt]
    nll += float(losses.sum())
    n += len(ids) - 1
    if masks is not None:
        m = np.asarray(masks[i], dtype=bool)
        ans_nll += float(losses[m].sum())
        ans_n += int(m.sum())
res["nll"], res["n"], res["answer_nll"], res["answer_n"] = nll, n, ans_nll, ans_n
res["first_logits"] = first_logits
llm.reset()
prompt = job["prompt_ids"]
out_ids = []
for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
    if llm.token_eos() == tok or tok in job.get("stop_ids", []) or len(out_ids) >= job["n_gen"]:
        break
    out_ids.append(int(tok))
res["gen_ids"] = out_ids
res["gen_text"] = llm.detokenize(out_ids).decode("utf-8", "replace")
res["seconds"] = time.perf_counter() - t0
print("OLLAMA_FT_RESULT " + json.dumps(res), flush=True)
"""


def _run_worker(script: str, args: list[str], what: str, timeout: float = 3600,
                on_line=None) -> Any:
    """Run a llama-cpp-python worker; return its tagged JSON. A crash becomes a UserError about `what`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
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

    Reads the header, metadata and tensor index, checks that every tensor's data lies inside the file,
    that the basic keys exist (architecture, tokenizer), and (load=True) that llama.cpp loads it with
    tensor-data validation, in a subprocess. Returns a summary dict: {path, bytes, architecture, type,
    name, tensors, file_type, chat_template, lineage, tokenizer_model, tokenizer_pre, n_params?, n_vocab?}.
    """
    from ..core.gguf_meta import GGUFDamaged, read_gguf_meta

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    hint = "the file is damaged or incomplete; re-create it (`ollama-ft export RUN --force`) or download it again"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')", hint=hint)
    try:
        meta = read_gguf_meta(path)
    except GGUFDamaged as e:
        raise UserError(f"{path}: GGUF header or metadata is corrupted or truncated ({e})", hint=hint) from None
    problems = [f"tensor {t.name} ends at byte {t.data_offset + t.n_bytes} but the file has {size}"
                for t in meta.tensors if t.data_offset + t.n_bytes > size]
    if not meta.tensors:
        problems.append("no tensors")
    fields = meta.fields
    arch = fields.get("general.architecture")
    gtype = fields.get("general.type") or "model"
    if not arch:
        problems.append("general.architecture missing")
    if gtype != "adapter" and fields.get("tokenizer.ggml.model") is None:
        problems.append("tokenizer.ggml.model missing")
    if gtype != "adapter" and not fields.get("tokenizer.ggml.tokens"):
        problems.append("tokenizer.ggml.tokens missing")
    if problems:
        raise UserError(f"{path}: GGUF is corrupted or truncated", hint=hint, details=problems[:10])
    info: dict[str, Any] = {
        "path": str(path), "bytes": size, "architecture": arch, "type": gtype,
        "name": fields.get("general.name"), "tensors": len(meta.tensors), "file_type": fields.get("general.file_type"),
        "chat_template": fields.get("tokenizer.chat_template"), "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
        "lineage": {k: v for k, v in fields.items() if isinstance(v, str | int | float | list) and k.startswith(
            ("general.base_model.", "general.dataset.", "general.finetune"))},
    }
    if gtype == "adapter":
        info["adapter"] = {k: v for k, v in fields.items() if k.startswith("adapter.")}
    if load and gtype != "adapter":
        res = _run_worker(_CHECK_WORKER, [str(path)], f"loading {path.name}", timeout=1800)
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
            res = _run_worker(_QUANTIZE_WORKER, [json.dumps(jobs)], f"quantizing {src.name}", on_line=on_line)
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
        res = _run_worker(_EVAL_WORKER, [job_path], f"evaluating {path.name}")
    finally:
        os.unlink(job_path)
    if res is None:
        raise UserError(f"llama.cpp returned no result for {path.name}")
    return res
