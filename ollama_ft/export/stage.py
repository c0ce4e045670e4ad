"""Stage `export`: merged HF model -> F16/BF16 GGUF -> quantized GGUFs, each one verified.

Conversion runs llama.cpp's packaged converter (converter.py); quantization uses llama-cpp-python's
`llama_model_quantize`. Every llama.cpp call runs in a subprocess: a native crash (e.g. an AMX build
in a VM) is then reported as an error about that file instead of killing ollama-ft.

Verification of each file: GGUF structure and metadata (gguf reader), llama.cpp loads it with tensor
validation, tokenizer parity with the HF tokenizer on the validation texts, teacher-forced perplexity
on the validation split (F16 must be within 1% of the merged HF model; quantized files report their
increase), and a short greedy generation.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from ..core.runs import atomic_write_text

QUANT_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16"}
PPL_TOLERANCE = 0.01  # F16 GGUF perplexity within 1% of the merged HF model's
PPL_MAX_TOKENS = 256  # per sequence; keeps llama.cpp's logits buffer (n_ctx x vocab floats) small
PPL_MAX_SEQS = 32
QUANT_LOSS_WARN = 0.25  # answer perplexity this much above F16's: say the quantization costs the fine-tune
RESULT_TAG = "OLLAMA_FT_RESULT "

# ------------------------------------------------------------------------------------------
# Subprocess workers (llama-cpp-python). Each prints one tagged JSON line.

_QUANTIZE_WORKER = r"""
import ctypes, json, sys, time
import llama_cpp
jobs = json.loads(sys.argv[1])
out = []
for job in jobs:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, job["ftype"])
    p.nthread = job.get("nthread", 0)
    print("QUANT_START " + job["quant"], file=sys.stderr, flush=True)
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(p))
    out.append({"quant": job["quant"], "rc": int(rc), "seconds": time.perf_counter() - t})
    if rc != 0:
        break
print("OLLAMA_FT_RESULT " + json.dumps(out), flush=True)
"""

_CHECK_WORKER = r"""
import json, sys
import llama_cpp
path = sys.argv[1]
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_default_params()
p.check_tensors = True  # llama.cpp validates tensor data (NaN/inf, bad quant blocks)
p.n_gpu_layers = 0
m = llama_cpp.llama_model_load_from_file(path.encode(), p)
if not m:
    print("OLLAMA_FT_RESULT " + json.dumps({"loaded": False}), flush=True)
    sys.exit(2)
vocab = llama_cpp.llama_model_get_vocab(m)
res = {"loaded": True, "n_params": int(llama_cpp.llama_model_n_params(m)),
       "n_vocab": int(llama_cpp.llama_vocab_n_tokens(vocab)), "n_embd": int(llama_cpp.llama_model_n_embd(m))}
llama_cpp.llama_model_free(m)
print("OLLAMA_FT_RESULT " + json.dumps(res), flush=True)
"""

_EVAL_WORKER = r"""
import json, math, sys, time
import numpy as np
import llama_cpp
job = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
kw = {}
if job.get("lora_path"):
    kw["lora_path"] = job["lora_path"]
llm = llama_cpp.Llama(job["path"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_ubatch=job["n_ctx"],
                      logits_all=True, verbose=False, n_threads=job.get("n_threads"), seed=0, **kw)
res = {"load_s": time.perf_counter() - t0}
res["tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
nll, n, ans_nll, ans_n = 0.0, 0, 0.0, 0
first_logits = None
masks = job.get("masks")
for i, ids in enumerate(job["seqs"]):
    llm.reset()
    llm.eval(ids)
    sc = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    if not np.isfinite(sc).all():
        res["nonfinite"] = True
        break
    if first_logits is None:
        first_logits = sc[:8].tolist()
    m = sc.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(sc - m).sum(axis=1)))
    tgt = np.asarray(ids[1:])
    losses = lse[:-1] - sc[np.arange(len(ids) - 1), tgt]
    nll += float(losses.sum())
    n += len(ids) - 1
    if masks is not None:
        m = np.asarray(masks[i], dtype=bool)
        ans_nll += float(losses[m].sum())
        ans_n += int(m.sum())
