"""Answer perplexity under the base model, and its outliers (`data.quality.perplexity_outliers`).

Every domain example's trained tokens (the answers) are scored by one forward pass of the base
model: mean negative log-likelihood per trained token, perplexity = exp(that). Outliers are
examples whose log-perplexity is far from the rest by a robust z-score, (x - median) / MAD (scipy's
normal-scaled median absolute deviation, so a few garbled records cannot hide themselves by
inflating a standard deviation); the usual cut is 3.5.

Cheap by construction: examples are packed into one row per batch (position ids restart per
example, as in training, so no padding and no cross-talk), logits are computed only at the trained
positions (`logits_to_keep`), the model runs under no_grad in the configured compute dtype, and
scores are cached on disk per (base model, token ids, labels): re-running the data stage with
another threshold or action costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..core import ui
from .writer import IGNORE


def _example_key(ids: list[int], labels: list[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes(memoryview(_int32(ids))))
    h.update(bytes(memoryview(_int32([x != IGNORE for x in labels]))))
    return h.hexdigest()


def _int32(v):
    from array import array

    return array("i", [int(x) for x in v])


def base_key(base_dir: Path, dtype_name: str) -> str:
    """Identity of the scoring model: its metadata, config and weight files (names, sizes), dtype."""
    h = hashlib.sha256(dtype_name.encode())
    for name in ("ollama_ft_base.json", "config.json"):
        p = base_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted(base_dir.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:24]


def _cache_file(base_dir: Path, dtype_name: str) -> Path:
    from ..core.files import cache_root

    return cache_root() / "data-quality" / f"{base_key(base_dir, dtype_name)}.json"


def _load_cache(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def score(base_dir: Path, examples: list[tuple[list[int], list[int]]], compute_dtype: str,
          batch_size: int) -> tuple[list[float], dict[str, Any]]:
    """Mean NLL per trained token of each (ids, labels), and how it was computed."""
    import torch

    from ..core.compute_dtype import choose
    from ..core.runs import atomic_write_text

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = choose(compute_dtype, device)
    cache_path = _cache_file(Path(base_dir), dt.name)
    cache = _load_cache(cache_path)
    keys = [_example_key(i, lab) for i, lab in examples]
    todo = [k for k, key in enumerate(keys) if key not in cache]
    info = {"device": device, "dtype": dt.name, "scored": len(todo), "cached": len(keys) - len(todo)}
    if todo:
        longest = max(len(examples[k][0]) for k in todo)
        info["memory_bytes"] = _check_memory(Path(base_dir), dt, device, batch_size, longest)
        model = _load_model(base_dir, dt.torch_dtype, device)
        with ui.progress_steps() as prog:
            task = prog.add_task("data: answer perplexity under the base model", total=len(todo))
            for b in range(0, len(todo), batch_size):
                chunk = todo[b:b + batch_size]
                for k, nll in zip(chunk, batch_nll(model, [examples[k] for k in chunk], device), strict=True):
                    cache[keys[k]] = nll
                prog.advance(task, len(chunk))
        del model
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps(cache))
    return [cache[k] for k in keys], info


SCORE_ROWS = 256  # answer positions turned into fp32 log-probabilities at once (batch_nll)


def screen_memory(parameters: int, dtype_bytes: int, batch_size: int, vocab: int, rows_per_example: int,
                  hidden: int, intermediate: int, softcap: bool = False) -> dict[str, float]:
    """Peak bytes of the perplexity screen by component (pure; `ollama-ft plan` shows the same figures).

    rows_per_example: answer positions per example, at most (the longest example, or data.max_length);
    a batch is one packed row of batch_size x rows_per_example tokens. Terms: the base unquantized in
    the compute dtype (+20% for buffers); the answer logits in the compute dtype (twice with final-logit
    soft-capping, which makes a copy); two chunks of SCORE_ROWS rows in fp32 (the cast unless already fp32,
    and the log-softmax); one decoder layer's forward activations (no gradients are kept); the packed
    row's block-diagonal attention mask (one byte per token pair). Checked against the measured peak on
    a tiny model (tests/test_data_methods.py)."""
    tokens = batch_size * rows_per_example
    return {"base unquantized (compute dtype, +20%)": parameters * dtype_bytes * 1.2,
            "answer logits (compute dtype)": tokens * vocab * dtype_bytes * (2 if softcap else 1),
            # two chunks: the allocator may still hold the previous one when the next is made
            "chunks of log-probabilities (fp32)": min(tokens, 2 * SCORE_ROWS) * vocab * (4 if dtype_bytes == 4 else 8),
            "one layer's activations": tokens * (3 * intermediate + 6 * hidden) * dtype_bytes,
            "attention mask (packed row)": tokens * tokens}


def _check_memory(base_dir: Path, dt, device: str, batch_size: int, rows_per_example: int) -> int:
    """Stop before loading a base that cannot fit (screen_memory against what is free on the device)."""
    import psutil
    import torch

    from ..core.errors import UserError
    from ..core.hf_dir import read_json, safetensors_summary

    params = safetensors_summary(base_dir)["parameters"]
    conf = read_json(base_dir / "config.json")
    text = {**conf, **(conf.get("text_config") or {})}
    dtype_bytes = torch.empty(0, dtype=dt.torch_dtype).element_size()
    need = int(sum(screen_memory(params, dtype_bytes, batch_size, int(text.get("vocab_size") or 0),
                                 rows_per_example, int(text.get("hidden_size") or 0),
                                 int(text.get("intermediate_size") or 0),
                                 bool(text.get("final_logit_softcapping"))).values()))
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available
    if need > free:
        raise UserError(f"data.quality.perplexity_outliers: scoring needs about {need / 2**30:.1f} GiB "
                        f"({params / 1e9:.2f}B parameters in {dt.name}) but {free / 2**30:.1f} GiB is free on {device}",
                        hint="lower data.quality.perplexity_outliers.batch_size, set model.compute_dtype=bfloat16, "
                        "or run the data stage on a machine with more memory")
    return need


def _load_model(base_dir: Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return model.to(device).eval()


def batch_nll(model, batch: list[tuple[list[int], list[int]]], device: str) -> list[float]:
    """One packed forward pass; logits only where a trained token is predicted."""
    import torch

    ids, pos, keep, targets, owner = [], [], [], [], []
    for j, (x, lab) in enumerate(batch):
        off = len(ids)
        ids.extend(x)
        pos.extend(range(len(x)))
        for t in range(len(x) - 1):  # position t predicts token t+1
            if lab[t + 1] != IGNORE:
                keep.append(off + t)
                targets.append(x[t + 1])
                owner.append(j)
    if not keep:
        return [math.nan] * len(batch)
    with torch.no_grad():  # no cache: with one, transformers skips the packed-sequence (block-diagonal) mask
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                    logits_to_keep=torch.tensor(keep, device=device), use_cache=False)
        logits = out.logits[0]
        del out
        tgt = torch.tensor(targets, device=device)
        nll = torch.empty(len(keep), device=device)
        for a in range(0, len(keep), SCORE_ROWS):  # fp32 softmax rows a chunk at a time: a bounded peak
            b = a + SCORE_ROWS
            nll[a:b] = torch.nn.functional.cross_entropy(logits[a:b].float(), tgt[a:b], reduction="none")
        own = torch.tensor(owner, device=device)
        sums = torch.zeros(len(batch), device=device).index_add_(0, own, nll)
        counts = torch.zeros(len(batch), device=device).index_add_(0, own, torch.ones_like(nll))
    return [float(s / c) if c else math.nan for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]


def outliers(nll: list[float], threshold: float, side: str) -> tuple[list[float], list[bool], dict[str, float]]:
    """(robust z per example, outlier flags, the centre and spread used) on log-perplexity = NLL."""
    import numpy as np
    from scipy.stats import median_abs_deviation

    x = np.asarray(nll, dtype=float)
    ok = np.isfinite(x)
    med = float(np.median(x[ok])) if ok.any() else 0.0
    mad = float(median_abs_deviation(x[ok], scale="normal")) if ok.any() else 0.0
    z = (x - med) / mad if mad > 0 else np.zeros_like(x)
    z[~ok] = 0.0
    flag = z > threshold if side == "high" else np.abs(z) > threshold
    return z.tolist(), flag.tolist(), {"median_ppl": round(math.exp(med), 3), "mad_log_ppl": round(mad, 4)}
