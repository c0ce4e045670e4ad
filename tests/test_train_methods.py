"""Training methods of issue 17 on the tiny models: layer-limited LoRA and target presets, label smoothing,
per-group learning rates (LoRA+, modules_to_save) with a cosine floor, multi-stage tuning and continued
adapters, FSDP/rendezvous launch."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ollama_ft.core.config import StageSpec
from ollama_ft.core.errors import UserError
from tests.test_train import tiny_cfg, write_data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_tokenizer_dir):
    return write_data(tiny_tokenizer_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, tiny_tokenizer_dir):
    return write_data(tiny_tokenizer_dir, tmp_path_factory.mktemp("data2"), seed=5)


def _adapter_keys(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Layer-limited LoRA, target presets, trainable-parameter count (model and plan agree)


def test_layer_limited_lora_leaves_other_layers_without_adapter(tiny_llama, tmp_path):
    from ollama_ft.train.model import load_model, trainable_summary
    from ollama_ft.train.plan import ModelDims, lora_params

    cfg = tiny_cfg()
    cfg.lora.layers = "last 1"
    cfg.lora.target_modules = "mlp"
    model = load_model(cfg, tiny_llama, "cpu", torch.float32)
    keys = _adapter_keys(model)
    assert keys and all(".layers.1." in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"gate_proj", "up_proj", "down_proj"}
    model.save_pretrained(str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and not any(".layers.0." in k for k in saved)  # untouched layer: no adapter weights at all
    summary = trainable_summary(model)
    assert summary["adapted_layers"] == [1]
    dims = ModelDims.from_config(json.loads((Path(tiny_llama) / "config.json").read_text()))
    assert summary["trainable_parameters"] == lora_params(dims, 8, "mlp", (1,))  # the plan counts the same
    full = load_model(tiny_cfg(), tiny_llama, "cpu", torch.float32)
    assert trainable_summary(full)["trainable_parameters"] == lora_params(dims, 8, "all-linear")
    assert trainable_summary(full)["adapted_layers"] == [0, 1]


def test_layer_list_and_attention_preset(tiny_llama):
    from ollama_ft.train.model import load_model

    cfg = tiny_cfg()
    cfg.lora.layers = [0]
    cfg.lora.target_modules = "attention"
    keys = _adapter_keys(load_model(cfg, tiny_llama, "cpu", torch.float32))
    assert all(".layers.0." in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    cfg.lora.target_modules = "all-linear"  # with limited layers: the decoder's linear names (peft needs a list)
    keys = _adapter_keys(load_model(cfg, tiny_llama, "cpu", torch.float32))
    assert all(".layers.0." in k for k in keys) and len(keys) == 2 * 7
    cfg.lora.layers = [0, 7]
    with pytest.raises(UserError, match=r"layers 0\.\.1, not \[7\]"):
        load_model(cfg, tiny_llama, "cpu", torch.float32)


def test_plan_counts_layers_modules_to_save_and_fsdp_shards():
    from dataclasses import replace

    from ollama_ft.train.plan import ModelDims, PlanSettings, estimate, trainable_params

    d = ModelDims(hidden=1024, layers=24, heads=16, kv_heads=4, head_dim=64, intermediate=2816, vocab=50000,
                  tied=False)
    s = PlanSettings(seq_len=512, micro_batch=2, gradient_checkpointing=False)
    all_layers, last4 = estimate(d, s), estimate(d, replace(s, adapted_layers=tuple(range(20, 24))))
    assert trainable_params(d, replace(s, adapted_layers=(20, 21, 22, 23)))["lora"] * 6 == trainable_params(d, s)["lora"]
    # backward stops at layer 20: 4 of 24 layers keep activations
    assert last4.train["activations (adapted layers and above)"] * 6 == pytest.approx(
        all_layers.train["activations (all layers)"])
    head = estimate(d, replace(s, modules_to_save=("lm_head",)))
    # bf16 copy + bf16 grad + 8-bit AdamW state + the chunked loss's fp32 head-gradient accumulator
    assert head.train["modules_to_save (copy + grad + optimizer)"] == d.vocab * d.hidden * (2 + 2 + 2 + 4)
    fsdp = estimate(d, replace(s, shards=2))
    assert fsdp.train["base weights (NF4)"] * 2 == pytest.approx(all_layers.train["base weights (NF4)"])
    assert fsdp.train_total < all_layers.train_total


# ---------------------------------------------------------------------------------------------
# Label smoothing (exactness against torch: tests/test_train.py::test_chunked_ce_matches_full_ce_value_and_grads)


def test_label_smoothing_applies_to_training_loss_only(tiny_llama, tiny_data, tmp_path):
    from transformers import TrainingArguments

    from ollama_ft.train.data import PackingCollator, load_split
    from ollama_ft.train.model import load_model
    from ollama_ft.train.trainer import trainer_class

    model = load_model(tiny_cfg(), tiny_llama, "cpu", torch.float32)
    tr = trainer_class()(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                         loss_chunk_size=8, label_smoothing=0.1)
    rows = load_split(tiny_data, "train").rows[:2]
    with torch.no_grad():
        model.train()
        smoothed = tr.compute_loss(model, PackingCollator()(rows))
        model.eval()
        plain = tr.compute_loss(model, PackingCollator()(rows))
        hf = model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]]))
    assert abs(float(smoothed) - float(plain)) > 1e-3
    s1, n1, _ = tr._loss_sum(model, PackingCollator()(rows[:1]))
    torch.testing.assert_close(s1 / n1, hf.loss, rtol=1e-5, atol=1e-5)  # evaluation stays the true CE


# ---------------------------------------------------------------------------------------------
# Per-group learning rates and the cosine floor


def test_param_groups_carry_configured_rates_and_lr_ends_at_floor(tiny_llama, tiny_data, tmp_path):
    from transformers import TrainerCallback

    from tests.test_train import _train

    cfg = tiny_cfg(max_steps=6, eval_steps=100, save_steps=100, learning_rate=2e-3, min_learning_rate=1e-4,
                   warmup_ratio=0.0)
    cfg.lora.loraplus_lr_ratio = 16
    cfg.lora.modules_to_save = ["lm_head"]
    cfg.lora.lm_head_learning_rate = 1e-4
    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            seen["begin"] = {g["name"]: (g["lr"], len(g["params"])) for g in optimizer.param_groups}

        def on_train_end(self, args, state, control, optimizer=None, **kw):
            seen["end"] = {g["name"]: g["lr"] for g in optimizer.param_groups}

    info, _ = _train(cfg, tiny_llama, tiny_data, tmp_path, "groups", callbacks=[Groups()])
    begin = seen["begin"]
    assert begin["lora_A"][0] == pytest.approx(2e-3) and begin["lora_B"][0] == pytest.approx(32e-3)
    assert begin["lm_head"] == (pytest.approx(1e-4), 1)  # the trained lm_head copy, its own rate
    assert begin["lora_A"][1] == begin["lora_B"][1] == 2 * 7  # 2 layers x 7 linears
    # The floor: the schedule's last value is min_learning_rate for the base rate, the ratios kept.
    end = seen["end"]
    assert end["lora_A"] == pytest.approx(1e-4) and info["final_learning_rate"] == pytest.approx(1e-4)
    assert end["lora_B"] == pytest.approx(16e-4) and end["lm_head"] == pytest.approx(1e-4 * 1e-4 / 2e-3)
    assert info["hyperparameters"]["param_group_lrs"]["lora_B"] == pytest.approx(32e-3)
    assert info["hyperparameters"]["lr_scheduler"] == "cosine_with_min_lr"


# ---------------------------------------------------------------------------------------------
# Multi-stage tuning, continued adapters


def _stage_cfg():
    cfg = tiny_cfg(max_steps=3, eval_steps=3, save_steps=1, warmup_ratio=0.0, lr_scheduler="constant")
    cfg.stages = [StageSpec(name="general", learning_rate=3e-3, max_steps=3),
                  StageSpec(name="task", learning_rate=1e-3, max_steps=4, data="other")]
    return cfg


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stages_carry_the_adapter_and_use_each_rate(tiny_llama, tiny_data, other_data, tmp_path):
    from transformers import TrainerCallback

    from ollama_ft.train.stages import train_all

    starts, lrs = [], []

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            starts.append(_lora_state(model))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "learning_rate" in logs:
                lrs.append((len(starts), logs["learning_rate"]))

    ck, out = tmp_path / "ck", tmp_path / "adapter"
    info = train_all(_stage_cfg(), tiny_llama, tiny_data, out, ck, False, stage_data={"task": other_data},
                     show=False, extra_callbacks=[Start()])
    assert [s["stage"] for s in info["stages"]] == ["general", "task"]
    assert [s["steps"] for s in info["stages"]] == [3, 4] and info["steps"] == 7
    assert [lr for k, lr in lrs if k == 1] == pytest.approx([3e-3] * 3)
    assert [lr for k, lr in lrs if k == 2] == pytest.approx([1e-3] * 4)
    assert all(s["best_eval_loss"] is not None for s in info["stages"])  # each stage's validation recorded
    stage1 = load_file(str(ck / "stage-1-general" / "adapter" / "adapter_model.safetensors"))
    start2 = starts[1]
    assert stage1.keys() == start2.keys()
    assert all(torch.equal(stage1[k], start2[k]) for k in stage1)  # stage 2 starts where stage 1 ended
    assert not all(torch.equal(starts[0][k], start2[k]) for k in stage1)
    final = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(ck / "stage-2-task" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {"general", "task"}
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 8))  # one continuous curve
    assert info["stages"][1]["train_examples"] == 32 and info["stages"][1]["data"] == "other"


def test_stages_under_two_processes_match_one(tiny_llama, tiny_data, other_data, tmp_path):
    """stages: with --nproc 2 (gloo): both stages run in both processes, rank 1 waits at the barrier for
    rank 0's stage adapter, and the result agrees with the single-process run (same global batch)."""
    from ollama_ft.train.stage import build_adapter
    from ollama_ft.train.stages import train_all

    single = train_all(_stage_cfg(), tiny_llama, tiny_data, tmp_path / "one" / "adapter", tmp_path / "one" / "ck",
                       False, stage_data={"task": other_data}, show=False)
    cfg = _stage_cfg()
    cfg.training.nproc = 2
    ck, out = tmp_path / "two" / "ck", tmp_path / "two" / "adapter"
    info = build_adapter(cfg, tiny_llama, tiny_data, out, ck, False, stage_data={"task": other_data})
    assert [s["stage"] for s in info["stages"]] == ["general", "task"] and info["steps"] == 7
    assert info["hyperparameters"]["processes"] == 2 and info["hyperparameters"]["gradient_accumulation"] == 1
    for name in ("stage-1-general", "stage-2-task"):
        assert (ck / name / "adapter" / "adapter_model.safetensors").is_file()
    final = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(ck / "stage-2-task" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 8))  # rank 0 wrote it, once
    for one, two in zip(single["stages"], info["stages"], strict=True):
        assert two["best_eval_loss"] == pytest.approx(one["best_eval_loss"], rel=0.05), one["stage"]


