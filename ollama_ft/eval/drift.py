"""Drift by stage: validation answer-only perplexity after each step (adapter, merged, each GGUF, base)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.runs import Run
from . import metrics as em
from .inputs import _read_json, load_examples
from .runner import perplexity_of, run_model

# ------------------------------------------------------------------------------------------
# Stage drift


def _find_number(obj: Any, keys: tuple[str, ...]) -> float | None:
    """First numeric value under one of `keys` (searched breadth-first through nested dicts)."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for k in keys:
                v = cur.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    return float(v)
            queue.extend(v for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            queue.extend(v for v in cur if isinstance(v, (dict, list)))
    return None


def drift_by_stage(cfg: RunConfig, run: Run, template: str, base_path: Path | None) -> list[dict[str, Any]]:
    """Validation answer-only perplexity after each step: adapter, merged, F16 GGUF, each quant.

    adapter and merged come from their stages' own records (computed in PyTorch during training and
    the merge check); GGUF files are scored here with llama.cpp on the same validation tokens.
    """
    rows: list[dict[str, Any]] = []
    adir, mdir = run.root / "adapter", run.root / "merged"
    summ = _read_json(adir / "train_summary.json")
    if summ is not None:
        loss = _find_number(summ, ("best_eval_loss", "eval_loss", "best_metric", "final_eval_loss"))
        if loss is not None:
            rows.append({"stage": "adapter (PEFT, training eval)", "perplexity": math.exp(loss),
                         "source": "adapter/train_summary.json"})
    mc = _read_json(mdir / "merge_check.json")
    if mc is not None:
        ppl = _find_number(mc, ("merged_perplexity", "val_perplexity", "perplexity"))
        if ppl is None:
            loss = _find_number(mc, ("merged_loss", "val_loss", "eval_loss", "loss"))
            ppl = math.exp(loss) if loss is not None else None
        if ppl is not None:
            rows.append({"stage": "merged (HF)", "perplexity": ppl, "source": "merged/merge_check.json"})
    data_dir = run.root / "data"
    try:
        # The whole validation split: the adapter's number was measured on all of it.
        val = load_examples(data_dir, "validation", None)
    except UserError:
        val = []
    val = [r for r in val if "labels" in r]
    if not val:
        ui.warn("no validation tokens (data/validation.parquet); GGUF drift not measured")
        return rows
    if mc is not None and not any(r["stage"].startswith("merged") for r in rows):
        row = _merged_row(mdir, val)
        if row:
            rows.append(row)
    gdir = run.root / "gguf"
    ggufs = sorted(gdir.glob("*.gguf"), key=lambda p: (not p.stem.upper().endswith(("F16", "BF16", "F32")), p.name))
    targets: list[tuple[str, Path]] = [(f"GGUF {p.stem.rsplit('-', 1)[-1]}", p) for p in ggufs if "-lora-" not in p.name]
    if base_path is not None:
        targets.append(("base GGUF (untuned, reference)", base_path))
    for label, path in targets:
        res = run_model(f"drift {label}", path, val, cfg, template, generate=False)
        rows.append({"stage": label, "perplexity": perplexity_of(res), "source": path.name,
                     "examples": len(val), "tokens": sum(res["nll_tokens"])})
    return rows


MERGED_SCORE_MAX_BYTES = 3 * 2**30  # score the merged HF model in-process only when it is small


def hf_nll(model_dir: Path, records: list[dict[str, Any]]) -> tuple[float, int]:
    """Teacher-forced answer-only NLL of an HF model directory (transformers, float32 on CPU or CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            ids = torch.tensor([rec["input_ids"]], device=device)
            labels = torch.tensor([rec["labels"]], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            mask = tgt != -100
            if mask.any():
                lp = torch.log_softmax(logits[mask], dim=-1)
                total += float(-lp.gather(1, tgt[mask].unsqueeze(1)).sum())
                count += int(mask.sum())
    del model
    return total, count


def _merged_row(mdir: Path, val: list[dict[str, Any]]) -> dict[str, Any] | None:
    size = sum(p.stat().st_size for p in mdir.glob("*.safetensors"))
    if size == 0:
        return None
    if size > MERGED_SCORE_MAX_BYTES:
        return {"stage": "merged (HF)", "perplexity": None, "source": f"not scored ({size / 2**30:.1f} GB; "
                "see the F16 GGUF row, converted from it)"}
    with ui.status("scoring the merged model on the validation split"):
        total, n = hf_nll(mdir, val)
    return {"stage": "merged (HF)", "perplexity": em.perplexity(total, n) if n else None,
            "source": "computed (transformers, float32)", "examples": len(val), "tokens": n}
