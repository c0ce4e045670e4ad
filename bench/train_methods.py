"""Training methods of issue 17 on the demo model: trainable parameters, tokens/s and peak RSS per method.

Every variant is the demo config (Gemma 3 270M QLoRA, configs/demo.yaml) on the demo run's base/ and
data/ with one change, trained for the same few steps, each in its own subprocess (its own peak RSS);
ratios are against the unchanged config measured in the same run, in tokens per CPU-second of the
training process (wall-clock tokens/s swings with other jobs on a shared CPU; CPU time much less). Needs `make demo` (or
`ollama-ft train configs/demo.yaml --until data`) first.

    .venv/bin/python bench/train_methods.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "train_methods"
VARIANTS = {
    "baseline (all layers, all-linear)": [],
    "lora.layers: last 4": ["lora.layers=last 4"],
    "lora.target_modules: attention": ["lora.target_modules=attention"],
    "lora.target_modules: mlp": ["lora.target_modules=mlp"],
    "training.label_smoothing: 0.1": ["training.label_smoothing=0.1"],
}  # LoRA+ and the cosine floor change rates only, not the work per step: not measured here


def _clock():
    """A callback timing training in wall and process CPU seconds (from train begin to the last train log)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
            self.wall = self.cpu = 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    return Clock()


def child(overrides: list[str], steps: int) -> dict:
    from ollama_ft.core.config import load_config
    from ollama_ft.train.stage import train_process

    fixed = [f"training.max_steps={steps}", "training.save_steps=1000", "training.eval_steps=1000",
             "training.patience=null", "training.warmup_ratio=0"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", fixed + overrides).config
    run = ROOT / "runs" / "demo"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        clock = _clock()
        info = train_process(cfg, run / "base", run / "data", Path(tmp) / "a", Path(tmp) / "ck", False, show=False,
                             extra_callbacks=[clock])
        seconds = time.perf_counter() - t0
    tokens = info["tokens_per_s"] * clock.wall  # the same interval MetricsCallback measures over
    # Tokens per CPU-second: what the method costs, nearly independent of other jobs on a shared CPU
    # (wall-clock tokens/s is kept too; it swings with the machine's load).
    return {"trainable": info["trainable_parameters"], "tokens_per_s": info["tokens_per_s"],
            "tokens_per_cpu_s": tokens / max(clock.cpu, 1e-9),
            "final_train_loss": info["final_train_loss"], "eval_loss": info["best_eval_loss"],
            "seconds": round(seconds, 1),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def interleaved(rounds: int) -> dict:
    """Forward + backward time of one demo micro-batch per variant, all models in this one process and
    timed in alternating order, round after round (the median of each): on a CPU other jobs share, every
    variant sees the same load, which separate runs minutes apart do not."""
    import statistics

    from transformers import TrainingArguments

    from ollama_ft.core.config import load_config
    from ollama_ft.train.data import PackingCollator, load_split
    from ollama_ft.train.model import load_model, pick_device_and_dtype, resolve_checkpointing
    from ollama_ft.train.trainer import trainer_class

    run = ROOT / "runs" / "demo"
    rows = load_split(run / "data", "train").rows
    batches = [PackingCollator()(rows[i:i + 8]) for i in range(0, 8 * rounds, 8)]
    setups = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(ROOT / "configs" / "demo.yaml", overrides).config
        device, dtype, _ = pick_device_and_dtype(cfg)
        gc = resolve_checkpointing(cfg, run / "base", device)[0]
        model = load_model(cfg, run / "base", device, dtype, checkpointing=gc)
        model.train()
        tr = trainer_class()(model=model, args=TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to="none"),
                             loss_chunk_size=cfg.training.loss_chunk_size,
                             label_smoothing=cfg.training.label_smoothing)
        setups[name] = (model, tr)
    times: dict[str, list[float]] = {n: [] for n in setups}
    for k, batch in enumerate(batches):
        order = list(setups) if k % 2 == 0 else list(reversed(setups))
        for name in order:
            model, tr = setups[name]
            model.zero_grad(set_to_none=True)
            b = {key: v.clone() for key, v in batch.items()}
            t0 = time.perf_counter()
            loss = tr.compute_loss(model, b)
            loss.backward()
            times[name].append(time.perf_counter() - t0)
    tokens = [int(b["input_ids"].numel()) for b in batches]
    out = {}
    for name, ts in times.items():
        # first round is warm-up (allocations, kernels), dropped
        out[name] = {"median_s": statistics.median(ts[1:]), "tokens_per_s": sum(tokens[1:]) / sum(ts[1:]),
                     "trainable": sum(p.numel() for p in setups[name][0].parameters() if p.requires_grad)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", default=None)
    ap.add_argument("--interleaved", type=int, default=0, help="ROUNDS: alternate the variants in one process")
    a = ap.parse_args()
    if a.interleaved:
        res = interleaved(a.interleaved)
        base = res["baseline (all layers, all-linear)"]
        print("| method | trainable params | fwd+bwd s per micro-batch (median) | tokens/s | vs baseline |")
        print("|---|---|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['trainable']:,} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "interleaved.json").write_text(json.dumps(res, indent=2))
        return 0
    if a.child is not None:
        print("RESULT " + json.dumps(child(json.loads(a.child), a.steps)))
        return 0
    if not (ROOT / "runs" / "demo" / "data" / "train.parquet").is_file():
        sys.exit("needs runs/demo/base and runs/demo/data: run `ollama-ft train configs/demo.yaml --until data`")
    results = {}
    for name, overrides in VARIANTS.items():
        p = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", json.dumps(overrides)],
                           capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{name}: failed")
        results[name] = json.loads(line[-1][7:])
        print(name, results[name], flush=True)
    base = results["baseline (all layers, all-linear)"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    rows = ["| method | trainable params | vs baseline | tokens per CPU-s | vs baseline | wall tokens/s | "
            f"peak RSS GB | train loss (step {a.steps}) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['trainable']:,} | {r['trainable'] / base['trainable']:.2f}x | "
                    f"{r['tokens_per_cpu_s']:.1f} | {r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x | "
                    f"{r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['final_train_loss']:.3f} |")
    table = "\n".join(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"cpu": cpu, "steps": a.steps, "results": results}, indent=2))
    print(f"\nCPU: {cpu} ({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} threads), "
          f"{a.steps} steps of the demo config each\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
