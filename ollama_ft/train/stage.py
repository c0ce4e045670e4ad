"""QLoRA training: the `train` stage (base/ + data/ -> adapter/).

A transformers Trainer subclass does the loop (gradient accumulation, AdamW / paged 8-bit AdamW,
cosine schedule with warmup, clipping, checkpoints with optimizer/scheduler/RNG state and data-order
skipping on resume, DDP under torchrun). What it adds:
- padding-free packing (train_data.PackingCollator) and targets shifted per example;
- the LM head + cross-entropy in chunks, only on trained positions (train_loss.chunked_ce_sum):
  the body's hidden states are captured by a forward hook while the model itself is asked for the
  logits of ONE position (`logits_to_keep=1`), so the full logits never exist;
- token-weighted evaluation (loss, perplexity), early stopping with patience, the best adapter kept;
- Ctrl-C: the step finishes, a checkpoint is written, KeyboardInterrupt is re-raised;
- live display, metrics.jsonl, loss_curve.png, train_summary.json (train_display.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.config import RunConfig
from ..core.errors import UserError
from .plan import resolve_batching

CHECKPOINT_PREFIX = "checkpoint-"
BEST_DIR = "best-adapter"


# ---------------------------------------------------------------------------------------------
# Resolved settings (pure: also used by plan.py and the tests)


def compute_choice(cfg: RunConfig):
    """The compute dtype for this config on this machine, with the reason (compute_dtype.ComputeDtype)."""
    import torch

    from ..core import compute_dtype

    return compute_dtype.choose(cfg.model.compute_dtype, "cuda" if torch.cuda.is_available() else "cpu")


def resolve_checkpointing(cfg: RunConfig, base_dir: Path, device: str) -> tuple[bool, str]:
    """(gradient checkpointing on?, why): the config's value, or for "auto" the memory plan's decision."""
    gc = cfg.training.gradient_checkpointing
    if gc != "auto":
        return bool(gc), "set by training.gradient_checkpointing"
    import psutil

    from .plan import ModelDims, decide_checkpointing, settings_from_config

    try:
        dims = ModelDims.from_config(json.loads((Path(base_dir) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return True, "on: no readable config.json to plan with"
    if device == "cuda":
        import torch

        memory = float(torch.cuda.get_device_properties(0).total_memory)
    else:
        memory = float(psutil.virtual_memory().available)
    return decide_checkpointing(dims, settings_from_config(cfg, device), memory)


def _resolved_compute_dtype(cfg: RunConfig) -> str:
    return compute_choice(cfg).name


def pick_device_and_dtype(cfg: RunConfig):
    """(device, compute dtype, optimizer name) for this machine and config."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = compute_choice(cfg).torch_dtype
    name = cfg.optimizer.name
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw"
    if not cuda and name in ("paged_adamw_8bit", "adamw_8bit"):
        ui.warn(f"optimizer.name={name} needs CUDA; using plain AdamW on CPU")
        name = "adamw"
    optim = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit"}[name]
    return ("cuda" if cuda else "cpu"), dtype, optim


# ---------------------------------------------------------------------------------------------
# Model


