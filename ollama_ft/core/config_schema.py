"""The run configuration's schema: one pydantic model per config section (field descriptions are the
documentation). Loading, line numbers and did-you-mean live in core/config.py."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# --------------------------------------------------------------------------------------------
# Sections.


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class ModelSettings(_Section):
    base: str = Field("gemma3:270m", description="Base model: Ollama name, HF repo, local dir, .gguf, or ollama://name")
    revision: str | None = Field(None, description="HF revision (commit/tag); catalog entries pin one")
    adapter: Literal["lora", "qlora"] = Field("qlora", description="lora = bf16 base; qlora = NF4 4-bit base")
    quantization: Literal["bitsandbytes_4bit", "none", "auto"] = Field(
        "auto", description="Training-time base quantization; auto = 4-bit when adapter is qlora")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code")
    chat_template: str | None = Field(None, description="Chat family to use when the base has no template")
    merge_base: Literal["full", "dequantized"] = Field(
        "full", description="Merge into the full-precision base (default) or the dequantized 4-bit copy")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype of a base dequantized from GGUF (auto: F32/F16/BF16 GGUFs keep theirs, "
        "quantized ones become bfloat16); HF checkpoints are kept as published")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel for training. auto / flash_attention_2: flash-attention 2 on CUDA "
        "when the flash_attn package is installed, sdpa otherwise (`ollama-ft doctor` shows which)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype torch computes in (training, incl. 4-bit compute). auto: bfloat16 on a GPU "
        "or a CPU with native bf16 (avx512_bf16/AMX), float32 on other CPUs, where bf16 is ~100x slower")


_DATA_FORMATS = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]


class ReplaySettings(_Section):
    path: str = Field("ollama_ft/data_files/general_chat.jsonl", description=(
        "General-domain chat data mixed into training against forgetting (default: the bundled everyday set)"))
    format: _DATA_FORMATS = "auto"
    ratio: float = Field(0.25, ge=0, lt=1, description=(
        "Share of the training examples that are replay: 0.25 = general:domain 1:3 (the guides' mix), 0.5 = 1:1; 0 = off"))


class PerplexityOutlierSettings(_Section):
    action: Literal["flag", "drop"] = Field("flag", description="flag: report only; drop: remove from train/validation")
    threshold: float = Field(3.5, gt=0, description=(
        "Robust z-score (median/MAD) of an answer's log-perplexity under the base model beyond which it is an outlier"))
    side: Literal["high", "both"] = Field("high", description=(
        "high: answers the base finds unusually surprising (garbled, mislabelled); both: also unusually predictable ones"))
    batch_size: int = Field(8, ge=1, description="Examples per forward pass of the base model")


class NearDuplicateSettings(_Section):
    threshold: float = Field(0.85, gt=0, le=1, description=(
        "MinHash-estimated Jaccard similarity of word n-gram sets at or above which a record is a near-duplicate"))
    ngram: int = Field(3, ge=1, le=10, description="Words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: closer estimate, slower)")
    action: Literal["flag", "drop"] = "drop"


class QualitySettings(_Section):
    perplexity_outliers: PerplexityOutlierSettings | None = Field(None, description=(
        "Score every answer's perplexity under the base model; flag or drop the outliers"))
    near_duplicates: NearDuplicateSettings | None = Field(None, description="MinHash near-duplicate detection")


class BalanceSettings(_Section):
    tolerance: float = Field(0.2, gt=0, lt=1, description=(
        "Balanced when every category's count is within 1 +/- tolerance of the mean (the guides: 1:0.8-1.2)"))
    sampling: Literal["none", "downsample"] = Field("none", description=(
        "downsample: cap the training examples of large categories until the categories are balanced"))


class DataSettings(_Section):
    path: str = Field("ollama_ft/data_files/clinic_sample.jsonl", description="File or directory of data")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    split: tuple[float, float, float] | Literal["time"] = Field((0.8, 0.1, 0.1), description=(
        "train/validation/test fractions (by content hash), or `time`: by the records' timestamps, test latest"))
    time_fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description=(
        "train/validation/test fractions of `split: time`, oldest to newest"))
    seed: int = 1234
    max_length: int = Field(1024, ge=16, description="Tokens per example after chat-template rendering")
    overlong: Literal["truncate", "drop"] = "truncate"
    system_prompt: str | None = None
    train_on_prompt: bool = Field(False, description="Also compute loss on user/system tokens")
    replay: ReplaySettings | None = Field(None, description="Mix general-domain examples into training")
    quality: QualitySettings = Field(default_factory=QualitySettings)
    balance: BalanceSettings = Field(default_factory=BalanceSettings)

    @field_validator("split", "time_fractions")
    @classmethod
    def _split_sums_to_one(cls, v):
        if v == "time":
            return v
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(v)}")
        return v


_LAYERS_RE = re.compile(r"^\s*(all|(last|first)\s+([0-9]+))\s*$")


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        "all-linear", description="Linear layers that get LoRA: all-linear, attention (q/k/v/o), mlp "
        "(gate/up/down), or a list of module names")
    layers: str | list[int] = Field("all", description="Decoder layers that get LoRA: all, 'last N', 'first N' "
                                    "or a list of layer indices (peft layers_to_transform)")
    loraplus_lr_ratio: float | None = Field(None, ge=1, description="LoRA+: learning rate of the B matrices "
                                            "= this x training.learning_rate (A keeps it); the paper uses 16")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved "
                                       "with the adapter, e.g. [lm_head] or [embed_tokens]")
    embedding_learning_rate: float | None = Field(None, gt=0, description="Learning rate of a trained input "
                                                  "embedding (in modules_to_save); default training.learning_rate")
    lm_head_learning_rate: float | None = Field(None, gt=0, description="Learning rate of a trained LM head "
                                                "(in modules_to_save); default training.learning_rate")

    @field_validator("layers")
    @classmethod
    def _layers_form(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError(f"a layer list must be distinct indices >= 0, got {v}")
            return sorted(v)
        if not _LAYERS_RE.match(v) or v.split()[-1] == "0":
            raise ValueError("expected all, 'last N', 'first N' (N >= 1) or a list of layer indices")
        return " ".join(v.split())


class TrainingSettings(_Section):
    batch_size: int = Field(4, ge=1, description="Global batch size (examples per optimizer step)")
    micro_batch_size: int | None = Field(None, ge=1, description="Examples per forward pass; default min(batch_size, 4)")
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in the backward pass (less memory, ~1.5x the layer FLOPs). "
        "auto: off when the memory plan fits without it in half the GPU memory (or free RAM on CPU)")
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    eval_steps: int = Field(20, ge=1)
    save_steps: int = Field(20, ge=1)
    logging_steps: int = Field(1, ge=1)
    patience: int | None = Field(3, ge=1, description="Early stopping: evals without improvement")
    dropout_rate: float | None = Field(None, ge=0, lt=1, description="Alias of lora.dropout (common in guides)")
    packing: bool = Field(True, description="Padding-free packing of examples into each micro-batch")
    loss_chunk_size: int = Field(256, ge=16, description="Trained tokens per chunk in the chunked cross-entropy "
                                 "(256 x a 152k vocab = 0.3 GB of logits)")
    tensorboard: bool = False
    nproc: int = Field(1, ge=1, description="Data-parallel processes per node (torchrun)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss (as "
                                   "torch cross_entropy's); evaluation loss and perplexity stay unsmoothed")
    min_learning_rate: float | None = Field(None, ge=0, description="Cosine decay ends at this learning rate "
                                            "instead of 0 (the guides' eta_min, e.g. 1e-6)")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="With nproc > 1 or nnodes > 1: ddp = a full "
                                                "copy per process; fsdp = the base sharded over processes "
                                                "(a model that does not fit one GPU, even in 4 bits)")
    nnodes: int = Field(1, ge=1, description="Machines taking part (torchrun --nnodes); > 1 needs rdzv_endpoint")
    node_rank: int | None = Field(None, ge=0, description="This machine's rank (static rendezvous); c10d "
                                  "assigns ranks itself")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the rendezvous (torchrun --rdzv-endpoint)")
    rdzv_backend: Literal["c10d", "static"] = Field("c10d", description="torchrun rendezvous backend")
    rdzv_id: str | None = Field(None, description="Job id shared by every node (default: the run name)")
    from_adapter: str | None = Field(None, description="Continue a previous run's adapter (run name or runs/<run>) "
                                     "instead of a fresh one; `ollama-ft train CONFIG --from-adapter RUN`")

    @model_validator(mode="after")
    def _schedule(self) -> TrainingSettings:
        if self.min_learning_rate is not None:
            if self.lr_scheduler != "cosine":
                raise ValueError(f"min_learning_rate needs lr_scheduler: cosine (got {self.lr_scheduler})")
            if self.min_learning_rate >= self.learning_rate:
                raise ValueError(f"min_learning_rate ({self.min_learning_rate}) must be below learning_rate "
                                 f"({self.learning_rate})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (HOST:PORT of the first node)")
        return self


class StageSpec(_Section):
    """One stage of multi-stage tuning; unset fields take the training section's value."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Stage name (directory-safe)")
    data: str | None = Field(None, description="Data file or directory of this stage (default: data.path)")
    learning_rate: float = Field(gt=0)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    min_learning_rate: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)


