"""llama.cpp (llama-cpp-python) jobs run in a child process by export/gguf.py:

    python -m ollama_ft.export.llama_worker quantize JOBS_JSON
    python -m ollama_ft.export.llama_worker check GGUF
    python -m ollama_ft.export.llama_worker eval JOB_FILE

Each prints one `OLLAMA_FT_RESULT {json}` line on stdout (progress goes to stderr), so a native crash
(an AMX build in a VM, a damaged file) kills only this process and gguf.py reports it about the file.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

RESULT_TAG = "OLLAMA_FT_RESULT "


def emit(obj: Any) -> None:
    print(RESULT_TAG + json.dumps(obj), flush=True)


def quantize(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each job {quant, ftype (llama_cpp constant name), src, dst, nthread?}; stops at the first failure."""
    import ctypes

    import llama_cpp

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
    return out


def check(path: str) -> dict[str, Any]:
    """Load with llama.cpp's tensor-data validation (NaN/inf, bad quant blocks); {loaded, n_params, ...}."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_default_params()
    p.check_tensors = True
    p.n_gpu_layers = 0
    m = llama_cpp.llama_model_load_from_file(path.encode(), p)
    if not m:
        return {"loaded": False}
    vocab = llama_cpp.llama_model_get_vocab(m)
    res = {"loaded": True, "n_params": int(llama_cpp.llama_model_n_params(m)),
           "n_vocab": int(llama_cpp.llama_vocab_n_tokens(vocab)), "n_embd": int(llama_cpp.llama_model_n_embd(m))}
    llama_cpp.llama_model_free(m)
    return res


def evaluate(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize job["texts"], score job["seqs"] teacher-forced (core/nll, answer tokens by job["masks"]),
    and generate greedily from job["prompt_ids"]."""
    import llama_cpp
    import numpy as np

    from ollama_ft.core.nll import NllSum, token_nll

    t0 = time.perf_counter()
    kw = {"lora_path": job["lora_path"]} if job.get("lora_path") else {}
    llm = llama_cpp.Llama(job["path"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_ubatch=job["n_ctx"],
                          logits_all=True, verbose=False, n_threads=job.get("n_threads"), seed=0, **kw)
    res: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    res["tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
    sums, first_logits = NllSum(), None
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
        sums.add(token_nll(sc, ids), masks[i] if masks is not None else None)
    res.update(sums.as_dict())
    res["first_logits"] = first_logits
    llm.reset()
    out_ids: list[int] = []
    for tok in llm.generate(job["prompt_ids"], temp=0.0, top_k=1, reset=True):
        if llm.token_eos() == tok or tok in job.get("stop_ids", []) or len(out_ids) >= job["n_gen"]:
            break
        out_ids.append(int(tok))
    res["gen_ids"] = out_ids
    res["gen_text"] = llm.detokenize(out_ids).decode("utf-8", "replace")
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv: list[str]) -> int:
    cmd, arg = argv[0], argv[1]
    if cmd == "quantize":
        emit(quantize(json.loads(arg)))
    elif cmd == "check":
        res = check(arg)
        emit(res)
        if not res["loaded"]:
            return 2
    elif cmd == "eval":
        with open(arg, encoding="utf-8") as f:
            emit(evaluate(json.load(f)))
    else:
        raise SystemExit(f"unknown llama_worker command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
