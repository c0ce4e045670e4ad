"""Run every CPU benchmark in turn (`make bench`). Each prints its own ratios against a baseline
measured in the same run; this script only sequences them and collects their last lines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["data_prepare.py", "train_throughput.py", "export.py", "merge_proof.py", "demo_time.py"]


def main() -> int:
    failed = []
    for name in (sys.argv[1:] or BENCHES):
        script = HERE / name
        if not script.exists():
            print(f"== {name}: missing", flush=True)
            failed.append(name)
            continue
        print(f"== {name}", flush=True)
        t = time.time()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"== {name}: exit {rc} in {time.time() - t:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
