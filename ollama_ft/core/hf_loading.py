"""Load an HF model in float32 for a correctness proof, within the machine's RAM.

The merge stage's logits proof and the export stage's perplexity reference run the full-precision model
in float32 on CPU: 4 bytes a parameter, 30 GB for a 7B model, which a 16 GB-RAM workstation does not have.
When the float32 model does not fit the RAM budget, it is loaded with accelerate's disk offload
(`device_map="auto"`, `max_memory`): weights stay in their safetensors files and each layer is read in
for its forward pass, so resident memory stays near the budget. The arithmetic is the same float32
arithmetic either way; only the time differs. A LoRA adapter is attached to an offloaded model with
peft's `inject_adapter_in_model` (PeftModel's dispatch cannot handle disk-offloaded weights).

OLLAMA_FT_PROOF_RAM_BYTES sets the budget (tests force the offload path with a tiny one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GB = 2**30
RUNTIME_RESERVE = int(1.5 * GB)  # python, torch, activations and logits of a proof batch


def float32_bytes(model_dir: Path) -> int:
    """Bytes of the model's weights in float32, from the safetensors headers (no weights read)."""
    from .hf_dir import safetensors_summary

    return safetensors_summary(model_dir)["parameters"] * 4


def ram_budget() -> int:
    """Bytes the proof may keep resident: $OLLAMA_FT_PROOF_RAM_BYTES, else 60% of available RAM."""
    env = os.environ.get("OLLAMA_FT_PROOF_RAM_BYTES")
    if env:
        try:
            value = int(env.strip().replace("_", ""))
        except ValueError:
            value = -1
        if value <= 0:
            from .errors import UserError

            raise UserError(f"OLLAMA_FT_PROOF_RAM_BYTES={env!r} is not a positive whole number of bytes",
                            hint="write bytes, e.g. OLLAMA_FT_PROOF_RAM_BYTES=16000000000 for 16 GB, or unset it "
                                 "to use 60% of the available RAM")
        return value
    import psutil

    return int(psutil.virtual_memory().available * 0.6)


def load_float32(model_dir: Path, offload_dir: Path, trust_remote_code: bool = False) -> tuple[Any, bool]:
    """(model in eval mode, offloaded?). Offloaded when the float32 weights exceed the RAM budget."""
    import torch
    from transformers import AutoModelForCausalLM

    budget = ram_budget()
    need = float32_bytes(model_dir)
    if need + RUNTIME_RESERVE <= budget:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
        return model.eval(), False
    offload_dir.mkdir(parents=True, exist_ok=True)
    cpu = max(budget - RUNTIME_RESERVE, budget // 4, 1)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, trust_remote_code=trust_remote_code,
        device_map="auto", max_memory={"cpu": cpu}, offload_folder=str(offload_dir))
    return model.eval(), True


def attach_adapter(model: Any, adapter_dir: Path, offloaded: bool) -> Any:
    """The model with the PEFT adapter applied (unmerged): PeftModel, or injected layers when offloaded."""
    if not offloaded:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    model = inject_adapter_in_model(cfg, model)
    # The injected LoRA matrices take the device of the layer they wrap, which is `meta` for an
    # offloaded layer: give them real (CPU) storage, then load the adapter's values into it.
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            module.to_empty(device="cpu")
    res = set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    if getattr(res, "unexpected_keys", None):
        raise RuntimeError(f"adapter tensors not used: {res.unexpected_keys[:3]}")
    return model.eval()


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """Run the base model alone (for the adapter's effect), for PeftModel and injected adapters alike."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
