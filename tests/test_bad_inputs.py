"""User mistakes end in one red line with a hint and exit 1, never a traceback or "internal error".

One parametrised test over a corpus of bad inputs (config files, CLI values, data files, base-model
directories, GGUF files, Modelfiles, model names, environment variables). Each case builds its
small fixture in tmp_path and runs the real CLI in a subprocess; none trains or loads a model.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Small hand-written fixtures

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
                "intermediate_size": 128, "vocab_size": 512}


def _safetensors(path: Path, truncate: int = 0) -> None:
    """A valid one-tensor safetensors file (or one cut `truncate` bytes short)."""
    data = b"\0" * (4 * 8)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, len(data)]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + data
    path.write_bytes(blob[: len(blob) - truncate] if truncate else blob)


def _base_dir(tmp: Path, *, config: str | None = None, weights: Callable[[Path], None] | None = None,
              tokenizer: bool = True) -> Path:
    d = tmp / "base"
    d.mkdir()
    (d / "config.json").write_text(config if config is not None else json.dumps(LLAMA_CONFIG))
    (weights or _safetensors)(d / "model.safetensors")
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def _config(tmp: Path, text: str | None = None, **sections) -> Path:
    """A config file; `text` verbatim, else YAML built from sections (base defaults to a local dir)."""
    import yaml

    p = tmp / "c.yaml"
    if text is not None:
        p.write_text(text)
        return p
    cfg = {"name": "c", "runs_dir": str(tmp / "runs"), **sections}
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run_dir(tmp: Path, name: str = "r", modelfile: str | None = None, manifest: str | None = None) -> str:
    d = tmp / "runs" / name
    d.mkdir(parents=True)
    (d / "run.yaml").write_text(f"name: {name}\n")
    if modelfile is not None:
        (d / "modelfile").mkdir()
        (d / "modelfile" / "Modelfile").write_text(modelfile)
    if manifest is not None:
        (d / "manifest.json").write_text(manifest)
    return name


def _data(tmp: Path, name: str, content: str | bytes) -> str:
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


GOOD_MSG = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def _checkpoint_fingerprint_case(tmp: Path, request) -> list[str]:
    """A resumable run whose checkpoints/fingerprint.json is damaged (needs a real tiny model)."""
    base = request.getfixturevalue("tiny_llama")
    data = _data(tmp, "d.jsonl", "\n".join([GOOD_MSG.replace('"q"', f'"q{i}"') for i in range(12)]) + "\n")
    cfg = _config(tmp, model={"base": str(base), "adapter": "lora"}, data={"path": data, "max_length": 64},
                  training={"max_steps": 1, "batch_size": 1})
    ck = tmp / "runs" / "c" / "checkpoints"
    (ck / "checkpoint-3").mkdir(parents=True)
    (ck / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (ck / "fingerprint.json").write_text('{"fingerprint": ')
    return ["train", str(cfg), "--until", "train"]


# --------------------------------------------------------------------------------------------
# The corpus: (id, setup(tmp, request) -> argv [, env], expected substring in stderr)

Setup = Callable[[Path, pytest.FixtureRequest], "list[str] | tuple[list[str], dict[str, str]]"]

CASES: list[tuple[str, Setup, str]] = [
    # ---- config files
    ("yaml-syntax", lambda t, r: ["plan", str(_config(t, "model:\n  base: [unclosed\nlora: {}\n"))], "c.yaml:3"),
    ("yaml-tab-indent", lambda t, r: ["plan", str(_config(t, "model:\n\tbase: x\n"))], "c.yaml:2"),
    ("yaml-unsafe-tag", lambda t, r: ["plan", str(_config(t, "model: !!python/object:os.system x\n"))], "c.yaml:1"),
    ("yaml-bad-int-tag", lambda t, r: ["plan", str(_config(t, "training:\n  epochs: !!int many\n"))], "'many'"),
    ("yaml-recursive-alias", lambda t, r: ["plan", str(_config(t, "a: &x [*x]\n"))], "c.yaml"),
    ("config-not-mapping", lambda t, r: ["plan", str(_config(t, "- a\n- b\n"))], "c.yaml:1"),
    ("config-not-utf8", lambda t, r: ["plan", _data(t, "c.yaml", b"name: caf\xe9\n")], "not UTF-8"),
    ("config-missing", lambda t, r: ["plan", str(t / "nope.yaml")], "nope.yaml"),
    ("unknown-section", lambda t, r: ["plan", str(_config(t, "trainin:\n  epochs: 1\n"))], "'trainin'"),
    ("unknown-key", lambda t, r: ["plan", str(_config(t, "training:\n  epoch: 1\n"))], "training.epoch"),
    ("wrong-type", lambda t, r: ["plan", str(_config(t, "training:\n  epochs: lots\n"))], "'lots'"),
    ("out-of-range", lambda t, r: ["plan", str(_config(t, "lora:\n  r: 0\n"))], "lora.r"),
    ("bad-enum", lambda t, r: ["plan", str(_config(t, "model:\n  adapter: qlora8\n"))], "'qlora8'"),
    ("bad-split", lambda t, r: ["plan", str(_config(t, "data:\n  split: [0.5, 0.5, 0.5]\n"))], "data.split"),
    ("bad-ollama-name-in-config", lambda t, r: ["plan", str(_config(t, "ollama:\n  name: Bad Name!\n"))],
     "Bad Name!"),
    # ---- training methods (issue 17) and the guides' config blocks
    ("guide-awq-quantization-block", lambda t, r: ["plan", str(_config(t, "quantization:\n  type: awq\n  "
                                                              "weight_dtype: int4\n  activate_dtype: fp16\n"))],
     "c.yaml:1: 'quantization' (type: awq): quantization-aware training"),
    ("guide-attention-unknown-type", lambda t, r: ["plan", str(_config(t, "attention:\n  type: ring\n"))],
     "attention: {type: flash_attn}"),
    ("lora-layers-bad-form", lambda t, r: ["plan", str(_config(t, "lora:\n  layers: top 4\n"))], "c.yaml:2: 'lora.layers'"),
    ("lora-layers-beyond-model", lambda t, r: ["plan", str(_config(t, "lora:\n  layers: last 99\n"))],
     "only 18 layers"),
    ("min-lr-above-lr", lambda t, r: ["plan", str(_config(t, "training:\n  learning_rate: 1e-4\n"
                                                        "  min_learning_rate: 1e-3\n"))], "must be below"),
    ("stage-unknown-key", lambda t, r: ["plan", str(_config(t, "stages:\n  - name: general\n    learning_rate: 1e-5"
                                                          "\n    epohcs: 1\n"))], "did you mean 'stages.0.epochs'"),
    ("stage-duplicate-names", lambda t, r: ["plan", str(_config(t, "stages:\n  - {name: a, learning_rate: 1e-5}"
                                                              "\n  - {name: a, learning_rate: 1e-6}\n"))], "repeated: a"),
    ("lm-head-lr-without-module", lambda t, r: ["plan", str(_config(t, "lora:\n  lm_head_learning_rate: 1e-5\n"))],
     "need lora.modules_to_save"),
    ("from-adapter-unknown-run", lambda t, r: ["train", str(_config(t)), "--from-adapter", "nope", "--until", "pull"],
     "run not found: nope"),
    ("nnodes-without-endpoint", lambda t, r: ["train", str(_config(t)), "--nnodes", "2", "--until", "pull"],
     "rdzv_endpoint"),
    # ---- CLI values
    ("set-not-yaml", lambda t, r: ["train", str(_config(t)), "--set", "training.epochs=[", "--until", "pull"],
     "training.epochs=["),
    ("set-no-equals", lambda t, r: ["plan", str(_config(t)), "--set", "training.epochs"], "training.epochs"),
    ("set-empty-key", lambda t, r: ["plan", str(_config(t)), "--set", "=3"], "'=3'"),
    ("set-bad-tag", lambda t, r: ["plan", str(_config(t)), "--set", "training.epochs=!!int x"], "!!int x"),
    ("set-wrong-type", lambda t, r: ["plan", str(_config(t)), "--set", "training.epochs=lots"],
     "--set training.epochs=lots"),
    ("until-unknown-stage", lambda t, r: ["train", str(_config(t)), "--until", "banana"], "banana"),
    ("from-unknown-stage", lambda t, r: ["train", str(_config(t)), "--from", "bananas"], "bananas"),
    ("force-unknown-stage", lambda t, r: ["train", str(_config(t)), "--force", "pulll"], "pulll"),
    ("plan-budget-unit", lambda t, r: ["plan", str(_config(t)), "--budget", "16XB"], "16XB"),
    ("plan-budget-zero", lambda t, r: ["plan", str(_config(t)), "--budget", "0GB"], "0GB"),
    ("plan-budget-negative", lambda t, r: ["plan", str(_config(t)), "--budget", "-4GB"], "-4GB"),
    ("plan-ram-words", lambda t, r: ["plan", str(_config(t)), "--ram", "lots"], "lots"),
    ("export-bad-quant", lambda t, r: ["export", _run_dir(t), "--quant", "Q3_BOGUS"], "Q3_BOGUS"),
    ("merge-bad-base", lambda t, r: ["merge", _run_dir(t), "--merge-base", "sideways"], "sideways"),
    ("eval-bad-via", lambda t, r: ["eval", _run_dir(t), "--via", "pigeon"], "pigeon"),
    ("inspect-bad-split", lambda t, r: ["data", "inspect", _run_dir(t), "--split", "bogus"], "bogus"),
    ("validate-bad-format", lambda t, r: ["data", "validate", _data(t, "d.jsonl", GOOD_MSG), "--format", "sharegtp"],
     "sharegtp"),
    ("markup-in-path", lambda t, r: ["plan", "[/x]"], "[/x]"),
    # ---- data files
    ("data-bad-json-line", lambda t, r: ["data", "validate", _data(t, "d.jsonl", GOOD_MSG + "\n{oops\n")],
     "d.jsonl:2"),
    ("data-missing-content", lambda t, r: ["data", "validate", _data(
        t, "d.jsonl", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}))],
     "d.jsonl:1"),
    ("data-empty-file", lambda t, r: ["data", "validate", _data(t, "d.jsonl", "")], "d.jsonl"),
    ("data-wrong-role", lambda t, r: ["data", "validate", _data(t, "d.jsonl", json.dumps(
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}))], "d.jsonl:1"),
    ("data-csv-no-known-columns", lambda t, r: ["data", "validate", _data(t, "d.csv", "foo,bar\n1,2\n")], "d.csv"),
    ("data-csv-header-only-blank", lambda t, r: ["data", "validate", _data(t, "d.csv", ",,\n1,2,3\n")], "d.csv:1"),
    ("data-not-utf8", lambda t, r: ["data", "validate", _data(t, "d.jsonl", b'{"text": "caf\xe9"}\n')], "d.jsonl:1"),
    ("data-json-array-broken", lambda t, r: ["data", "validate", _data(t, "d.json", "[\n" + GOOD_MSG + ",\n{x}\n]")],
     "d.json:3"),
    ("data-corrupt-parquet", lambda t, r: ["data", "validate", _data(t, "d.parquet", b"PAR1 not really")],
     "d.parquet"),
    ("data-unsupported-type", lambda t, r: ["data", "validate", _data(t, "d.docx", "x")], "d.docx"),
    ("data-not-found", lambda t, r: ["data", "validate", str(t / "missing.jsonl")], "missing.jsonl"),
    ("data-alpaca-no-output", lambda t, r: ["data", "validate", _data(
        t, "d.jsonl", json.dumps({"instruction": "q", "input": ""}))], "d.jsonl:1"),
    # ---- base-model directories
    ("base-corrupt-safetensors-pull", lambda t, r: ["pull", str(_base_dir(
        t, weights=lambda p: p.write_bytes(b"garbage")))], "model.safetensors"),
    ("base-safetensors-bad-header", lambda t, r: ["pull", str(_base_dir(
        t, weights=lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{nope")))], "model.safetensors"),
    ("base-truncated-safetensors", lambda t, r: ["pull", str(_base_dir(
        t, weights=lambda p: _safetensors(p, truncate=8)))], "model.safetensors"),
    ("base-corrupt-safetensors-train", lambda t, r: ["train", str(_config(t, model={"base": str(_base_dir(
        t, weights=lambda p: p.write_bytes(b"\xff" * 16)))})), "--until", "pull"], "model.safetensors"),
    ("base-malformed-config-pull", lambda t, r: ["pull", str(_base_dir(t, config='{"hidden_size": 64\n,,'))],
     "config.json:2"),
    ("base-config-not-object", lambda t, r: ["pull", str(_base_dir(t, config="[1, 2]"))], "config.json"),
    ("base-malformed-config-plan", lambda t, r: ["plan", str(_config(t, model={"base": str(_base_dir(
        t, config='{"hidden_size": 64,\n "x": }'))}))], "config.json:2"),
    ("base-config-missing-dims-plan", lambda t, r: ["plan", str(_config(t, model={"base": str(_base_dir(
        t, config='{"architectures": ["LlamaForCausalLM"]}'))}))], "hidden_size"),
    ("base-config-bad-dims-plan", lambda t, r: ["plan", str(_config(t, model={"base": str(_base_dir(
        t, config=json.dumps({**LLAMA_CONFIG, "num_attention_heads": "four"})))}))], "four"),
    ("base-missing-tokenizer", lambda t, r: ["pull", str(_base_dir(t, tokenizer=False))], "no tokenizer"),
    ("base-no-config", lambda t, r: ["pull", str((t / "empty").mkdir() or t / "empty")], "empty"),
    # ---- GGUF files
    ("gguf-truncated", lambda t, r: ["pull", _data(t, "m.gguf", b"GGUF\x03\x00\x00\x00\x01")], "m.gguf"),
    ("gguf-truncated-counts", lambda t, r: ["pull", _data(t, "m.gguf", b"GGUF" + struct.pack("<IQQ", 3, 5, 1))],
     "m.gguf"),
    ("gguf-not-gguf", lambda t, r: ["pull", _data(t, "m.gguf", "just text\n")], "m.gguf"),
    ("gguf-empty", lambda t, r: ["pull", _data(t, "m.gguf", b"")], "m.gguf"),
    # ---- Modelfiles (modelfile RUN --check parses the run's Modelfile first)
    ("modelfile-unknown-instruction", lambda t, r: ["modelfile", _run_dir(t, modelfile="FORM x.gguf\n"),
                                                    "--check"], "(line 1)"),
    ("modelfile-bad-parameter-value", lambda t, r: ["modelfile", _run_dir(
        t, modelfile="FROM x.gguf\nPARAMETER temperature hot\n"), "--check"], "hot"),
    ("modelfile-unknown-parameter", lambda t, r: ["modelfile", _run_dir(
        t, modelfile="FROM x.gguf\nPARAMETER temprature 0.5\n"), "--check"], "temprature"),
    ("modelfile-no-from", lambda t, r: ["modelfile", _run_dir(t, modelfile="SYSTEM hi\n"), "--check"], "no FROM"),
    ("modelfile-unterminated", lambda t, r: ["modelfile", _run_dir(
        t, modelfile='FROM x.gguf\nTEMPLATE """{{ .Prompt }}\n'), "--check"], "Modelfile"),
    # ---- model names
    ("name-with-space", lambda t, r: ["train", str(_config(t)), "--name", "Bad Name!", "--until", "pull"],
     "Bad Name!"),
    ("name-two-tags", lambda t, r: ["register", _run_dir(t), "--name", "a:b:c"], "a:b:c"),
    ("bad-tag", lambda t, r: ["plan", str(_config(t)), "--set", "ollama.tag=x y"], "x y"),
    ("run-bad-name", lambda t, r: ["run", "Bad!Name", "hi"], "Bad!Name"),
    ("install-bad-ref", lambda t, r: ["install", "a:b:c"], "a:b:c"),
    ("install-bad-model", lambda t, r: ["install", "127.0.0.1:5000/team/Bad!:latest"], "Bad!"),
    ("publish-bad-registry", lambda t, r: ["publish", "m", "--registry", "not a registry!!"], "not a registry!!"),
    # ---- environment variables
    ("env-ollama-host-scheme", lambda t, r: (["run", "m", "hi"], {"OLLAMA_HOST": "ftp://x"}), "ftp://x"),
    ("env-ollama-host-port", lambda t, r: (["run", "m", "hi"], {"OLLAMA_HOST": "http://127.0.0.1:99999"}), "99999"),
    ("env-ollama-host-ipv6", lambda t, r: (["status", "r"], {"OLLAMA_HOST": "http://[::1"}), "[::1"),
    ("env-proof-ram-bytes", lambda t, r: (["status", _run_dir(t)], {"OLLAMA_FT_PROOF_RAM_BYTES": "16GB"}), "16GB"),
    ("env-convert-chunk", lambda t, r: (["status", _run_dir(t)], {"OLLAMA_FT_CONVERT_CHUNK_BYTES": "-1"}),
     "OLLAMA_FT_CONVERT_CHUNK_BYTES"),
    ("env-cache-is-file", lambda t, r: (["status", _run_dir(t)], {"OLLAMA_FT_CACHE": _data(t, "cachefile", "x")}),
     "cachefile"),
    # ---- run state
    ("manifest-not-json", lambda t, r: ["status", _run_dir(t, manifest="{oops")], "manifest.json:1"),
    ("manifest-not-object", lambda t, r: ["status", _run_dir(t, manifest="[]")], "manifest.json"),
    ("checkpoint-fingerprint-corrupt", _checkpoint_fingerprint_case, "fingerprint.json"),
]


