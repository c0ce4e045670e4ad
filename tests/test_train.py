"""Training stage on tiny models: loss, masking, chunked CE, packing, early stopping, resume, DDP, 4-bit."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from ollama_ft.core.config import RunConfig

QUESTIONS = ["when does the clinic open", "what is the dose", "who is the nurse", "where is the ward",
             "how is the patient", "should i call the desk", "is the fever severe", "can i rest"]
ANSWERS = ["the clinic opens at eight", "one tablet with water", "the nurse is at the desk",
           "the ward is blue level two", "the patient is mild", "please call the desk",
           "the fever is mild", "yes please rest"]


def write_data(tok_dir: Path, out: Path, n_train: int = 32, n_val: int = 8, seed: int = 0) -> Path:
    """Tokenized parquet splits like the data stage writes: labels -100 outside the assistant reply."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        ids_col, lab_col, id_col = [], [], []
        for i in range(n):
            k = rng.randrange(len(QUESTIONS))
            prompt = tok.encode(f"<|im_start|>user\n{QUESTIONS[k]}<|im_end|>\n<|im_start|>assistant\n")
            reply = tok.encode(f"{ANSWERS[k]} {' '.join(rng.choice(ANSWERS).split()[:rng.randint(0, 3)])}"
                               f"<|im_end|>", add_special_tokens=False)
            ids_col.append(prompt + reply)
            lab_col.append([-100] * len(prompt) + reply)
            id_col.append(f"{split}-{i}")
        table = pa.table({"id": id_col, "input_ids": pa.array(ids_col, pa.list_(pa.int32())),
                          "labels": pa.array(lab_col, pa.list_(pa.int32()))})
        pq.write_table(table, out / f"{split}.parquet")
    return out


def tiny_cfg(**training) -> RunConfig:
    cfg = RunConfig()
    cfg.model.adapter = "lora"
    cfg.lora.r = 8
    cfg.lora.alpha = 16
    cfg.lora.dropout = 0.0
    base = dict(batch_size=4, micro_batch_size=2, learning_rate=5e-3, max_steps=12, eval_steps=4, save_steps=4,
                warmup_ratio=0.1, patience=None, seed=7, loss_chunk_size=16)
    base.update(training)
    for k, v in base.items():
        setattr(cfg.training, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_tokenizer_dir):
    return write_data(tiny_tokenizer_dir, tmp_path_factory.mktemp("data"))


def _train(cfg, base, data, tmp: Path, name: str, resume: bool = False, callbacks=None):
    from ollama_ft.train.stage import train_process

    out = tmp / name / "adapter"
    return train_process(cfg, base, data, out, tmp / name / "checkpoints", resume, show=False,
                         extra_callbacks=callbacks), out


# ---------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_ce_matches_full_ce_value_and_grads(smoothing):
    """Chunked == torch's cross_entropy on the full logits (full_ce_sum), label smoothing included
    (training.label_smoothing: exact against cross_entropy(label_smoothing=...), -100 positions too)."""
    from ollama_ft.train.loss import chunked_ce_sum, full_ce_sum

    g = torch.Generator().manual_seed(0)
    for softcap in (None, 30.0):
        h = torch.randn(3, 17, 24, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(301, 24, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(301, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 301, (3, 17), generator=g)
        y[0, :5] = -100
        y[2, -3:] = -100
        ref, n_ref = full_ce_sum(h, w, b, y, softcap=softcap, smoothing=smoothing)
        gh, gw, gb = torch.autograd.grad(ref, (h, w, b))
        got, n = chunked_ce_sum(h, w, b, y, chunk=7, softcap=softcap, smoothing=smoothing)
        ch, cw, cb = torch.autograd.grad(got, (h, w, b))
        assert n == n_ref == 51 - 8
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-6)
        for a, r in ((ch, gh), (cw, gw), (cb, gb)):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        # masked positions get exactly zero gradient
        assert ch[0, :5].abs().max() == 0 and ch[2, -3:].abs().max() == 0
        if smoothing:  # and smoothing has an effect
            assert abs(float(got) - float(chunked_ce_sum(h, w, b, y, chunk=7, softcap=softcap)[0])) > 1e-2


def test_packing_does_not_attend_across_examples(tiny_llama, tiny_data):
    """A packed row gives the same per-example loss as each example alone (sdpa, CPU)."""
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.data import PackingCollator, PaddingCollator, load_split
    from ollama_ft.train.loss import full_ce_sum

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="sdpa").eval()
    rows = load_split(tiny_data, "train").rows[:3]

    def loss_of(batch):
        out = model.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                          attention_mask=batch.get("attention_mask"), use_cache=False)
        return full_ce_sum(out.last_hidden_state, model.lm_head.weight, None, batch["shift_labels"])[0]

    with torch.no_grad():
        packed = loss_of(PackingCollator()(rows))
        alone = sum(loss_of(PackingCollator()([r])) for r in rows)
        padded = loss_of(PaddingCollator(0)(rows))
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)
    # Without restarting position ids the examples would see each other: the check has teeth.
    with torch.no_grad():
        b = PackingCollator()(rows)
        b["position_ids"] = torch.arange(b["input_ids"].shape[1])[None]
        leaky = loss_of(b)
    assert abs(float(leaky) - float(alone)) > 1e-3