def test_interrupted_stage_run_resumes_inside_that_stage(tiny_llama, tiny_data, other_data, tmp_path):
    from transformers import TrainerCallback

    from ollama_ft.train.stages import train_all

    class CtrlCInTask(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if "stage-2-task" in args.output_dir and state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    ck, out = tmp_path / "ck", tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train_all(_stage_cfg(), tiny_llama, tiny_data, out, ck, True, stage_data={"task": other_data},
                  show=False, extra_callbacks=[CtrlCInTask()])
    summary1 = (ck / "stage-1-general" / "adapter" / "train_summary.json").read_text()
    assert (ck / "stage-2-task" / "checkpoints" / "checkpoint-2").is_dir()
    trained = []

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            trained.append(args.output_dir)

    info = train_all(_stage_cfg(), tiny_llama, tiny_data, out, ck, True, stage_data={"task": other_data},
                     show=False, extra_callbacks=[Count()])
    assert trained == [str(ck / "stage-2-task" / "checkpoints")]  # stage 1 was not trained again
    assert (ck / "stage-1-general" / "adapter" / "train_summary.json").read_text() == summary1
    assert info["stages"][1]["resumed_from"].endswith("stage-2-task/checkpoints/checkpoint-2")
    assert info["stages"][1]["steps"] == 4


def test_from_adapter_lineage_and_refusals(tmp_path):
    from ollama_ft.core.config import load_config
    from ollama_ft.core.runs import Run
    from ollama_ft.pipeline import from_adapter

    def make_run(name: str, hidden: int, train: bool = True) -> Run:
        run = Run.open(name, tmp_path, create=True)

        def base(out):
            (out / "config.json").write_text(json.dumps({"hidden_size": hidden}))
            return {}

        run.run_stage("pull", {}, base)
        if train:
            run.run_stage("train", {}, lambda out: (out / "adapter_config.json").write_text("{}") and {"steps": 5})
        return run

    src = make_run("november", 64)
    src.record_lineage("from_adapter", {"run": "october"})
    dst = make_run("december", 64, train=False)
    cfg = load_config(None, [f"runs_dir={tmp_path}", "training.from_adapter=november"]).config
    adapter, lineage = from_adapter(cfg, dst)
    assert adapter == src.root / "adapter"
    assert lineage["run"] == str(src.root) and lineage["train_digest"] == src.output_digest("train")
    assert lineage["lineage"] == {"from_adapter": {"run": "october"}}  # the chain of both runs
    other = make_run("other-base", 128, train=False)
    with pytest.raises(UserError, match="another base model"):
        from_adapter(cfg, other)
    with pytest.raises(UserError, match="this run itself"):
        from_adapter(cfg, src)
    cfg2 = load_config(None, [f"runs_dir={tmp_path}", "training.from_adapter=december"]).config
    with pytest.raises(UserError, match="stage 'train' has not run"):
        from_adapter(cfg2, other)


# ---------------------------------------------------------------------------------------------
# Launch: rendezvous options, FSDP


def test_torchrun_command_single_node_and_rendezvous():
    from ollama_ft.core.config import load_config
    from ollama_ft.train.launch import torchrun_command

    one = load_config(None, ["training.nproc=2"]).config
    cmd = torchrun_command(one, ["--x"], port=1234)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "1234"
    multi = load_config(None, ["training.nproc=4", "training.nnodes=2", "training.rdzv_endpoint=node1:29400",
                               "name=job"]).config
    cmd = torchrun_command(multi, ["--x"])
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv-endpoint") + 1] == "node1:29400"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d" and cmd[cmd.index("--rdzv-id") + 1] == "job"
    assert "--master_port" not in cmd and cmd[-3:] == ["-m", "ollama_ft.train.worker", "--x"]
    with pytest.raises(UserError, match="rdzv_endpoint"):
        load_config(None, ["training.nnodes=2"])


def test_fsdp_on_cpu_is_refused_not_silently_ddp(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """accelerate enables FSDP only on accelerator devices; on CPU/gloo it would quietly run DDP
    (measured: the model came back wrapped as DistributedDataParallel), so ollama-ft refuses it."""
    from ollama_ft.train.stage import build_adapter

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_cfg()
    cfg.training.nproc = 2
    cfg.training.distributed = "fsdp"
    with pytest.raises(UserError, match="fsdp needs CUDA GPUs"):
        build_adapter(cfg, tiny_llama, tiny_data, tmp_path / "a", tmp_path / "ck", False)


@pytest.mark.gpu
def test_two_process_fsdp_qlora(tiny_llama, tiny_data, tmp_path):
    """2 CUDA processes, NF4 base with bf16 quant storage sharded by FSDP: trains and saves a normal PEFT
    adapter (full tensors). Run on a 2-GPU machine:
    OLLAMA_FT_REQUIRE_ALL=1 .venv/bin/python -m pytest -q tests/test_train_methods.py -k fsdp_qlora"""
    from ollama_ft.train.model import load_model
    from ollama_ft.train.stage import build_adapter

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (FSDP shards over processes, one GPU each)")
    cfg = tiny_cfg(max_steps=4, eval_steps=4, save_steps=100)
    cfg.model.adapter = "qlora"
    cfg.training.nproc = 2
    cfg.training.distributed = "fsdp"
    info = build_adapter(cfg, tiny_llama, tiny_data, tmp_path / "fsdp" / "adapter", tmp_path / "fsdp" / "ck", False)
    assert info["hyperparameters"]["distributed"] == "fsdp" and info["steps"] == 4
    assert info["hyperparameters"]["wrapped_as"] == "FullyShardedDataParallel"
    saved = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    single = tiny_cfg()
    fresh = {n.replace(".default", ""): p.shape for n, p in
             load_model(single, tiny_llama, "cpu", torch.float32).named_parameters() if p.requires_grad}
    assert {k: v.shape for k, v in saved.items()} == fresh  # full (gathered) tensors, not FSDP shards
    assert info["best_eval_loss"] < 6.3  # ln(512) = 6.24 is chance: the sharded run learned


# ---------------------------------------------------------------------------------------------
# The guides' attention block; packing through DataCollatorWithFlattening


def test_attention_block_maps_to_attn_implementation(tmp_path):
    from ollama_ft.core.config import load_config
    from ollama_ft.train.model import resolve_attn_implementation

    p = tmp_path / "g.yaml"
    p.write_text("model:\n  base: qwen2.5:7b\nattention:\n  type: flash_attn\n")
    loaded = load_config(p)
    assert loaded.config.model.attn_implementation == "flash_attention_2"
    assert loaded.resolved()["model.attn_implementation"]["source"] == f"{p}:4 (attention.type)"
    impl, why = resolve_attn_implementation("flash_attention_2", "cpu")
    assert impl == "sdpa" and "no CUDA device" in why
    assert resolve_attn_implementation("eager", "cpu")[0] == "eager"


def test_packing_collator_equals_per_example_shift(tiny_data):
    """PackingCollator (DataCollatorWithFlattening + a left shift) == concatenating each example's own
    shifted targets, with position ids restarting per example."""
    from ollama_ft.train.data import PackingCollator, _shifted, load_split

    rows = load_split(tiny_data, "train").rows[:5]
    b = PackingCollator()(rows)
    assert b["shift_labels"][0].tolist() == sum((_shifted(r["labels"]) for r in rows), [])
    assert b["input_ids"][0].tolist() == sum((list(r["input_ids"]) for r in rows), [])
    assert b["position_ids"][0].tolist() == sum((list(range(len(r["input_ids"]))) for r in rows), [])
    flash = PackingCollator(flash_attn_kwargs=True)(rows)
    assert flash["cu_seq_lens_q"].tolist()[-1] == len(b["input_ids"][0])


# ---------------------------------------------------------------------------------------------
# Through the pipeline and the CLI


@pytest.mark.slow
def test_pipeline_stages_then_continued_run_records_lineage(tmp_path, tiny_llama):
    """`stages:` with a stage of its own data (built into stage-data/), then a second run continuing the
    first run's adapter (--from-adapter): lineage of both in the manifest."""
    import yaml

    from ollama_ft.pipeline import run_pipeline
    from tests.test_pipeline import SAMPLE

    lines = SAMPLE.read_text().splitlines()
    (tmp_path / "task.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "general.jsonl").write_text("\n".join(lines[40:80]) + "\n")
    cfg = {"name": "first", "runs_dir": str(tmp_path / "runs"), "model": {"base": str(tiny_llama), "adapter": "lora"},
           "data": {"path": str(tmp_path / "task.jsonl"), "max_length": 128}, "lora": {"r": 4, "alpha": 8},
           "training": {"batch_size": 4, "max_steps": 2, "eval_steps": 2, "save_steps": 2},
           "stages": [{"name": "general", "data": str(tmp_path / "general.jsonl"), "learning_rate": 1e-3},
                      {"name": "task", "learning_rate": 5e-4}]}
    p = tmp_path / "first.yaml"
    p.write_text(yaml.safe_dump(cfg))
    first = run_pipeline(p, [], until="train")
    info = first.entry("train")["info"]
    assert [s["stage"] for s in info["stages"]] == ["general", "task"]
    assert (first.root / "stage-data" / "general" / "train.parquet").is_file()
    assert first.entry("train")["settings"]["stage_files"].keys() == {"general"}

    second = run_pipeline(p, ["name=second", "training.from_adapter=first", "stages=[]"], until="train")
    lineage = json.loads((second.root / "manifest.json").read_text())["lineage"]["from_adapter"]
    assert lineage["run"] == str(first.root) and lineage["train_digest"] == first.output_digest("train")
    summary = second.entry("train")["info"]
    assert summary["init_adapter"] == str(first.root / "adapter")
    assert second.entry("train")["settings"]["from_adapter"] == first.output_digest("train")


def test_plan_prints_trainable_parameters_of_layer_limited_lora():
    import subprocess
    import sys

    from tests.test_pipeline import ROOT

    p = subprocess.run([sys.executable, "-m", "ollama_ft", "plan", "configs/layers-example.yaml", "--budget", "8GB"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("trainable parameters:"))
    assert "LoRA in 4 of 18 layers" in line
    # 4 layers x r=16 x 3 x (640 + 2048): gate/up/down of Gemma 3 270M (hidden 640, intermediate 2048)
    assert f"{4 * 16 * 3 * (640 + 2048):,}" in line
