"""The `data` stage: `build_data` writes runs/<run>/data/ (see docs/ARCHITECTURE.md).

read (formats.py, readers.py) -> drop duplicates, exact and near (dedupe.py) -> split (split.py:
content hash or time) -> balanced sampling (balance.py) -> render with the base model's chat
template and mask (render.py) -> tokenize -> answer-perplexity outliers (quality.py) -> replay
mix (replay.py) -> write splits, tokens, masks (writer.py) and stats.json (summary.py).

Streaming by default; the options that need every record at once (`split: time`, balanced
sampling, perplexity outliers) hold the records (or their tokens) in memory.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError
from . import balance, quality, replay
from .dedupe import Deduper
from .formats import Problem, Record, Report, iter_records
from .render import ChatRenderer, _rendered_batches, load_tokenizer, resolve_chat_template
from .split import assign_split, time_splits
from .summary import build_stats, print_stats, summary_line
from .writer import IGNORE, SplitWriter, token_labels

SPLITS = ("train", "validation", "test")
_BATCH = 2048


# ------------------------------------------------------------------------------------------
# Paths and templates


def resolve_data_path(path: str | Path, key: str = "data.path") -> Path:
    """`path` as given (CWD-relative or absolute); else relative to the installed package's parent,
    so the default `ollama_ft/data_files/clinic_sample.jsonl` works from any directory."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute():
        pkg_root = Path(__file__).resolve().parents[2]
        if (pkg_root / p).exists():
            return pkg_root / p
    raise UserError(f"{key}: data not found: {path}", hint=f"set {key} to a file or directory (jsonl, json, csv, "
                    f"parquet, txt), e.g. --set {key}=my_data.jsonl")


def data_files_digest(cfg) -> dict[str, str]:
    """sha256 of every data file the stage would read, replay data included (part of the `data` stage fingerprint, so an
    edited data file re-runs the stage)."""
    from ..core.runs import sha256_file
    from .formats import list_files

    src = resolve_data_path(cfg.data.path)
    out = {(p.relative_to(src).as_posix() if src.is_dir() else p.name): sha256_file(p)
           for p in list_files(src, Report())}
    if cfg.data.replay is not None and cfg.data.replay.ratio > 0:
        rsrc = resolve_data_path(cfg.data.replay.path, "data.replay.path")
        out.update({f"replay/{p.relative_to(rsrc).as_posix() if rsrc.is_dir() else p.name}": sha256_file(p)
                    for p in list_files(rsrc, Report())})
    return out


class _Encoder:
    """Renders, masks and tokenizes (record, split) pairs, handing each example to a sink."""

    def __init__(self, cfg, base_dir: Path, report: Report):
        self.d = cfg.data
        self.report = report
        self.tok = load_tokenizer(base_dir)
        self.template, self.template_source = resolve_chat_template(cfg, base_dir, self.tok)
        self.special = {k: v for k, v in (self.tok.special_tokens_map or {}).items() if isinstance(v, str)}
        self.renderer = ChatRenderer(self.template, self.special)
        self.backend = self.tok.backend_tokenizer
        # The HF wrapper sets these per call; on the raw backend they must be off for full offsets.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.add_special = not self.renderer.template_has_bos
        self.truncated = 0

    def encode(self, pairs, sink, label: str) -> None:
        def batches():
            batch = []
            for p in pairs:
                batch.append(p)
                if len(batch) >= _BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch

        with ui.progress_steps() as prog:
            task = prog.add_task(label, total=None)
            for batch, results in _rendered_batches(batches(), self.template, self.special, self.d.train_on_prompt):
                self._tokenize(batch, results, sink)
                prog.advance(task, len(batch))

    def _tokenize(self, batch, results, sink) -> None:
        d, report = self.d, self.report
        texts, spans, kept = [], [], []
        for (rec, split, _), res in zip(batch, results, strict=True):
            if res[0] is None:
                report.add(Problem(rec.source, "", None, res[2], res[1]))
                report.drop(res[1])
                continue
            texts.append(res[0])
            spans.append(res[1])
            kept.append((rec, split))
        encs = self.backend.encode_batch(texts, add_special_tokens=self.add_special) if texts else []
        for (rec, split), enc, sp in zip(kept, encs, spans, strict=True):
            ids = enc.ids
            labels, trained = token_labels(ids, enc.offsets, sp)
            if len(ids) > d.max_length:
                if d.overlong == "drop":
                    report.drop("overlong")
                    continue
                ids, labels = ids[: d.max_length], labels[: d.max_length]
                trained = sum(1 for x in labels if x != IGNORE)
                self.truncated += 1
            if trained == 0:
                report.drop("no_trained_tokens_after_truncation" if len(enc.ids) > d.max_length
                            else "no_trained_tokens")
                continue
            sink(rec, split, ids, labels, trained)


def _with_system(d, rec: Record) -> Record:
    if d.system_prompt and rec.messages[0]["role"] != "system" and not (
            len(rec.messages) == 1 and rec.messages[0]["role"] == "assistant"):
        rec.messages = [{"role": "system", "content": d.system_prompt}, *rec.messages]
    return rec


def _domain_pairs(d, src: Path, report: Report, dedupe: Deduper, info: dict):
    """(record, split, normalised digest) for every kept domain record."""
    unique = ((_with_system(d, rec), norm) for rec, exact, norm in iter_records(src, d.format, report)
              if dedupe.check(rec, exact, norm) is None)
    if d.split == "time":
        pairs = _time_split(list(unique), tuple(d.time_fractions), report)
    else:
        pairs = ((rec, rec.split or assign_split(norm, d.seed, tuple(d.split)), norm) for rec, norm in unique)
    if d.balance.sampling == "downsample":
        pairs, info["balance_dropped"] = balance.downsample(list(pairs), d.balance.tolerance, d.seed)
        if info["balance_dropped"]:
            report.drop("balance_downsample", info["balance_dropped"])
    for rec, split, norm in pairs:
        if rec.split:
            info["pinned"][rec.split] += 1
        yield rec, split, norm


