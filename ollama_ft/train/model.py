"""The model the train stage trains: device/dtype choices, the base (NF4 or plain) and its LoRA adapter.

What is adapted is decided here from the config: `lora.target_modules` (a preset resolved against the
model's own linear layers, or names), `lora.layers` (peft's layers_to_transform: all, the last/first N
decoder layers, or a list), `lora.modules_to_save` (modules trained in full, e.g. the LM head). A run
that continues an earlier adapter (`--from-adapter`, or the next stage of `stages:`) loads that adapter
trainable instead of creating a fresh one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError

# Module names of attention / MLP projections across the architectures transformers ships
# (llama-style first; phi/falcon/gpt-neox/mpt names after). A preset keeps those the model has.
TARGET_PRESETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn",
                  "out_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
            "dense_h_to_4h", "dense_4h_to_h"),
}


def compute_choice(cfg: RunConfig):
    """The compute dtype for this config on this machine, with the reason (compute_dtype.ComputeDtype)."""
    import torch

    from ..core import compute_dtype

    return compute_dtype.choose(cfg.model.compute_dtype, "cuda" if torch.cuda.is_available() else "cpu")


def resolve_attn_implementation(requested: str, device: str) -> tuple[str, str]:
    """(attn_implementation for transformers, why). auto / flash_attention_2 (the guides' `attention.type:
    flash_attn`): flash-attention 2 where it runs (CUDA + the flash_attn package), sdpa otherwise."""
    if requested in ("auto", "flash_attention_2"):
        installed = importlib.util.find_spec("flash_attn") is not None
        if device == "cuda" and installed:
            return "flash_attention_2", "flash-attention 2 (CUDA, flash_attn installed)"
        why = "no CUDA device" if device != "cuda" else "the flash_attn package is not installed"
        return "sdpa", f"sdpa ({why}; flash-attention 2 needs both)"
    return requested, f"{requested} (set by model.attn_implementation)"


def resolve_checkpointing(cfg: RunConfig, base_dir: Path, device: str) -> tuple[bool, str]:
    """(gradient checkpointing on?, why): the config's value, or for "auto" the memory plan's decision."""
    gc = cfg.training.gradient_checkpointing
    if gc != "auto":
        return bool(gc), "set by training.gradient_checkpointing"
    import psutil

    from .plan import ModelDims, decide_checkpointing, settings_from_config

    try:
        dims = ModelDims.from_config(json.loads((Path(base_dir) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return True, "on: no readable config.json to plan with"
    if device == "cuda":
        import torch

        memory = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        memory = float(psutil.virtual_memory().available)
    return decide_checkpointing(dims, settings_from_config(cfg, device, dims), memory)


def pick_device_and_dtype(cfg: RunConfig):
    """(device, compute dtype, optimizer name) for this machine and config."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = compute_choice(cfg).torch_dtype
    name = cfg.optimizer.name
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw"
    if not cuda and name in ("paged_adamw_8bit", "adamw_8bit"):
        ui.warn(f"optimizer.name={name} needs CUDA; using plain AdamW on CPU")
        name = "adamw"
    optim = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit"}[name]
    return ("cuda" if cuda else "cpu"), dtype, optim


def _linear_names(model) -> set[str]:
    """Last name component of every linear layer inside the decoder layers."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."}


def resolve_targets(targets: list[str] | str, model, limited_layers: bool = False) -> list[str] | str:
    """lora.target_modules -> what peft gets: a preset as the names this model has; all-linear as is, or,
    with lora.layers limited, as the decoder layers' linear names (peft refuses layers_to_transform
    with a string target)."""
    if isinstance(targets, list):
        return targets
    have = _linear_names(model)
    if targets == "all-linear":
        return sorted(have) if limited_layers else targets
    names = sorted(n for n in TARGET_PRESETS[targets] if n in have)
    if not names:
        raise UserError(f"lora.target_modules={targets}: none of {', '.join(TARGET_PRESETS[targets])} is a "
                        f"linear layer of {type(model).__name__} (it has {', '.join(sorted(have)) or 'none'})",
                        hint="list the module names yourself, e.g. target_modules: [q_proj, v_proj]")
    return names


def lora_config(cfg: RunConfig, model):
    """The peft LoraConfig for this config on this model."""
    from peft import LoraConfig

    from .plan import resolve_layers

    n_layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)
    layers = resolve_layers(cfg.lora.layers, n_layers) if n_layers else None
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=resolve_targets(cfg.lora.target_modules, model, layers is not None), bias="none",
                      task_type="CAUSAL_LM", layers_to_transform=layers,
                      modules_to_save=list(cfg.lora.modules_to_save) or None)


def load_model(cfg: RunConfig, base_dir: Path, device: str, dtype, local_rank: int = 0,
               checkpointing: bool | None = None, init_adapter: Path | None = None):
    """Base model (NF4 4-bit with double quantization, or plain) with LoRA adapters attached.

    checkpointing: the resolved gradient-checkpointing decision (None: resolve it here).
    init_adapter: a PEFT adapter directory to continue (trainable) instead of a fresh adapter."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device_map = {"": local_rank} if device == "cuda" else "cpu"
    fsdp = cfg.training.distributed == "fsdp"
    if fsdp:
        device_map = None  # FSDP places and shards the weights itself
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map,
                              "trust_remote_code": cfg.model.trust_remote_code,
                              "attn_implementation": resolve_attn_implementation(cfg.model.attn_implementation,
                                                                                 device)[0]}
    if cfg.load_in_4bit:
        # FSDP flattens the 4-bit weights together with the unquantized ones: the storage dtype must be theirs.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if fsdp else torch.uint8)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base model from {base_dir}: {e}",
                        hint="re-run the pull stage: `ollama-ft train CONFIG --force pull --until pull`") from None
    model.config.use_cache = False
    # prepare_model_for_kbit_training, minus its fp32 upcast of every non-quantized weight: that copy
    # doubles the embedding (0.7 GB for Gemma 3's 262k vocab) and makes activations fp32. The trainable
    # LoRA weights are fp32 anyway (peft's autocast_adapter_dtype) and the optimizer state follows them.
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing is None:
        checkpointing = resolve_checkpointing(cfg, base_dir, device)[0]
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        _check_adapter_fits(cfg, Path(init_adapter))
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lcfg = lora_config(cfg, model)
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules={cfg.lora.target_modules!r} does not fit this model: {e}",
                        hint="use 'all-linear' or names such as q_proj, v_proj") from None


def _check_adapter_fits(cfg: RunConfig, adapter: Path) -> None:
    """A continued adapter keeps its own shape; say so when the config asks for another one."""
    conf = adapter / "adapter_config.json"
    if not conf.is_file():
        raise UserError(f"{adapter} holds no PEFT adapter (no adapter_config.json)",
                        hint="--from-adapter takes a run whose train stage finished (`ollama-ft status RUN`)")
    saved = json.loads(conf.read_text())
    if saved.get("r") != cfg.lora.r:
        ui.warn(f"continuing the adapter in {adapter}: its rank r={saved.get('r')} is kept "
                f"(lora.r={cfg.lora.r} applies to fresh adapters only)")


def trainable_summary(model) -> dict[str, Any]:
    """Trainable / total parameter counts and which decoder layers carry adapter weights."""
    import re

    trainable, total = model.get_nb_trainable_parameters()
    layers = sorted({int(m.group(1)) for n, p in model.named_parameters() if p.requires_grad
                     for m in [re.search(r"\.layers\.(\d+)\.", n)] if m})
    n_layers = int(getattr(model.get_base_model().config.get_text_config(), "num_hidden_layers", 0) or 0)
    return {"trainable_parameters": int(trainable), "total_parameters": int(total),
            "trainable_share": trainable / max(1, total), "adapted_layers": layers, "layers": n_layers}


def active_module(module):
    """The module a peft ModulesToSaveWrapper currently runs (the trained copy), else the module itself."""
    import torch

    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict):
        name = module.active_adapters[0] if getattr(module, "active_adapters", None) else "default"
        return copies[name]
    return module


def body_and_head(model):
    """The decoder body (whose output we capture) and the LM head of a (peft-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    if body is None or head is None:
        raise UserError(f"{type(lm).__name__}: cannot find the decoder body / LM head for the chunked loss",
                        hint="this architecture is not supported for training yet")
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if getattr(lm.config, "logit_scale", None) not in (None, 1, 1.0):
        raise UserError(f"{type(lm).__name__} scales its logits (logit_scale); not supported by the chunked loss")
    return body, head, softcap


def pad_id(model) -> int:
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    pad = getattr(cfg, "pad_token_id", None)
    return int(pad) if pad is not None else 0
