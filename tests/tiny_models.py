"""Tiny random models built in-process (no hub), each with the kind of tokenizer its family really has.

llama: a SentencePiece BPE tokenizer (byte fallback) trained here and saved as `tokenizer.model`, which
llama.cpp's converter reads through its SentencePiece path.
qwen2: a byte-level BPE tokenizer (tokenizer.json only) with Qwen2's pre-tokenizer split and NFC, as real
Qwen2/DeepSeek-R1-distill models ship. transformers always loads qwen2 tokenizers as Qwen2Tokenizer, which
imposes exactly that pre-tokenization. Its vocabulary is new, so llama.cpp's converter cannot recognise it
by hash: exporting it needs `export.pre_tokenizer: qwen2`, which tokenizer parity then proves.
In both, ChatML markers are single special tokens.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the clinic opens at eight protocol patient nurse doctor room ward visit dose tablet water rest "
    "morning evening check report call desk form sign wait triage blue green red level step one two "
    "three four five six seven eight nine ten what when where who how is are does should must can "
    "please thank you hello question answer yes no fever cough pain ache mild severe urgent routine"
).split()


def _corpus(n_lines: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 14)
        s = " ".join(rng.choice(_WORDS) for _ in range(k))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice([".", "?", "!", ":"])
        if rng.random() < 0.1:
            s += " " + str(rng.randint(0, 999))
        lines.append(s)
    lines.append("Ünïcödé – ä ö ü ß é ñ 日本語 🙂")
    return "\n".join(lines) + "\n"


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a SentencePiece BPE model and save an HF tokenizer (with tokenizer.model) in out_dir."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    # In transformers 5, LlamaTokenizer(vocab_file=...) silently builds a 3-token vocabulary;
    # from_pretrained on a directory holding tokenizer.model loads it properly.
    # legacy=True: a space prefix after special tokens, as llama.cpp's SentencePiece tokenizer does (token parity).
    tok = LlamaTokenizer.from_pretrained(str(out_dir), legacy=True, add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.unk_token
    # transformers 5 does not save `legacy`; reloading as LlamaTokenizer would drop the space after special
    # tokens that llama.cpp adds. The generic class keeps tokenizer.json's pre-tokenizer as saved.
    _save(tok, out_dir, "PreTrainedTokenizerFast")
    return tok


def _save(tok, out_dir: Path, tokenizer_class: str) -> None:
    """Save tok with the ChatML template, recording tokenizer_class for AutoTokenizer."""
    import json

    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out_dir))
    conf_path = out_dir / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    conf["tokenizer_class"] = tokenizer_class
    conf_path.write_text(json.dumps(conf, indent=2, ensure_ascii=False))
    (out_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)


# Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's "qwen2" pre-tokenizer uses the same).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_bytelevel_tokenizer(out_dir: Path, vocab_size: int = 600):
    """Train a Qwen2-style byte-level BPE tokenizer and save it (tokenizer.json, no tokenizer.model)."""

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    # Hyphenated and bracketed words make Qwen2's "punctuation joins the next word" rule visible in the
    # merges (a wrong pre-tokenizer then tokenizes them differently).
    extra = ["follow-up x-ray check-in (urgent) (routine) re-check"] * 200
    tk.train_from_iterator(_corpus().splitlines() + extra, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    _save(tok, out_dir, "Qwen2Tokenizer")
    return tok


def build_model(out_dir: Path, arch: str = "llama", seed: int = 0, tokenizer_dir: Path | None = None,
                dtype: str = "float32", tied: bool = False):
    """Save a tiny random causal LM of the given architecture (llama | qwen2) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out_dir = Path(out_dir)
    if tokenizer_dir is None:
        tok = (build_bytelevel_tokenizer if arch == "qwen2" else build_tokenizer)(out_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out_dir))
        for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            src = Path(tokenizer_dir) / f
            if src.exists():
                (out_dir / f).write_bytes(src.read_bytes())
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tied,  # tied: the LM head is the embedding (Gemma 3, Qwen2.5 small, Llama 3.2)
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    # Random init with std 0.02 gives near-uniform logits; a larger scale makes outputs distinct,
    # which makes parity checks (HF vs merged vs GGUF) meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
