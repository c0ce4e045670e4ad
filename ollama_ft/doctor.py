"""`ollama-ft doctor`: what works on this machine and what does not, each with its fix.

Native code is probed in subprocesses: a llama.cpp build that crashes (AMX inside a VM kills the
process with SIGSEGV/SIGILL at the first decode) must be reported, not take the tool down.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .core import ui
from .core.errors import UserError
from .core.files import cache_root, human_bytes

PORTABLE_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _probe(code: str, timeout: float = 120) -> tuple[int, str]:
    """Run Python code in a child process; return (exit code, last output line)."""
    try:
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode != 0:
        err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        out = out or (err[-1] if err else "")
    return p.returncode, out


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", ok, sys.version.split()[0], "" if ok else "install Python 3.10 or newer")


def check_torch() -> list[Check]:
    rc, out = _probe(
        """
        import torch
        cuda = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if cuda else '-'
        bf16 = torch.cuda.is_bf16_supported() if cuda else False
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0
        from ollama_ft.core.compute_dtype import choose
        c = choose('auto', 'cuda' if cuda else 'cpu')
        from ollama_ft.train.model import resolve_attn_implementation
        attn, attn_why = resolve_attn_implementation('auto', 'cuda' if cuda else 'cpu')
        print(f"{torch.__version__}|{cuda}|{name}|{bf16}|{mem:.1f}|{c.name}|{attn}|{torch.version.cuda}|{c.reason}|{attn_why}")
        """
    )
    if rc != 0:
        return [Check("torch", False, out, "run `make install` (CPU) or install a CUDA torch first, see README")]
    ver, cuda, name, bf16, mem, dtype, attn, built_for_cuda, why, attn_why = out.split("|", 9)
    checks = [Check("torch", True, ver),
              Check("compute dtype", True, f"{dtype} ({why}); override with model.compute_dtype", required=False),
              Check("attention", True, f"{attn_why}; model.attn_implementation (or a guide's `attention.type: "
                    "flash_attn`) picks it", required=False)]
    if cuda == "True":
        checks.append(Check("CUDA GPU", True, f"{name}, {mem} GiB, bf16={'yes' if bf16 == 'True' else 'no (fp16 used)'}",
                            required=False))
    else:
        cuda_build = built_for_cuda not in ("None", "")
        checks.append(Check("CUDA GPU", False, "none (training runs on CPU: fine for the demo, slow for 7B)",
                            f"torch {ver} is a CUDA build: a GPU needs the NVIDIA driver (`nvidia-smi` lists it)"
                            if cuda_build else "for GPU training install a CUDA torch into .venv before "
                            "`make install` (README, GPU users)", required=False))
    return checks


def check_bnb() -> Check:
    rc, out = _probe(
        """
        import warnings; warnings.filterwarnings('ignore')
        import torch, bitsandbytes as bnb
        from bitsandbytes.nn import Linear4bit
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
        lin = Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type='nf4', compress_statistics=True)
        lin = lin.to(dev)
        y = lin(torch.randn(2, 64, dtype=torch.bfloat16, device=dev))
        print(f"{bnb.__version__} NF4 on {dev} ok")
        """
    )
    return Check("bitsandbytes 4-bit", rc == 0, out,
                 "" if rc == 0 else "pip install 'bitsandbytes>=0.48,<0.51' (NF4 works on CPU and CUDA)")


def check_llama_cpp() -> Check:
    # A tiny decode exercises the matmul kernels; the AMX crash happens exactly there.
    rc, out = _probe(
        """
        import llama_cpp, sys
        print(llama_cpp.__version__)
        """,
        timeout=60,
    )
    if rc != 0:
        return Check("llama-cpp-python", False, out or "not importable",
                     f"CMAKE_ARGS=\"{PORTABLE_CMAKE}\" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")
    ver = out
    gguf = _any_small_gguf()
    if gguf is None:
        return Check("llama-cpp-python", True, f"{ver} (import ok; no GGUF at hand to probe a decode)")
    rc, out = _probe(
        f"""
        import llama_cpp
        m = llama_cpp.Llama({str(gguf)!r}, n_ctx=64, verbose=False, n_threads=1)
        r = m.create_completion("Hello", max_tokens=2, temperature=0)
        print("decode ok")
        """,
        timeout=120,
    )
    if rc == 0:
        return Check("llama-cpp-python", True, f"{ver}, decode ok")
    crashed = rc < 0 or rc in (132, 139)
    detail = f"{ver}: decode {'CRASHED (signal ' + str(-rc) + ')' if crashed else 'failed: ' + out}"
    return Check("llama-cpp-python", False, detail,
                 "rebuild portable (AMX in VMs crashes native builds): "
                 f"CMAKE_ARGS=\"{PORTABLE_CMAKE}\" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")


def _any_small_gguf() -> Path | None:
    for root in (Path("runs"), cache_root()):
        if root.is_dir():
            for p in sorted(root.rglob("*.gguf")):
                if p.stat().st_size < 1_500_000_000:
                    return p
    return None


def check_converter() -> Check:
    try:
        from .export.converter import converter_dir

        d = converter_dir()
    except UserError as e:
        return Check("llama.cpp converter", False, e.message, e.hint or "run `make install`")
    except ImportError:
        d = Path(sys.prefix) / "converter"
        if not (d / "convert_hf_to_gguf.py").exists():
            return Check("llama.cpp converter", False, f"not found in {d}", "run `make install`")
    return Check("llama.cpp converter", True, str(d))


def check_gguf_module() -> Check:
    rc, out = _probe(
        """
        from transformers.utils import is_gguf_available
        import importlib.metadata
        import gguf  # noqa: F401 - the import is what is checked
        print(f"gguf {importlib.metadata.version('gguf')}, transformers GGUF loading: {is_gguf_available()}")
        assert is_gguf_available()
        """
    )
    return Check("gguf (transformers)", rc == 0, out,
                 "" if rc == 0 else "pip install 'gguf>=0.17,<0.20' in the main environment (not the converter's copy)")


def check_ollama(host: str | None) -> Check:
    from .ollama import api as ollama_api

    url = ollama_api.resolve_host(host)
    if ollama_api.is_reachable(url):
        version = ollama_api.server_version(url) if hasattr(ollama_api, "server_version") else "?"
        return Check("Ollama server", True, f"{url} (version {version})", required=False)
    return Check("Ollama server", False, f"not reachable at {url}",
                 "start it with `ollama serve` (or set OLLAMA_HOST); without it ollama-ft stops after the "
                 "Modelfile and prints the `ollama create` command", required=False)


def check_disk(path: Path = Path(".")) -> Check:
    free_bytes = shutil.disk_usage(path).free
    free = free_bytes / 2**30
    # A 7B run needs ~15 GB base + ~15 GB merged + ~15 GB F16 GGUF + ~4.5 GB Q4_K_M.
    ok = free >= 2
    return Check("free disk", ok, f"{human_bytes(free_bytes)} in {path.resolve()}",
                 "" if free >= 50 else "a 7B run needs about 50 GB; the 270M demo about 2 GB")


def doctor_command(host: str | None = None) -> None:
    checks: list[Check] = [check_python()]
    with ui.status("probing torch, bitsandbytes, llama.cpp (in subprocesses) ..."):
        checks += check_torch()
        checks.append(check_bnb())
        checks.append(check_gguf_module())
        checks.append(check_llama_cpp())
        checks.append(check_converter())
        checks.append(check_ollama(host))
        checks.append(check_disk())
    rows = []
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]missing[/]")
        rows.append([c.name, mark, c.detail, c.fix])
    ui.table("ollama-ft doctor", ["check", "status", "detail", "fix"], rows)
    broken = [c.name for c in checks if c.required and not c.ok]
    if broken:
        raise UserError(f"required parts are broken: {', '.join(broken)}", hint="apply the fixes in the table above")
