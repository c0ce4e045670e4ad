"""Memory and disk planning for train / merge / export from the model config alone (no weights).

`estimate(model_dims, settings)` is pure: a config.json-like dict and a `PlanSettings` in, a
`Breakdown` out. The terms, per training step:

- base weights: NF4 linear weights at 4 bits + their block scales (blocksize 64: an fp32 absmax per
  block, or with double quantization an 8-bit absmax + an fp32 scale per 256 blocks), embeddings and
  an untied LM head left in the compute dtype (bitsandbytes does not quantize them);
- LoRA weights (fp32), their gradients (fp32), optimizer state (AdamW: 8 bytes/param; 8-bit AdamW: 2);
- activations: with gradient checkpointing, every layer's input plus one layer's full set during its
  recompute; without, every layer's full set (per-token per-layer bytes counted tensor by tensor for a
  llama-style block: norms with fp32 intermediates, q/k/v/RoPE/attention output, SwiGLU, LoRA dropout);
- logits: the chunked loss holds `chunk x vocab` (bf16 + fp32 + bf16 gradient); a plain HF loss holds
  the whole `tokens x vocab` in bf16, its fp32 copy, log-softmax and gradient (16 bytes per element);
- CUDA: context (~0.5 GB, outside torch's allocator) and 8% allocator fragmentation.
  CPU: the Python/torch runtime (0.45 GB measured here) and the safetensors pages mapped while loading.

Tolerances against measurements are stated in tests/test_plan.py and docs/training.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.quality import screen_memory

GB = 1e9
GIB = 2**30
NF4_BLOCK = 64
DQ_BLOCK = 256
CUDA_CONTEXT = 0.5 * GIB
CUDA_FRAGMENTATION = 0.08
# Python + torch + transformers + peft + bitsandbytes resident after import: 0.95 GiB with PyPI's CUDA torch
# 2.13 (its CUDA libraries are mapped even on CPU; measured 2026-12-01), 0.45 GiB with the old CPU wheel.
CPU_RUNTIME = 0.95 * GIB


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    softcap: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDims:
        """From a transformers config.json dict (multimodal configs: their text_config)."""
        c = cfg.get("text_config") or cfg
        h = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        return cls(
            hidden=h,
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or h // heads),
            intermediate=int(c["intermediate_size"]),
            vocab=int(c.get("vocab_size") or cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
            qkv_bias=bool(c.get("attention_bias", False)) or "Qwen2" in str(cfg.get("architectures", "")),
            softcap=bool(c.get("final_logit_softcapping")),
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder block (attention + SwiGLU MLP)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        return self.linear_params + self.embedding_params + self.layers * 4 * self.hidden + self.hidden


@dataclass(frozen=True)
class PlanSettings:
    seq_len: int = 1024
    micro_batch: int = 1
    accumulation: int = 4
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    double_quant: bool = True
    compute_bytes: int = 2
    gradient_checkpointing: bool = True
    optimizer: str = "paged_adamw_8bit"  # adamw | paged_adamw_8bit | adamw_8bit
    loss: str = "chunked"  # chunked | full (plain HF: whole logits)
    loss_chunk: int = 256
    # Bytes per logit held at the peak of a full-logits loss: 16 for transformers' ForCausalLMLoss (bf16
    # logits, fp32 copy, log-softmax, fp32 + bf16 gradients); 10 for a loss that stays in bf16.
    full_logits_bytes: int = 16
    upcast_non_quantized: bool = False  # peft.prepare_model_for_kbit_training's fp32 copy
    trained_fraction: float = 1.0  # share of tokens with a label (the chunked loss only projects those)
    device: str = "cuda"  # cuda | cpu
    adapted_layers: tuple[int, ...] | None = None  # lora.layers resolved (None: every layer)
    modules_to_save: tuple[str, ...] = ()  # modules trained in full (embed_tokens, lm_head)
    shards: int = 1  # FSDP: processes the base and the trained weights are sharded over
    perplexity_screen_batch: int | None = None  # data.quality.perplexity_outliers.batch_size (None: off)
    attention: str = "sdpa"  # model.attn_implementation as resolved: sdpa | eager | flash_attention_2
    packing: bool = True  # a packed micro-batch is one row of micro_batch x seq_len tokens


@dataclass
class Breakdown:
    """Bytes per component for training, plus merge/export RAM and disk."""

    train: dict[str, float] = field(default_factory=dict)
    merge: dict[str, float] = field(default_factory=dict)
    export: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)
    data: dict[str, float] = field(default_factory=dict)  # the data stage's perplexity screen, when on
    notes: list[str] = field(default_factory=list)

    @property
    def train_total(self) -> float:
        return sum(self.train.values())

    @property
    def train_allocated(self) -> float:
        """What torch's allocator holds at peak (comparable to torch.cuda.max_memory_allocated)."""
        return sum(v for k, v in self.train.items() if k not in ("CUDA context", "allocator fragmentation"))

    @property
    def merge_total(self) -> float:
        return sum(self.merge.values())

    @property
    def export_total(self) -> float:
        return sum(self.export.values())

    @property
    def data_total(self) -> float:
        return sum(self.data.values())

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())


