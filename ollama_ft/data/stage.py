"""The `data` stage and the `ollama-ft data validate|inspect` commands.

build_data: read (data_formats.py) -> normalise -> drop duplicates -> split -> render with the base
model's chat template -> tokenize -> mask -> write runs/<run>/data/ (see docs/ARCHITECTURE.md).

Split: a record goes to train/validation/test by a keyed hash of its whitespace-normalised content
and `data.seed`, not by its position, so reordering the file or appending to it never moves an
existing record to another split. A record's own "split" field (train | validation | test) wins:
the bundled sample data uses it to hold paraphrased questions out for the test split.

Masking: only assistant turns are trained (labels -100 elsewhere) unless `data.train_on_prompt`.
Assistant spans are found on the rendered text, not by assuming a template's layout: the prompt
before turn i is the template rendered for messages[:i] with the generation prompt, and the turn
ends where the rendering of messages[:i+1] ends, so the end-of-turn marker (<|im_end|>,
<end_of_turn>, <|eot_id|>, </s>...) is trained and the model learns to stop. Templates that rewrite
earlier turns (dropping old <think> blocks) are handled by locating the turn's text instead.
Token labels then come from the tokenizer's character offsets, one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from .formats import FORMATS, Problem, Record, Report, iter_records

SPLITS = ("train", "validation", "test")
_BATCH = 2048
_IGNORE = -100


# ------------------------------------------------------------------------------------------
# Paths and templates


def resolve_data_path(path: str | Path) -> Path:
    """`path` as given (CWD-relative or absolute); else relative to the installed package's parent,
    so the default `ollama_ft/data_files/clinic_sample.jsonl` works from any directory."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute():
        pkg_root = Path(__file__).resolve().parents[2]
        if (pkg_root / p).exists():
            return pkg_root / p
    raise UserError(f"data not found: {path}", hint="set data.path to a file or directory (jsonl, json, csv, "
                    "parquet, txt), e.g. --set data.path=my_data.jsonl")


def data_files_digest(cfg) -> dict[str, str]:
    """sha256 of every data file the stage would read (part of the `data` stage fingerprint, so an
    edited data file re-runs the stage)."""
    from ..core.runs import sha256_file
    from .formats import list_files

    src = resolve_data_path(cfg.data.path)
    return {(p.relative_to(src).as_posix() if src.is_dir() else p.name): sha256_file(p)
            for p in list_files(src, Report())}


def _base_family(base_dir: Path) -> str | None:
    meta = Path(base_dir) / "ollama_ft_base.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("family")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def resolve_chat_template(cfg, base_dir: Path, tok) -> tuple[str, str]:
    """(template, where it came from): the base's own template, else the chat family's."""
    f = Path(base_dir) / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8"), f"{f.name} of the base model"
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    if isinstance(t, str) and t.strip():
        return t, "the tokenizer's chat_template"
    family = cfg.model.chat_template or _base_family(base_dir)
    if not family:
        raise UserError(f"the base model in {base_dir} has no chat template and no chat family is known",
                        hint="set model.chat_template to a chat family, e.g. --set model.chat_template=chatml")
    try:
        from ..ollama.templates import family_jinja
    except ImportError:
        raise UserError(f"the base model has no chat template, and chat family fallbacks ('{family}') are not "
                        "available in this version", hint="use a base model that ships a chat template") from None
    try:
        return family_jinja(family), f"the '{family}' chat family (the base has no template)"
    except KeyError:
        raise UserError(f"unknown chat family '{family}'", hint="see `ollama-ft pull --help` for families") from None


def _compile(template: str):
    try:  # the exact environment transformers renders chat templates with
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)