class OptimizerSettings(_Section):
    name: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class ExportSettings(_Section):
    quants: list[Literal["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]] = Field(default_factory=lambda: ["Q4_K_M"])
    outtype: Literal["f16", "bf16"] = "f16"
    verify: bool = True
    adapter_gguf: bool = Field(False, description="Also export the LoRA as a GGUF adapter")
    tokenizer_parity: Literal["error", "warn"] = Field(
        "error", description="llama.cpp token ids differing from the HF tokenizer's: stop (error) or report (warn)")
    pre_tokenizer: str = Field("auto", description=(
        "llama.cpp BPE pre-tokenizer (tokenizer.ggml.pre, e.g. qwen2, llama-bpe, gpt-2) for a vocabulary the "
        "converter does not recognise; auto: the converter's own detection. Checked by tokenizer parity"))
    gguf_chat_template: Literal["auto", "training", "none"] = Field("auto", description=(
        "The GGUF's tokenizer.chat_template. auto: the training template unless it shows tools/thinking the "
        "Ollama TEMPLATE lacks (Ollama v0.30+ would then render it instead of the TEMPLATE); then the family's "
        "own equivalent template, or none. training: always the training template. none: no chat template"))


class OllamaSettings(_Section):
    name: str | None = Field(None, description="Model name in Ollama; default: the run name")
    tag: str = "latest"
    host: str | None = Field(None, description="Default: $OLLAMA_HOST or http://127.0.0.1:11434")
    system: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    quant: str | None = Field(None, description="Which exported GGUF to register (default: the first of export.quants)")
    verify_prompt: bool = Field(True, description="After registering, ask the server for the prompt it would run "
                                "(_debug_render_only) and fail unless it equals the training render")


class PublishSettings(_Section):
    registry: str | None = Field(None, description="HOST:PORT[/namespace]")
    tag: str | None = None
    insecure: bool = False
    ca_cert: str | None = Field(None, description=(
        "PEM file of the CA that signed the registry's TLS certificate (a team's private CA), relative to "
        "where ollama-ft runs; the system trust store is used too. Credentials never go here: see "
        "`ollama-ft publish --help`"))


class EvalSettings(_Section):
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per test answer (greedy)")
    max_examples: int | None = Field(64, ge=1, description="Evaluate the first N test examples (null: all)")
    via: Literal["llama_cpp", "ollama"] = "llama_cpp"
    gate: bool = Field(True, description="Registration refuses a tuned model that is significantly worse")
    bootstrap_samples: int = Field(2000, ge=100, description="Paired-bootstrap resamples for the CIs")
    seed: int = Field(0, description="Seed of the bootstrap and of llama.cpp")
    limit_margin: float = Field(0.25, gt=0, le=1, description=(
        "Gate: refuse when the tuned model hits the token limit this share of answers more than the base"))
    drift: bool = Field(True, description="Also score validation perplexity of every exported GGUF")
    threads: int | None = Field(None, ge=1, description="llama.cpp CPU threads (default: cores, at most 8)")
    general_data: str | None = Field(None, description=(
        "Forgetting check: general text scored before/after tuning (.jsonl with a \"text\" field, or .txt of "
        "blank-line separated paragraphs); default: the bundled general_text.jsonl; \"none\" turns it off"))
    max_general_ppl_increase: float | None = Field(0.15, ge=0, description=(
        "Gate: refuse when general-text perplexity rises by more than this share (0.15 = 15%; null: report only)"))


class CombinedWeights(_Section):
    automatic: float = Field(0.4, ge=0, description="Weight of the automatic part (ROUGE-L, chrF/100, fact recall)")
    human: float = Field(0.6, ge=0, description="Weight of the blind human ratings ((mean 1-5 score - 1) / 4)")

    @model_validator(mode="after")
    def _not_both_zero(self) -> CombinedWeights:
        if self.automatic + self.human <= 0:
            raise ValueError("at least one weight must be above 0 (default automatic 0.4, human 0.6)")
        return self


class ReviewSettings(_Section):
    """`ollama-ft review`: the blind human review and its share of the combined score. Not part of the
    eval fingerprint on purpose: `ollama-ft review RUN --report` re-renders the report without re-running eval."""

    combined_weights: CombinedWeights = Field(default_factory=CombinedWeights, description=(
        "Combined score = weights x (automatic, human), each part normalised to 0..1"))
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples for the human-score CIs")
    seed: int = Field(0, description="Seed of the per-reviewer A/B order and of the bootstrap")


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name: runs/<name>/; default: the config file's stem")
    runs_dir: str = "runs"
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    stages: list[StageSpec] = Field(default_factory=lambda: [], description=(
        "Multi-stage tuning (e.g. general -> domain -> task): each stage continues the previous stage's best "
        "adapter with its own data, epochs/max_steps and learning rate"))

    @model_validator(mode="after")
    def _train_consistency(self) -> RunConfig:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: names must be unique, repeated: {', '.join(dup)}")
        for k, st in enumerate(self.stages):
            if st.min_learning_rate is not None and st.min_learning_rate >= st.learning_rate:
                raise ValueError(f"stages[{k}] ({st.name}): min_learning_rate must be below its learning_rate")
        lr_given = self.lora.embedding_learning_rate or self.lora.lm_head_learning_rate
        if lr_given and not self.lora.modules_to_save:
            raise ValueError("lora.embedding_learning_rate / lm_head_learning_rate need lora.modules_to_save "
                             "(e.g. [embed_tokens, lm_head]): only a trained module has a learning rate")
        return self

    @model_validator(mode="after")
    def _aliases(self) -> RunConfig:
        # Guides write `training.dropout_rate`; it is the LoRA dropout.
        if self.training.dropout_rate is not None:
            self.lora.dropout = self.training.dropout_rate
        if self.ollama.quant is None:
            self.ollama.quant = self.export.quants[0] if self.export.quants else "F16"
        return self

    # -- derived values used by several stages --------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or "run"

    @property
    def load_in_4bit(self) -> bool:
        if self.model.quantization == "auto":
            return self.model.adapter == "qlora"
        return self.model.quantization == "bitsandbytes_4bit"

    @property
    def ollama_name(self) -> str:
        return self.ollama.name or self.run_name

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections, for stage fingerprints."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


SECTIONS = {name for name, f in RunConfig.model_fields.items() if isinstance(f.default_factory, type)}
