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
    # Only after success: on failure a barrier would wait for ranks blocked in a collective with this
    # one; torchrun stops them when this process exits non-zero.
    _shut_down_process_group()
    return 0


def _shut_down_process_group() -> None:
    """Destroy the process group while the interpreter is whole.

    Left to interpreter teardown, gloo's worker threads can still hold tensors whose release needs the
    GIL; the process then aborts ("terminate called without an active exception", SIGABRT) after a
    successful run and torchrun reports the whole run failed. The barrier lets every rank finish its
    last collective before any rank tears its side down.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
