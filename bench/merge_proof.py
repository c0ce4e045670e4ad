"""Benchmark: the merge stage's logits proof in RAM against disk-offloaded within a RAM budget.

On the random Qwen2.5-1.5B-shaped model of bench/export.py (3.1 GB bf16, 5.8 GB as float32) with a random
rank-16 all-linear LoRA: merge it (streamed), then run merge.logits_check twice, each in its own process:
  1. in RAM:    the float32 models loaded whole (the path for models that fit)
  2. offloaded: OLLAMA_FT_PROOF_RAM_BYTES = 3 GiB, so accelerate streams layers from the safetensors files
Prints seconds, peak anonymous memory and the proof's numbers (which must be identical).

Usage: .venv/bin/python bench/merge_proof.py [--out bench/out] [--budget-gib 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, re, sys, threading, time
from pathlib import Path
from ollama_ft.merge.stage import logits_check
base, adapter, merged, scratch = map(Path, sys.argv[1:5])
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        st = open("/proc/self/status").read()
        peak[0] = max(peak[0], int(re.search(r"RssAnon:\s+(\d+)", st).group(1)) * 1024)
        stop.wait(0.02)
threading.Thread(target=sample, daemon=True).start()
seqs = [list(range(5, 133)), list(range(200, 264))]
t = time.perf_counter()
r = logits_check(base, adapter, merged, seqs, offload_dir=scratch)
stop.set()
print("PROOF " + json.dumps({"seconds": time.perf_counter() - t, "peak_anon": peak[0], **r}))
"""


def prepare(out: Path) -> tuple[Path, Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.export import synthetic_hf_dir
    from ollama_ft.merge.stage import copy_side_files, merge_streamed

    base = synthetic_hf_dir(out)
    work = out / "merge_proof"
    adapter, merged = work / "adapter", work / "merged"
    if not (adapter / "adapter_model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(adapter))
        del model
    if not (merged / "config.json").is_file():
        merge_streamed(base, adapter, merged)
        copy_side_files(base, None, merged)
    return base, adapter, merged


def run(base: Path, adapter: Path, merged: Path, budget: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OLLAMA_FT_PROOF_RAM_BYTES", None)
    if budget:
        env["OLLAMA_FT_PROOF_RAM_BYTES"] = str(budget)
    out = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(merged),
                          str(merged.parent / "offload")], env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("PROOF "):
            return json.loads(line[6:])
    raise SystemExit(f"proof run failed:\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--budget-gib", type=float, default=3.0)
    args = ap.parse_args()
    from ollama_ft.core import ui
    from ollama_ft.core.hf_loading import float32_bytes

    base, adapter, merged = prepare(Path(args.out))
    fp32 = float32_bytes(base)
    in_ram = run(base, adapter, merged, None)
    budget = int(args.budget_gib * 2**30)
    offloaded = run(base, adapter, merged, budget)
    keys = ("relative_diff", "max_abs_diff", "adapter_effect_max_abs", "argmax_agreement")
    same = all(in_ram[k] == offloaded[k] for k in keys)
    ui.table(f"merge logits proof, Qwen2.5-1.5B shapes ({fp32 / 2**30:.2f} GiB as float32)",
             ["mode", "seconds", "peak anon GiB", "relative diff", "disk offloaded"],
             [[label, f"{r['seconds']:.1f}", f"{r['peak_anon'] / 2**30:.2f}", f"{r['relative_diff']:.3g}",
               str(r["disk_offloaded"])] for label, r in (("in RAM", in_ram), (f"budget {args.budget_gib:g} GiB", offloaded))])
    ui.out.print(f"offloaded / in RAM: time {offloaded['seconds'] / in_ram['seconds']:.2f}x, peak anonymous memory "
                 f"{offloaded['peak_anon'] / in_ram['peak_anon']:.2f}x; identical proof numbers: {same}")
    (Path(args.out) / "merge_proof.json").write_text(json.dumps({"in_ram": in_ram, "offloaded": offloaded,
                                                                 "budget": budget, "identical": same}, indent=2))


if __name__ == "__main__":
    main()
