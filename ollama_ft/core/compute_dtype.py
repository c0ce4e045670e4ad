"""Which dtype torch computes in on this machine, and why.

Why it matters: on a CPU without native bfloat16 (most AVX2-only consumer and cloud CPUs) oneDNN
emulates bf16 matmuls, measured 135x slower than float32 (0.5 vs 62.5 GFLOP/s on an AMD EPYC with
AVX2). On a CPU with avx512_bf16 or AMX, bf16 is the fast path (3x float32 measured on a Zen 4 EPYC).
So "auto" asks the hardware, never assumes.

Used by every stage that runs a torch forward: training (incl. bitsandbytes' 4-bit compute dtype),
and shown by `doctor` and `plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHOICES = ("auto", "float32", "bfloat16", "float16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class ComputeDtype:
    name: str    # float32 | bfloat16 | float16
    reason: str  # one line a user can read ("CPU has no native bfloat16 (no avx512_bf16/amx_bf16)")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.name)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent, e.g. macOS)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native() -> tuple[bool, str]:
    """(native bf16 on this CPU, why). oneDNN's own check decides; the CPU flags name the reason."""
    flags = cpu_flags()
    have = [f for f in _BF16_FLAGS if f in flags]
    try:
        import torch

        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an old or unusual torch build: fall back to the flags alone
        onednn = bool(have)
    if onednn and (have or not flags):
        return True, f"CPU has native bfloat16 ({', '.join(have) or 'oneDNN reports it'})"
    return False, "CPU has no native bfloat16 (no " + "/".join(_BF16_FLAGS) + "), so bf16 would be emulated"


def choose(requested: str, device: str) -> ComputeDtype:
    """The compute dtype for `requested` (model.compute_dtype) on `device` ("cpu" or "cuda")."""
    if requested not in CHOICES:
        from .errors import UserError

        raise UserError(f"model.compute_dtype={requested!r} is not one of {', '.join(CHOICES)}",
                        hint="use auto (the fastest exact-enough dtype for this machine)")
    if requested != "auto":
        return ComputeDtype(requested, f"set by model.compute_dtype={requested}")
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return ComputeDtype("bfloat16", "GPU supports bfloat16")
        return ComputeDtype("float16", "GPU has no bfloat16; float16 with loss scaling")
    native, why = cpu_bf16_native()
    return ComputeDtype("bfloat16" if native else "float32", why)