_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ALIASES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
            "c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"),
            "w1": ("gate_proj",), "w2": ("up_proj",)}


def _targeted(targets) -> set[str]:
    if targets == "all-linear" or targets is None:
        return set(_NAMES)
    if targets == "attention":
        return set(_ATTN)
    if targets == "mlp":
        return set(_NAMES) - _ATTN
    out: set[str] = set()
    for t in targets:
        out.update(_ALIASES.get(t, (t,)))
    return out & set(_NAMES)


def lora_params(d: ModelDims, r: int, targets="all-linear", adapted_layers: tuple[int, ...] | None = None) -> int:
    keep = _targeted(targets)
    n = d.layers if adapted_layers is None else len(adapted_layers)
    return n * sum(r * (a + b) for name, (a, b) in zip(_NAMES, d.linears(), strict=True) if name in keep)


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int] | None:
    """lora.layers -> the layer indices peft adapts (None: all of them)."""
    from ..core.errors import UserError

    if spec == "all":
        return None
    if isinstance(spec, list):
        bad = [i for i in spec if i >= n_layers]
        if bad:
            raise UserError(f"lora.layers={spec}: this model has layers 0..{n_layers - 1}, not {bad}",
                            hint=f"use indices below {n_layers}, 'last N' or all")
        return list(spec)
    kind, n = spec.split()
    if int(n) > n_layers:
        raise UserError(f"lora.layers='{spec}': this model has only {n_layers} layers",
                        hint=f"use 'last {n_layers}' or all")
    return list(range(n_layers - int(n), n_layers)) if kind == "last" else list(range(int(n)))


def full_trained(d: ModelDims, modules: tuple[str, ...]) -> dict[str, int]:
    """Parameters of the modules_to_save that the plan can size: input embedding and LM head."""
    out = {}
    for m in modules:
        if "embed" in m or m in ("wte", "tok_embeddings"):
            out["embeddings"] = d.vocab * d.hidden
        elif m in ("lm_head", "output", "embed_out"):
            out["lm_head"] = d.vocab * d.hidden
    return out


def trainable_params(d: ModelDims, s: PlanSettings) -> dict[str, int]:
    """Trainable parameters by kind: LoRA on the adapted layers + modules trained in full."""
    return {"lora": lora_params(d, s.lora_r, s.lora_targets, s.adapted_layers), **full_trained(d, s.modules_to_save)}


def layer_activation_bytes(d: ModelDims, s: PlanSettings) -> float:
    """Bytes one decoder block keeps for backward, per token (no checkpointing inside the block)."""
    b = s.compute_bytes
    h, q, kv, i = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate
    norms = 2 * (8 * h + 2 * b * h)  # two RMSNorms: fp32 input + fp32 normalised, compute-dtype in/out
    attn = b * (q + 2 * kv) + b * (q + kv) + b * q  # q/k/v projections, RoPE outputs, attention output
    if d.kv_heads != d.heads:
        attn += 2 * b * q  # k/v repeated to all heads for sdpa's math path
    mlp = 4 * b * i  # gate, up, act(gate), act*up
    keep = _targeted(s.lora_targets)
    lora = 0.0
    if s.lora_dropout > 0:
        ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
        lora = sum((b + 1) * ins[n] for n in keep)  # dropout output + bool mask per adapted input
    lora += 4 * s.lora_r * len(keep)  # fp32 lora_A outputs
    if s.attention == "eager":
        # Eager attention keeps the softmax of the full score matrix for backward: fp32 (softmax runs in
        # fp32) plus its compute-dtype copy, heads x row x row per layer, i.e. heads x row per token. A
        # packed row is the whole micro-batch (its block-diagonal mask does not shrink the matrix).
        # Checked against autograd's saved tensors in tests/test_plan.py.
        row = s.seq_len * (s.micro_batch if s.packing else 1)
        attn += d.heads * row * (4 + (b if b != 4 else 0)) + b * q
    return norms + attn + mlp + lora