res["nll"], res["n"], res["answer_nll"], res["answer_n"] = nll, n, ans_nll, ans_n
res["first_logits"] = first_logits
llm.reset()
prompt = job["prompt_ids"]
out_ids = []
for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
    if llm.token_eos() == tok or tok in job.get("stop_ids", []) or len(out_ids) >= job["n_gen"]:
        break
    out_ids.append(int(tok))
res["gen_ids"] = out_ids
res["gen_text"] = llm.detokenize(out_ids).decode("utf-8", "replace")
res["seconds"] = time.perf_counter() - t0
print("OLLAMA_FT_RESULT " + json.dumps(res), flush=True)
"""


def _run_worker(script: str, args: list[str], what: str, timeout: float = 3600,
                on_line=None) -> Any:
    """Run a llama-cpp-python worker; return its tagged JSON. A crash becomes a UserError about `what`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True, errors="replace")
    tail: list[str] = []

    def _drain_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            del tail[:-40]
            if on_line:
                on_line(line)

    import threading

    out_parts: list[str] = []

    def _drain_out() -> None:
        assert proc.stdout is not None
        out_parts.append(proc.stdout.read())

    # One reader per pipe, each in its own thread. (communicate() would also read stderr, racing the
    # drain thread: it can block in read() on an emptied stderr while the worker blocks on a full stdout.)
    t = threading.Thread(target=_drain_err, daemon=True)
    t_out = threading.Thread(target=_drain_out, daemon=True)
    t.start()
    t_out.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise UserError(f"llama.cpp took longer than {timeout:.0f} s on {what}") from None
    t_out.join(30)
    t.join(5)
    stdout = "".join(out_parts)
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if proc.returncode != 0 and result is None:
        sig = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else f" (exit code {proc.returncode})"
        crash = "illegal instruction / AMX" if proc.returncode in (-4, -11) else "crash"
        raise UserError(
            f"llama.cpp failed on {what}{sig}",
            hint=("if this is a native-code crash, reinstall llama-cpp-python as a portable build "
                  "(`make install`, see README Troubleshooting); if the file is damaged, re-run `ollama-ft export RUN --force`"),
            details=[f"{crash}? last output:"] + tail[-8:],
        )
    return result


# ------------------------------------------------------------------------------------------
# Structural verification (usable on any GGUF; registration calls it)


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Truncated(Exception):
    pass


