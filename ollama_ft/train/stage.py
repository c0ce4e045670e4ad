"""QLoRA training: the `train` stage (base/ + data/ -> adapter/).

A transformers Trainer subclass (train/trainer.py) does the loop (gradient accumulation, AdamW / paged
8-bit AdamW, cosine schedule with warmup (optionally to a floor), clipping, checkpoints with
optimizer/scheduler/RNG state and data-order skipping on resume, DDP or FSDP under torchrun). Around it:
- the model and its adapter: train/model.py (layers, target presets, modules_to_save, a continued adapter);
- padding-free packing (train/data.py) and the chunked, optionally label-smoothed loss (train/loss.py);
- best adapter, early stopping, Ctrl-C: train/callbacks.py; checkpoint fingerprints: train/checkpoints.py;
- one training process: train/process.py; multi-stage tuning (`stages:`): train/stages.py;
- the torchrun launch: train/launch.py;
- live display, metrics.jsonl, loss_curve.png, train_summary.json (train/display.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from .checkpoints import fingerprint, newest_checkpoint, prepare_checkpoints
from .model import load_model, pick_device_and_dtype
from .process import train_process
from .trainer import trainer_class

# Names the tests and bench/ use (the pieces live in their own modules).
_trainer_class = trainer_class
_fingerprint = fingerprint
_prepare_checkpoints = prepare_checkpoints
__all__ = ["build_adapter", "train_process", "load_model", "pick_device_and_dtype", "newest_checkpoint"]


def build_adapter(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                  resume: bool, init_adapter: Path | None = None, stage_data: dict[str, Path] | None = None) -> dict:
    """Train a LoRA/QLoRA adapter on data_dir's splits; write the PEFT adapter and metrics into `out`.

    init_adapter: continue this adapter (`--from-adapter`); stage_data: the data directory of each
    stage of `stages:` that has its own data (others use data_dir).
    Returns the stage info (hyperparameters, best eval loss/perplexity, steps, tokens/s, peak memory,
    per-stage results, "summary"). Ctrl-C writes a checkpoint into checkpoints_dir and re-raises
    KeyboardInterrupt.
    """
    t = cfg.training
    if t.distributed == "fsdp":
        _check_fsdp(cfg)
    if (t.nproc > 1 or t.nnodes > 1) and os.environ.get("LOCAL_RANK") is None:
        from .launch import launch_distributed

        return launch_distributed(cfg, base_dir, data_dir, out, checkpoints_dir, resume, init_adapter, stage_data)
    from .stages import train_all

    return train_all(cfg, base_dir, data_dir, out, checkpoints_dir, resume, init_adapter, stage_data)


def _check_fsdp(cfg: RunConfig) -> None:
    import torch

    t = cfg.training
    if not torch.cuda.is_available():
        # accelerate turns an FSDP plugin on only for accelerator devices: on CPU it would run DDP silently.
        raise UserError("training.distributed=fsdp needs CUDA GPUs: accelerate shards models only on "
                        "accelerator devices (on CPU the run would silently be DDP)",
                        hint="use training.distributed=ddp (--nproc N) on CPU; FSDP is for a model that does not "
                             "fit one GPU")
    if t.nproc * t.nnodes == 1:
        ui.warn("training.distributed=fsdp with one process shards nothing; use --nproc N")


