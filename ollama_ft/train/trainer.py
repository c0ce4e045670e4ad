"""The Trainer subclass and its arguments: chunked loss, label smoothing, per-group learning rates.

- The loss: the decoder body's hidden states are captured by a forward hook while the model itself is
  asked for the logits of ONE position (`logits_to_keep=1`); the LM head + cross-entropy then run in
  chunks on trained positions only (loss.chunked_ce_sum), label-smoothed in training when
  `training.label_smoothing` > 0. Evaluation is always the plain, token-weighted cross-entropy.
- Learning rates per parameter group (`parameter_groups`): LoRA+ gives the B matrices
  `lora.loraplus_lr_ratio` x the rate of A; a trained input embedding / LM head (`lora.modules_to_save`)
  gets `lora.embedding_learning_rate` / `lm_head_learning_rate`. peft's create_loraplus_optimizer is not
  used because it puts modules_to_save weights (a full lm_head copy) in group A with the LoRA A rate and
  has no rate of their own for them. The schedule multiplies every group's rate by the same factor, so
  the ratios hold at every step; `training.min_learning_rate` is transformers' cosine_with_min_lr.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..core.config import RunConfig
from ..core.nll import perplexity_of_mean


def parameter_groups(model, cfg: RunConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups {name, params, lr, weight_decay} for the trainable parameters."""
    from .model import active_module

    lr = cfg.training.learning_rate
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    owners = {}
    for key, module in (("embeddings", lm.get_input_embeddings()), ("lm_head", lm.get_output_embeddings())):
        if module is not None:
            for p in active_module(module).parameters():
                owners.setdefault(id(p), key)
    rates = {"lora_A": lr, "lora_B": lr * (cfg.lora.loraplus_lr_ratio or 1.0),
             "embeddings": cfg.lora.embedding_learning_rate or lr, "lm_head": cfg.lora.lm_head_learning_rate or lr,
             "no_decay": lr}
    groups: dict[str, list] = {k: [] for k in rates}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in owners:
            groups[owners[id(p)]].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        elif "lora_B" in name or "lora_embedding_B" in name:
            groups["lora_B"].append(p)
        else:
            groups["lora_A"].append(p)
    wd = cfg.optimizer.weight_decay
    return [{"name": k, "params": ps, "lr": rates[k], "weight_decay": 0.0 if k == "no_decay" else wd}
            for k, ps in groups.items() if ps]


def uses_parameter_groups(cfg: RunConfig) -> bool:
    """Only then is the optimizer built here (otherwise the Trainer's own, unchanged default)."""
    lo = cfg.lora
    return bool(lo.loraplus_lr_ratio or lo.embedding_learning_rate or lo.lm_head_learning_rate)


def schedule_arguments(cfg: RunConfig) -> dict[str, Any]:
    """lr_scheduler_type (+ kwargs) for TrainingArguments: cosine to a floor when min_learning_rate is set."""
    t = cfg.training
    if t.min_learning_rate is not None:
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": t.min_learning_rate}}
    return {"lr_scheduler_type": t.lr_scheduler}


def training_arguments(cfg: RunConfig, checkpoints_dir: Path, *, micro: int, accum: int, total_steps: int,
                       warmup: int, optim: str, device: str, dtype, world: int, has_eval: bool):
    """TrainingArguments for this config (one place, so single-, multi-process and FSDP runs agree)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    fsdp: dict[str, Any] = {}
    if t.distributed == "fsdp" and world > 1:
        # transformers' FSDP integration (accelerate), set up as PEFT's FSDP + QLoRA guide does: FSDP1 with
        # flat parameters (use_orig_params false; transformers' update_fsdp_plugin_peft wraps the LoRA
        # layers apart, so each flat parameter is all-frozen or all-trained, and sets the mixed precision
        # to the 4-bit quant storage dtype); decoder layers sharded. The root unit (embeddings, final
        # norm, LM head) is not resharded after forward in FSDP1, which the chunked loss relies on: it
        # reads the head's weight after the forward. Full state dict for saving: a normal PEFT adapter. Every rank
        # loads the (4-bit) base into CPU memory first (load_model: no device_map), FSDP then moves its shards.
        fsdp = {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"version": 1, "use_orig_params": False, "cpu_ram_efficient_loading": False,
                                "sync_module_states": True, "state_dict_type": "FULL_STATE_DICT"}}
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=total_steps,
        warmup_steps=warmup,
        **schedule_arguments(cfg),
        weight_decay=cfg.optimizer.weight_decay,
        adam_beta1=cfg.optimizer.betas[0],
        adam_beta2=cfg.optimizer.betas[1],
        adam_epsilon=cfg.optimizer.eps,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
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
        **fsdp,
    )


def trainer_class():
    """The Trainer subclass, built in a function so that importing this module needs no transformers
    (it is one class definition: long only because the class is)."""
    import torch
    from transformers import Trainer

    from .loss import chunked_ce_sum
    from .model import active_module, body_and_head

    class QLoRATrainer(Trainer):
        """Trainer with the chunked loss, packing-aware token counting and token-weighted evaluation."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, loss_chunk_size: int = 256, label_smoothing: float = 0.0,
                     run_config: RunConfig | None = None, **kw):
            super().__init__(*args, **kw)
            # Our loss is a token sum divided by the batch's trained-token count (num_items_in_batch).
            self.model_accepts_loss_kwargs = True
            self.loss_chunk_size = loss_chunk_size
            self.label_smoothing = label_smoothing
            self.run_config = run_config
            self.useful_tokens = 0
            self._captured: list = []
            body, head, softcap = body_and_head(self.model)
            self._head, self._softcap = head, softcap
            body.register_forward_hook(self._capture)

        def _capture(self, module, args, output):
            hs = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._captured.append(hs)

        def create_optimizer(self, model=None):
            if self.optimizer is None and self.run_config is not None and uses_parameter_groups(self.run_config):
                opt_model = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = cls(parameter_groups(opt_model, self.run_config), **kwargs)
                return self.optimizer
            return super().create_optimizer(model)

        def _loss_sum(self, model, inputs, smoothing: float = 0.0):
            targets = inputs.pop("shift_labels")
            inputs.pop("labels", None)
            self._captured.clear()
            # logits for one position only: the head runs below, in chunks, on trained positions.
            model(**inputs, logits_to_keep=1, use_cache=False)
            hidden = self._captured.pop()
            self._captured.clear()
            head = active_module(self._head)  # the trained copy when lm_head is in modules_to_save
            w = head.weight
            b = getattr(head, "bias", None)
            if "attention_mask" in inputs:
                n_tok = int(inputs["attention_mask"].sum())
            else:
                n_tok = inputs["input_ids"].numel()
            s, n = chunked_ce_sum(hidden, w, b, targets, self.loss_chunk_size, self._softcap, smoothing)
            return s, n, n_tok

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            smoothing = self.label_smoothing if model.training else 0.0
            loss_sum, n, n_tok = self._loss_sum(model, inputs, smoothing)
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
                       f"{metric_key_prefix}_perplexity": perplexity_of_mean(loss),
                       f"{metric_key_prefix}_tokens": int(total[1]),
                       f"{metric_key_prefix}_runtime": round(time.perf_counter() - start, 3)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return QLoRATrainer
