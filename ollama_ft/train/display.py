"""Live training display, metrics.jsonl and the loss-curve PNG.

The display is a Rich Live panel on ui.err (stderr): step, epoch, loss, learning rate, gradient
norm, tokens/s, ETA, memory (VRAM on CUDA, RSS on CPU) and warnings when the gradient norm leaves
0.1-5.0, the loss spreads more than 5% around its trend over 10 steps, or GPU memory leaves
70-90% of the card. Without a terminal it prints one line
every 10 logged steps instead.
"""

from __future__ import annotations

import json
import math
import re
import resource
import time
from collections import deque
from pathlib import Path

import torch
from rich.live import Live
from rich.table import Table
from transformers import TrainerCallback

from ..core import ui

GRAD_NORM_RANGE = (0.1, 5.0)
SWING_WINDOW = 10
SWING_LIMIT = 0.05


def memory_now() -> dict[str, float]:
    """Current and peak memory of this process in bytes: VRAM on CUDA, RSS otherwise."""
    if torch.cuda.is_available():
        return {"kind": "vram", "current": float(torch.cuda.memory_allocated()),
                "peak": float(torch.cuda.max_memory_allocated())}
    import psutil

    rss = float(psutil.Process().memory_info().rss)
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # KiB on Linux
    return {"kind": "rss", "current": rss, "peak": max(peak, rss)}


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GB"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def loss_volatility(losses: list[float]) -> float:
    """Spread of the losses around their local trend (a quadratic fit over the window), relative to their
    mean: residual std / mean.

    A smoothly falling loss has a large max/min ratio but small residuals, so it is not volatile; a loss
    that jumps step to step has large residuals whatever its trend.
    """
    import numpy as np

    y = np.asarray(losses, dtype=float)
    mean = float(y.mean())
    if len(y) < 4 or mean <= 0:
        return 0.0
    x = np.arange(len(y), dtype=float)
    trend = np.polyval(np.polyfit(x, y, 2), x)
    return float(np.std(y - trend, ddof=3) / mean)


MEMORY_SHARE_RANGE = (0.70, 0.90)  # the guides' target for GPU memory use against the budget


def training_warnings(grad_norm: float | None, recent_losses: list[float],
                      memory_share: float | None = None) -> list[str]:
    """Warnings for the current step (pure, so the thresholds are testable).

    memory_share: GPU memory in use / budget (None on CPU, where there is no budget to fill).
    """
    out = []
    if grad_norm is not None and math.isfinite(grad_norm):
        lo, hi = GRAD_NORM_RANGE
        if grad_norm < lo:
            out.append(f"gradient norm {grad_norm:.3g} < {lo}: learning may have stalled (raise the learning rate?)")
        elif grad_norm > hi:
            out.append(f"gradient norm {grad_norm:.3g} > {hi}: unstable (lower the learning rate?)")
    elif grad_norm is not None:
        out.append(f"gradient norm is {grad_norm}: training diverged")
    if len(recent_losses) >= SWING_WINDOW:
        vol = loss_volatility(recent_losses[-SWING_WINDOW:])
        if vol > SWING_LIMIT:
            out.append(f"loss is volatile: {100 * vol:.0f}% spread around its trend over the last "
                       f"{SWING_WINDOW} steps (lower the learning rate or raise the batch size?)")
    if memory_share is not None:
        lo, hi = MEMORY_SHARE_RANGE
        if memory_share > hi:
            out.append(f"GPU memory at {100 * memory_share:.0f}% of the budget: close to out-of-memory "
                       "(lower training.micro_batch_size or data.max_length)")
        elif memory_share < lo:
            out.append(f"GPU memory at {100 * memory_share:.0f}% of the budget: room for a larger "
                       "training.micro_batch_size (faster)")
    return out


