"""Checkpoints of the train stage: their fingerprint, the newest one, and the resume-or-discard decision.

A checkpoint is resumed only when it was written for the same trajectory: LoRA/training/optimizer
settings, dtype, attention kernel, base config, data digests and the adapter it started from (a
continued run or a later stage of `stages:`). Anything else discards it with a warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
BEST_DIR = "best-adapter"
# Settings that do not change the trajectory (display, cadence of evaluation and saving, how nodes meet).
_NOT_TRAJECTORY = ("tensorboard", "logging_steps", "eval_steps", "save_steps", "patience", "from_adapter",
                   "rdzv_endpoint", "rdzv_backend", "rdzv_id", "node_rank")


def fingerprint(cfg: RunConfig, base_dir: Path, data_dir: Path, init_adapter: Path | None = None) -> str:
    from ..core.runs import sha256_file
    from .model import compute_choice, resolve_attn_implementation

    tr = cfg.training.model_dump(mode="json")
    for k in _NOT_TRAJECTORY:
        tr.pop(k, None)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = {"lora": cfg.lora.model_dump(mode="json"), "training": tr,
               "optimizer": cfg.optimizer.model_dump(mode="json"), "4bit": cfg.load_in_4bit,
               "dtype": cfg.model.dtype, "compute_dtype": compute_choice(cfg).name,
               "attn": resolve_attn_implementation(cfg.model.attn_implementation, device)[0]}
    for f in ("config.json", "ollama_ft_base.json"):
        if (Path(base_dir) / f).is_file():
            payload[f"base/{f}"] = sha256_file(Path(base_dir) / f)
    for f in ("train.parquet", "validation.parquet"):
        if (Path(data_dir) / f).is_file():
            payload[f"data/{f}"] = sha256_file(Path(data_dir) / f)
    if init_adapter is not None:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if (Path(init_adapter) / f).is_file():
                payload[f"init_adapter/{f}"] = sha256_file(Path(init_adapter) / f)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def newest_checkpoint(checkpoints_dir: Path) -> Path | None:
    cps = [p for p in Path(checkpoints_dir).glob(CHECKPOINT_PREFIX + "*")
           if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return max(cps, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):])) if cps else None


def read_checkpoint_fingerprint(fp_file: Path) -> str | None:
    """The fingerprint the checkpoints were written for. An unreadable file is a UserError, not a silent
    discard: the checkpoints may hold hours of training that only the user can judge."""
    if not fp_file.is_file():
        return None
    try:
        data = json.loads(fp_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
            raise ValueError("no \"fingerprint\" string in it")
        return data["fingerprint"]
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        where = f"{fp_file}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(fp_file)
        raise UserError(f"{where}: checkpoint fingerprint is unreadable ({getattr(e, 'msg', e)}), so ollama-ft "
                        f"cannot tell whether the checkpoints in {fp_file.parent} belong to this config",
                        hint=f"to start training afresh, delete {fp_file.parent} (or re-run with --no-resume, "
                             "which discards them); to keep them, restore fingerprint.json from a backup") from None


def prepare_checkpoints(checkpoints_dir: Path, fp: str, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None (stale or unwanted checkpoints are removed)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoints_dir / "fingerprint.json"
    newest = newest_checkpoint(checkpoints_dir)
    old = read_checkpoint_fingerprint(fp_file) if resume and newest is not None else None
    if resume and newest is not None and old == fp:
        return newest
    if newest is not None:
        why = "--no-resume" if not resume else "the config, base or data changed since they were written"
        ui.warn(f"discarding checkpoints in {checkpoints_dir} ({why})")
    for p in checkpoints_dir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    fp_file.write_text(json.dumps({"fingerprint": fp}) + "\n")
    return None
