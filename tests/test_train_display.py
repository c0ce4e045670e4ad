"""The training progress lines a log file (CI, `> train.log`) gets: no repeated lines, warnings once."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ollama_ft.core import ui
from ollama_ft.train.display import MetricsCallback


@pytest.fixture
def lines(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(ui, "info", lambda text: shown.append(text))
    return shown


def _run(tmp_path, logs: list[tuple[int, dict]], max_steps: int, eval_steps: int = 10):
    cb = MetricsCallback(tmp_path / "metrics.jsonl", token_counter=lambda: 0, show=True)
    args = SimpleNamespace(world_size=1, eval_strategy="steps", eval_steps=eval_steps)
    state = SimpleNamespace(global_step=0, max_steps=max_steps, epoch=0.0, is_world_process_zero=True)
    cb.on_train_begin(args, state, None)  # not a terminal under pytest: line mode
    for step, rec in logs:
        state.global_step = step
        cb.on_log(args, state, None, logs=rec)
    return cb


def test_an_eval_step_prints_one_line_with_this_steps_eval(tmp_path, lines):
    logs = []
    for step in range(1, 21):
        logs.append((step, {"loss": 2.0 - step * 0.01, "grad_norm": 1.0, "learning_rate": 1e-4}))
        if step % 10 == 0:
            logs.append((step, {"eval_loss": 1.5 - step * 0.01, "eval_perplexity": 4.0}))
    _run(tmp_path, logs, max_steps=20)
    steps = [ln.split()[1] for ln in lines]
    assert steps == ["1/20", "10/20", "20/20"], lines  # step 10 and 20 once each, from their eval
    assert "eval 1.4000" in lines[1] and "eval" not in lines[0]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 22  # the file keeps every record


def test_a_lasting_warning_is_printed_once_and_again_after_it_went_away(tmp_path, lines):
    jumpy = [3.0, 1.0] * 10  # volatile around any trend
    logs = [(s, {"loss": jumpy[s - 1], "grad_norm": 1.0}) for s in range(1, 21)]
    logs += [(s, {"loss": 1.0 - 0.001 * s, "grad_norm": 1.0}) for s in range(21, 41)]  # calm again
    logs += [(41, {"loss": 1.0, "grad_norm": 50.0})]  # a new warning: printed at once
    logs += [(s, {"loss": jumpy[s - 42], "grad_norm": 1.0}) for s in range(42, 62)]  # volatile again
    cb = _run(tmp_path, logs, max_steps=100, eval_steps=1000)
    text = "\n".join(lines)
    assert text.count("loss is volatile") == 2, text  # once per spell, not on every line of it
    first, second = [i for i, ln in enumerate(lines) if "loss is volatile" in ln]
    assert any(ln.startswith("step 41/100") and "gradient norm 50 > 5.0" in ln for ln in lines[first:second])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss is volatile" in " ".join(r.get("warnings", [])) for r in records) >= 5
    assert cb.warnings and "loss is volatile" in cb.warnings[0]
