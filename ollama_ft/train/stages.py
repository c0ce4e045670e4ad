"""Multi-stage tuning (`stages:`): general -> domain -> task in one run, one adapter carried through.

Stage k trains with its own data, epochs/max_steps and learning rate, starting from the best adapter
of stage k-1 (the first stage from a fresh adapter, or from `--from-adapter`). Each stage lives in
`checkpoints/stage-<k>-<name>/` (its own checkpoints, and its finished adapter + train_summary.json
in `adapter/`). A finished stage is recognised by its fingerprint (its settings, data, and the
adapter it started from), so an interrupted run redoes nothing that finished and resumes the stage it
was in from that stage's newest checkpoint. The last stage's adapter is the stage output; every
stage's validation loss and metrics are recorded in train_summary.json under "stages".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig, StageSpec, TrainingSettings
from .checkpoints import fingerprint


def stage_config(cfg: RunConfig, st: StageSpec) -> RunConfig:
    """The run config as stage `st` trains: its rate, epochs/max_steps, floor and warmup on top of training."""
    tr = cfg.training.model_dump()
    tr["learning_rate"] = st.learning_rate
    if st.epochs is not None or st.max_steps is not None:
        tr["epochs"] = st.epochs if st.epochs is not None else tr["epochs"]
        tr["max_steps"] = st.max_steps  # epochs alone: the stage runs them, not the training section's cap
    if st.warmup_ratio is not None:
        tr["warmup_ratio"] = st.warmup_ratio
    floor = st.min_learning_rate if st.min_learning_rate is not None else tr["min_learning_rate"]
    tr["min_learning_rate"] = floor if floor is not None and floor < st.learning_rate else None
    return cfg.model_copy(update={"training": TrainingSettings.model_validate(tr), "stages": []}, deep=True)


def stage_dir(checkpoints_dir: Path, k: int, st: StageSpec) -> Path:
    return Path(checkpoints_dir) / f"stage-{k + 1}-{st.name}"


def train_all(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path, resume: bool,
              init_adapter: Path | None = None, stage_data: dict[str, Path] | None = None, *, show: bool = True,
              extra_callbacks: list | None = None) -> dict:
    """The whole training of a run in this process: one train_process, or one per stage."""
    from .process import train_process

    if not cfg.stages:
        return train_process(cfg, base_dir, data_dir, out, checkpoints_dir, resume, show=show,
                             extra_callbacks=extra_callbacks, init_adapter=init_adapter)
    stage_data = {k: Path(v) for k, v in (stage_data or {}).items()}
    prev, results = (Path(init_adapter) if init_adapter else None), []
    n = len(cfg.stages)
    for k, st in enumerate(cfg.stages):
        cfg_k = stage_config(cfg, st)
        sdir = stage_dir(checkpoints_dir, k, st)
        data_k = stage_data.get(st.name, Path(data_dir))
        fp = fingerprint(cfg_k, base_dir, data_k, prev)
        done = _finished(sdir / "adapter", fp) if resume else None
        ui.err.rule(f"[bold]training stage {k + 1}/{n}: {st.name}[/] [dim](learning rate {st.learning_rate:g}, "
                    f"data {data_k})[/]")
        if done is not None:
            ui.success(f"stage {st.name}: finished earlier with the same settings, reused ({sdir / 'adapter'})")
            info = done
        else:
            shutil.rmtree(sdir / "adapter", ignore_errors=True)
            info = train_process(cfg_k, base_dir, data_k, sdir / "adapter", sdir / "checkpoints", resume,
                                 show=show, extra_callbacks=extra_callbacks, init_adapter=prev,
                                 extra_info={"stage": st.name, "stage_fingerprint": fp})
        _barrier()  # ranks > 0 load the next stage's start from what rank 0 wrote
        results.append(info)
        prev = sdir / "adapter"
    return _combine(cfg, results, prev, out)


def _finished(adapter_dir: Path, fp: str) -> dict | None:
    summary = adapter_dir / "train_summary.json"
    if not (summary.is_file() and (adapter_dir / "adapter_model.safetensors").is_file()):
        return None
    try:
        info = json.loads(summary.read_text())
    except ValueError:
        return None
    return info if info.get("stage_fingerprint") == fp else None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _combine(cfg: RunConfig, results: list[dict], last_adapter: Path, out: Path) -> dict:
    """Rank 0: the last stage's adapter into `out`, one metrics.jsonl / loss curve, per-stage results."""
    if not results or not results[-1]:
        return {}  # ranks > 0
    from ..core.runs import atomic_write_text
    from .display import plot_loss_curve, read_metrics

    out.mkdir(parents=True, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(last_adapter / f, out / f)
    records, offset = [], 0
    for st, info in zip(cfg.stages, results, strict=True):
        for r in read_metrics(_stage_metrics(last_adapter, st.name)):
            records.append({**r, "stage": st.name, "step": r.get("step", 0) + offset})
        offset += int(info.get("steps") or 0)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    plot_loss_curve(records, out / "loss_curve.png")
    last = results[-1]
    keep = ("stage", "steps", "best_eval_loss", "best_eval_perplexity", "best_step", "final_train_loss",
            "final_learning_rate", "stopped_early", "tokens_per_s", "train_examples", "init_adapter", "resumed_from")
    per_stage: list[dict[str, Any]] = []
    for st, info in zip(cfg.stages, results, strict=True):
        per_stage.append({**{k: info.get(k) for k in keep}, "learning_rate": st.learning_rate,
                          "data": st.data or cfg.data.path})
    info = {**last, "stages": per_stage, "steps": sum(int(i.get("steps") or 0) for i in results)}
    info.pop("stage_fingerprint", None)
    info["summary"] = "; ".join(
        f"{s['stage']}: {s['steps']} steps, best eval loss "
        + (f"{s['best_eval_loss']:.4f}" if s["best_eval_loss"] is not None else "-") for s in per_stage)
    atomic_write_text(out / "train_summary.json", json.dumps(info, indent=2) + "\n")
    return info


def _stage_metrics(last_adapter: Path, name: str) -> Path:
    """metrics.jsonl of the stage called `name` (a sibling of the last stage's directory)."""
    root = last_adapter.parent.parent
    matches = [p for p in root.glob("stage-*/adapter/metrics.jsonl") if p.parent.parent.name.split("-", 2)[2] == name]
    return matches[0] if matches else root / "missing.jsonl"  # read_metrics: a missing file has no records