def estimate(model_dims: dict[str, Any] | ModelDims, settings: PlanSettings) -> Breakdown:
    """Predict peak memory (training, merge, export) and disk, from dims alone. Pure.

    One term per memory component, in the order the breakdown table shows them (long for that reason)."""
    d = model_dims if isinstance(model_dims, ModelDims) else ModelDims.from_config(model_dims)
    s = settings
    b = s.compute_bytes
    out = Breakdown()
    t = out.train
    tokens = s.seq_len * s.micro_batch

    # Base weights.
    emb_bytes = b * (4 / b if s.upcast_non_quantized else 1)
    if s.load_in_4bit:
        scale = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK)) if s.double_quant else 4 / NF4_BLOCK
        t["base weights (NF4)"] = d.linear_params * 0.5 / s.shards
        t["NF4 block scales"] = d.linear_params * scale / s.shards
        # One linear is dequantized to the compute dtype at a time (forward and backward).
        t["dequantized linear (transient)"] = max(a * c for a, c in d.linears()) * b
    else:
        t["base weights"] = d.linear_params * b / s.shards
    t["embeddings + LM head"] = (d.embedding_params * emb_bytes + (d.layers * 4 + 1) * d.hidden * emb_bytes) / s.shards
    if s.shards > 1:  # FSDP gathers one decoder layer's full weights at a time
        t["FSDP: one layer gathered"] = d.linear_params / d.layers * (0.5 if s.load_in_4bit else b)

    n_lora = lora_params(d, s.lora_r, s.lora_targets, s.adapted_layers)
    t["LoRA weights (fp32)"] = n_lora * 4 / s.shards
    t["LoRA gradients (fp32)"] = n_lora * 4 / s.shards
    t["optimizer state"] = n_lora * (8 if s.optimizer == "adamw" else 2) / s.shards
    full = sum(full_trained(d, s.modules_to_save).values())
    if full:
        # A trained copy in the compute dtype, its gradient, AdamW's two moments (param dtype) or 8-bit state,
        # and the chunked loss's fp32 gradient accumulator for a trained head.
        head = "lm_head" in full_trained(d, s.modules_to_save)
        t["modules_to_save (copy + grad + optimizer)"] = full * (2 * b + (2 * b if s.optimizer == "adamw" else 2)) \
            / s.shards + (d.vocab * d.hidden * 4 if head else 0)

    per_layer = layer_activation_bytes(d, s)
    # Backward stops at the lowest adapted layer: the layers below it keep no activations (nothing in
    # them or under them needs a gradient), unless the input embedding is trained.
    low = 0 if s.adapted_layers is None or "embeddings" in full_trained(d, s.modules_to_save) \
        else min(s.adapted_layers)
    kept = d.layers - low
    if s.gradient_checkpointing:
        t["activations (checkpointed layer inputs)"] = kept * tokens * b * d.hidden
        t["activations (one layer recomputed)"] = tokens * per_layer
    else:
        t["activations (adapted layers and above)" if low else "activations (all layers)"] = kept * tokens * per_layer
    t["activation gradients"] = tokens * (3 * b * d.hidden + 2 * b * d.intermediate)

    if s.loss == "chunked":
        rows = max(1, min(s.loss_chunk, math.ceil(tokens * s.trained_fraction)))
        per = b + 4 + b + (4 if d.softcap else 0)
        t["logits chunk"] = rows * d.vocab * per
    else:
        t["full logits"] = tokens * d.vocab * s.full_logits_bytes

    if s.device == "cuda":
        t["allocator fragmentation"] = CUDA_FRAGMENTATION * sum(t.values())
        t["CUDA context"] = CUDA_CONTEXT
    else:
        t["runtime (python, torch)"] = CPU_RUNTIME
        # Loading maps the full-precision safetensors; those pages count in RSS (bf16 published weights).
        t["mapped weight files (load)"] = d.parameters * 2 * (0.5 if s.load_in_4bit else 0.0)

    # Merge: streamed shard by shard into the full-precision base (bf16); 2 GB shards read + written.
    shard = min(d.parameters * 2, 2 * GIB)
    out.merge = {"runtime (python, torch)": CPU_RUNTIME, "shard in + merged shard out": 2 * shard,
                 "adapter (fp32)": n_lora * 4, "largest tensor dequantized (fp32)": d.vocab * d.hidden * 4}
    # Export: the converter writes big tensors in row blocks (converter_lowmem.py); llama.cpp's quantizer
    # converts each whole tensor to fp32, so the largest one (the embedding) sets the peak
    # (bench/export.py: 1.19 GB anonymous for a Qwen2.5-1.5B-shaped model, estimate 1.4 GB).
    out.export = {"runtime (python, llama.cpp)": CPU_RUNTIME,
                  "quantizer: largest tensor as fp32": d.vocab * d.hidden * 4,
                  "quantizer: its quantized copy + buffers": d.vocab * d.hidden * 1 + 64 * 2**20}
    out.notes.append("merge and export prove their output with the float32 model; beyond 60% of free RAM it runs "
                     "disk-offloaded, layer by layer (slower, same numbers)")
    out.disk = {"base (bf16 safetensors)": d.parameters * 2, "merged (bf16 safetensors)": d.parameters * 2,
                "GGUF F16": d.parameters * 2, "GGUF Q4_K_M": d.parameters * 4.85 / 8,
                "adapter + checkpoints (2)": n_lora * (4 + 2 * (4 + (8 if s.optimizer == "adamw" else 2)))}
    if d.softcap:
        out.notes.append("final logit soft-capping adds an fp32 tanh buffer per logits chunk")
    if s.perplexity_screen_batch:
        # The data stage scores every answer with the base model unquantized, on the training device.
        # An upper bound: every position of a max_length example counted as an answer position.
        out.data = screen_memory(d.parameters, b, s.perplexity_screen_batch, d.vocab, s.seq_len, d.hidden,
                                 d.intermediate, bool(d.softcap))
        out.data.update({"CUDA context": CUDA_CONTEXT} if s.device == "cuda" else {"runtime (python, torch)": CPU_RUNTIME})
    return out