def _time_split(recs: list[tuple[Record, bytes]], fractions, report: Report) -> list[tuple]:
    timed = [(r, n) for r, n in recs if r.timestamp is not None and not r.split]
    if not timed:
        raise UserError("data.split is 'time' but no record has a timestamp",
                        hint="give each record a 'timestamp' (ISO 8601, e.g. 2024-05-01T09:30:00Z, or epoch "
                        "seconds), or use data.split: [0.8, 0.1, 0.1]")
    for r, _ in recs:
        if r.timestamp is None and not r.split:
            report.add(Problem(r.source, "", "timestamp", "no timestamp (data.split is 'time'); record skipped",
                               "no_timestamp"))
            report.drop("no_timestamp")
    splits = time_splits([r.timestamp for r, _ in timed], [n for _, n in timed], fractions)
    pinned = [(r, r.split, n) for r, n in recs if r.split]
    return [(r, s, n) for (r, n), s in zip(timed, splits, strict=True)] + pinned


def _score_and_filter(cfg, base_dir: Path, held: list[tuple], out: Path) -> tuple[list[tuple], dict[str, Any]]:
    """Perplexity outliers: score every held example, flag them, drop them from train/validation
    when asked (test examples are what gets measured: they are flagged, never dropped)."""
    q = cfg.data.quality.perplexity_outliers
    nll, how = quality.score(base_dir, [(e[2], e[3]) for e in held], cfg.model.compute_dtype, q.batch_size)
    z, flag, centre = quality.outliers(nll, q.threshold, q.side)
    from ..core.runs import atomic_write_text

    rows, kept, flagged, dropped = [], [], [], 0
    for e, x, zz, f in zip(held, nll, z, flag, strict=True):
        rows.append({"id": e[0].id, "split": e[1], "source": e[0].source, "ppl": round(math.exp(x), 3)
                     if math.isfinite(x) else None, "z": round(zz, 2), "outlier": f})
        if f:
            flagged.append(rows[-1])
        if f and q.action == "drop" and e[1] != "test":
            dropped += 1
            continue
        kept.append(e)
    atomic_write_text(out / "quality.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    flagged.sort(key=lambda r: -abs(r["z"]))
    info = {**how, **centre, "threshold": q.threshold, "side": q.side, "action": q.action,
            "examples": len(held), "flagged": len(flagged), "dropped": dropped, "first": flagged[:50]}
    return kept, info


def _add_replay(cfg, enc: _Encoder, writers: dict, seen_exact: set[bytes]) -> dict[str, Any]:
    r, d = cfg.data.replay, cfg.data
    fractions = tuple(d.time_fractions if d.split == "time" else d.split)
    path = resolve_data_path(r.path, "data.replay.path")
    pool, info = replay.pool(path, r.format, d.seed, fractions, seen_exact)
    pool = [(_with_system(d, rec), s, n) for rec, s, n in pool]
    encoded: list[tuple] = []
    enc.encode(pool, lambda rec, split, ids, labels, trained: encoded.append((rec, ids, labels, trained)),
               f"data: replay {path.name}")
    n = replay.wanted(r.ratio, writers["train"].n)
    chosen, repeats = replay.cycle(encoded, n)
    seen: dict[str, int] = {}
    for rec, ids, labels, trained in chosen:
        k = seen[rec.id] = seen.get(rec.id, 0) + 1
        writers["train"].add(rec if k == 1 else Record(f"{rec.id}#{k}", rec.messages, "train", rec.source),
                             ids, labels, trained)
    domain = writers["train"].n - len(chosen)
    return {**info, "ratio": r.ratio, "requested": n, "used": len(chosen), "repeated": repeats,
            "usable": len(encoded), "share": round(len(chosen) / max(writers["train"].n, 1), 4),
            "domain_train": domain}


def build_data(cfg, base_dir: Path, out: Path) -> dict[str, Any]:
    """The `data` stage: write splits, tokens, masks, stats and the template into `out`."""
    d = cfg.data
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_data_path(d.path)
    report = Report()
    enc = _Encoder(cfg, base_dir, report)
    dedupe = Deduper(d.quality.near_duplicates)
    info: dict[str, Any] = {"pinned": Counter(), "balance_dropped": 0}
    q = d.quality.perplexity_outliers
    writers = {s: SplitWriter(out, s) for s in SPLITS}
    try:
        held: list[tuple] = []
        sink = (lambda *e: held.append(e)) if q else (lambda rec, split, *rest: writers[split].add(rec, *rest))
        enc.encode(_domain_pairs(d, src, report, dedupe, info), sink, f"data: {src.name}")
        if q:
            held, info["quality"] = _score_and_filter(cfg, base_dir, held, out)
            if info["quality"]["dropped"]:
                report.drop("perplexity_outlier", info["quality"]["dropped"])
            for rec, split, *rest in held:
                writers[split].add(rec, *rest)
        if d.replay is not None and d.replay.ratio > 0 and writers["train"].n:
            info["replay"] = _add_replay(cfg, enc, writers, dedupe._exact)
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
    (out / "chat_template.jinja").write_text(enc.template, encoding="utf-8")
    stats = build_stats(cfg, src, report, writers, dedupe, enc, info)
    from ..core.runs import atomic_write_text

    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    print_stats(stats, report)
    return {"counts": counts, "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
            "dropped": stats["dropped"], "duplicates": stats["duplicates"], "truncated": enc.truncated,
            "source": str(src), "chat_template_source": enc.template_source, "summary": summary_line(stats)}