class MetricsCallback(TrainerCallback):
    """Writes metrics.jsonl (train and eval records), drives the live panel, tracks tokens/s and memory."""

    def __init__(self, metrics_path: Path, token_counter, show: bool = True):
        self.metrics_path = Path(metrics_path)
        self.token_counter = token_counter  # callable -> useful tokens processed so far (this process)
        self.show = show
        self.live: Live | None = None
        self.t0 = 0.0
        self.tok0 = 0
        self.step0 = 0
        self.losses: deque[float] = deque(maxlen=SWING_WINDOW)
        self.last: dict = {}
        self.warnings: list[str] = []
        self.tokens_per_s = 0.0
        self.peak_mem = 0.0
        self._logged = 0
        self.world = 1
        self.eval_step: int | None = None  # step of the newest eval record
        self._printed_warnings: set[str] = set()  # kinds printed in line mode, so a log shows each once

    def truncate_after(self, step: int) -> None:
        """On resume, drop records newer than the checkpoint so the curve continues without duplicates."""
        if not self.metrics_path.is_file():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self.tok0 = self.token_counter()
        self.step0 = state.global_step
        self.world = max(1, args.world_size)
        if self.show and ui.err.is_terminal:
            self.live = Live(self._render(state), console=ui.err, refresh_per_second=2, transient=False)
            self.live.start()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        now = time.perf_counter()
        mem = memory_now()
        self.peak_mem = max(self.peak_mem, mem["peak"])
        if "loss" in logs:
            dt = max(now - self.t0, 1e-9)
            self.tokens_per_s = (self.token_counter() - self.tok0) * self.world / dt
            rec.update(type="train", loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                       grad_norm=logs.get("grad_norm"), tokens_per_s=round(self.tokens_per_s, 2),
                       memory_gb=round(mem["current"] / 2**30, 3), peak_memory_gb=round(mem["peak"] / 2**30, 3),
                       memory_kind=mem["kind"])
            self.losses.append(float(logs["loss"]))
            gn = logs.get("grad_norm")
            share = None
            if mem["kind"] == "vram":
                total = torch.cuda.get_device_properties(0).total_memory
                share = mem["peak"] / total if total else None
            self.warnings = training_warnings(float(gn) if gn is not None else None, list(self.losses), share)
            if self.warnings:
                rec["warnings"] = self.warnings
            done = state.global_step - self.step0
            left = state.max_steps - state.global_step
            rec["eta_s"] = round((now - self.t0) / done * left, 1) if done > 0 else None
            self.last.update(rec)
        elif "eval_loss" in logs:
            rec.update(type="eval", eval_loss=logs["eval_loss"], eval_perplexity=logs.get("eval_perplexity"),
                       eval_tokens=logs.get("eval_tokens"))
            self.eval_step = state.global_step
            self.last.update(rec)
        else:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.live is not None:
            self.live.update(self._render(state))
        elif self.show and self._print_line(args, state, rec["type"]):
            ui.info(self._line(state))
        self._logged += 1

    def _print_line(self, args, state, kind: str) -> bool:
        """Line mode (a log file, CI): every eval, every 10th train log, the last step; a train log whose
        eval comes next is left to the eval line, which carries both."""
        if kind == "eval":
            return True
        every = getattr(args, "eval_steps", None)
        if getattr(args, "eval_strategy", None) == "steps" and every and state.global_step % int(every) == 0:
            return False
        if any(_warning_kind(w) not in self._printed_warnings for w in self.warnings):
            return True  # a new warning is shown when it appears
        return self._logged % 10 == 0 or state.global_step >= state.max_steps

    def on_train_end(self, args, state, control, **kw):
        if self.live is not None:
            self.live.update(self._render(state))
            self.live.stop()
            self.live = None

    def _line(self, state) -> str:
        r = self.last
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if r.get("eval_loss") is not None and self.eval_step == state.global_step:
            parts.append(f"eval {r['eval_loss']:.4f} (ppl {r.get('eval_perplexity', 0):.2f})")
        parts.append(f"{self.tokens_per_s:.0f} tok/s")
        parts.append(f"ETA {_fmt_eta(r.get('eta_s'))}")
        # A warning is printed when it appears, not on every line while it lasts (metrics.jsonl has each).
        kinds = {_warning_kind(w): w for w in self.warnings}
        new = [w for k, w in kinds.items() if k not in self._printed_warnings]
        self._printed_warnings = set(kinds)
        return "  ".join(parts) + "".join(f"\n  [yellow]warning:[/] {w}" for w in new)

    def _render(self, state) -> Table:
        r = self.last
        t = Table(title="training", show_header=False, box=None, padding=(0, 2))
        t.add_column(style="dim")
        t.add_column()
        lr = r.get("learning_rate")
        gn = r.get("grad_norm")
        mem = memory_now()
        rows = [
            ("step", f"{state.global_step} / {state.max_steps}"),
            ("epoch", f"{state.epoch or 0:.2f}"),
            ("loss", f"{r['loss']:.4f}" if "loss" in r else "-"),
            ("eval loss / ppl", f"{r['eval_loss']:.4f} / {r.get('eval_perplexity', 0):.2f}"
             if r.get("eval_loss") is not None else "-"),
            ("learning rate", f"{lr:.3g}" if lr is not None else "-"),
            ("grad norm", f"{gn:.3g}" if gn is not None else "-"),
            ("tokens/s", f"{self.tokens_per_s:.0f}"),
            ("ETA", _fmt_eta(r.get("eta_s"))),
            ("VRAM" if mem["kind"] == "vram" else "RSS", f"{_gb(mem['current'])} (peak {_gb(mem['peak'])})"),
        ]
        for k, v in rows:
            t.add_row(k, v)
        for w in self.warnings:
            t.add_row("[yellow]warning[/]", w)
        return t


def _warning_kind(text: str) -> str:
    """A warning without its numbers: the same warning with a new value is the same kind."""
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", text)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_loss_curve(records: list[dict], out_png: Path) -> Path | None:
    """Train and eval loss against step, written atomically; None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.runs import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)