def test_masked_tokens_carry_no_gradient(tiny_llama, tiny_data, tmp_path):
    """Changing a token whose label is -100 at the END of the sequence, or its label, changes no gradient."""
    from ollama_ft.train.data import PackingCollator, load_split
    from ollama_ft.train.stage import _trainer_class, load_model, pick_device_and_dtype

    cfg = tiny_cfg()
    device, dtype, _ = pick_device_and_dtype(cfg)
    model = load_model(cfg, tiny_llama, device, dtype)
    from transformers import TrainingArguments

    tr = _trainer_class()(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                          loss_chunk_size=8)
    row = dict(load_split(tiny_data, "train").rows[0])
    # A trained example with two extra untrained tokens appended: their targets are -100.
    base = {"input_ids": row["input_ids"] + [5, 6], "labels": row["labels"] + [-100, -100]}

    def grads(ex):
        model.zero_grad()
        loss_sum, n, _ = tr._loss_sum(model, PackingCollator()([ex]))
        loss_sum.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, float(loss_sum)

    g0, l0 = grads(base)
    changed = {"input_ids": row["input_ids"] + [9, 11], "labels": row["labels"] + [-100, -100]}
    g1, l1 = grads(changed)
    assert l0 == pytest.approx(l1, abs=1e-6)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=0, atol=1e-7)
    # ...while changing a trained target does change them.
    lab = list(base["labels"])
    i = max(j for j, x in enumerate(lab) if x != -100)
    lab[i] = 7 if lab[i] != 7 else 8
    g2, _ = grads({"input_ids": base["input_ids"], "labels": lab})
    assert any(not torch.allclose(g0[k], g2[k]) for k in g0)


# ---------------------------------------------------------------------------------------------
# The stage