def load_model(cfg: RunConfig, base_dir: Path, device: str, dtype, local_rank: int = 0,
               checkpointing: bool | None = None):
    """Base model (NF4 4-bit with double quantization, or plain) with LoRA adapters attached.

    checkpointing: the resolved gradient-checkpointing decision (None: resolve it here)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device_map = {"": local_rank} if device == "cuda" else "cpu"
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map,
                              "trust_remote_code": cfg.model.trust_remote_code, "attn_implementation": "sdpa"}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base model from {base_dir}: {e}",
                        hint="re-run the pull stage: `ollama-ft train CONFIG --force pull --until pull`") from None
    model.config.use_cache = False
    # prepare_model_for_kbit_training, minus its fp32 upcast of every non-quantized weight: that copy
    # doubles the embedding (0.7 GB for Gemma 3's 262k vocab) and makes activations fp32. The trainable
    # LoRA weights are fp32 anyway (peft's autocast_adapter_dtype) and the optimizer state follows them.
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing is None:
        checkpointing = resolve_checkpointing(cfg, base_dir, device)[0]
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules={cfg.lora.target_modules!r} does not fit this model: {e}",
                        hint="use 'all-linear' or names such as q_proj, v_proj") from None
    return model


def _body_and_head(model):
    """The decoder body (whose output we capture) and the LM head of a (peft-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    if body is None or head is None:
        raise UserError(f"{type(lm).__name__}: cannot find the decoder body / LM head for the chunked loss",
                        hint="this architecture is not supported for training yet")
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if getattr(lm.config, "logit_scale", None) not in (None, 1, 1.0):
        raise UserError(f"{type(lm).__name__} scales its logits (logit_scale); not supported by the chunked loss")
    return body, head, softcap


# ---------------------------------------------------------------------------------------------
# Trainer


def _trainer_class():
    import torch
    from transformers import Trainer

    from .loss import chunked_ce_sum

    class QLoRATrainer(Trainer):
        """Trainer with the chunked loss, packing-aware token counting and token-weighted evaluation."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, loss_chunk_size: int = 256, **kw):
            super().__init__(*args, **kw)
            # Our loss is a token sum divided by the batch's trained-token count (num_items_in_batch).
            self.model_accepts_loss_kwargs = True
            self.loss_chunk_size = loss_chunk_size
            self.useful_tokens = 0
            self._captured: list = []
            body, head, softcap = _body_and_head(self.model)
            self._head, self._softcap = head, softcap
            body.register_forward_hook(self._capture)

        def _capture(self, module, args, output):
            hs = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._captured.append(hs)

        def _loss_sum(self, model, inputs):
            targets = inputs.pop("shift_labels")
            inputs.pop("labels", None)
            self._captured.clear()
            # logits for one position only: the head runs below, in chunks, on trained positions.
            model(**inputs, logits_to_keep=1, use_cache=False)
            hidden = self._captured.pop()
            self._captured.clear()
            w = self._head.weight
            b = getattr(self._head, "bias", None)
            if "attention_mask" in inputs:
                n_tok = int(inputs["attention_mask"].sum())
            else:
                n_tok = inputs["input_ids"].numel()
            return (*chunked_ce_sum(hidden, w, b, targets, self.loss_chunk_size, self._softcap), n_tok)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, n, n_tok = self._loss_sum(model, inputs)
            if model.training:
                self.useful_tokens += n_tok
            if num_items_in_batch is None:
                loss = loss_sum / n.clamp(min=1)
            else:
                loss = loss_sum / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.args.world_size  # DDP averages gradients; the count is global
            return (loss, None) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            dl = self.get_eval_dataloader(eval_dataset)
            model = self.model
            was_training = model.training
            model.eval()
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            start = time.perf_counter()
            with torch.no_grad():
                for batch in dl:
                    batch = self._prepare_inputs(batch)
                    s, n, _ = self._loss_sum(model, batch)
                    total[0] += s.double()
                    total[1] += n
            if self.args.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
            if was_training:
                model.train()
            loss = float(total[0] / total[1].clamp(min=1))
            metrics = {f"{metric_key_prefix}_loss": loss,
                       f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50.0)),
                       f"{metric_key_prefix}_tokens": int(total[1]),
                       f"{metric_key_prefix}_runtime": round(time.perf_counter() - start, 3)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return QLoRATrainer


def _callbacks():
    from transformers import TrainerCallback

    class BestAndEarlyStop(TrainerCallback):
        """Keeps the best adapter (lowest eval loss) and stops after `patience` evals without improvement.

        State lives in TrainerState (best_metric, best_global_step, log_history), which checkpoints
        save and resume restores, so patience survives a resume.
        """

        def __init__(self, best_dir: Path, patience: int | None, min_delta: float = 0.0):
            self.best_dir = Path(best_dir)
            self.patience = patience
            self.min_delta = min_delta
            self.model = None
            self.stopped_early = False

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if state.best_metric is None or loss < state.best_metric - self.min_delta:
                state.best_metric = loss
                state.best_global_step = state.global_step
                if state.is_world_process_zero and self.model is not None:
                    tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    self.model.save_pretrained(str(tmp))
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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _fingerprint(cfg: RunConfig, base_dir: Path, data_dir: Path) -> str:
    from ..core.runs import sha256_file

    tr = cfg.training.model_dump(mode="json")
    for k in ("tensorboard", "logging_steps", "eval_steps", "save_steps", "patience"):
        tr.pop(k, None)  # these do not change the trajectory
    payload = {"lora": cfg.lora.model_dump(mode="json"), "training": tr,
               "optimizer": cfg.optimizer.model_dump(mode="json"), "4bit": cfg.load_in_4bit,
               "dtype": cfg.model.dtype, "compute_dtype": _resolved_compute_dtype(cfg)}
    for f in ("config.json", "ollama_ft_base.json"):
        if (Path(base_dir) / f).is_file():
            payload[f"base/{f}"] = sha256_file(Path(base_dir) / f)
    for f in ("train.parquet", "validation.parquet"):
        if (Path(data_dir) / f).is_file():
            payload[f"data/{f}"] = sha256_file(Path(data_dir) / f)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def newest_checkpoint(checkpoints_dir: Path) -> Path | None:
    cps = [p for p in Path(checkpoints_dir).glob(CHECKPOINT_PREFIX + "*")
           if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return max(cps, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):])) if cps else None


def _read_checkpoint_fingerprint(fp_file: Path) -> str | None:
    """The fingerprint the checkpoints were written for. An unreadable file is a UserError, not a silent
    discard: the checkpoints may hold hours of training that only the user can judge."""
    if not fp_file.is_file():
        return None
    try:
        data = json.loads(fp_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
            raise ValueError("no \"fingerprint\" string in it")
        return data["fingerprint"]
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        where = f"{fp_file}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(fp_file)
        raise UserError(f"{where}: checkpoint fingerprint is unreadable ({getattr(e, 'msg', e)}), so ollama-ft "
                        f"cannot tell whether the checkpoints in {fp_file.parent} belong to this config",
                        hint=f"to start training afresh, delete {fp_file.parent} (or re-run with --no-resume, "
                             "which discards them); to keep them, restore fingerprint.json from a backup") from None


def _prepare_checkpoints(checkpoints_dir: Path, fingerprint: str, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None (stale or unwanted checkpoints are removed)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoints_dir / "fingerprint.json"
    newest = newest_checkpoint(checkpoints_dir)
    old = _read_checkpoint_fingerprint(fp_file) if resume and newest is not None else None
    if resume and newest is not None and old == fingerprint:
        return newest
    if newest is not None:
        why = "--no-resume" if not resume else "the config, base or data changed since they were written"
        ui.warn(f"discarding checkpoints in {checkpoints_dir} ({why})")
    for p in checkpoints_dir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    fp_file.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return None


# ---------------------------------------------------------------------------------------------
# The stage


def build_adapter(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                  resume: bool) -> dict:
    """Train a LoRA/QLoRA adapter on data_dir's splits; write the PEFT adapter and metrics into `out`.

    Returns the stage info (hyperparameters, best eval loss/perplexity, steps, tokens/s, peak memory,
    "summary"). Ctrl-C writes a checkpoint into checkpoints_dir and re-raises KeyboardInterrupt.
    """
    if cfg.training.nproc > 1 and os.environ.get("LOCAL_RANK") is None:
        return _launch_distributed(cfg, base_dir, data_dir, out, checkpoints_dir, resume)
    return train_process(cfg, base_dir, data_dir, out, checkpoints_dir, resume)


def train_process(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                  resume: bool, show: bool = True, extra_callbacks: list | None = None) -> dict:
    """One training process (the whole run, or one rank under torchrun)."""
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from ..core.runs import atomic_write_text
    from .data import PackingCollator, PaddingCollator, load_split
    from .display import MetricsCallback, memory_now, plot_loss_curve, read_metrics

    base_dir, data_dir, out, checkpoints_dir = map(Path, (base_dir, data_dir, out, checkpoints_dir))
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.training
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    is_main = rank == 0
    hf_logging.set_verbosity_error()

    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("training.tensorboard=true but TensorBoard is not installed",
                            hint="pip install 'ollama-ft[tensorboard]' or set training.tensorboard=false") from None

    train_ds = load_split(data_dir, "train")
    eval_ds = load_split(data_dir, "validation", required=False)
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None

    device, dtype, optim = pick_device_and_dtype(cfg)
    # Resolved once: "auto" checkpointing reads free memory, which may change during the run.
    dtype_reason = compute_choice(cfg).reason
    checkpointing, checkpointing_why = resolve_checkpointing(cfg, base_dir, device)
    if is_main:
        ui.info(f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason}); "
                f"gradient checkpointing {checkpointing_why}")
    micro, accum, global_batch = resolve_batching(t.batch_size, t.micro_batch_size, world)
    if global_batch != t.batch_size and is_main:
        ui.warn(f"training.batch_size={t.batch_size} is not a multiple of micro batch {micro} x {world} "
                f"process(es); using {global_batch}")
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (micro * world)) // accum)
    total_steps = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    warmup = int(round(t.warmup_ratio * total_steps))

    fingerprint = _fingerprint(cfg, base_dir, data_dir)
    resume_from = None
    if is_main:
        resume_from = _prepare_checkpoints(checkpoints_dir, fingerprint, resume)
    if world > 1:
        # Ranks > 0 wait for rank 0's decision (it may have deleted stale checkpoints).
        marker = checkpoints_dir / "fingerprint.json"
        for _ in range(600):
            if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
                break
            time.sleep(0.1)
        if not is_main and resume:
            resume_from = newest_checkpoint(checkpoints_dir)

    torch.manual_seed(t.seed)
    model = load_model(cfg, base_dir, device, dtype, local_rank, checkpointing=checkpointing)

    metrics_path = checkpoints_dir / "metrics.jsonl"
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=total_steps,
        warmup_steps=warmup,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=cfg.optimizer.weight_decay,
        adam_beta1=cfg.optimizer.betas[0],
        adam_beta2=cfg.optimizer.betas[1],
        adam_epsilon=cfg.optimizer.eps,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=t.seed,
        data_seed=t.seed,
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world > 1 else None,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        report_to=["tensorboard"] if t.tensorboard else "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        average_tokens_across_devices=True,
        save_only_model=False,
    )
    metrics_cb = None
    collator = PackingCollator() if t.packing else PaddingCollator(_pad_id(model))
    Trainer = _trainer_class()
    BestAndEarlyStop, InterruptCallback = _callbacks()
    best_cb = BestAndEarlyStop(checkpoints_dir / BEST_DIR, t.patience)
    interrupt_cb = InterruptCallback()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, loss_chunk_size=t.loss_chunk_size)
    best_cb.model = trainer.model
    metrics_cb = MetricsCallback(metrics_path, lambda: trainer.useful_tokens, show=show and is_main)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # our own display replaces them
    for cb in (best_cb, interrupt_cb, metrics_cb, *(extra_callbacks or [])):
        trainer.add_callback(cb)

    if is_main:
        if resume_from is not None:
            step = json.loads((resume_from / "trainer_state.json").read_text()).get("global_step", 0)
            metrics_cb.truncate_after(step)
            ui.info(f"resuming from {resume_from} (step {step} of {total_steps})")
        else:
            metrics_path.unlink(missing_ok=True)
        ui.info(f"training {'QLoRA (NF4, double quant)' if cfg.load_in_4bit else 'LoRA'} r={cfg.lora.r} on "
                f"{device} ({str(dtype).removeprefix('torch.')}): {len(train_ds)} examples, {total_steps} steps, "
                f"batch {global_batch} = {micro} x {accum} accumulation x {world} process(es), optimizer {optim}")

    interrupted = _run_with_sigint(trainer, interrupt_cb, resume_from)
    if interrupted:
        ui.warn(f"interrupted: checkpoint saved in {newest_checkpoint(checkpoints_dir)}; "
                "run the same command again to resume")
        raise KeyboardInterrupt

    # Evaluate the final weights too, so the best adapter is chosen among all of them.
    last_eval = max((h.get("step", -1) for h in trainer.state.log_history if "eval_loss" in h), default=-1)
    if eval_ds is not None and last_eval != trainer.state.global_step:
        trainer.evaluate()

    info: dict[str, Any] = {}
    if is_main:
        best = checkpoints_dir / BEST_DIR
        if eval_ds is not None and (best / "adapter_model.safetensors").is_file():
            for f in best.iterdir():
                if f.is_file() and f.name != "best.json":
                    shutil.copy2(f, out / f.name)
            chosen = json.loads((best / "best.json").read_text())
        else:
            trainer.model.save_pretrained(str(out))
            chosen = {"step": trainer.state.global_step, "eval_loss": None}
        records = read_metrics(metrics_path)
        if metrics_path.is_file():
            shutil.copy2(metrics_path, out / "metrics.jsonl")
        plot_loss_curve(records, out / "loss_curve.png")
        train_recs = [r for r in records if r.get("type") == "train"]
        mem = memory_now()
        best_loss = trainer.state.best_metric
        info = {
            "hyperparameters": {
                "quantization": "nf4+double-quant" if cfg.load_in_4bit else "none",
                "compute_dtype": str(dtype).removeprefix("torch."), "device": device,
                "compute_dtype_reason": dtype_reason,
                "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
                "target_modules": cfg.lora.target_modules, "learning_rate": t.learning_rate,
                "lr_scheduler": t.lr_scheduler, "warmup_steps": warmup, "weight_decay": cfg.optimizer.weight_decay,
                "max_grad_norm": t.max_grad_norm, "optimizer": optim, "global_batch": global_batch,
                "micro_batch": micro, "gradient_accumulation": accum, "processes": world,
                "packing": t.packing, "loss_chunk_size": t.loss_chunk_size,
                "gradient_checkpointing": checkpointing, "gradient_checkpointing_reason": checkpointing_why, "seed": t.seed, "max_steps": total_steps,
            },
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4),
            "train_examples": len(train_ds),
            "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
            "best_eval_loss": best_loss,
            "best_eval_perplexity": math.exp(min(best_loss, 50.0)) if best_loss is not None else None,
            "best_step": chosen.get("step"),
            "stopped_early": best_cb.stopped_early,
            "tokens_per_s": round(metrics_cb.tokens_per_s, 2),
            "peak_memory_gb": round(max(metrics_cb.peak_mem, mem["peak"]) / 2**30, 3),
            "memory_kind": mem["kind"],
            "resumed_from": str(resume_from) if resume_from else None,
        }
        ev = f", best eval loss {best_loss:.4f} (ppl {info['best_eval_perplexity']:.2f}) at step {chosen.get('step')}" \
            if best_loss is not None else ""
        info["summary"] = (f"{info['steps']} steps{' (early stop)' if best_cb.stopped_early else ''}, "
                           f"train loss {info['final_train_loss'] or float('nan'):.4f}{ev}, "
                           f"{info['tokens_per_s']:.0f} tokens/s, peak {mem['kind'].upper()} "
                           f"{info['peak_memory_gb']:.2f} GB")
        atomic_write_text(out / "train_summary.json", json.dumps(info, indent=2) + "\n")
    return info


def _pad_id(model) -> int:
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    pad = getattr(cfg, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _run_with_sigint(trainer, interrupt_cb, resume_from) -> bool:
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


# ---------------------------------------------------------------------------------------------
# Data-parallel launch


def _launch_distributed(cfg: RunConfig, base_dir: Path, data_dir: Path, out: Path, checkpoints_dir: Path,
                        resume: bool) -> dict:
    """Run `train_worker` under torchrun with cfg.training.nproc processes (gloo on CPU, nccl on CUDA)."""
    import socket

    import torch

    n = cfg.training.nproc
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise UserError(f"training.nproc={n} but only {torch.cuda.device_count()} CUDA device(s) are visible",
                        hint=f"use --nproc {torch.cuda.device_count()} or set CUDA_VISIBLE_DEVICES")
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg_file = Path(out) / ".train_config.json"
    cfg_file.write_text(cfg.model_dump_json())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "ollama_ft.train.worker", "--config", str(cfg_file), "--base", str(base_dir),
           "--data", str(data_dir), "--out", str(out), "--checkpoints", str(checkpoints_dir)]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Two processes on a shared CPU: split the cores instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n)))
    ui.info(f"launching {n} data-parallel processes: {' '.join(cmd[:8])} ...")
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
        raise UserError(f"distributed training wrote no {summary}")
    return json.loads(summary.read_text())
