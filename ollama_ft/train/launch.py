"""Launching training over several processes and machines with torchrun.

One node: `--nproc_per_node N --nnodes 1` on a free loopback port. Several nodes: torchrun's
rendezvous (`--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`, or a static
rendezvous with `--node-rank`); run the same `ollama-ft train` command on every node. Rank 0 writes the
outputs; the run directory must be on storage every node sees at the same path (ranks wait for rank
0's checkpoint decision in it). `training.distributed: fsdp` shards the base over the processes
(transformers' FSDP integration, see trainer.training_arguments and model.load_model's quant storage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError


def torchrun_command(cfg: RunConfig, worker_args: list[str], port: int | None = None) -> list[str]:
    """The torchrun command line for this config (pure: the tests check it)."""
    t = cfg.training
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(t.nproc), "--nnodes", str(t.nnodes)]
    if t.nnodes == 1 and not t.rdzv_endpoint:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        cmd += ["--rdzv-backend", t.rdzv_backend, "--rdzv-endpoint", str(t.rdzv_endpoint),
                "--rdzv-id", t.rdzv_id or cfg.run_name]
        if t.node_rank is not None:
            cmd += ["--node-rank", str(t.node_rank)]
    return [*cmd, "-m", "ollama_ft.train.worker", *worker_args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_distributed(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                       resume: bool, init_adapter: Path | None = None,
                       stage_data: dict[str, Path] | None = None) -> dict:
    """Run `train.worker` under torchrun (gloo on CPU, nccl on CUDA); return rank 0's train_summary.json."""
    import torch

    t = cfg.training
    n = t.nproc
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise UserError(f"training.nproc={n} but only {torch.cuda.device_count()} CUDA device(s) are visible",
                        hint=f"use --nproc {torch.cuda.device_count()} or set CUDA_VISIBLE_DEVICES")
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg_file = Path(out) / ".train_config.json"
    cfg_file.write_text(cfg.model_dump_json())
    args = ["--config", str(cfg_file), "--base", str(base_dir), "--data", str(data_dir), "--out", str(out),
            "--checkpoints", str(checkpoints_dir)]
    if resume:
        args.append("--resume")
    if init_adapter:
        args += ["--init-adapter", str(init_adapter)]
    if stage_data:
        args += ["--stage-data", json.dumps({k: str(v) for k, v in stage_data.items()})]
    cmd = torchrun_command(cfg, args, _free_port())
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Several processes on a shared CPU: split the cores instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n)))
    kind = "FSDP (sharded)" if t.distributed == "fsdp" else "data-parallel"
    ui.info(f"launching {n} {kind} process(es) x {t.nnodes} node(s): {' '.join(cmd[:12])} ...")
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    finally:
        cfg_file.unlink(missing_ok=True)
    if rc != 0:
        raise UserError(f"distributed training failed (torchrun exit status {rc})",
                        hint="the worker's error is printed above; try --nproc 1 to see it without torchrun")
    summary = Path(out) / "train_summary.json"
    if not summary.is_file():
        if t.nnodes > 1 and t.node_rank not in (None, 0):
            return {"summary": f"node {t.node_rank}: training finished; rank 0's node writes the adapter"}
        raise UserError(f"distributed training wrote no {summary}")
    return json.loads(summary.read_text())