# ---------------------------------------------------------------------------------------------
# Config -> dims/settings, suggestions, the `plan` command


def parse_size(text: str) -> float:
    """'16GB' / '16 GiB' / '800MB' / '16' (GB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        from ..core.errors import UserError

        raise UserError(f"cannot read the size '{text}'", hint="write it like 16GB, 12GiB or 800MB")
    num, unit = float(m.group(1)), (m.group(2) or "gb")
    if num <= 0:
        from ..core.errors import UserError

        raise UserError(f"the size '{text}' is zero", hint="give a memory budget above zero, e.g. 16GB")
    base = 1024 if "i" in unit else 1000
    power = {"k": 1, "m": 2, "g": 3, "t": 4}.get(unit[:1], 3)
    return num * base**power


def resolve_batching(batch_size: int, micro_batch_size: int | None, world: int = 1) -> tuple[int, int, int]:
    """(micro, accumulation, effective global batch) for a requested global batch over `world` processes."""
    micro = micro_batch_size or min(batch_size, 4)
    micro = min(micro, batch_size)
    accum = max(1, math.ceil(batch_size / (micro * world)))
    return micro, accum, micro * accum * world


def settings_from_config(cfg, device: str = "cuda", dims: ModelDims | None = None) -> PlanSettings:
    """PlanSettings for a RunConfig as the train stage would run it on `device` (dims: to resolve lora.layers)."""
    t = cfg.training
    layers = resolve_layers(cfg.lora.layers, dims.layers) if dims is not None else None
    shards = t.nproc * t.nnodes if t.distributed == "fsdp" else 1
    rank = _continued_rank(cfg) or cfg.lora.r
    micro, accum, _ = resolve_batching(t.batch_size, t.micro_batch_size, t.nproc)
    opt = cfg.optimizer.name
    if opt == "auto":
        opt = "paged_adamw_8bit" if device == "cuda" else "adamw"
    targets = cfg.lora.target_modules
    screen = cfg.data.quality.perplexity_outliers
    return PlanSettings(
        seq_len=cfg.data.max_length, micro_batch=micro, accumulation=accum, lora_r=rank,
        lora_targets=targets if isinstance(targets, str) else tuple(targets), lora_dropout=cfg.lora.dropout,
        load_in_4bit=cfg.load_in_4bit,
        compute_bytes=4 if _compute_dtype_name(cfg, device) == "float32" else 2,
        gradient_checkpointing=cfg.training.gradient_checkpointing is not False, optimizer=opt,
        loss="chunked", loss_chunk=t.loss_chunk_size, device=device,
        adapted_layers=tuple(layers) if layers is not None else None,
        modules_to_save=tuple(cfg.lora.modules_to_save), shards=shards,
        perplexity_screen_batch=screen.batch_size if screen is not None else None,
        attention=_attention(cfg), packing=t.packing)


def _attention(cfg) -> str:
    """model.attn_implementation as memory sees it: only eager stores the score matrix (sdpa and
    flash-attention 2, whichever `auto` picks, do not)."""
    return "eager" if cfg.model.attn_implementation == "eager" else "sdpa"


def _continued_rank(cfg) -> int | None:
    """The rank of the adapter a --from-adapter run continues (it keeps its own), when readable."""
    import json

    ref = cfg.training.from_adapter
    if not ref:
        return None
    for d in (Path(cfg.runs_dir) / ref, Path(ref)):
        try:
            return int(json.loads((d / "adapter" / "adapter_config.json").read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def decide_checkpointing(dims: ModelDims, settings: PlanSettings, memory_bytes: float) -> tuple[bool, str]:
    """training.gradient_checkpointing=auto: off (faster: no recomputation) when the plan's training peak
    without it stays within half of `memory_bytes` (the GPU, or free RAM on CPU); on otherwise."""
    without = estimate(dims, replace(settings, gradient_checkpointing=False)).train_total
    if without <= 0.5 * memory_bytes:
        return False, (f"off: training needs {without / GB:.1f} GB without it, within half of "
                       f"{memory_bytes / GB:.1f} GB")
    return True, f"on: training would need {without / GB:.1f} GB without it, over half of {memory_bytes / GB:.1f} GB"


def train_flops_per_token(dims: ModelDims, gradient_checkpointing: bool, trained_share: float) -> float:
    """Matmul FLOPs per training token of LoRA on a frozen base: forward 2N + input-gradient 2N (no weight
    gradients for frozen weights) + 2N recomputation with checkpointing; the head costs 4 FLOPs per
    parameter only on tokens whose logits the chunked loss computes (the trained share)."""
    layer = dims.linear_params * (6 if gradient_checkpointing else 4)
    head = 4 * dims.vocab * dims.hidden * trained_share
    return float(layer + head)


def measure_matmul_gflops(dtype_name: str, seconds: float = 0.3) -> float:
    """This machine's matmul throughput in `dtype_name` (CPU), timed on a training-shaped product."""
    import time

    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(512, 640, dtype=dt), torch.randn(640, 2048, dtype=dt)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 * 640 * 2048 * n / (time.perf_counter() - t0) / 1e9


