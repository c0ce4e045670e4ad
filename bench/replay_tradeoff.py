"""The replay trade-off on the demo: general-text perplexity (the forgetting check) and the domain
metrics with `data.replay.ratio` 0, 0.25 and 0.5, one run at a time.

  .venv/bin/python bench/replay_tradeoff.py [--ratios 0 0.25 0.5] [--config configs/demo.yaml]

Each ratio is a run `replay-<pct>` of `ollama-ft train CONFIG --set data.replay.ratio=R --until eval`
(no Ollama server needed); finished stages are reused when re-run, and the base model's eval GGUF is
copied from an earlier run's cache when one has it. The forgetting check is the eval stage's
(`metrics.json` "general"); for a run whose report has none, this script scores the same general
text itself through `ollama_ft.eval.general`. Ratio 0 is the baseline: every other row is also
shown as a ratio to it. Writes bench/out/replay_tradeoff.{json,md} and docs/replay_tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} threads"


def run_name(ratio: float) -> str:
    return f"replay-{round(ratio * 100):02d}"


def reuse_base_gguf(runs: Path, name: str) -> None:
    """The eval stage converts the base to GGUF once per run (runs/<run>/cache): copy an earlier one."""
    dst = runs / name / "cache"
    if dst.exists():
        return
    for src in sorted(runs.glob("*/cache")):
        if any(src.glob("base-*.gguf")):
            dst.mkdir(parents=True)
            for f in src.glob("base-*"):
                shutil.copy2(f, dst / f.name)
            return


def general_fallback(run: Path, cfg) -> dict | None:
    """The forgetting check through eval/general.py, for a report written before it existed."""
    try:
        from ollama_ft.eval import general as eg
    except ImportError:
        return None
    quant = cfg.ollama.quant
    base = next(iter((run / "cache").glob(f"base-{quant}.gguf")), None)
    tuned = next(iter((run / "gguf").glob(f"*-{quant}.gguf")), None)
    if base is None or tuned is None:
        return None
    texts = eg.load_texts(eg.general_path(cfg.eval.general_data))
    template = (run / "data" / "chat_template.jinja").read_text()
    scores = [eg.score(g, texts, template, threads=cfg.eval.threads, seed=cfg.eval.seed) for g in (base, tuned)]
    return eg.check(scores[0], scores[1], max_increase=None, n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)


def measure(config: Path, ratio: float, runs: Path, extra: list[str]) -> dict:
    from ollama_ft.core.config import load_config

    name = run_name(ratio)
    sets = [f"name={name}", f"runs_dir={runs}", f"data.replay.ratio={ratio}", f"ollama.name=ollama-ft-{name}", *extra]
    reuse_base_gguf(runs, name)
    env = {**os.environ, "OLLAMA_HOST": os.environ.get("OLLAMA_HOST", "http://127.0.0.1:9")}
    t = time.time()
    cmd = [sys.executable, "-m", "ollama_ft", "train", str(config), "--until", "eval"]
    for s in sets:
        cmd += ["--set", s]
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    wall = time.time() - t
    if rc != 0:
        raise SystemExit(f"{name}: ollama-ft train exited {rc}")
    run = runs / name
    m = json.loads((run / "report" / "metrics.json").read_text())
    stats = json.loads((run / "data" / "stats.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    gen = m.get("general")
    source = "eval stage"
    if not gen:
        gen, source = general_fallback(run, load_config(config, sets).config), "bench (eval/general.py)"
    tuned, base = m["tuned"]["corpus"], m["base"]["corpus"]
    return {
        "ratio": ratio, "run": name, "wall_s": round(wall, 1),
        "train_s": manifest["stages"].get("train", {}).get("seconds"),
        "train_examples": stats["counts"]["train"],
        "replay_examples": stats.get("replay", {}).get("used", 0),
        "replay_share": stats.get("replay", {}).get("share", 0.0),
        "domain": {k: tuned.get(k) for k in ("rouge_l", "chrf", "bleu", "perplexity", "stop_at_eot", "facts_all",
                                             "fact_recall")},
        "domain_base": {k: base.get(k) for k in ("rouge_l", "chrf", "bleu", "perplexity", "facts_all")},
        "general": ({"base_ppl": gen.get("base_perplexity"), "tuned_ppl": gen.get("tuned_perplexity"),
                     "source": source} if gen else None),
    }


def quick_scores(run: Path, texts: list[str], adapter: bool) -> dict:
    """--quick: general-text and domain-test perplexity of base (+ the run's adapter) in torch float32,
    token-weighted, through the data stage's packed scorer (no merge/export/eval: minutes, not tens)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.data.quality import batch_nll

    model = AutoModelForCausalLM.from_pretrained(str(run / "base"), dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run / "adapter"))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(run / "base"))
    general = [tok(t)["input_ids"] for t in texts]
    general = [(ids, ids) for ids in general]
    t = pq.read_table(run / "data" / "test.parquet")
    domain = list(zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist(), strict=True))
    out = {}
    for name, ex in (("general_ppl", general), ("domain_test_ppl", domain)):
        tot = n = 0.0
        for b in range(0, len(ex), 8):
            batch = ex[b:b + 8]
            for (_ids, lab), nll in zip(batch, batch_nll(model, batch, "cpu"), strict=True):
                k = sum(1 for x in lab[1:] if x != -100)
                tot, n = tot + nll * k, n + k
        out[name] = math.exp(tot / n)
    return out