class SpanError(Exception):
    """The assistant turn could not be located in the rendered conversation."""


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Renders conversations with a chat template and finds the character spans to train on."""

    def __init__(self, template: str, special_tokens: dict[str, str]):
        self.template = template
        self._tpl = _compile(template)
        self._kw = {k: v for k, v in special_tokens.items() if isinstance(v, str)}
        self.bos = self._kw.get("bos_token", "")
        self.eos = self._kw.get("eos_token", "")
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text = self.render(probe)
        except Exception:  # a template that refuses the probe still decides below
            text = ""
        # A template that writes the BOS text itself must not get a second BOS from the tokenizer.
        self.template_has_bos = bool(self.bos) and text.startswith(self.bos)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self._tpl.render(messages=messages, add_generation_prompt=generation_prompt, **self._kw)

    def spans(self, messages: list[dict[str, str]], train_on_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end)]) with the character spans whose tokens are trained."""
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            # Plain text: no template; BOS as the template would have it, EOS to learn to stop.
            prefix = self.bos if self.template_has_bos else ""
            text = prefix + messages[0]["content"] + self.eos
            return text, [(len(prefix), len(text))]
        full = self.render(messages)
        if train_on_prompt:
            return full, [(0, len(full))]
        spans: list[tuple[int, int]] = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True)
            if full.startswith(prompt):
                start = len(prompt)
            else:
                start = self._locate_start(full, spans[-1][1] if spans else 0, prompt, messages[i - 1]["content"])
            upto = full if i == last else self.render(messages[: i + 1])
            end = len(upto) if full.startswith(upto) else self._locate_end(full, start, upto, m["content"])
            # Whitespace after the end-of-turn marker is layout, not something to learn.
            while end > start and full[end - 1] in " \t\r\n":
                end -= 1
            content = m["content"].strip()
            if i == last and content and full[start:end].endswith(content) and full[end:].strip() == "":
                # The template ends the last turn with nothing: add EOS so the model learns to stop.
                full = full[:end] + self.eos
                end = len(full)
            if end <= start:
                raise SpanError(f"assistant turn {i} renders to nothing")
            spans.append((start, end))
        return full, spans

    @staticmethod
    def _locate_start(full: str, search_from: int, prompt: str, before: str) -> int:
        # The prompt rendered for messages[:i] is not a prefix of the whole conversation (the
        # template moves the system prompt, or its generation prompt differs from how a finished
        # turn starts): find the message before the turn in `full`, then the prompt's tail after it.
        key = before.strip()[-48:]
        q = prompt.rfind(key) if key else -1
        pos = full.find(key, search_from) if q >= 0 else -1
        if pos < 0:
            return _common_prefix(prompt, full)
        tail = prompt[q + len(key):]
        exact = full.find(key + tail, search_from)
        if exact >= 0:
            return exact + len(key) + len(tail)
        pos += len(key)
        return pos + _common_prefix(tail, full[pos:])

    @staticmethod
    def _locate_end(full: str, start: int, upto: str, content: str) -> int:
        # The template rendered this turn differently once later turns followed (e.g. it drops
        # <think> blocks of earlier turns): find the visible end of the content and the marker after it.
        visible = content.split("</think>")[-1].strip()
        tail = visible[-48:]
        pos = full.find(tail, start) if tail else -1
        if pos < 0:
            raise SpanError("assistant turn not found in the rendered conversation")
        end = pos + len(tail)
        q = upto.rfind(tail)
        if q >= 0:
            end += _common_prefix(upto[q + len(tail):], full[end:])
        return end


# Rendering is pure Python (jinja); with more than one batch it runs in worker processes while the
# main process reads, tokenizes (Rust, multi-threaded) and writes.
_RENDERER: dict[str, Any] = {}


def _init_worker(template: str, special_tokens: dict[str, str], train_on_prompt: bool) -> None:
    _RENDERER["r"] = ChatRenderer(template, special_tokens)
    _RENDERER["train_on_prompt"] = train_on_prompt


def _render_batch(conversations: list[list[dict[str, str]]]) -> list[tuple]:
    """(text, spans) per conversation, or (None, kind, message) when it cannot be rendered."""
    r: ChatRenderer = _RENDERER["r"]
    top = _RENDERER["train_on_prompt"]
    out: list[tuple] = []
    for msgs in conversations:
        try:
            out.append(r.spans(msgs, top))
        except SpanError as e:
            out.append((None, "assistant_not_located", f"{e}; record skipped"))
        except Exception as e:  # jinja TemplateError / raise_exception() in the template
            out.append((None, "template_error", f"the chat template refused this conversation: {e}"))
    return out