@pytest.mark.parametrize("setup, expect", [pytest.param(s, e, id=i) for i, s, e in CASES])
def test_bad_input_is_one_red_line(tmp_path, request, setup, expect):
    got = setup(tmp_path, request)
    argv, extra = got if isinstance(got, tuple) else (got, {})
    env = {**os.environ, "OLLAMA_FT_CACHE": str(tmp_path / "cache"), "OLLAMA_MODELS": str(tmp_path / "ollama"),
           "OLLAMA_HOST": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "NO_COLOR": "1",
           "OLLAMA_FT_REGISTRY": ""}
    for k in ("OLLAMA_FT_PROOF_RAM_BYTES", "OLLAMA_FT_CONVERT_CHUNK_BYTES", "OLLAMA_FT_VERBOSE"):
        env.pop(k, None)
    env.update(extra)
    proc = subprocess.run([sys.executable, "-m", "ollama_ft", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    err = proc.stderr
    shown = f"argv={argv}\nexit={proc.returncode}\nstderr:\n{err[-4000:]}\nstdout:\n{proc.stdout[-2000:]}"
    assert proc.returncode == 1, shown
    assert "Traceback" not in err, shown
    assert "internal error" not in err, shown
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert error_lines, shown
    assert any(ln.startswith("hint:") for ln in err.splitlines()), shown
    assert expect in err, f"expected {expect!r} in stderr\n{shown}"
