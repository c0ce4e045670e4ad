"""Config loading: line numbers, did-you-mean, all errors at once, 1e-5 floats, --set, sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollama_ft.core.config import load_config
from ollama_ft.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    loaded = load_config(path)
    assert loaded.config.run_name == (loaded.config.name or path.stem)


def test_short_form_from_guides(tmp_path):
    p = write(tmp_path, """
model: {base: deepseek:7b, adapter: lora, quantization: bitsandbytes_4bit}
training: {batch_size: 16, learning_rate: 3e-5, epochs: 3, gradient_checkpointing: true, dropout_rate: 0.1, patience: 2}
optimizer: {weight_decay: 0.01}
""")
    cfg = load_config(p).config
    assert cfg.model.base == "deepseek:7b"
    assert cfg.load_in_4bit is True
    assert cfg.model.adapter == "qlora"
    assert cfg.training.learning_rate == pytest.approx(3e-5)
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.batch_size == 16 and cfg.training.epochs == 3
    assert cfg.lora.dropout == pytest.approx(0.1)  # dropout_rate is the LoRA dropout
    assert cfg.training.patience == 2
    assert cfg.optimizer.weight_decay == pytest.approx(0.01)


def test_scientific_notation_is_float(tmp_path):
    p = write(tmp_path, "training:\n  learning_rate: 1e-5\n")
    assert load_config(p).config.training.learning_rate == pytest.approx(1e-5)


def test_misspelled_section_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "model:\n  base: gemma3:270m\ntrainig:\n  epochs: 2\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    text = "\n".join(e.value.details)
    assert f"{p}:3" in text
    assert "trainig" in text
    assert "did you mean 'training'" in text


def test_three_independent_mistakes_reported_together(tmp_path):
    p = write(tmp_path, """
model:
  base: gemma3:270m
  adaptr: lora
training:
  learning_rate: -1
  epochs: 1
lora:
  r: many
""")
    with pytest.raises(UserError) as e:
        load_config(p)
    details = e.value.details
    assert len(details) == 3, details
    assert any(f"{p}:4" in d and "adaptr" in d and "adapter" in d for d in details)
    assert any(f"{p}:6" in d and "learning_rate" in d for d in details)
    assert any(f"{p}:9" in d and "lora.r" in d for d in details)


def test_key_in_wrong_section_suggests_right_place(tmp_path):
    p = write(tmp_path, "patience: 3\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    assert "training.patience" in "\n".join(e.value.details)


def test_set_overrides_and_sources(tmp_path):
    p = write(tmp_path, "training:\n  epochs: 2\n")
    loaded = load_config(p, ["training.epochs=5", "training.learning_rate=2e-5", "export.quants=[Q4_K_M,Q8_0]"])
    cfg = loaded.config
    assert cfg.training.epochs == 5
    assert cfg.training.learning_rate == pytest.approx(2e-5)
    assert cfg.export.quants == ["Q4_K_M", "Q8_0"]
    resolved = loaded.resolved()
    assert resolved["training.epochs"]["source"] == "--set training.epochs=5"
    assert resolved["training.seed"]["source"] == "default"
    loaded2 = load_config(p)
    assert loaded2.resolved()["training.epochs"]["source"] == f"{p}:2"


def test_bad_set_syntax(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["training.epochs"])


def test_set_unknown_key_is_reported(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(None, ["training.epoch=3"])
    assert "did you mean 'training.epochs'" in "\n".join(e.value.details)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "model:\n  base: [unclosed\n")
    with pytest.raises(UserError, match=r"c.yaml:\d+"):
        load_config(p)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config("nope/none.yaml")


def test_resolved_config_saved(tmp_path):
    p = write(tmp_path, "name: x\ntraining:\n  epochs: 2\n")
    loaded = load_config(p)
    loaded.save(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "config.resolved.json").read_text())
    assert data["training.epochs"] == {"value": 2.0, "source": f"{p}:3"}
    assert (tmp_path / "run" / "run.yaml").exists()
    # the saved run.yaml is itself a valid config
    assert load_config(tmp_path / "run" / "run.yaml").config.training.epochs == 2
