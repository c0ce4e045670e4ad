"""Fabricated eval outputs and a real review server process for the review tests (no model needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    ("When are you open on Tuesday?", "Monday to Friday from 7:40 to 18:20."),
    ("Where do I park?", "In the garage under the clinic, level -1."),
    ("Do you take walk-ins?", "Yes, until 11:00 every weekday."),
    ("How do I cancel?", "Call 555-0142 at least 24 hours ahead."),
    ("Is there a lab on site?", "Yes, on the second floor, room 214."),
    ("Can I bring my child?", "Yes, children are welcome with an adult."),
]
ROOT = Path(__file__).resolve().parent.parent


def make_run(runs: Path, name: str = "r1", answers_from: str = "v1", seed: int = 0) -> Path:
    """runs/<name>/ with run.yaml, data/test.jsonl and report/metrics.json as the eval stage writes them."""
    root = runs / name
    (root / "data").mkdir(parents=True)
    (root / "report").mkdir()
    (root / "run.yaml").write_text(f"name: {name}\nreview:\n  seed: {seed}\n  bootstrap_samples: 500\n")
    with open(root / "data" / "test.jsonl", "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QUESTIONS):
            f.write(json.dumps({"id": f"test-{i}", "messages": [{"role": "user", "content": q},
                                                                {"role": "assistant", "content": a}]}) + "\n")
    per = []
    for i, (_q, a) in enumerate(QUESTIONS):
        base = "I am not sure, please ask the front desk." + " Thank you." * (i % 2)
        tuned = f"{a} ({answers_from} answer {i})"
        per.append({"id": f"test-{i}", "reference": a,
                    "base": {"text": base, "tokens": 12, "hit_limit": False},
                    "tuned": {"text": tuned, "tokens": 14, "hit_limit": False},
                    "base_rouge_l": 0.1, "tuned_rouge_l": 0.5 + 0.05 * i,
                    "base_chrf": 20.0, "tuned_chrf": 60.0})
    metrics = {"run": name, "split": "test", "examples": len(per), "examples_available": len(per), "cap": None,
               "via": "llama_cpp", "max_new_tokens": 32, "decoding": "greedy",
               "base": {"model": "base.gguf", "corpus": {"rouge_l": 0.1}},
               "tuned": {"model": "tuned.gguf", "corpus": {"rouge_l": 0.6}},
               "comparisons": {}, "primary_metric": "rouge_l", "gate": {"passed": True, "reason": "ok"},
               "drift": [], "example": {}, "per_example": per}
    (root / "report" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return root


class ReviewServer:
    """`python -m ollama_ft review RUN ...` as a real process; `url` is the page URL it printed."""

    def __init__(self, *args: str, cwd: Path | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_ft", "review", *args], cwd=cwd or ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 60
        self.url = ""
        self.output: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            self.output.append(line)
            if line.startswith("review page: "):
                self.url = line.split(": ", 1)[1].strip()
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"review server exited {self.proc.returncode}: {''.join(self.output)}")
        if not self.url:
            self.kill()
            raise RuntimeError("review server printed no URL within 60 s")
        self.base, self.token = self.url.split("/?token=")
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        for _ in range(100):
            try:
                httpx.get(self.base + "/api/state", headers={"X-Review-Token": self.token}, timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)

    def api(self, method: str, path: str, **kw):
        import httpx

        return httpx.request(method, self.base + path, headers={"X-Review-Token": self.token}, timeout=10, **kw)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs (what a crash or `kill -9` does)."""
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.stdout.close()
