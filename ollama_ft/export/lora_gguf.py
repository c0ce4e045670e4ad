"""A PEFT LoRA adapter as a llama.cpp / Ollama GGUF adapter (../shared/docs/ollama-contract.md §7.3).

Runs inside the converter's environment (export/converter_driver.py, `lora` mode): no package ships
llama.cpp's `convert_lora_to_gguf.py`, so this is the project's own writer, built on the packaged
converter's `conversion` model classes for what they know: the architecture name, which HF tensors go
into a GGUF (`filter_tensors`), and each tensor's GGUF name and layout (`modify_tensors`, e.g. llama's
q/k row permutation). Only B goes through `modify_tensors`: the transforms act on output rows, and A's
rows are the rank. tests/test_export.py loads the result in llama.cpp (lora_path) against the merged
model's GGUF.

Keys: general.type=adapter, adapter.type=lora, adapter.lora.alpha (the caller passes scaling x r, so
llama.cpp's alpha/r gives PEFT's scaling, rsLoRA included), general.file_type F16, general.architecture
of the base; tensors `<base tensor>.lora_a` / `.lora_b` in float16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_(A|B)(?:\.default)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class LoraMappingError(ValueError):
    """An adapter tensor that has no place in a GGUF adapter."""


def lora_pairs(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{HF module name: {"A": tensor, "B": tensor}} from PEFT's adapter_model.safetensors keys."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise LoraMappingError(f"adapter tensor {key!r} cannot go into a GGUF adapter "
                                   "(only lora_A/lora_B of linear layers can)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    return pairs


def write_adapter(cls, model_dir: Path, adapter_dir: Path, out_path: Path, alpha: float,
                  metadata: dict[str, Any]) -> dict[str, Any]:
    """Write adapter_dir's LoRA pairs for the base in model_dir (converter model class `cls`) to out_path."""
    import gguf
    from safetensors.torch import load_file

    model = cls(model_dir, gguf.LlamaFileType.MOSTLY_F16, Path(out_path), eager=True, dry_run=True)
    pairs = lora_pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    arch_name = gguf.MODEL_ARCH_NAMES[model.model_arch]
    w = gguf.GGUFWriter(str(out_path), arch_name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for k, v in metadata.items():
        w.add_string(k, str(v))
    written = 0
    for module, ab in sorted(pairs.items()):
        item = cls.filter_tensors((module + ".weight", lambda: None))
        if item is None:  # a tensor the converter leaves out of the model GGUF: nothing to adapt there
            continue
        hf_name = item[0]
        bm = _LAYER.search(hf_name)
        outs = list(model.modify_tensors(ab["B"].float(), hf_name, int(bm.group(1)) if bm else None))
        if len(outs) != 1:
            raise LoraMappingError(f"cannot map LoRA of {hf_name} (the converter splits it into {len(outs)} tensors)")
        gname, b = outs[0]
        w.add_tensor(gname + ".lora_a", ab["A"].float().numpy().astype("float16"))
        w.add_tensor(gname + ".lora_b", b.numpy().astype("float16"))
        written += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"lora_pairs": written, "architecture": arch_name}
