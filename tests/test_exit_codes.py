"""Exit codes scripts can trust, through the real CLI in a subprocess: Ctrl-C during training exits 130
after saying what was kept, and the re-run resumes to the same final loss as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "ollama_ft" / "data_files" / "clinic_sample.jsonl"


def _config(tmp_path: Path, base: Path, name: str) -> Path:
    data = tmp_path / "small.jsonl"
    if not data.exists():
        data.write_text("\n".join(SAMPLE.read_text().splitlines()[:60]) + "\n")
    cfg = {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "model": {"base": str(base), "adapter": "lora"},
        "data": {"path": str(data), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 120, "eval_steps": 1000,
                     "save_steps": 1000, "learning_rate": 1e-3, "seed": 3, "logging_steps": 1},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(cfg: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ollama_ft", "train", str(cfg), "--until", "train"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OLLAMA_FT_PROGRESS": "0"}, **kw)


def _final_loss(tmp_path: Path, name: str) -> float:
    summary = tmp_path / "runs" / name / "adapter" / "train_summary.json"
    return json.loads(summary.read_text())["final_train_loss"]


def test_sigint_during_training_exits_130_keeps_checkpoint_and_resumes_to_same_loss(tmp_path, tiny_llama):
    ref = _train(_config(tmp_path, tiny_llama, "ref"))
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]

    cut_cfg = _config(tmp_path, tiny_llama, "cut")
    proc = _train(cut_cfg)
    ckpt_dir = tmp_path / "runs" / "cut" / "checkpoints"
    deadline = time.time() + 300
    # Interrupt once training steps are running (the progress line of step 1 on stderr): a signal before
    # the loop starts, or after it, is an interrupt without a training checkpoint to keep.
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    while time.time() < deadline and not any(ln.startswith("step 1/") for ln in lines):
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.05)
    assert (ckpt_dir / "fingerprint.json").is_file(), "training never started"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "checkpoint saved" in err and "re-run" in err
    assert "interrupted" in err
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"))
    assert ckpts, f"no checkpoint kept in {ckpt_dir}"
    assert not (tmp_path / "runs" / "cut" / "adapter").exists()  # no half-written stage output

    again = _train(cut_cfg)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "runs" / "cut" / "adapter" / "train_summary.json").read_text())
    assert summary.get("resumed_from"), summary
    assert _final_loss(tmp_path, "cut") == pytest.approx(_final_loss(tmp_path, "ref"), rel=1e-4)


def test_user_error_exits_1_and_internal_error_exits_2_with_log(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: [\n")
    p = subprocess.run([sys.executable, "-m", "ollama_ft", "train", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr and f"{bad}" in p.stderr

    # An internal failure (a bug, simulated by a broken module) exits 2 and names the crash log.
    code = ("import sys, ollama_ft.cli as c\n"
            "@c.app.command('boom')\n"
            "def boom():\n    raise ZeroDivisionError('simulated bug')\n"
            "sys.argv = ['ollama-ft', 'boom']\nc.main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OLLAMA_FT_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    assert "internal error: ZeroDivisionError: simulated bug" in p.stderr and "Traceback" not in p.stderr
    logs = list((tmp_path / "cache" / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and "ZeroDivisionError" in logs[0].read_text() and str(logs[0]) in p.stderr
