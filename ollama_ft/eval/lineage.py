"""Lineage of a tuned model (run, base, data, training settings, registered name:tag) and the test
split's content hash: what run-vs-run comparisons check and what the report names for both sides."""

from __future__ import annotations

import hashlib
from typing import Any

from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.runs import Run
from .inputs import _read_json


def split_digest(run: Run) -> str:
    """sha256 of the run's data/test.jsonl (the normalised test records, byte for byte)."""
    p = run.root / "data" / "test.jsonl"
    if not p.is_file():
        raise UserError(f"run {run.root.name} has no test split ({p} is missing)",
                        hint=f"run its data stage first: `ollama-ft data {run.root}`")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def lineage(run: Run, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Where a tuned model came from: run, base, data digest, training settings, registered name."""
    stages = (run.load_manifest() or {}).get("stages", {})
    meta = _read_json(run.root / "base" / "ollama_ft_base.json") or {}
    train = (stages.get("train") or {}).get("info") or {}
    hp = train.get("hyperparameters") or {}
    reg = (stages.get("register") or {}).get("info") or {}
    out: dict[str, Any] = {
        "run": run.root.name,
        "base": meta.get("spec") or (cfg.model.base if cfg else None),
        "data_digest": (stages.get("data") or {}).get("output_digest"),
        "test_split_sha256": split_digest(run)[:16] if (run.root / "data" / "test.jsonl").is_file() else None,
        "steps": train.get("steps"),
        "learning_rate": hp.get("learning_rate"),
        "lora_r": hp.get("lora_r"),
        "registered_as": reg.get("model"),
    }
    extra = run.lineage() if hasattr(run, "lineage") else {}
    if extra:
        out["continued_from"] = {k: (v.get("run") if isinstance(v, dict) else v) for k, v in extra.items()}
    return {k: v for k, v in out.items() if v is not None}


def lineage_text(lin: dict[str, Any]) -> str:
    """One line: `run demo-v2 (base gemma3:270m, 80 steps, lr 0.002, r 16, registered demo:v2)`."""
    if lin.get("untuned"):
        return f"the untuned base {lin.get('base')}"
    bits = [f"base {lin['base']}" if lin.get("base") else None,
            f"{lin['steps']} steps" if lin.get("steps") else None,
            f"lr {lin['learning_rate']:g}" if lin.get("learning_rate") else None,
            f"r {lin['lora_r']}" if lin.get("lora_r") else None,
            f"data {lin['data_digest'][:12]}" if lin.get("data_digest") else None,
            f"registered {lin['registered_as']}" if lin.get("registered_as") else "not registered",
            f"continued from {lin['continued_from']}" if lin.get("continued_from") else None]
    return f"run {lin.get('run')} (" + ", ".join(b for b in bits if b) + ")"