def test_loss_decreases_and_outputs(tiny_llama, tiny_data, tmp_path):
    info, out = _train(tiny_cfg(max_steps=16), tiny_llama, tiny_data, tmp_path, "run")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if r["type"] == "train"]
    evals = [r["eval_loss"] for r in recs if r["type"] == "eval"]
    assert len(train) == 16 and len(evals) == 4
    assert sum(train[-4:]) / 4 < 0.85 * sum(train[:4]) / 4
    assert evals[-1] < evals[0]
    for f in ("adapter_config.json", "adapter_model.safetensors", "train_summary.json", "loss_curve.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["best_eval_loss"] == pytest.approx(min(evals))
    assert summary["best_eval_perplexity"] == pytest.approx(2.718281828 ** min(evals), rel=1e-6)
    assert summary["hyperparameters"]["gradient_accumulation"] == 2
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_gb"] > 0
    assert "summary" in info
    # The adapter is a standard PEFT directory.
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 8


def test_early_stopping_keeps_best_adapter(tiny_llama, tiny_data, tmp_path):
    # A learning rate this high makes validation loss rise after the first evaluations.
    cfg = tiny_cfg(learning_rate=0.3, max_steps=40, eval_steps=2, save_steps=2, patience=2, warmup_ratio=0.0)
    info, out = _train(cfg, tiny_llama, tiny_data, tmp_path, "es")
    assert info["stopped_early"] is True
    assert info["steps"] < 40
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in recs if r["type"] == "eval"]
    best_step, best = min(evals, key=lambda x: x[1])
    assert info["best_step"] == best_step and info["best_eval_loss"] == pytest.approx(best)
    # The saved adapter is the best one: its validation loss is the best eval loss.
    best_adapter = tmp_path / "es" / "checkpoints" / "best-adapter"
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(best_adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_then_resume_matches_uninterrupted_run(tiny_llama, tiny_data, tmp_path):
    from transformers import TrainerCallback

    cfg = tiny_cfg(max_steps=10, save_steps=100, eval_steps=5)
    cfg.lora.dropout = 0.1  # dropout makes the RNG state part of what resume must restore
    ref_info, ref_out = _train(cfg, tiny_llama, tiny_data, tmp_path, "ref")

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tiny_llama, tiny_data, tmp_path, "cut", callbacks=[CtrlC()])
    from ollama_ft.train.stage import newest_checkpoint

    # The signal lands after step 4's checks ran, so the checkpoint is written at the end of step 5.
    ckpt = newest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert ckpt.name == "checkpoint-5" and (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    info, out = _train(cfg, tiny_llama, tiny_data, tmp_path, "cut", resume=True)
    assert info["resumed_from"].endswith("checkpoint-5")
    assert info["final_train_loss"] == pytest.approx(ref_info["final_train_loss"], rel=1e-4)
    assert info["best_eval_loss"] == pytest.approx(ref_info["best_eval_loss"], rel=1e-4)
    ref = [json.loads(ln) for ln in (ref_out / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # one continuous curve, no duplicates
    for r, g in zip(ref, got, strict=True):
        if r["type"] == "train":
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-4)


def test_stale_checkpoints_are_not_resumed(tiny_llama, tiny_data, tmp_path):
    from ollama_ft.train.stage import _fingerprint, _prepare_checkpoints

    ck = tmp_path / "ck"
    fp = _fingerprint(tiny_cfg(), tiny_llama, tiny_data)
    assert _prepare_checkpoints(ck, fp, resume=True) is None
    (ck / "checkpoint-3").mkdir()
    (ck / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert _prepare_checkpoints(ck, fp, resume=True).name == "checkpoint-3"
    other = _fingerprint(tiny_cfg(learning_rate=1e-3), tiny_llama, tiny_data)
    assert other != fp
    assert _prepare_checkpoints(ck, other, resume=True) is None
    assert not (ck / "checkpoint-3").exists()


def test_qlora_4bit_path_runs_on_cpu(tiny_llama, tiny_data, tmp_path):
    import bitsandbytes as bnb

    from ollama_ft.train.stage import load_model

    cfg = tiny_cfg(max_steps=3, eval_steps=3, save_steps=3)
    cfg.model.adapter = "qlora"
    assert cfg.load_in_4bit
    info, out = _train(cfg, tiny_llama, tiny_data, tmp_path, "q")
    assert info["hyperparameters"]["quantization"] == "nf4+double-quant"
    assert info["hyperparameters"]["compute_dtype"] == "bfloat16"
    assert (out / "adapter_model.safetensors").is_file()
    model = load_model(cfg, tiny_llama, "cpu", torch.bfloat16)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16  # the head stays unquantized


def test_warnings_thresholds():
    from ollama_ft.train.display import training_warnings

    assert training_warnings(1.0, [1.0] * 10) == []
    assert "stalled" in training_warnings(0.05, [])[0]
    assert "unstable" in training_warnings(9.0, [])[0]
    assert "volatile" in training_warnings(1.0, [1.0] * 5 + [1.2] + [1.0] * 4)[0]
    assert "volatile" in training_warnings(1.0, [1.0, 1.1] * 5)[0]
    assert training_warnings(1.0, [1.0] * 9 + [1.04]) == []


def test_falling_loss_is_trend_not_volatility():
    """The loss that once warned "swings 92%": a smooth fall from 1.76 to 0.90 over 10 steps."""
    import numpy as np

    from ollama_ft.train.display import loss_volatility, training_warnings

    smooth = list(np.linspace(1.76, 0.90, 10))
    assert training_warnings(1.0, smooth) == []
    curved = [0.9 + 0.86 * np.exp(-k / 3) for k in range(10)]  # decaying, not linear
    assert training_warnings(1.0, curved) == []
    rng = np.random.default_rng(0)
    jumpy = list(np.linspace(1.5, 1.0, 10) * (1 + rng.choice([-0.15, 0.15], 10)))
    warns = training_warnings(1.0, jumpy)
    assert len(warns) == 1 and "volatile" in warns[0]
    assert loss_volatility(jumpy) > 0.05 > loss_volatility(smooth)


def test_gpu_memory_share_warnings():
    from ollama_ft.train.display import training_warnings

    assert training_warnings(1.0, [], memory_share=0.8) == []
    assert "close to out-of-memory" in training_warnings(1.0, [], memory_share=0.95)[0]
    assert "room for a larger" in training_warnings(1.0, [], memory_share=0.4)[0]
    assert training_warnings(1.0, [], memory_share=None) == []


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tiny_llama, tiny_data, tmp_path):
    """2 gloo processes x micro 2 = global batch 4 == 1 process x micro 2 x accumulation 2."""
    from ollama_ft.train.stage import build_adapter

    cfg = tiny_cfg(max_steps=6, eval_steps=3, save_steps=100)
    single, _ = _train(cfg, tiny_llama, tiny_data, tmp_path, "single")
    cfg2 = cfg.model_copy(deep=True)
    cfg2.training.nproc = 2
    info = build_adapter(cfg2, tiny_llama, tiny_data, tmp_path / "ddp" / "adapter", tmp_path / "ddp" / "ck", False)
    assert info["hyperparameters"]["processes"] == 2 and info["hyperparameters"]["gradient_accumulation"] == 1
    assert info["steps"] == single["steps"] == 6
    # Same global batch, but each step sees a different split of examples: losses agree loosely.
    assert info["best_eval_loss"] == pytest.approx(single["best_eval_loss"], rel=0.05)


def test_trainer_loss_equals_the_models_own_loss(tiny_qwen2, tiny_data, tmp_path):
    """Hook + chunked head on trained positions == HF's full-logits loss (same example, same weights)."""
    from transformers import TrainingArguments

    from ollama_ft.train.data import PackingCollator, load_split
    from ollama_ft.train.stage import _trainer_class, load_model

    cfg = tiny_cfg()
    model = load_model(cfg, tiny_qwen2, "cpu", torch.float32).eval()
    tr = _trainer_class()(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                          loss_chunk_size=5)
    row = load_split(tiny_data, "validation").rows[0]
    with torch.no_grad():
        s, n, _ = tr._loss_sum(model, PackingCollator()([row]))
        ref = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert int(n) == sum(1 for x in row["labels"][1:] if x != -100)
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-5)