def measure_quick(config: Path, ratio: float, runs: Path, extra: list[str], texts: list[str]) -> dict:
    name = run_name(ratio)
    sets = [f"name={name}", f"runs_dir={runs}", f"data.replay.ratio={ratio}", f"ollama.name=ollama-ft-{name}", *extra]
    cmd = [sys.executable, "-m", "ollama_ft", "train", str(config), "--until", "train"]
    for s in sets:
        cmd += ["--set", s]
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise SystemExit(f"{name}: ollama-ft train --until train failed")
    run = runs / name
    stats = json.loads((run / "data" / "stats.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    evals = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    return {"ratio": ratio, "run": name, "train_examples": stats["counts"]["train"],
            "replay_examples": stats.get("replay", {}).get("used", 0),
            "train_s": manifest["stages"].get("train", {}).get("seconds"),
            "val_loss": evals[-1].get("eval_loss") if evals else None,
            **quick_scores(run, texts, adapter=True)}


def quick_table(rows: list[dict], base: dict, cpu: str, commit: str, extra: list[str]) -> str:
    b = rows[0]
    over = " ".join("--set " + e for e in extra)
    out = [f"Replay trade-off, quick mode (train stage + torch float32 scoring of base+adapter; no merge/export/"
           f"eval), `configs/demo.yaml` {over} (commit {commit}), {cpu}. Baseline: replay {b['ratio']} in the "
           "same bench run; (x) = ratio to it. Base model: general-text ppl "
           f"{base['general_ppl']:.2f}, domain test ppl {base['domain_test_ppl']:.2f}.", "",
           "| replay ratio | train examples (replay) | general-text ppl | domain test ppl | domain val loss | train s |",
           "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda x: x["ratio"]):
        vl = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "n/a"
        out.append(f"| {r['ratio']} | {r['train_examples']} ({r['replay_examples']}) | {r['general_ppl']:.2f} "
                   f"({r['general_ppl'] / b['general_ppl']:.3f}x) | {r['domain_test_ppl']:.2f} "
                   f"({r['domain_test_ppl'] / b['domain_test_ppl']:.3f}x) | {vl} | {r['train_s']:.0f} |")
    return "\n".join(out) + "\n"


def quick_plot(rows: list[dict], base: dict, path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda x: x["ratio"])
    x = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, [r["general_ppl"] for r in rows], "o-", color="tab:blue", label="general-text ppl (tuned)")
    ax.axhline(base["general_ppl"], color="tab:blue", ls=":", label="general-text ppl (base)")
    ax.plot(x, [r["domain_test_ppl"] for r in rows], "s-", color="tab:orange", label="domain test ppl (tuned)")
    ax.set_xlabel("data.replay.ratio (share of training examples that are general chat)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"Replay trade-off, demo, quick mode ({cpu})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(rows: list[dict], cpu: str, commit: str, config: str, extra: list[str]) -> str:
    b = rows[0]
    over = f" with {' '.join('--set ' + e for e in extra)}" if extra else ""
    out = [f"Replay trade-off on `{Path(config).relative_to(ROOT).as_posix() if Path(config).is_absolute() else config}`"
           f"{over} (commit {commit}), {cpu}. "
           f"Baseline: replay {b['ratio']} in the same bench run; (x) = ratio to it.", "",
           "| replay ratio | train examples (replay) | general-text ppl (base -> tuned) | all key facts stated "
           "(base -> tuned) | domain test ppl | ROUGE-L | chrF | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda x: x["ratio"]):
        g = r["general"]
        gtxt = f"{g['base_ppl']:.2f} -> {g['tuned_ppl']:.2f} ({g['tuned_ppl'] / b['general']['tuned_ppl']:.3f}x)" \
            if g and b["general"] else "n/a"
        d, bd = r["domain"], b["domain"]
        fb, ft = r.get("domain_base", {}).get("facts_all"), d.get("facts_all")
        ftxt = f"{100 * fb:.0f}% -> {100 * ft:.0f}%" if fb is not None and ft is not None else "n/a"
        out.append(f"| {r['ratio']} | {r['train_examples']} ({r['replay_examples']}) | {gtxt} | {ftxt} | "
                   f"{d['perplexity']:.2f} ({d['perplexity'] / bd['perplexity']:.2f}x) | "
                   f"{d['rouge_l']:.3f} ({d['rouge_l'] / bd['rouge_l']:.2f}x) | {d['chrf']:.1f} "
                   f"({d['chrf'] / bd['chrf']:.2f}x) | {r['train_s']:.0f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["ratio"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.8))
    if all(r["general"] for r in rows):
        ax1.plot(x, [r["general"]["tuned_ppl"] for r in rows], "o-", color="tab:blue", label="general-text ppl (tuned)")
        ax1.axhline(rows[0]["general"]["base_ppl"], color="tab:blue", ls=":", label="general-text ppl (base)")
    ax1.plot(x, [r["domain"]["perplexity"] for r in rows], "s-", color="tab:orange", label="domain test ppl (tuned)")
    ax1.set_xlabel("data.replay.ratio (share of training examples that are general chat)")
    ax1.set_ylabel("perplexity (lower is better)")
    ax1.set_yscale("log")
    ax2 = ax1.twinx()
    if all(r["domain"].get("facts_all") is not None for r in rows):
        ax2.plot(x, [100 * r["domain"]["facts_all"] for r in rows], "D-", color="tab:red",
                 label="answers with all key facts, % (tuned)")
    ax2.plot(x, [100 * r["domain"]["rouge_l"] for r in rows], "^--", color="tab:green", label="domain ROUGE-L x 100")
    ax2.set_ylabel("% (higher is better)")
    ax2.set_ylim(0, 100)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
               frameon=False)
    ax1.set_title(f"Replay trade-off, demo ({cpu})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "replay_tradeoff.png"))
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="extra config override for every run, e.g. --set training.max_steps=16 on a busy CPU")
    ap.add_argument("--quick", action="store_true",
                    help="train stage only, then score base+adapter in torch (minutes instead of the full pipeline)")
    args = ap.parse_args()
    runs = Path(args.runs_dir).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    cpu = cpu_name()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "configs/demo.yaml", "ollama_ft/data_files",
                            "ollama_ft/eval", "ollama_ft/train", "ollama_ft/data"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    if dirty:  # other work in the shared tree: say the figures include it
        commit += " + uncommitted " + ", ".join(dirty)
    rows = []
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from ollama_ft.eval import general as eg

        texts = [t["text"] for t in eg.load_texts(eg.BUNDLED)]
        for r in args.ratios:
            rows.append(measure_quick(Path(args.config), r, runs, args.extra, texts))
            print(json.dumps(rows[-1]), flush=True)
        base = quick_scores(runs / run_name(args.ratios[0]), texts, adapter=False)
        md = quick_table(rows, base, cpu, commit, args.extra)
        (out / "replay_tradeoff.json").write_text(json.dumps({"cpu": cpu, "commit": commit, "mode": "quick",
                                                              "overrides": args.extra, "base": base, "rows": rows},
                                                             indent=2))
        (out / "replay_tradeoff.md").write_text(md)
        quick_plot(rows, base, Path(args.png), cpu)
        print(md)
        return 0
    for r in args.ratios:  # one at a time: the CPU is shared; the outputs are rewritten after each
        rows.append(measure(Path(args.config), r, runs, args.extra))
        print(json.dumps(rows[-1]), flush=True)
        md = table(rows, cpu, commit, args.config, args.extra)
        (out / "replay_tradeoff.json").write_text(json.dumps({"cpu": cpu, "commit": commit, "overrides": args.extra,
                                                              "rows": rows}, indent=2))
        (out / "replay_tradeoff.md").write_text(md)
        plot(sorted(rows, key=lambda x: x["ratio"]), Path(args.png), cpu)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
