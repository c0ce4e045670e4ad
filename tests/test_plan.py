"""Memory planner: pure estimates checked three ways (CPU measurements here, published figures, CUDA).

Tolerances (stated, not tuned per run):
- published GPU figures: +-15% (Qwen-7B QLoRA, plain HF+PEFT) and +-20% (torchtune Llama2-7B QLoRA,
  whose sequence lengths are not stated: we assume its worst case, batch 2 x 2048);
- CPU peak RSS here: +-35% for the tiny models (the runtime dominates) and +-30% for Gemma 3 270M
  (slow test). CPU RSS is not VRAM: it includes the Python/torch runtime and mapped weight files,
  which the CPU estimate models separately (plan.CPU_RUNTIME, "mapped weight files").
- CUDA (gpu-marked, skipped without a GPU): predicted allocator peak within +-15% of
  torch.cuda.max_memory_allocated for DeepSeek-R1-Distill-Qwen-7B dims at seq 2048.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ollama_ft.train.plan import GB, GIB, ModelDims, PlanSettings, estimate, parse_size
from ollama_ft.train.plan_report import suggestions

ROOT = Path(__file__).resolve().parent.parent

QWEN1_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=151936, tie_word_embeddings=False)
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
R1_QWEN_7B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                  tie_word_embeddings=False, max_position_embeddings=131072)


def test_nf4_storage_with_double_quant():
    d = ModelDims.from_config(LLAMA2_7B)
    b = estimate(d, PlanSettings())
    bits = 8 * (b.train["base weights (NF4)"] + b.train["NF4 block scales"]) / d.linear_params
    assert bits == pytest.approx(4.127, abs=0.001)  # 4 + 8/64 + 32/(64*256)
    nodq = estimate(d, PlanSettings(double_quant=False))
    assert 8 * nodq.train["NF4 block scales"] / d.linear_params == pytest.approx(0.5)
    assert d.parameters == pytest.approx(6.74e9, rel=0.01)  # Llama 2 7B


def test_terms_move_the_right_way():
    base = PlanSettings(seq_len=2048)
    e = estimate(R1_QWEN_7B, base).train_total
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, gradient_checkpointing=False)).train_total > e
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, loss="full")).train_total > e + 4 * GB
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, optimizer="adamw")).train_total > e
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, load_in_4bit=False)).train_total > e + 8 * GB
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=4096)).train_total > e
    assert estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, lora_r=64)).train_total > e


def test_published_qwen_7b_qlora_plain_hf_peft():
    """Qwen-7B QLoRA, seq 2048, batch 1, plain HF+PEFT: 13.9 GB (Qwen's README, A100).

    Configured like their finetune.py: LoRA r=64 on c_attn/c_proj/w1/w2 (every linear layer), fp32
    AdamW, gradient checkpointing, full logits with the loss on bf16 logits (Qwen's remote code).
    """
    s = PlanSettings(seq_len=2048, micro_batch=1, lora_r=64, lora_targets=("c_attn", "c_proj", "w1", "w2"),
                     optimizer="adamw", loss="full", full_logits_bytes=10)
    got = estimate(QWEN1_7B, s).train_total
    assert got == pytest.approx(13.9 * GB, rel=0.15)


def test_published_torchtune_llama2_7b_qlora():
    """torchtune Llama2-7B QLoRA: 9.29 GiB peak (r=8 on q/k/v/o + MLP, batch 2, fp32 logits, AdamW)."""
    s = PlanSettings(seq_len=2048, micro_batch=2, lora_r=8, lora_dropout=0.0, optimizer="adamw", loss="full",
                     full_logits_bytes=16)
    got = estimate(LLAMA2_7B, s).train_total
    assert got == pytest.approx(9.29 * GIB, rel=0.20)


def test_r1_7b_fits_16gb_and_under_12gb_goal():
    s = PlanSettings(seq_len=2048, micro_batch=1, lora_r=16)
    b = estimate(R1_QWEN_7B, s)
    assert b.train_total < 12 * GB
    plain = estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, lora_r=16, loss="full", upcast_non_quantized=True))
    assert plain.train_total > b.train_total + 5 * GB
    assert b.disk["GGUF Q4_K_M"] == pytest.approx(4.6 * GB, rel=0.1)


def test_suggestions_fit_and_prefer_cheap_changes():
    s = PlanSettings(seq_len=2048, micro_batch=4, accumulation=4, lora_r=16)
    need = estimate(R1_QWEN_7B, s).train_total
    budget = need * 0.8
    fixes = suggestions(ModelDims.from_config(R1_QWEN_7B), s, budget)
    assert fixes and all(b.train_total <= budget for _, b in fixes)
    assert fixes[0][0].startswith("training.micro_batch_size")  # same global batch: preferred
    assert suggestions(ModelDims.from_config(R1_QWEN_7B), s, 1 * GB) == []


def test_parse_size():
    assert parse_size("16GB") == 16e9
    assert parse_size("12 GiB") == 12 * 2**30
    assert parse_size("800MB") == 800e6
    assert parse_size("16") == 16e9
    from ollama_ft.core.errors import UserError

    with pytest.raises(UserError):
        parse_size("lots")


def test_plan_command_go_and_no_go(tmp_path, capsys):
    from ollama_ft.train.plan_report import plan_command

    cfg = ROOT / "configs" / "deepseek-r1-7b.yaml"
    plan_command(cfg, budget="16GB", overrides=[f"runs_dir={tmp_path}"], ram="32GB")
    out = capsys.readouterr().out
    assert "GO" in out and "NO-GO" not in out and "152064" in out
    plan_command(cfg, budget="10GB", overrides=[f"runs_dir={tmp_path}", "training.micro_batch_size=4"])
    out = capsys.readouterr().out
    assert "NO-GO" in out and "--set" in out


def test_plan_reads_a_local_model_dir(tiny_llama, tmp_path, capsys):
    from ollama_ft.train.plan_report import plan_command

    plan_command(None, budget="1GB", overrides=[f"model.base={tiny_llama}", f"runs_dir={tmp_path}"], device="cpu")
    assert "GO" in capsys.readouterr().out


def _measure_cpu_peak(base: Path, data: Path, tmp: Path, steps: int, extra: str = "") -> dict:
    code = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_train import tiny_cfg
        from ollama_ft.train.stage import train_process
        cfg = tiny_cfg(max_steps={steps}, eval_steps=1000, save_steps=1000, batch_size=4, micro_batch_size=4)
        cfg.training.gradient_checkpointing = True  # what the PlanSettings below assume
        {extra}
        train_process(cfg, {str(base)!r}, {str(data)!r}, {str(tmp / 'a')!r}, {str(tmp / 'c')!r}, False, show=False)
        # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a big pytest process
        # would report the parent's size; the new address space's high-water mark is the child's own.
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
        print("PEAK", int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"peak": int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])}


def test_cpu_peak_rss_tiny_model(tiny_llama, tmp_path):
    from tests.test_train import write_data

    data = write_data(tiny_llama, tmp_path / "data")
    measured = _measure_cpu_peak(tiny_llama, data, tmp_path, steps=2)["peak"]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    lens = [len(x) for x in __import__("pyarrow.parquet").parquet.read_table(data / "train.parquet")
            .column("input_ids").to_pylist()]
    s = PlanSettings(seq_len=max(lens), micro_batch=4, lora_r=8, lora_dropout=0.0, load_in_4bit=False,
                     compute_bytes=4, optimizer="adamw", loss_chunk=16, device="cpu")
    predicted = estimate(cfg, s).train_total
    print(f"tiny llama CPU peak RSS: measured {measured / GB:.3f} GB, predicted {predicted / GB:.3f} GB")
    assert predicted == pytest.approx(measured, rel=0.35), (predicted / GB, measured / GB)


@pytest.mark.slow
def test_cpu_peak_rss_gemma_270m(tmp_path):
    """Gemma 3 270M QLoRA on CPU, batch 4 x 256, r=16: predicted vs measured peak RSS within 30%."""
    bench = pytest.importorskip("bench.train_throughput")
    base = bench.gemma_dir()
    data = bench.make_data(base, n=8, max_len=256)
    cfg = json.loads((base / "config.json").read_text())
    extra = ("cfg.model.adapter = 'qlora'; cfg.lora.r = 16; cfg.lora.alpha = 32; cfg.lora.dropout = 0.05; "
             "cfg.training.loss_chunk_size = 256")
    measured = _measure_cpu_peak(base, data, tmp_path, steps=2, extra=extra)["peak"]
    from ollama_ft.core.compute_dtype import choose

    # the train stage computes in float32 on CPUs without native bf16 (compute_dtype auto)
    b = 4 if choose("auto", "cpu").name == "float32" else 2
    s = PlanSettings(seq_len=256, micro_batch=4, lora_r=16, lora_dropout=0.05, load_in_4bit=True, compute_bytes=b,
                     optimizer="adamw", loss_chunk=256, device="cpu")
    predicted = estimate(cfg, s).train_total
    print(f"Gemma 3 270M CPU peak RSS: measured {measured / GB:.3f} GB, predicted {predicted / GB:.3f} GB")
    assert predicted == pytest.approx(measured, rel=0.30), (predicted / GB, measured / GB)


@pytest.mark.gpu
def test_cuda_peak_r1_qwen_7b_dims(tmp_path):
    """Random-init model with DeepSeek-R1-Distill-Qwen-7B's exact dims, QLoRA at seq 2048 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ollama_ft.core.config import RunConfig
    from ollama_ft.train.data import PackingCollator
    from ollama_ft.train.stage import _trainer_class, load_model, pick_device_and_dtype

    conf = Qwen2Config(**{k: v for k, v in R1_QWEN_7B.items() if k != "architectures"})
    base = tmp_path / "r1-dims"
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    m.save_pretrained(str(base))
    del m
    torch.cuda.empty_cache()
    cfg = RunConfig()
    cfg.lora.r = 16
    device, dtype, optim = pick_device_and_dtype(cfg)
    model = load_model(cfg, base, device, dtype)
    from transformers import TrainingArguments

    tr = _trainer_class()(model=model, args=TrainingArguments(str(tmp_path / "o"), report_to="none", optim=optim,
                                                              bf16=True, max_steps=3,
                                                              per_device_train_batch_size=1),
                          train_dataset=[{"input_ids": list(range(2048)), "labels": list(range(2048))}] * 3,
                          data_collator=PackingCollator(), loss_chunk_size=256)
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    measured = torch.cuda.max_memory_allocated()
    predicted = estimate(R1_QWEN_7B, PlanSettings(seq_len=2048, micro_batch=1, lora_r=16)).train_allocated
    print(f"R1-7B dims seq 2048: measured {measured / GB:.2f} GB, predicted {predicted / GB:.2f} GB")
    assert measured <= 12 * GB
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("name", ["deepseek-r1-7b", "deepseek-llm-7b", "qwen2.5-7b", "llama3.1-8b", "mistral-7b",
                                  "my-medical-model"])
def test_every_16gb_config_fits_16gb(name, tmp_path, capsys):
    """The ready GPU configs in configs/ are shown by `plan --budget 16GB` to fit (training memory)."""
    from ollama_ft.train.plan_report import plan_command

    plan_command(ROOT / "configs" / f"{name}.yaml", budget="16GB", overrides=[f"runs_dir={tmp_path}"], ram="64GB")
    out = capsys.readouterr().out
    assert "GO" in out and "NO-GO" not in out, out[-2000:]


def test_plan_sizes_the_data_stages_perplexity_screen(tmp_path, capsys):
    """data.quality.perplexity_outliers loads the base unquantized in the data stage: the plan shows that
    peak with the data stage's own formula and says NO-GO where it cannot fit the budget."""
    import yaml

    from ollama_ft.data.quality import screen_memory
    from ollama_ft.train.plan_report import plan_command

    base = yaml.safe_load((ROOT / "configs" / "deepseek-r1-7b.yaml").read_text())
    plan_command(ROOT / "configs" / "deepseek-r1-7b.yaml", budget="16GB", overrides=[f"runs_dir={tmp_path}"])
    assert "perplexity screen" not in capsys.readouterr().out  # off unless configured

    base.setdefault("data", {})["quality"] = {"perplexity_outliers": {"batch_size": 2}}
    cfg = tmp_path / "screened.yaml"
    cfg.write_text(yaml.safe_dump(base))
    b = plan_command(cfg, budget="16GB", overrides=[f"runs_dir={tmp_path}"])
    out = " ".join(capsys.readouterr().out.split())
    d = ModelDims.from_config(R1_QWEN_7B)
    want = screen_memory(d.parameters, 2, 2, d.vocab, base["data"]["max_length"], d.hidden, d.intermediate)
    assert b.data == pytest.approx({**want, "CUDA context": 0.5 * GIB})
    assert b.data_total > 16 * GB  # 7.6B parameters unquantized in bf16 (+20%) do not fit 16 GB
    assert "NO-GO: the data stage's perplexity screen needs" in out and "GO: training needs" in out
    assert "perplexity_outliers.batch_size" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager_attention_cost_matches_autograds_saved_tensors(dtype):
    """model.attn_implementation=eager keeps the softmaxed score matrix for backward; the plan's extra
    activation bytes for it equal what autograd saves beyond sdpa on a real forward (within 3%)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ollama_ft.train.plan import layer_activation_bytes

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256)
    batch, seq = 2, 128
    tdtype = getattr(torch, dtype)

    def saved(impl: str) -> int:
        storages: dict[tuple[int, torch.dtype], int] = {}

        def pack(t):
            storages[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**dims, attn_implementation=impl)).to(tdtype).train()
        ids = torch.randint(0, 256, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        return sum(storages.values())

    measured = saved("eager") - saved("sdpa")
    d = ModelDims.from_config(dims)
    s = PlanSettings(seq_len=seq, micro_batch=batch, packing=False, compute_bytes=tdtype.itemsize, lora_dropout=0)
    per_token = layer_activation_bytes(d, PlanSettings(**{**s.__dict__, "attention": "eager"})) \
        - layer_activation_bytes(d, s)
    predicted = per_token * batch * seq * d.layers
    assert predicted == pytest.approx(measured, rel=0.03)
    # Packed, the micro-batch is one row: the matrix grows with the row, so it costs more per token.
    packed = PlanSettings(**{**s.__dict__, "attention": "eager", "packing": True})
    assert layer_activation_bytes(d, packed) - layer_activation_bytes(d, s) > per_token
