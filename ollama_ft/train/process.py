"""One training process: the run (or one stage of it, or one rank under torchrun) from setup to outputs.

Resolves device, dtype, checkpointing, attention and batching; decides the resume point; builds the
model (train/model.py), the Trainer (train/trainer.py) and its callbacks (train/callbacks.py); trains;
writes the best adapter, metrics.jsonl, loss_curve.png and train_summary.json (rank 0).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.nll import perplexity_of_mean
from .checkpoints import BEST_DIR, fingerprint, newest_checkpoint, prepare_checkpoints
from .model import (
    compute_choice,
    load_model,
    pad_id,
    pick_device_and_dtype,
    resolve_attn_implementation,
    resolve_checkpointing,
    trainable_summary,
)
from .plan import resolve_batching
from .trainer import trainer_class


@dataclass
class _Setup:
    """What one training process resolved before building the Trainer."""

    train_ds: Any
    eval_ds: Any
    device: str
    dtype: Any
    optim: str
    dtype_reason: str
    checkpointing: bool
    checkpointing_why: str
    attn: str
    micro: int
    accum: int
    global_batch: int
    total_steps: int
    warmup: int
    world: int
    is_main: bool


def _setup(cfg: RunConfig, base_dir: Path, data_dir: Path) -> _Setup:
    from .data import load_split

    t = cfg.training
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("training.tensorboard=true but TensorBoard is not installed",
                            hint="pip install 'ollama-ft[tensorboard]' or set training.tensorboard=false") from None
    train_ds = load_split(data_dir, "train")
    eval_ds = load_split(data_dir, "validation", required=False)
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    device, dtype, optim = pick_device_and_dtype(cfg)
    # Resolved once: "auto" checkpointing reads free memory, which may change during the run.
    checkpointing, checkpointing_why = resolve_checkpointing(cfg, base_dir, device)
    attn, attn_why = resolve_attn_implementation(cfg.model.attn_implementation, device)
    dtype_reason = compute_choice(cfg).reason
    if is_main:
        ui.info(f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason}); "
                f"gradient checkpointing {checkpointing_why}; attention {attn_why}")
    micro, accum, global_batch = resolve_batching(t.batch_size, t.micro_batch_size, world)
    if global_batch != t.batch_size and is_main:
        ui.warn(f"training.batch_size={t.batch_size} is not a multiple of micro batch {micro} x {world} "
                f"process(es); using {global_batch}")
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (micro * world)) // accum)
    total_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    return _Setup(train_ds, eval_ds, device, dtype, optim, dtype_reason, checkpointing, checkpointing_why, attn,
                  micro, accum, global_batch, total_steps, int(round(t.warmup_ratio * total_steps)), world, is_main)


def _resume_point(s: _Setup, checkpoints_dir: Path, fp: str, resume: bool) -> Path | None:
    resume_from = prepare_checkpoints(checkpoints_dir, fp, resume) if s.is_main else None
    if s.world > 1:
        # Ranks > 0 wait for rank 0's decision (it may have deleted stale checkpoints).
        marker = checkpoints_dir / "fingerprint.json"
        for _ in range(600):
            if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp:
                break
            time.sleep(0.1)
        if not s.is_main and resume:
            resume_from = newest_checkpoint(checkpoints_dir)
    return resume_from


def train_process(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                  resume: bool, show: bool = True, extra_callbacks: list | None = None,
                  init_adapter: Path | None = None, extra_info: dict | None = None) -> dict:
    """One training process (the whole run or one stage of it, or one rank under torchrun)."""
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from .callbacks import callback_classes, run_with_sigint
    from .data import PackingCollator, PaddingCollator
    from .display import MetricsCallback
    from .trainer import training_arguments

    base_dir, data_dir, out, checkpoints_dir = map(Path, (base_dir, data_dir, out, checkpoints_dir))
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.training
    hf_logging.set_verbosity_error()
    s = _setup(cfg, base_dir, data_dir)
    resume_from = _resume_point(s, checkpoints_dir, fingerprint(cfg, base_dir, data_dir, init_adapter), resume)

    torch.manual_seed(t.seed)
    model = load_model(cfg, base_dir, s.device, s.dtype, int(os.environ.get("LOCAL_RANK", "0")),
                       checkpointing=s.checkpointing, init_adapter=init_adapter)
    params = trainable_summary(model)
    args = training_arguments(cfg, checkpoints_dir, micro=s.micro, accum=s.accum, total_steps=s.total_steps,
                              warmup=s.warmup, optim=s.optim, device=s.device, dtype=s.dtype, world=s.world,
                              has_eval=s.eval_ds is not None)
    collator = (PackingCollator(flash_attn_kwargs=s.attn == "flash_attention_2") if t.packing
                else PaddingCollator(pad_id(model)))
    BestAndEarlyStop, InterruptCallback = callback_classes()
    best_cb = BestAndEarlyStop(checkpoints_dir / BEST_DIR, t.patience)
    interrupt_cb = InterruptCallback()
    trainer = trainer_class()(model=model, args=args, train_dataset=s.train_ds, eval_dataset=s.eval_ds,
                              data_collator=collator, loss_chunk_size=t.loss_chunk_size,
                              label_smoothing=t.label_smoothing, run_config=cfg)
    best_cb.collective = t.distributed == "fsdp" and s.world > 1
    best_cb.save = lambda d: save_adapter(trainer, d, best_cb.collective)
    metrics_path = checkpoints_dir / "metrics.jsonl"
    metrics_cb = MetricsCallback(metrics_path, lambda: trainer.useful_tokens, show=show and s.is_main)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # our own display replaces them
    for cb in (best_cb, interrupt_cb, metrics_cb, *(extra_callbacks or [])):
        trainer.add_callback(cb)

    if s.is_main:
        _announce(cfg, s, params, resume_from, metrics_cb, metrics_path, init_adapter)
    if run_with_sigint(trainer, interrupt_cb, resume_from):
        ui.warn(f"interrupted: checkpoint saved in {newest_checkpoint(checkpoints_dir)}; "
                "run the same command again to resume")
        raise KeyboardInterrupt
    # Evaluate the final weights too, so the best adapter is chosen among all of them.
    last_eval = max((h.get("step", -1) for h in trainer.state.log_history if "eval_loss" in h), default=-1)
    if s.eval_ds is not None and last_eval != trainer.state.global_step:
        trainer.evaluate()
    if best_cb.collective and not (checkpoints_dir / BEST_DIR / "adapter_model.safetensors").is_file():
        save_adapter(trainer, out, True)  # no evaluation: the last adapter, gathered by every rank
    if not s.is_main:
        return {}
    return _write_outputs(cfg, s, trainer, best_cb, metrics_cb, params, checkpoints_dir, out, resume_from,
                          init_adapter, extra_info or {})


def save_adapter(trainer, directory: Path, collective: bool) -> None:
    """Write the PEFT adapter into `directory`. collective (FSDP): called on every rank, which gather the
    sharded weights (FULL_STATE_DICT) for rank 0 to write; otherwise rank 0 alone saves."""
    if collective:
        trainer.save_model(str(directory))
        if trainer.args.should_save:
            (Path(directory) / "training_args.bin").unlink(missing_ok=True)
    else:
        trainer.model.save_pretrained(str(directory))


def _announce(cfg, s: _Setup, params, resume_from, metrics_cb, metrics_path: Path, init_adapter) -> None:
    if resume_from is not None:
        step = json.loads((resume_from / "trainer_state.json").read_text()).get("global_step", 0)
        metrics_cb.truncate_after(step)
        ui.info(f"resuming from {resume_from} (step {step} of {s.total_steps})")
    else:
        metrics_path.unlink(missing_ok=True)
    layers = params["adapted_layers"]
    where = "all layers" if len(layers) == params["layers"] else f"layers {_ranges(layers)} of {params['layers']}"
    start = f", continuing {init_adapter}" if init_adapter else ""
    ui.info(f"training {'QLoRA (NF4, double quant)' if cfg.load_in_4bit else 'LoRA'} r={cfg.lora.r} on "
            f"{s.device} ({str(s.dtype).removeprefix('torch.')}){start}: {len(s.train_ds)} examples, "
            f"{s.total_steps} steps, batch {s.global_batch} = {s.micro} x {s.accum} accumulation x {s.world} "
            f"process(es), optimizer {s.optim}; trainable parameters {params['trainable_parameters']:,} of "
            f"{params['total_parameters']:,} ({100 * params['trainable_share']:.3f}%) in {where}")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}-{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ", ".join(out) or "none"


def _write_outputs(cfg, s: _Setup, trainer, best_cb, metrics_cb, params, checkpoints_dir: Path, out: Path,
                   resume_from, init_adapter, extra_info: dict) -> dict:
    """Rank 0: the best (else last) adapter, metrics, loss curve and train_summary.json into `out`."""
    from ..core.runs import atomic_write_text
    from .display import memory_now, plot_loss_curve, read_metrics

    best = checkpoints_dir / BEST_DIR
    if s.eval_ds is not None and (best / "adapter_model.safetensors").is_file():
        for f in best.iterdir():
            if f.is_file() and f.name != "best.json":
                shutil.copy2(f, out / f.name)
        chosen = json.loads((best / "best.json").read_text())
    else:
        if not (out / "adapter_model.safetensors").is_file():
            trainer.model.save_pretrained(str(out))
        chosen = {"step": trainer.state.global_step, "eval_loss": None}
    metrics_path = checkpoints_dir / "metrics.jsonl"
    records = read_metrics(metrics_path)
    if metrics_path.is_file():
        shutil.copy2(metrics_path, out / "metrics.jsonl")
    plot_loss_curve(records, out / "loss_curve.png")
    train_recs = [r for r in records if r.get("type") == "train"]
    mem = memory_now()
    best_loss = trainer.state.best_metric
    info: dict[str, Any] = {
        "hyperparameters": _hyperparameters(cfg, s, trainer),
        "trainable_parameters": params["trainable_parameters"], "total_parameters": params["total_parameters"],
        "adapted_layers": params["adapted_layers"],
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_examples": len(s.train_ds),
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        # The schedule's value at the last step (cosine_with_min_lr reaches the floor there).
        "final_learning_rate": trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler else None,
        "best_eval_loss": best_loss,
        "best_eval_perplexity": perplexity_of_mean(best_loss) if best_loss is not None else None,
        "best_step": chosen.get("step"),
        "stopped_early": best_cb.stopped_early,
        "tokens_per_s": round(metrics_cb.tokens_per_s, 2),
        "peak_memory_gb": round(max(metrics_cb.peak_mem, mem["peak"]) / 2**30, 3),
        "memory_kind": mem["kind"],
        "resumed_from": str(resume_from) if resume_from else None,
        "init_adapter": str(init_adapter) if init_adapter else None,
        **extra_info,
    }
    ev = f", best eval loss {best_loss:.4f} (ppl {info['best_eval_perplexity']:.2f}) at step {chosen.get('step')}" \
        if best_loss is not None else ""
    info["summary"] = (f"{info['steps']} steps{' (early stop)' if best_cb.stopped_early else ''}, "
                       f"train loss {info['final_train_loss'] or float('nan'):.4f}{ev}, "
                       f"{info['tokens_per_s']:.0f} tokens/s, peak {mem['kind'].upper()} "
                       f"{info['peak_memory_gb']:.2f} GB, {info['trainable_parameters']:,} trainable parameters")
    atomic_write_text(out / "train_summary.json", json.dumps(info, indent=2) + "\n")
    return info


def _hyperparameters(cfg: RunConfig, s: _Setup, trainer) -> dict[str, Any]:
    t = cfg.training
    return {
        "quantization": "nf4+double-quant" if cfg.load_in_4bit else "none",
        "compute_dtype": str(s.dtype).removeprefix("torch."), "device": s.device,
        "compute_dtype_reason": s.dtype_reason, "attn_implementation": s.attn,
        "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
        "target_modules": cfg.lora.target_modules, "lora_layers": cfg.lora.layers,
        "modules_to_save": cfg.lora.modules_to_save, "loraplus_lr_ratio": cfg.lora.loraplus_lr_ratio,
        "learning_rate": t.learning_rate, "min_learning_rate": t.min_learning_rate,
        "param_group_lrs": {g.get("name", str(i)): g.get("initial_lr", g["lr"])
                            for i, g in enumerate(trainer.optimizer.param_groups)} if trainer.optimizer else {},
        "lr_scheduler": trainer.args.lr_scheduler_type.value if hasattr(trainer.args.lr_scheduler_type, "value")
        else str(trainer.args.lr_scheduler_type),
        "label_smoothing": t.label_smoothing, "warmup_steps": s.warmup, "weight_decay": cfg.optimizer.weight_decay,
        "max_grad_norm": t.max_grad_norm, "optimizer": s.optim, "global_batch": s.global_batch,
        "micro_batch": s.micro, "gradient_accumulation": s.accum, "processes": s.world,
        "distributed": t.distributed if s.world > 1 else "none",
        "wrapped_as": type(trainer.model_wrapped).__name__,  # DistributedDataParallel / FullyShardedDataParallel
        "packing": t.packing, "loss_chunk_size": t.loss_chunk_size,
        "gradient_checkpointing": s.checkpointing, "gradient_checkpointing_reason": s.checkpointing_why,
        "seed": t.seed, "max_steps": s.total_steps,
    }
