"""Trainer callbacks of the train stage: best adapter + early stopping, and Ctrl-C as "checkpoint, stop".

Why not transformers' EarlyStoppingCallback (checked against 5.24): it counts patience only, against
state.best_metric, which the Trainer updates itself only with metric_for_best_model set; keeping the
best *adapter* would still need load_best_model_at_end, which requires save_steps to be a multiple of
eval_steps and keeps a whole best checkpoint (optimizer state included: 3x the adapter with AdamW) out
of rotation. Here the best adapter alone is saved at every improving evaluation, whatever the
checkpoint cadence, and patience is counted from TrainerState.log_history, which checkpoints save, so
it survives a resume (test_early_stopping_keeps_best_adapter,
test_interrupt_then_resume_matches_uninterrupted_run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

from ..core import ui


def callback_classes():
    """(BestAndEarlyStop, InterruptCallback); built lazily so importing this module needs no transformers."""
    from transformers import TrainerCallback

    class BestAndEarlyStop(TrainerCallback):
        """Keeps the best adapter (lowest eval loss) and stops after `patience` evals without improvement."""

        def __init__(self, best_dir: Path, patience: int | None, min_delta: float = 0.0):
            self.best_dir = Path(best_dir)
            self.patience = patience
            self.min_delta = min_delta
            self.save = None  # save(dir): writes the adapter (set by the stage once the Trainer exists)
            self.collective = False  # FSDP: every rank takes part in gathering the sharded adapter
            self.stopped_early = False

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if state.best_metric is None or loss < state.best_metric - self.min_delta:
                state.best_metric = loss
                state.best_global_step = state.global_step
                zero = state.is_world_process_zero
                if self.save is not None and (zero or self.collective):
                    tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
                    if zero:
                        shutil.rmtree(tmp, ignore_errors=True)
                    self.save(tmp)
                    if zero:
                        (tmp / "best.json").write_text(json.dumps({"step": state.global_step, "eval_loss": loss}))
                        shutil.rmtree(self.best_dir, ignore_errors=True)
                        os.replace(tmp, self.best_dir)
                return
            worse = [h for h in state.log_history
                     if "eval_loss" in h and h.get("step", 0) > (state.best_global_step or 0)]
            if self.patience and len(worse) >= self.patience:
                control.should_training_stop = True
                self.stopped_early = True
                ui.info(f"early stopping: no improvement in {len(worse)} evaluations "
                        f"(best eval loss {state.best_metric:.4f} at step {state.best_global_step})")

    class InterruptCallback(TrainerCallback):
        """Ctrl-C sets a flag; at the end of the current step a checkpoint is saved and training stops."""

        def __init__(self):
            self.requested = False

        def on_step_end(self, args, state, control, **kw):
            if args.world_size > 1:
                # Every rank must stop at the same step, or the next collective would hang.
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self.requested = bool(flag.item())
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    return BestAndEarlyStop, InterruptCallback


def run_with_sigint(trainer, interrupt_cb, resume_from) -> bool:
    """trainer.train() with Ctrl-C turned into 'checkpoint at the end of this step, then stop'."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = None

    def _handler(signum, frame):
        if interrupt_cb.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        interrupt_cb.requested = True
        ui.warn("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort at once)")

    if main_thread:
        previous = signal.signal(signal.SIGINT, _handler)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return interrupt_cb.requested
