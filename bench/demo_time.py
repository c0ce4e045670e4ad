"""End-to-end demo time: runs `ollama-ft train configs/demo.yaml` in a fresh runs directory and
prints the wall time of the pipeline (install excluded) and of each stage, against the 15-minute
goal on a 2-core machine. The stage times come from the run's manifest.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 15 * 60


def main() -> int:
    runs = Path(tempfile.mkdtemp(prefix="ollama-ft-demo-bench-"))
    env = {**os.environ, "OLLAMA_HOST": os.environ.get("OLLAMA_HOST", "http://127.0.0.1:9")}
    t = time.time()
    rc = subprocess.call([sys.executable, "-m", "ollama_ft", "train", str(ROOT / "configs" / "demo.yaml"),
                          "--set", f"runs_dir={runs}"], cwd=ROOT, env=env)
    wall = time.time() - t
    manifest = runs / "demo" / "manifest.json"
    if manifest.exists():
        stages = json.loads(manifest.read_text())["stages"]
        for name, e in stages.items():
            print(f"  {name:10s} {e.get('seconds', 0):8.1f} s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"demo pipeline wall time: {wall:.0f} s (goal {GOAL_S} s) -> ratio {wall / GOAL_S:.2f} of the goal"
          f" [{'OK' if wall <= GOAL_S else 'OVER'}]")
    shutil.rmtree(runs, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