def read_gguf_index(path: str | Path) -> dict[str, Any]:
    """Header, metadata (scalars, strings, and small arrays) and tensor index of a GGUF, in one pass.

    Much faster than gguf.GGUFReader on large vocabularies: big arrays (262k tokens) are skipped, not
    materialised. Raises _Truncated / ValueError on a damaged file.
    """
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > size:
                raise _Truncated(f"needs byte {pos + n}, file has {size}")
            b = mm[pos:pos + n]
            pos += n
            return b

        def unpack(fmt: str):
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            n = unpack("<Q")
            if n > size:
                raise ValueError(f"string length {n} larger than the file")
            return take(n).decode("utf-8", "replace")

        def value(vtype: int, keep: bool = True):
            nonlocal pos
            if vtype in _SCALAR:
                return unpack(_SCALAR[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = unpack("<I"), unpack("<Q")
                if etype in _SCALAR:
                    width = struct.calcsize(_SCALAR[etype])
                    if count * width > size:
                        raise ValueError(f"array of {count} items larger than the file")
                    if keep and count <= 64:
                        return list(struct.unpack(f"<{count}{_SCALAR[etype][1]}", take(count * width)))
                    take(count * width)
                    return {"array_of": etype, "count": count}
                if etype == 8 and not (keep and count <= 64):
                    # skip a big string array (a 262k-token vocabulary) without decoding it
                    for _ in range(count):
                        if pos + 8 > size:
                            raise _Truncated(f"needs byte {pos + 8}, file has {size}")
                        pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
                    if pos > size:
                        raise _Truncated(f"needs byte {pos}, file has {size}")
                    return {"array_of": etype, "count": count}
                items = [value(etype, keep and count <= 64) for _ in range(count)]
                return items if keep and count <= 64 else {"array_of": etype, "count": count}
            raise ValueError(f"unknown GGUF value type {vtype}")

        if take(4) != b"GGUF":
            raise ValueError("bad magic")
        version = unpack("<I")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise ValueError(f"implausible counts (tensors {n_tensors}, keys {n_kv})")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [unpack("<Q") for _ in range(unpack("<I"))]
            tensors.append((name, dims, unpack("<I"), unpack("<Q")))
        align = int(fields.get("general.alignment", 32) or 32)
        data_start = (pos + align - 1) // align * align
    return {"version": version, "fields": fields, "tensors": tensors, "data_start": data_start, "size": size}


def verify_gguf_file(path: str | Path, load: bool = True) -> dict[str, Any]:
    """Check that a GGUF file is whole and sane; raise UserError if it is truncated or corrupted.

    Reads the header, metadata and tensor index, checks that every tensor's data lies inside the file,
    that the basic keys exist (architecture, tokenizer), and (load=True) that llama.cpp loads it with
    tensor-data validation, in a subprocess. Returns a summary dict: {path, bytes, architecture, type,
    name, tensors, file_type, chat_template, lineage, tokenizer_model, tokenizer_pre, n_params?, n_vocab?}.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    hint = "the file is damaged or incomplete; re-create it (`ollama-ft export RUN --force`) or download it again"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')", hint=hint)
    try:
        idx = read_gguf_index(path)
    except (_Truncated, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: GGUF header or metadata is corrupted or truncated ({e})", hint=hint) from None
    problems: list[str] = []
    for name, dims, ttype, off in idx["tensors"]:
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            problems.append(f"tensor {name}: unknown type {ttype}")
            continue
        n = 1
        for d in dims:
            n *= d
        stop = idx["data_start"] + off + n // block * nbytes
        if stop > size:
            problems.append(f"tensor {name} ends at byte {stop} but the file has {size}")
    if not idx["tensors"]:
        problems.append("no tensors")
    fields = idx["fields"]
    arch = fields.get("general.architecture")
    gtype = fields.get("general.type") or "model"
    if not arch:
        problems.append("general.architecture missing")
    if gtype != "adapter" and fields.get("tokenizer.ggml.model") is None:
        problems.append("tokenizer.ggml.model missing")
    if gtype != "adapter" and not fields.get("tokenizer.ggml.tokens"):
        problems.append("tokenizer.ggml.tokens missing")
    if problems:
        raise UserError(f"{path}: GGUF is corrupted or truncated", hint=hint, details=problems[:10])
    info: dict[str, Any] = {
        "path": str(path), "bytes": size, "architecture": arch, "type": gtype,
        "name": fields.get("general.name"), "tensors": len(idx["tensors"]), "file_type": fields.get("general.file_type"),
        "chat_template": fields.get("tokenizer.chat_template"), "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
        "lineage": {k: v for k, v in fields.items() if k.startswith(("general.base_model.", "general.dataset.",
                                                                    "general.finetune"))},
    }
    if gtype == "adapter":
        info["adapter"] = {k: v for k, v in fields.items() if k.startswith("adapter.")}
    if load and gtype != "adapter":
        res = _run_worker(_CHECK_WORKER, [str(path)], f"loading {path.name}", timeout=1800)
        if not res or not res.get("loaded"):
            raise UserError(f"llama.cpp cannot load {path} (tensor validation failed or the file is damaged)",
                            hint=hint)
        info.update({k: res[k] for k in ("n_params", "n_vocab", "n_embd")})
    return info


# ------------------------------------------------------------------------------------------
# Quantization


def quantize(src: Path, targets: dict[str, Path]) -> dict[str, float]:
    """Quantize one F16/BF16 GGUF to several types in one llama.cpp call (subprocess).

    K-quants need rows that are multiples of 256; llama.cpp falls back per tensor (e.g. q5_0/q8_0) for
    smaller ones. Returns seconds per quant.
    """
    jobs = []
    tmp_of = {}
    for q, dst in targets.items():
        if q not in QUANT_FTYPES:
            raise UserError(f"unknown quantization {q!r}", hint=f"choose from {', '.join(QUANT_FTYPES)}")
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp_of[q] = (tmp, dst)
        jobs.append({"quant": q, "ftype": QUANT_FTYPES[q], "src": str(src), "dst": str(tmp)})
    tensor_re = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
    with ui.progress_steps() as prog:
        task = prog.add_task("quantize", total=None)
        state = {"q": ""}

        def on_line(line: str) -> None:
            if line.startswith("QUANT_START "):
                state["q"] = line.split()[1]
                prog.update(task, description=f"quantize {state['q']}", completed=0, total=None)
            m = tensor_re.match(line)
            if m:
                prog.update(task, description=f"quantize {state['q']}", completed=int(m.group(1)),
                            total=int(m.group(2)))

        try:
            res = _run_worker(_QUANTIZE_WORKER, [json.dumps(jobs)], f"quantizing {src.name}", on_line=on_line)
            seconds = {}
            for r in res or []:
                if r["rc"] != 0:
                    raise UserError(f"llama.cpp could not quantize {src.name} to {r['quant']} (code {r['rc']})")
                tmp, dst = tmp_of[r["quant"]]
                os.replace(tmp, dst)
                seconds[r["quant"]] = round(r["seconds"], 3)
            if len(seconds) != len(jobs):
                raise UserError(f"quantization of {src.name} stopped early", hint="see the log above")
        finally:
            for tmp, _ in tmp_of.values():
                if tmp.exists():
                    tmp.unlink()
    return seconds


# ------------------------------------------------------------------------------------------
# Lineage


def lineage_metadata(cfg, run) -> dict[str, Any]:
    """general.* keys for the converter's --metadata file: name, finetune, base model, datasets."""
    meta: dict[str, Any] = {"general.name": cfg.ollama_name, "general.finetune": cfg.run_name}
    base_json = Path(run.root) / "base" / "ollama_ft_base.json" if run is not None else None
    base: dict[str, Any] = {}
    if base_json is not None and base_json.is_file():
        try:
            base = json.loads(base_json.read_text())
        except json.JSONDecodeError:
            base = {}
    entry: dict[str, Any] = {"name": base.get("hf_repo") or base.get("spec") or cfg.model.base}
    if base.get("hf_repo"):
        entry["repo_url"] = f"https://huggingface.co/{base['hf_repo']}"
        entry["organization"] = base["hf_repo"].split("/")[0]
    if base.get("revision"):
        entry["version"] = str(base["revision"])
    if base.get("gguf_source"):
        entry["description"] = f"dequantized from GGUF {base['gguf_source']}"
    meta["general.base_models"] = [entry]
    if base.get("license"):
        meta["general.license"] = str(base["license"])
    ds: dict[str, Any] = {"name": Path(cfg.data.path).name}
    stats_path = Path(run.root) / "data" / "stats.json" if run is not None else None
    if stats_path is not None and stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text())
            n = stats.get("examples") or stats.get("n_examples") or stats.get("total")
            if n:
                ds["description"] = f"{n} examples"
        except json.JSONDecodeError:
            pass
    meta["general.datasets"] = [ds]
    return meta


# ------------------------------------------------------------------------------------------
# Verification against the merged HF model


def _validation(merged_dir: Path, data_dir: Path | None
                ) -> tuple[list[str], list[list[int]], list[int], list[list[int]] | None]:
    """(texts for tokenizer parity, token-id sequences for perplexity, prompt ids for generation, answer masks).

    masks[i][t] = 1 where token t+1 of seqs[i] is a trained (answer) token; None without the data stage.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    texts: list[str] = []
    prompt_ids: list[int] | None = None
    if data_dir is not None and (data_dir / "validation.jsonl").is_file():
        for line in (data_dir / "validation.jsonl").read_text(encoding="utf-8").splitlines()[:200]:
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = rec.get("messages") or []
            texts += [m.get("content", "") for m in msgs if m.get("content")]
            if tok.chat_template:
                try:
                    texts.append(tok.apply_chat_template(msgs, tokenize=False))
                    if prompt_ids is None:
                        user = [m for m in msgs if m.get("role") != "assistant"][:2] or msgs[:1]
                        prompt_ids = list(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True,
                                                                  return_dict=False))
                except Exception:  # a template that needs other roles: the plain texts still count
                    pass
    if not texts:
        texts = ["The clinic opens at eight. Please wait to be called!",
                 "Ünïcödé – ä ö ü ß é ñ 日本語 🙂  two  spaces\nnew line 12345"]
        if tok.chat_template:
            # the rendered template exercises the chat markers (special tokens) too
            try:
                texts.append(tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False,
                                                     add_generation_prompt=True))
            except Exception:
                pass
    seqs: list[list[int]] = []
    masks: list[list[int]] | None = None
    if data_dir is not None:
        for split in ("validation", "test"):
            p = data_dir / f"{split}.parquet"
            if p.is_file():
                import pyarrow.parquet as pq

                table = pq.read_table(p, columns=["input_ids", "labels"])
                pairs = [(list(r)[:PPL_MAX_TOKENS], list(lab)[:PPL_MAX_TOKENS]) for r, lab in
                         zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True)
                         if r and len(r) > 2][:PPL_MAX_SEQS]
                seqs = [ids for ids, _ in pairs]
                masks = [[int(t != -100) for t in lab[1:]] for _, lab in pairs]
                break
    if not seqs:
        seqs = [tok(t)["input_ids"][:PPL_MAX_TOKENS] for t in texts[:PPL_MAX_SEQS]]
        seqs = [s for s in seqs if len(s) > 2]
    if prompt_ids is None:
        prompt_ids = tok(texts[0])["input_ids"][:32]
    if masks is not None and not any(any(m) for m in masks):
        masks = None
    return texts, seqs, prompt_ids, masks


def hf_reference(merged_dir: Path, texts: list[str], seqs: list[list[int]],
                 masks: list[list[int]] | None = None) -> dict[str, Any]:
    """HF tokenizer ids for the texts, and the merged HF model's teacher-forced NLL on seqs (all tokens,
    and answer tokens only where masks are given)."""
    from transformers import AutoTokenizer

    from ..core.hf_loading import load_float32

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    offload_dir = Path(merged_dir).parent / f".offload-ref-{os.getpid()}"
    try:
        model, offloaded = load_float32(Path(merged_dir), offload_dir)
        return {"ids": ids, **_teacher_forced_nll(model, seqs, masks), "disk_offloaded": offloaded}
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)


def _teacher_forced_nll(model, seqs: list[list[int]], masks: list[list[int]] | None) -> dict[str, Any]:
    import torch

    nll, n, ans_nll, ans_n = 0.0, 0, 0.0, 0
    first = None
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logits = model(input_ids=torch.tensor([s])).logits[0].double()
            if first is None:
                first = logits[:8]
            lp = torch.log_softmax(logits[:-1], dim=-1)
            losses = -lp[torch.arange(len(s) - 1), torch.tensor(s[1:])]
            nll += float(losses.sum())
            n += len(s) - 1
            if masks is not None:
                m = torch.tensor(masks[i], dtype=torch.bool)
                ans_nll += float(losses[m].sum())
                ans_n += int(m.sum())
    return {"nll": nll, "n": n, "answer_nll": ans_nll, "answer_n": ans_n, "first_logits": first}


def eval_gguf(path: Path, texts: list[str], seqs: list[list[int]], prompt_ids: list[int], n_gen: int = 24,
              lora_path: Path | None = None, stop_ids: list[int] | None = None,
              masks: list[list[int]] | None = None) -> dict[str, Any]:
    """Tokenize, score and generate with llama.cpp on one GGUF (subprocess)."""
    import tempfile

    n_ctx = max([len(s) for s in seqs] + [len(prompt_ids) + n_gen + 1, 64])
    job = {"path": str(path), "texts": texts, "seqs": seqs, "masks": masks, "prompt_ids": prompt_ids, "n_gen": n_gen,
           "n_ctx": n_ctx, "lora_path": str(lora_path) if lora_path else None, "stop_ids": stop_ids or [],
           "n_threads": max(1, min(8, os.cpu_count() or 1))}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    try:
        res = _run_worker(_EVAL_WORKER, [job_path], f"evaluating {path.name}")
    finally:
        os.unlink(job_path)
    if res is None:
        raise UserError(f"llama.cpp returned no result for {path.name}")
    return res


def _ppl(nll: float, n: int) -> float:
    return math.exp(nll / max(n, 1))


def build_gguf(cfg, run, merged_dir: Path, out: Path) -> dict[str, Any]:
    """Stage `export`: convert, quantize, verify. Writes gguf/<name>-<QUANT>.gguf and gguf/verify.json."""
    merged_dir, out = Path(merged_dir), Path(out)
    ecfg = cfg.export
    name = cfg.ollama_name
    hi = ecfg.outtype.upper()  # F16 | BF16
    src = out / f"{name}-{hi}.gguf"
    timings: dict[str, float] = {}
    ui.info(f"export: {merged_dir} -> {src.name} with llama.cpp's converter")
    conv = _convert_with_lineage(cfg, run, merged_dir, src)
    timings["convert_s"] = conv["seconds"]
    files = {hi: src}
    to_quantize = {q: out / f"{name}-{q}.gguf" for q in dict.fromkeys(ecfg.quants) if q != hi}
    if to_quantize:
        t = time.perf_counter()
        qsec = quantize(src, to_quantize)
        timings["quantize_s"] = round(time.perf_counter() - t, 3)
        timings.update({f"quantize_{q}_s": s for q, s in qsec.items()})
        files.update(to_quantize)

    template_path = merged_dir / "chat_template.jinja"
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
    data_dir = Path(run.root) / "data" if run is not None and (Path(run.root) / "data").is_dir() else None
    t = time.perf_counter()
    results = verify_outputs(files, merged_dir, data_dir, template, verify=ecfg.verify, base_quant=hi,
                             parity=ecfg.tokenizer_parity)
    timings["verify_s"] = round(time.perf_counter() - t, 3)

    adapter_info = None
    if ecfg.adapter_gguf:
        adapter_info = export_adapter(cfg, run, merged_dir, out, src, data_dir, verify=ecfg.verify)

    report = {"files": results, "timings": timings, "converter": {k: conv[k] for k in ("phases", "architecture", "tokenizer", "lowmem")},
              "ppl_tolerance": PPL_TOLERANCE, "adapter": adapter_info}
    atomic_write_text(out / "verify.json", json.dumps(report, indent=2) + "\n")
    _print_table(results)
    default_q = cfg.ollama.quant if cfg.ollama.quant in files else next(iter(files))
    summary = ", ".join(f"{q} {r['bytes'] / 2**20:.0f} MiB"
                        + (f" answer ppl {r['answer_ppl']:.3g}" if r.get("answer_ppl")
                           else f" ppl {r['ppl']:.3g}" if r.get("ppl") else "")
                        for q, r in results.items())
    return {
        "files": {q: p.name for q, p in files.items()},
        "default": files[default_q].name,
        "verify": {q: {k: r.get(k) for k in ("ppl", "ppl_increase", "answer_ppl", "answer_ppl_increase",
                                             "tokenizer_parity", "loaded", "generation")}
                   for q, r in results.items()},
        "reference_ppl": next(iter(results.values())).get("reference_ppl"),
        "timings": timings,
        "converter_phases": conv["phases"],
        "adapter": adapter_info,
        "summary": summary,
    }


def export_adapter(cfg, run, merged_dir: Path, out: Path, merged_gguf: Path, data_dir: Path | None,
                   verify: bool = True) -> dict[str, Any]:
    """The LoRA alone as `<name>-lora-F16.gguf`, checked against the merged model's GGUF.

    Verification converts the unmerged base to a scratch F16 GGUF, loads it with the adapter in llama.cpp
    and compares perplexity, logits and greedy output with the merged model's F16 GGUF.
    """
    import numpy as np

    from .converter import convert_lora_to_gguf, convert_to_gguf

    if run is None:
        raise UserError("adapter export needs the run's base/ and adapter/ directories")
    base_dir, adapter_dir = Path(run.root) / "base", Path(run.root) / "adapter"
    for d, stage in ((base_dir, "pull"), (adapter_dir, "train")):
        if not d.is_dir():
            raise UserError(f"adapter export needs {d}", hint=f"run `ollama-ft {stage} {run.root}` first")
    dst = out / f"{cfg.ollama_name}-lora-F16.gguf"
    info = convert_lora_to_gguf(adapter_dir, base_dir, dst, metadata={"general.name": f"{cfg.ollama_name}-lora"})
    finfo = verify_gguf_file(dst, load=False)
    if finfo["type"] != "adapter" or finfo["adapter"].get("adapter.type") != "lora":
        raise UserError(f"{dst.name}: not marked as a LoRA adapter (general.type/adapter.type)")
    info.update({"file": dst.name, "architecture": finfo["architecture"], "tensors": finfo["tensors"]})
    if not verify:
        return info
    if cfg.model.merge_base != "full":
        info["note"] = "merged into the dequantized base; base+adapter is compared against it loosely"
    scratch = out / f".base-{os.getpid()}-F16.gguf"
    try:
        convert_to_gguf(base_dir, scratch, outtype="f16", pre_tokenizer=cfg.export.pre_tokenizer)
        texts, seqs, prompt_ids, _masks = _validation(merged_dir, data_dir)
        with ui.status("export: base GGUF + adapter GGUF vs merged GGUF in llama.cpp"):
            with_lora = eval_gguf(scratch, texts[:1], seqs, prompt_ids, lora_path=dst)
            merged = eval_gguf(merged_gguf, texts[:1], seqs, prompt_ids)
    finally:
        if scratch.exists():
            scratch.unlink()
    a, b = np.asarray(with_lora["first_logits"]), np.asarray(merged["first_logits"])
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    ppl_a, ppl_b = _ppl(with_lora["nll"], with_lora["n"]), _ppl(merged["nll"], merged["n"])
    n_same = next((i for i, (x, y) in enumerate(zip(with_lora["gen_ids"], merged["gen_ids"], strict=False)) if x != y),
                  min(len(with_lora["gen_ids"]), len(merged["gen_ids"])))
    info.update({"ppl_base_plus_adapter": ppl_a, "ppl_merged": ppl_b, "ppl_ratio": ppl_a / ppl_b,
                 "logits_relative_diff": rel, "greedy_tokens_equal": n_same,
                 "greedy_tokens": len(merged["gen_ids"]), "generation": with_lora["gen_text"]})
    info["passed"] = abs(ppl_a / ppl_b - 1) <= PPL_TOLERANCE or cfg.model.merge_base != "full"
    if not info["passed"]:
        raise UserError(f"{dst.name}: base + adapter in llama.cpp disagrees with the merged model "
                        f"(perplexity {ppl_a:.4g} vs {ppl_b:.4g})",
                        hint="the adapter conversion is wrong for this architecture; use the merged GGUF")
    ui.success(f"adapter GGUF: base+adapter perplexity {ppl_a:.4g} vs merged {ppl_b:.4g}; greedy output equal for "
               f"{n_same}/{len(merged['gen_ids'])} tokens")
    return info


def _convert_with_lineage(cfg, run, merged_dir: Path, dst: Path) -> dict[str, Any]:
    from .converter import convert_to_gguf

    return convert_to_gguf(merged_dir, dst, outtype=cfg.export.outtype, metadata=lineage_metadata(cfg, run),
                           pre_tokenizer=cfg.export.pre_tokenizer)


def verify_outputs(files: dict[str, Path], merged_dir: Path, data_dir: Path | None, template: str | None,
                   verify: bool = True, base_quant: str = "F16", parity: str = "error") -> dict[str, dict[str, Any]]:
    """Verify every GGUF; raise UserError on a structural problem, tokenizer mismatch or F16 ppl drift."""
    results: dict[str, dict[str, Any]] = {}
    for q, p in files.items():
        info = verify_gguf_file(p, load=verify)
        problems = []
        if template is not None and info["chat_template"] != template:
            problems.append("tokenizer.chat_template differs from the training chat template")
        if not info["lineage"].get("general.base_model.count"):
            problems.append("lineage keys general.base_model.* missing")
        if problems:
            raise UserError(f"{p.name}: metadata check failed", details=problems,
                            hint="this is a bug in the export; please report it")
        results[q] = {"file": p.name, "bytes": info["bytes"], "architecture": info["architecture"],
                      "tensors": info["tensors"], "chat_template_ok": True if template is not None else None,
                      "loaded": bool(verify), "lineage": info["lineage"]}
    if not verify:
        return results
    texts, seqs, prompt_ids, masks = _validation(merged_dir, data_dir)
    with ui.status("export: reference perplexity with the merged HF model"):
        ref = hf_reference(merged_dir, texts, seqs, masks)
    ref_ppl = _ppl(ref["nll"], ref["n"])
    base_ppl = None
    for q, p in files.items():
        with ui.status(f"export: verifying {p.name} with llama.cpp"):
            ev = eval_gguf(p, texts, seqs, prompt_ids, masks=masks)
        if ev.get("nonfinite"):
            raise UserError(f"{p.name}: llama.cpp produced non-finite logits; the file is damaged",
                            hint="re-run `ollama-ft export RUN --force`")
        mismatches = [i for i, (a, b) in enumerate(zip(ref["ids"], ev["tokens"], strict=True)) if list(a) != list(b)]
        ppl = _ppl(ev["nll"], ev["n"])
        r = results[q]
        r.update({"tokenizer_parity": not mismatches, "texts_checked": len(texts),
                  "tokens_scored": ev["n"], "ppl": ppl, "reference_ppl": ref_ppl,
                  "ppl_vs_reference": ppl / ref_ppl - 1, "generation": ev["gen_text"], "load_s": ev["load_s"],
                  "reference_disk_offloaded": ref["disk_offloaded"]})
        if masks is not None and ev.get("answer_n"):
            # answer tokens only: what the fine-tune changed, so what a quantization can undo
            r.update({"answer_ppl": _ppl(ev["answer_nll"], ev["answer_n"]), "answer_tokens": ev["answer_n"],
                      "reference_answer_ppl": _ppl(ref["answer_nll"], ref["answer_n"])})
        if mismatches:
            i = mismatches[0]
            err = UserError(
                f"{p.name}: llama.cpp tokenizes {len(mismatches)} of {len(texts)} validation texts differently "
                "from the HF tokenizer",
                hint="the served model would see other tokens than in training; use a base whose tokenizer llama.cpp "
                     "knows, update the converter package, or correct export.pre_tokenizer if you set it "
                     "(export.tokenizer_parity=warn accepts the difference)",
                details=[f"text: {texts[i][:80]!r}", f"HF:        {list(ref['ids'][i])[:24]}",
                         f"llama.cpp: {ev['tokens'][i][:24]}"])
            r["tokenizer_mismatches"] = len(mismatches)
            r["tokenizer_first_mismatch"] = err.details
            if parity == "error":
                raise err
            ui.warn(f"{err.message} (export.tokenizer_parity=warn)")
        if q == base_quant:
            base_ppl = ppl
            if abs(ppl / ref_ppl - 1) > PPL_TOLERANCE:
                raise UserError(
                    f"{p.name}: perplexity {ppl:.4g} differs from the merged HF model's {ref_ppl:.4g} by "
                    f"{100 * (ppl / ref_ppl - 1):+.2f}% (allowed ±{100 * PPL_TOLERANCE:g}%)",
                    hint="the conversion changed the model; check the converter version and the model architecture")
    base_answer = results.get(base_quant, {}).get("answer_ppl")
    for q, r in results.items():
        if base_ppl and r.get("ppl"):
            r["ppl_increase"] = r["ppl"] / base_ppl - 1
        if base_answer and r.get("answer_ppl"):
            r["answer_ppl_increase"] = r["answer_ppl"] / base_answer - 1
            if r["answer_ppl_increase"] > QUANT_LOSS_WARN:
                ui.warn(f"{q}: answer perplexity {r['answer_ppl']:.3g} vs {base_answer:.3g} at {base_quant} "
                        f"({100 * r['answer_ppl_increase']:+.0f}%): this quantization undoes much of the fine-tune; "
                        "register a larger one (ollama.quant: Q8_0 or Q6_K)")
    return results


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = []
    answer = any(r.get("answer_ppl") for r in results.values())
    for q, r in results.items():
        key = "answer_ppl" if answer else "ppl"
        inc = r.get("answer_ppl_increase" if answer else "ppl_increase")
        rows.append([q, r["file"], f"{r['bytes'] / 2**20:.1f} MiB", r["tensors"],
                     "yes" if r.get("loaded") else "not checked",
                     {True: "equal", False: "DIFFERS", None: "-"}[r.get("tokenizer_parity")],
                     f"{r['ppl']:.4g}" if r.get("ppl") else "-",
                     f"{r[key]:.4g}" + (f" ({100 * inc:+.1f}%)" if inc is not None else "") if r.get(key) else "-",
                     (r.get("generation") or "-")[:40].replace("\n", " ")])
    ui.table("GGUF verification", ["quant", "file", "size", "tensors", "llama.cpp loads", "tokens vs HF",
                                   "perplexity (all tokens)", "answer ppl (vs F16)" if answer else "ppl (vs F16)",
                                   "greedy sample"], rows, console=ui.err)
