"""CLI surface: --help is instant and torch-free, user errors are one red line, doctor reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = ["pull", "data", "plan", "train", "merge", "export", "modelfile", "register", "run", "publish",
            "install", "eval", "status", "doctor"]


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "ollama_ft", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help_lists_every_command_and_skips_torch():
    code = ("import sys, time; t=time.time(); sys.argv=['ollama-ft','--help']\n"
            "from ollama_ft.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("NOTORCH")
    for c in COMMANDS:
        assert c in p.stdout
    assert elapsed < 5  # well under a second normally; generous for a loaded CI machine


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_teaching_help(cmd):
    p = cli(cmd, "--help")
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout and len(p.stdout) > 200


def test_user_error_is_one_red_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainig:\n  epochs: 1\n")
    p = cli("train", str(bad))
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert "did you mean 'training'" in p.stderr
    assert f"{bad}:1" in p.stderr


def test_status_of_missing_run(tmp_path):
    p = cli("status", "nope", "--runs-dir", str(tmp_path))
    assert p.returncode == 1 and "run not found" in p.stderr and "Traceback" not in p.stderr


def test_doctor_reports_missing_ollama_with_fix():
    # port 9 (discard) on loopback: nothing listens, so the server is "missing"
    p = cli("doctor", "--host", "http://127.0.0.1:9", timeout=300)
    assert "Traceback" not in p.stderr
    out = p.stdout + p.stderr
    assert "Ollama server" in out and "not reachable" in out and "ollama serve" in out
    assert "llama-cpp-python" in out and "bitsandbytes" in out


def test_plan_on_this_cpu_and_a_device_it_does_not_know(tmp_path):
    p = cli("plan", str(ROOT / "configs" / "demo.yaml"), "--device", "cpu", "--budget", "8GB",
            "--set", f"runs_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    assert "training peak on CPU" in out and "time on this CPU" in out and "GO: training needs" in out
    p = cli("plan", str(ROOT / "configs" / "demo.yaml"), "--device", "tpu")
    assert p.returncode == 1 and "--device 'tpu': expected cuda or cpu" in p.stderr and "Traceback" not in p.stderr
