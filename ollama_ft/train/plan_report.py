"""`ollama-ft plan`: the breakdown table, go/no-go for a budget, and the smallest changes that would fit.

The estimates themselves are in plan.py (pure); this module presents them and searches the fixes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from .plan import (
    GB,
    Breakdown,
    ModelDims,
    PlanSettings,
    _compute_dtype_name,
    decide_checkpointing,
    estimate,
    measure_matmul_gflops,
    model_config_for,
    parse_size,
    settings_from_config,
    train_flops_per_token,
    trainable_params,
)


def _trainable_line(d: ModelDims, s: PlanSettings) -> str:
    parts = trainable_params(d, s)
    total = sum(parts.values())
    n = d.layers if s.adapted_layers is None else len(s.adapted_layers)
    kinds = " + ".join(f"{v / 1e6:.2f}M {k}" for k, v in parts.items())
    shard = f", sharded over {s.shards} processes (FSDP)" if s.shards > 1 else ""
    return (f"trainable parameters: {total:,} ({kinds}) = {100 * total / d.parameters:.3f}% of "
            f"{d.parameters / 1e9:.2f}B, LoRA in {n} of {d.layers} layers{shard}")


_MIN_SEQ = 256


def suggestions(dims, s: PlanSettings, budget: float) -> list[tuple[str, Breakdown]]:
    """Smallest single changes (then pairs) that bring the training peak under `budget`, least costly first.

    Order of preference: sdpa instead of eager attention (free), micro-batch down with more accumulation
    (same global batch, slower), gradient checkpointing on, smaller loss chunk, 8-bit optimizer, 4-bit
    base, lower rank, shorter sequences.
    """
    # Knobs in order of preference; each lists its options from mild to strong.
    knobs: list[list[tuple[str, dict]]] = []
    if s.attention == "eager":  # costs nothing in quality: the same attention, without the score matrix
        knobs.append([("model.attn_implementation=auto (sdpa / flash-attention 2)", {"attention": "sdpa"})])
    opts, m = [], s.micro_batch
    while m > 1:
        m //= 2
        acc = math.ceil(s.micro_batch * s.accumulation / m)
        opts.append((f"training.micro_batch_size={m} (accumulation {acc}, same global batch)",
                     {"micro_batch": m, "accumulation": acc}))
    knobs.append(opts)
    if not s.gradient_checkpointing:
        knobs.append([("training.gradient_checkpointing=true", {"gradient_checkpointing": True})])
    if s.loss_chunk > 64:
        knobs.append([("training.loss_chunk_size=64", {"loss_chunk": 64})])
    if s.optimizer == "adamw" and s.device == "cuda":
        knobs.append([("optimizer.name=paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"})])
    if not s.load_in_4bit:
        knobs.append([("model.adapter=qlora (NF4 base)", {"load_in_4bit": True})])
    opts, r = [], s.lora_r
    while r > 4:
        r //= 2
        opts.append((f"lora.r={r}", {"lora_r": r}))
    knobs.append(opts)
    opts, L = [], s.seq_len
    while L > _MIN_SEQ:
        L //= 2
        opts.append((f"data.max_length={L}", {"seq_len": L}))
    knobs.append(opts)
    knobs = [k for k in knobs if k]

    single = []
    for knob in knobs:
        for name, change in knob:  # the mildest option of each knob that fits
            b = estimate(dims, replace(s, **change))
            if b.train_total <= budget:
                single.append((name, b))
                break
    if single:
        return single[:4]
    # No single change is enough: take knobs in order, each at its mildest option that fits, else its strongest.
    cur, names = s, []
    for knob in knobs:
        for i, (name, change) in enumerate(knob):
            b = estimate(dims, replace(cur, **change))
            if b.train_total <= budget or i == len(knob) - 1:
                cur = replace(cur, **change)
                names.append(name)
                break
        if b.train_total <= budget:
            return [(" + ".join(names), b)]
    return []


def plan_command(config: Path, budget: str = "16GB", overrides: list[str] | None = None, ram: str | None = None,
                 device: str = "cuda") -> Breakdown:
    """`ollama-ft plan`: breakdown table, go/no-go for the GPU budget (and RAM for merge/export), fixes."""
    from ..core import ui
    from ..core.config import load_config
    from ..core.errors import UserError

    loaded = load_config(config, overrides)
    cfg = loaded.config
    budget_b = parse_size(budget)
    ram_b = parse_size(ram) if ram else None
    cfg_dict, source = model_config_for(cfg.model.base, Path(cfg.runs_dir), cfg.run_name)
    try:
        dims = ModelDims.from_config(cfg_dict)
    except KeyError as e:
        raise UserError(f"{source}: no {e.args[0]!r}, which the plan needs to size the model",
                        hint="a decoder config.json has hidden_size, num_attention_heads, num_hidden_layers, "
                             "intermediate_size and vocab_size; fetch the model's config.json again") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise UserError(f"{source}: cannot read the model dimensions ({type(e).__name__}: {e})",
                        hint="hidden_size, num_attention_heads, num_hidden_layers, intermediate_size and "
                             "vocab_size must be positive whole numbers") from None
    s = settings_from_config(cfg, device, dims)
    gc_note = ""
    if cfg.training.gradient_checkpointing == "auto":
        on, why = decide_checkpointing(dims, s, budget_b)
        s = replace(s, gradient_checkpointing=on)
        gc_note = f" (auto, {why})"
    b = estimate(dims, s)

    ui.out.print(f"[bold]{cfg.model.base}[/]: {dims.parameters / 1e9:.2f}B parameters, {dims.layers} layers, "
                 f"hidden {dims.hidden}, vocab {dims.vocab} [dim](from {source})[/]")
    ui.out.print(f"training: {'QLoRA NF4' if s.load_in_4bit else 'LoRA'} r={s.lora_r}, seq {s.seq_len} x micro-batch "
                 f"{s.micro_batch} (accumulation {s.accumulation}), optimizer {s.optimizer}, "
                 f"checkpointing {'on' if s.gradient_checkpointing else 'off'}{gc_note}, loss chunk {s.loss_chunk}"
                 f"{', eager attention (stores the score matrix)' if s.attention == 'eager' else ''}")
    ui.out.print(_trainable_line(dims, s))
    rows = [[k, f"{v / GB:.2f}"] for k, v in b.train.items()]
    rows.append(["[bold]peak (training)[/]", f"[bold]{b.train_total / GB:.2f}[/]"])
    ui.table(f"training peak on {device.upper()} (GB)", ["component", "GB"], rows)
    ui.table("merge / export (system RAM, GB) and disk (GB)", ["stage", "GB"], [
        ["merge peak RAM", f"{b.merge_total / GB:.2f}"],
        ["export peak RAM", f"{b.export_total / GB:.2f}"],
        *[[f"disk: {k}", f"{v / GB:.2f}"] for k, v in b.disk.items()],
        ["disk total (one run)", f"{b.disk_total / GB:.2f}"],
    ])
    if b.data:
        rows = [[k, f"{v / GB:.2f}"] for k, v in b.data.items()]
        rows.append(["[bold]peak (data stage)[/]", f"[bold]{b.data_total / GB:.2f}[/]"])
        ui.table(f"data stage: perplexity screen on {device.upper()} (GB)", ["component", "GB"], rows)
    for note in b.notes:
        ui.out.print(f"[dim]note: {note}[/]")
    if device == "cpu":
        dtype = _compute_dtype_name(cfg, "cpu")
        gflops = measure_matmul_gflops(dtype)
        share = 0.3
        flops = train_flops_per_token(dims, s.gradient_checkpointing, share)
        step_tokens = s.seq_len * s.micro_batch * s.accumulation
        ui.out.print(f"time on this CPU: compute in {dtype} at {gflops:.1f} GFLOP/s (measured now) -> at most "
                     f"{gflops * 1e9 / flops:.0f} tokens/s, {step_tokens * flops / (gflops * 1e9):.0f} s per full "
                     f"step of {step_tokens} tokens [dim](FLOP bound; logits on {share:.0%} of tokens)[/]")
    go = b.train_total <= budget_b
    verdict = "[green]GO[/]" if go else "[red]NO-GO[/]"
    ui.out.print(f"{verdict}: training needs {b.train_total / GB:.1f} GB of a {budget_b / GB:.1f} GB budget "
                 f"({100 * b.train_total / budget_b:.0f}%)")
    if b.data:
        screen_ok = b.data_total <= budget_b
        ui.out.print(f"{'[green]GO[/]' if screen_ok else '[red]NO-GO[/]'}: the data stage's perplexity screen needs "
                     f"{b.data_total / GB:.1f} GB of the {budget_b / GB:.1f} GB budget (the base unquantized)")
        if not screen_ok:
            ui.out.print("  lower data.quality.perplexity_outliers.batch_size, use a bf16 compute dtype, or turn the "
                         "screen off (data.quality.perplexity_outliers: null)")
    if ram_b is not None:
        need = max(b.merge_total, b.export_total)
        ok = need <= ram_b
        ui.out.print(f"{'[green]GO[/]' if ok else '[red]NO-GO[/]'}: merge/export need {need / GB:.1f} GB of "
                     f"{ram_b / GB:.1f} GB RAM")
    if not go:
        fixes = suggestions(dims, s, budget_b)
        if fixes:
            combo = len(fixes) == 1 and " + " in fixes[0][0]
            ui.out.print("no single change fits; these together would:" if combo
                         else "changes that would fit (any one of them, least costly first):")
            for name, fb in fixes:
                sets = " ".join(f"--set {part.split(' ')[0]}" for part in name.split(" + "))
                notes = [p.split(" ", 1)[1] for p in name.split(" + ") if " " in p]
                extra = f"   [dim]{'; '.join(notes)}[/]" if notes else ""
                ui.out.print(f"  {sets}  -> {fb.train_total / GB:.1f} GB{extra}")
        else:
            ui.out.print("no combination of the usual changes fits this budget: use a smaller base model")
    return b