def _rendered_batches(batches, template: str, special_tokens: dict[str, str], train_on_prompt: bool):
    """Yield (batch, render results) in order. A single batch renders in-process; more start a
    small process pool (fork) so rendering overlaps with tokenizing and writing."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    _init_worker(template, special_tokens, train_on_prompt)
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    workers = min(2, os.cpu_count() or 1)
    if second is None or workers < 2 or not sys.platform.startswith("linux"):
        for b in (first, second, *it):
            if b is not None:
                yield b, _render_batch([r.messages for r, _ in b])
        return
    # Started before the first tokenization, so forked children never inherit a busy Rust pool.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                             initargs=(template, special_tokens, train_on_prompt)) as ex:
        pending: deque = deque()
        for b in (first, second, *it):
            pending.append((b, ex.submit(_render_batch, [r.messages for r, _ in b])))
            if len(pending) > workers + 1:
                b0, fut = pending.popleft()
                yield b0, fut.result()
        while pending:
            b0, fut = pending.popleft()
            yield b0, fut.result()


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as e:  # missing/corrupt tokenizer files are a broken base, reported plainly
        raise UserError(f"cannot load the tokenizer of the base model in {base_dir}: {e}",
                        hint="re-run `ollama-ft pull` for this run (or --force pull)") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer in {base_dir} has no fast (Rust) version; ollama-ft needs one for "
                        "character offsets", hint="save the tokenizer with `tokenizer.json` (transformers does "
                        "this when converting)")
    return tok


# ------------------------------------------------------------------------------------------
# Split, tokenize, write


def assign_split(norm_digest: bytes, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from content + seed: independent of position, stable when appending."""
    h = hashlib.blake2b(norm_digest, digest_size=8, key=str(seed).encode()[:64]).digest()
    u = int.from_bytes(h, "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _start(o: tuple[int, int]) -> int:
    return o[0]


def _end(o: tuple[int, int]) -> int:
    return o[1]


def token_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Labels (ids on tokens overlapping a span, -100 elsewhere) and the count of trained tokens."""
    labels = [_IGNORE] * len(ids)
    trained = 0
    for a, b in spans:
        # Offsets are non-decreasing, so two binary searches find the tokens overlapping [a, b).
        i = bisect_right(offsets, a, key=_end)  # first token ending after a
        j = bisect_left(offsets, b, key=_start)  # first token starting at or after b
        if j > i:
            labels[i:j] = ids[i:j]
            trained += j - i
    return labels, trained


class _SplitWriter:
    """Streams one split to {split}.jsonl and {split}.parquet (temp names, renamed on close)."""

    def __init__(self, out: Path, split: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.out, self.split = out, split
        self.schema = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                 ("labels", pa.list_(pa.int32()))])
        self._jsonl_tmp = out / f".{split}.jsonl.tmp"
        self._pq_tmp = out / f".{split}.parquet.tmp"
        self._f = open(self._jsonl_tmp, "w", encoding="utf-8")
        self._pq = pq.ParquetWriter(self._pq_tmp, self.schema)
        self._buf: tuple[list, list, list] = ([], [], [])
        self.n = self.tokens = self.trained = 0
        self.lengths: list[int] = []

    def add(self, rec: Record, ids: list[int], labels: list[int], trained: int) -> None:
        self._f.write(json.dumps(rec.as_json(), ensure_ascii=False) + "\n")
        self._buf[0].append(rec.id)
        self._buf[1].append(ids)
        self._buf[2].append(labels)
        self.n += 1
        self.tokens += len(ids)
        self.trained += trained
        self.lengths.append(len(ids))
        if len(self._buf[0]) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._buf[0]:
            return
        pa = self.pa
        t = pa.Table.from_arrays([pa.array(self._buf[0], pa.string()),
                                  pa.array(self._buf[1], pa.list_(pa.int32())),
                                  pa.array(self._buf[2], pa.list_(pa.int32()))], schema=self.schema)
        self._pq.write_table(t)
        self._buf = ([], [], [])

    def close(self) -> None:
        self._flush()
        self._pq.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._jsonl_tmp, self.out / f"{self.split}.jsonl")
        os.replace(self._pq_tmp, self.out / f"{self.split}.parquet")

    def abort(self) -> None:
        for closer in (self._pq.close, self._f.close):
            try:
                closer()
            except Exception:
                pass
        for p in (self._jsonl_tmp, self._pq_tmp):
            p.unlink(missing_ok=True)


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    import numpy as np

    a = np.asarray(values)
    return {"p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max())}


def build_data(cfg, base_dir: Path, out: Path) -> dict[str, Any]:
    """The `data` stage: write splits, tokens, masks, stats and the template into `out`."""
    d = cfg.data
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_data_path(d.path)
    tok = load_tokenizer(base_dir)
    template, template_source = resolve_chat_template(cfg, base_dir, tok)
    special = {k: v for k, v in (tok.special_tokens_map or {}).items() if isinstance(v, str)}
    renderer = ChatRenderer(template, special)
    backend = tok.backend_tokenizer
    # The HF wrapper sets these per call; on the raw backend they must be off for full offsets.
    backend.no_truncation()
    backend.no_padding()
    add_special = not renderer.template_has_bos

    report = Report()
    dups: Counter = Counter()
    pinned: Counter = Counter()
    truncated = 0

    def batches():
        seen_exact: set[bytes] = set()
        seen_norm: set[bytes] = set()
        system = d.system_prompt
        batch: list[tuple[Record, str]] = []
        for rec, exact, norm in iter_records(src, d.format, report):
            if exact in seen_exact:
                dups["exact"] += 1
                continue
            if norm in seen_norm:
                dups["whitespace"] += 1
                seen_exact.add(exact)
                continue
            seen_exact.add(exact)
            seen_norm.add(norm)
            if rec.split:
                pinned[rec.split] += 1
            split = rec.split or assign_split(norm, d.seed, tuple(d.split))
            if system and rec.messages[0]["role"] != "system" and not (
                    len(rec.messages) == 1 and rec.messages[0]["role"] == "assistant"):
                rec.messages = [{"role": "system", "content": system}, *rec.messages]
            batch.append((rec, split))
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def process(batch: list[tuple[Record, str]], results: list[tuple]) -> None:
        nonlocal truncated
        texts, spans, kept = [], [], []
        for (rec, split), res in zip(batch, results, strict=True):
            if res[0] is None:
                report.add(Problem(rec.source, "", None, res[2], res[1]))
                report.drop(res[1])
                continue
            texts.append(res[0])
            spans.append(res[1])
            kept.append((rec, split))
        encs = backend.encode_batch(texts, add_special_tokens=add_special) if texts else []
        for (rec, split), enc, sp in zip(kept, encs, spans, strict=True):
            ids = enc.ids
            labels, trained = token_labels(ids, enc.offsets, sp)
            if len(ids) > d.max_length:
                if d.overlong == "drop":
                    report.drop("overlong")
                    continue
                ids, labels = ids[: d.max_length], labels[: d.max_length]
                trained = sum(1 for x in labels if x != _IGNORE)
                truncated += 1
            if trained == 0:
                report.drop("no_trained_tokens_after_truncation" if len(enc.ids) > d.max_length
                            else "no_trained_tokens")
                continue
            writers[split].add(rec, ids, labels, trained)

    writers = {s: _SplitWriter(out, s) for s in SPLITS}
    try:
        with ui.progress_steps() as prog:
            task = prog.add_task(f"data: {src.name}", total=None)
            for batch, results in _rendered_batches(batches(), template, special, d.train_on_prompt):
                process(batch, results)
                prog.advance(task, len(batch))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()

    counts = {s: writers[s].n for s in SPLITS}
    if not any(counts.values()):
        raise UserError(f"no usable examples in {src} ({report.rows} rows read)",
                        details=[str(p) for p in report.problems[:10]],
                        hint=f"run `ollama-ft data validate {src}` to see every problem")
    if counts["train"] == 0:
        raise UserError(f"no training examples: all {sum(counts.values())} examples went to validation/test",
                        hint="use more data, or change data.split (e.g. --set data.split=[0.9,0.05,0.05])")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")

    tokens = sum(w.tokens for w in writers.values())
    trained = sum(w.trained for w in writers.values())
    all_lengths = [n for w in writers.values() for n in w.lengths]
    dropped = dict(sorted(report.dropped.items()))
    for k in ("exact", "whitespace"):
        if dups[k]:
            dropped[f"duplicate_{k}"] = dups[k]
    stats = {
        "source": str(src),
        "files": report.files,
        "formats": dict(report.formats),
        "records_read": report.rows,
        "records_valid": report.records,
        "counts": counts,
        "pinned_by_split_field": dict(pinned),
        "duplicates": {"exact": dups["exact"], "whitespace": dups["whitespace"]},
        "dropped": dropped,
        "truncated": truncated,
        "problems": {"errors": report.errors, "warnings": report.warnings,
                     "first": [str(p) for p in report.problems[:50]]},
        "tokens": tokens,
        "trained_tokens": trained,
        "masked_fraction": round(1 - trained / tokens, 4) if tokens else 0.0,
        "length": _percentiles(all_lengths),
        "splits": {s: {"examples": w.n, "tokens": w.tokens, "trained_tokens": w.trained,
                       "length": _percentiles(w.lengths)} for s, w in writers.items()},
        "max_length": d.max_length,
        "overlong": d.overlong,
        "train_on_prompt": d.train_on_prompt,
        "chat_template_source": template_source,
        "add_special_tokens": add_special,
        "tokenizer": type(tok).__name__,
    }
    from ..core.runs import atomic_write_text

    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    _print_stats(stats, report)
    n_drop = sum(dropped.values())
    summary = (f"{counts['train']} train / {counts['validation']} validation / {counts['test']} test examples, "
               f"{tokens} tokens ({100 * trained / max(tokens, 1):.0f}% trained)")
    if n_drop:
        summary += f", dropped {n_drop} (" + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")"
    if truncated:
        summary += f", truncated {truncated}"
    return {"counts": counts, "tokens": tokens, "trained_tokens": trained, "dropped": dropped,
            "duplicates": stats["duplicates"], "truncated": truncated, "source": str(src),
            "chat_template_source": template_source, "summary": summary}


def _print_stats(stats: dict, report: Report) -> None:
    rows = []
    for s in SPLITS:
        sp = stats["splits"][s]
        ln = sp["length"]
        rows.append([s, sp["examples"], sp["tokens"], sp["trained_tokens"], ln["p50"], ln["p90"], ln["p99"], ln["max"]])
    ui.table("data: examples and token lengths", ["split", "examples", "tokens", "trained", "p50", "p90", "p99", "max"],
             rows)
    other = [["records read", stats["records_read"]], ["valid records", stats["records_valid"]],
             ["masked (untrained) fraction", f"{stats['masked_fraction']:.1%}"],
             [f"truncated to {stats['max_length']} tokens", stats["truncated"]]]
    other += [[f"dropped: {k}", v] for k, v in stats["dropped"].items()]
    other.append(["chat template", stats["chat_template_source"]])
    ui.table(None, ["", ""], other)
    if report.errors:
        ui.warn(f"{report.errors} problem(s) in the data; the affected records were dropped and counted above. "
                f"First ones:")
        for p in report.problems[:5]:
            ui.info(f"  {p}")
        ui.info(f"  run `ollama-ft data validate {stats['source']}` to list them all")


# ------------------------------------------------------------------------------------------
# Commands


def _check_format(fmt: str) -> str:
    if fmt not in ("auto", *FORMATS):
        import difflib

        close = difflib.get_close_matches(fmt, ["auto", *FORMATS], n=1)
        raise UserError(f"unknown data format '{fmt}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                        hint=f"formats: auto, {', '.join(FORMATS)}")
    return fmt


def validate_command(path: Path | str, format: str = "auto", show: int = 20) -> Report:
    """Check every record under `path`; print the first `show` problems and the totals.

    Raises UserError (exit 1) when any record has a problem; warnings alone (a BOM, a skipped
    non-data file) do not fail.
    """
    fmt = _check_format(format)
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {path}", hint="give a file or directory (jsonl, json, csv, parquet, txt)")
    report = Report(keep=max(show, 0) + 1)
    dups: Counter = Counter()
    seen_exact: set[bytes] = set()
    seen_norm: set[bytes] = set()
    splits: Counter = Counter()
    with ui.status(f"reading {p}"):
        for rec, exact, norm in iter_records(p, fmt, report):
            if exact in seen_exact:
                dups["exact"] += 1
            elif norm in seen_norm:
                dups["whitespace"] += 1
            seen_exact.add(exact)
            seen_norm.add(norm)
            if rec.split:
                splits[rec.split] += 1
    rows = [["files", len(report.files)], ["records read", report.rows], ["valid records", report.records],
            ["format", ", ".join(f"{k} ({v})" for k, v in report.formats.items()) or "-"],
            ["duplicates (dropped by prepare)", f"{dups['exact']} exact, {dups['whitespace']} whitespace-only"],
            ["errors", report.errors], ["warnings", report.warnings]]
    rows += [[f"would drop: {k}", v] for k, v in sorted(report.dropped.items())]
    if splits:
        rows.append(["pinned by 'split' field", ", ".join(f"{k} {v}" for k, v in splits.items())])
    ui.table(f"data validate: {p}", ["", ""], rows)
    shown = report.problems[:show]
    for prob in shown:
        colour = "red" if prob.severity == "error" else "yellow"
        ui.out.print(f"[{colour}]{prob.severity}[/] ", end="")
        ui.out.print(str(prob), markup=False, highlight=False, soft_wrap=True)
    total = report.errors + report.warnings
    if total > len(shown):
        ui.out.print(f"... and {total - len(shown)} more (--show {total} lists them all)", highlight=False)
    if report.errors:
        dropped = sum(report.dropped.values())
        first = next((prob for prob in report.problems if prob.severity == "error"), None)
        at = f"; first: {first.location()}: {first.message}" if first else ""
        raise UserError(f"{p}: {report.errors} problem(s); {dropped} of {report.rows} records would be dropped{at}",
                        hint="fix the places listed above; `data prepare` skips and counts such records")
    if report.records == 0:
        raise UserError(f"{p}: no records found", hint="give a file with records (jsonl, json, csv, parquet, txt)")
    ui.success(f"{report.records} valid records" + (f", {report.warnings} warning(s)" if report.warnings else ""))
    return report


def inspect_command(run: str, n: int = 3, split: str = "train") -> None:
    """Print `n` examples of a prepared split, trained tokens highlighted."""
    import pyarrow.parquet as pq
    from rich.text import Text

    from ..core.runs import Run

    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'", hint=f"splits: {', '.join(SPLITS)}")
    r = Run.open(run)
    data_dir, base_dir = r.root / "data", r.root / "base"
    pq_path = data_dir / f"{split}.parquet"
    if not pq_path.is_file():
        raise UserError(f"{r.root} has no prepared data ({pq_path} missing)",
                        hint="run `ollama-ft data prepare CONFIG` (or `ollama-ft train CONFIG --until data`)")
    tok = load_tokenizer(base_dir)
    pf = pq.ParquetFile(pq_path)
    rows = []
    for b in pf.iter_batches(batch_size=max(n, 1)):
        rows.extend(b.to_pylist())
        if len(rows) >= n:
            break
    if not rows:
        ui.info(f"the {split} split is empty")
        return
    ui.out.print(Text.assemble(("trained tokens", "bold black on green"), "  ", ("context (not trained)", "dim")))
    for row in rows[:n]:
        ids, labels = row["input_ids"], row["labels"]
        text = Text()
        prev = ""
        # Decode growing prefixes: single-token decoding loses SentencePiece spaces and splits
        # multi-byte characters; a piece is what the next token adds to the decoded text.
        for i, lab in enumerate(labels):
            cur = tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
            k = _common_prefix(prev, cur)
            if k < len(prev):
                text.right_crop(len(prev) - k)
            text.append(cur[k:], style="bold black on green" if lab != _IGNORE else "dim")
            prev = cur
        trained = sum(1 for x in labels if x != _IGNORE)
        ui.out.rule(f"{split} · id {row['id']} · {len(ids)} tokens, {trained} trained")
        ui.out.print(text, soft_wrap=True)
