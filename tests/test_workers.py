"""The programs run in child processes are real modules: importable here, and isolated where they must be."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest


def test_driver_and_workers_import_without_their_environment():
    for name in ("ollama_ft.export.converter_driver", "ollama_ft.export.lora_gguf", "ollama_ft.export.llama_worker"):
        mod = importlib.import_module(name)
        assert mod.__doc__
    # importing them pulls in neither the converter's `conversion` package nor llama.cpp
    assert "conversion" not in sys.modules


def test_converter_driver_refuses_a_foreign_gguf(tmp_path, monkeypatch):
    """The driver runs apart from PyPI gguf: the converter directory goes first, and a gguf already
    imported from elsewhere (here: the main environment's) is refused instead of silently used."""
    import gguf

    from ollama_ft.export import converter_driver

    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RuntimeError, match="already imported"):
        converter_driver.isolate(tmp_path)
    monkeypatch.delitem(sys.modules, "gguf")
    converter_driver.isolate(tmp_path)
    assert sys.path[0] == str(tmp_path.resolve())
    assert gguf.__file__  # the main environment's module object is untouched


def test_lora_pairs_names_and_refusals():
    from ollama_ft.export.lora_gguf import LoraMappingError, lora_pairs

    got = lora_pairs({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": 1,
                      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": 2})
    assert got == {"model.layers.0.self_attn.q_proj": {"A": 1, "B": 2}}
    with pytest.raises(LoraMappingError, match="lm_head.weight"):
        lora_pairs({"base_model.model.lm_head.weight": 3})


def test_one_nll_matches_torch_cross_entropy():
    """core/nll.token_nll (used by llama_worker and the export reference) is torch's cross entropy."""
    import torch

    from ollama_ft.core.nll import NllSum, perplexity, token_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=30, size=(9, 50))
    ids = list(rng.integers(0, 50, size=9))
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[:-1]), torch.tensor(ids[1:]), reduction="none")
    got = token_nll(logits, ids)
    assert np.allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)
    s = NllSum()
    s.add(got, [1, 0, 0, 1, 1, 0, 0, 0])
    assert s.n == 8 and s.answer_n == 3 and s.answer_nll == pytest.approx(got[[0, 3, 4]].sum())
    assert perplexity(s.nll, s.n) == pytest.approx(float(np.exp(got.mean())))
    assert np.isnan(perplexity(0.0, 0)) and perplexity(1e6, 1) == pytest.approx(np.exp(700.0))
