"""One training process (DDP or FSDP rank), started by torchrun from train.launch.launch_distributed.

    python -m torch.distributed.run --nproc_per_node N -m ollama_ft.train.worker --config CFG.json ...

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; the Trainer initialises the process group (gloo on CPU,
nccl on CUDA) and wraps the model in DDP. Rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ollama_ft.train.worker")
    p.add_argument("--config", required=True, help="RunConfig as JSON")
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-adapter", default=None, help="adapter to continue (--from-adapter)")
    p.add_argument("--stage-data", default=None, help="JSON {stage name: data dir} for stages:")
    a = p.parse_args(argv)

    from ..core.config import RunConfig
    from ..core.errors import UserError
    from ..core.ui import print_error
    from .stages import train_all

    cfg = RunConfig.model_validate_json(Path(a.config).read_text())
    try:
        train_all(cfg, Path(a.base), Path(a.data), Path(a.out), Path(a.checkpoints), a.resume,
                  Path(a.init_adapter) if a.init_adapter else None,
                  json.loads(a.stage_data) if a.stage_data else None)
    except UserError as e:
        print_error(e.message, e.hint, e.details)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