def stage_disk_need(dims: ModelDims, stage: str, quants: list[str] | tuple[str, ...] = ("Q4_K_M",),
                    lora_r: int = 16) -> float:
    """Bytes a stage writes (what must be free before it starts), from the plan's disk figures."""
    p = dims.parameters
    bits = {"Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q4_K_M": 4.85, "Q4_0": 4.5, "F16": 16, "BF16": 16}
    lora = dims.layers * sum((a + b) * lora_r for a, b in dims.linears()) * 4
    need = {
        "pull": p * 2,                              # full-precision safetensors (bf16)
        "data": 64 * 2**20,
        "train": lora * (1 + 2 * 3) + 64 * 2**20,   # adapter + two checkpoints with AdamW state
        "merge": p * 2,
        "export": p * 2 + sum(p * bits.get(q.upper(), 8.5) / 8 for q in quants if q.upper() not in ("F16",)),
        "modelfile": 2**20,
        "eval": 64 * 2**20,
    }
    return float(need.get(stage, 0))


def _compute_dtype_name(cfg, device: str) -> str:
    """The dtype training would compute in on `device` (a CPU without native bf16 gets float32)."""
    from ..core import compute_dtype

    if cfg.model.compute_dtype != "auto":
        return cfg.model.compute_dtype
    if device == "cuda":
        return "bfloat16"
    return compute_dtype.choose("auto", "cpu").name


def _read_config_json(p: Path) -> dict:
    """A model's config.json as a dict; a damaged one is a UserError naming file:line (sources' reader)."""
    from ..core.hf_dir import read_json

    return read_json(p)


def model_config_for(spec: str, runs_dir: Path | None = None, run_name: str | None = None) -> tuple[dict, str]:
    """A config.json-like dict for a base spec without downloading: catalog, local dir, or the run's base/."""
    from ..core.errors import UserError

    if runs_dir is not None and run_name:
        p = Path(runs_dir) / run_name / "base" / "config.json"
        if p.is_file():
            return _read_config_json(p), str(p)
    local = Path(spec).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return _read_config_json(local / "config.json"), str(local / "config.json")
    try:
        from ..base import catalog
    except ImportError:
        catalog = None
    if catalog is not None:
        entry = catalog.find(spec) if hasattr(catalog, "find") else None
        if entry is not None:
            return entry.config_dict(), f"catalog entry {entry.name} ({entry.hf_repo})"
        if "/" not in spec and hasattr(catalog, "lookup"):
            catalog.lookup(spec)  # raises a UserError with close matches
    raise UserError(f"cannot find the dimensions of '{spec}' without downloading it",
                    hint="use a catalog name (ollama-ft pull --help), a local HF directory, or run "
                         "`ollama-ft train CONFIG --until pull` first")
