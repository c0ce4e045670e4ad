"""stats.json of the data stage, its printed tables, and the findings `data inspect` shows again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from ..core import ui
from . import balance
from .formats import Report
from .writer import percentiles

SPLITS = ("train", "validation", "test")


def iso_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_stats(cfg, src: Path, report: Report, writers: dict, dedupe, enc, info: dict) -> dict[str, Any]:
    d = cfg.data
    tokens = sum(w.tokens for w in writers.values())
    trained = sum(w.trained for w in writers.values())
    dropped = dict(sorted(report.dropped.items()))
    dups = dedupe.summary()
    for k in ("exact", "whitespace"):
        if dups[k]:
            dropped[f"duplicate_{k}"] = dups[k]
    if "near" in dups and dups["near"]["found"] and dups["near"]["action"] == "drop":
        dropped["duplicate_near"] = dups["near"]["found"]
    splits = {}
    for s, w in writers.items():
        splits[s] = {"examples": w.n, "tokens": w.tokens, "trained_tokens": w.trained, "length": percentiles(w.lengths)}
        if w.replay:
            splits[s]["replay_examples"] = w.replay
        if d.split == "time" and w.times:
            splits[s]["time_range"] = [iso_time(min(w.times)), iso_time(max(w.times))]
    stats: dict[str, Any] = {
        "source": str(src), "files": report.files, "formats": dict(report.formats),
        "records_read": report.rows, "records_valid": report.records,
        "counts": {s: w.n for s, w in writers.items()},
        "pinned_by_split_field": dict(info["pinned"]),
        "split_method": "time" if d.split == "time" else "hash",
        "duplicates": dups, "dropped": dropped, "truncated": enc.truncated,
        "problems": {"errors": report.errors, "warnings": report.warnings,
                     "first": [str(p) for p in report.problems[:50]]},
        "tokens": tokens, "trained_tokens": trained,
        "masked_fraction": round(1 - trained / tokens, 4) if tokens else 0.0,
        "length": percentiles([n for w in writers.values() for n in w.lengths]),
        "splits": splits, "max_length": d.max_length, "overlong": d.overlong, "train_on_prompt": d.train_on_prompt,
        "chat_template_source": enc.template_source, "add_special_tokens": enc.add_special,
        "tokenizer": type(enc.tok).__name__,
    }
    train_cats = writers["train"].categories
    if any(k != balance.NONE for k in train_cats):
        stats["categories"] = {s: dict(sorted(w.categories.items())) for s, w in writers.items()}
        stats["balance"] = {**balance.report(train_cats, d.balance.tolerance), "sampling": d.balance.sampling,
                            "dropped_by_sampling": info["balance_dropped"]}
    for k in ("quality", "replay"):
        if k in info:
            stats[k] = info[k]
    return stats


def summary_line(stats: dict) -> str:
    c, tokens, trained = stats["counts"], stats["tokens"], stats["trained_tokens"]
    out = (f"{c['train']} train / {c['validation']} validation / {c['test']} test examples, "
           f"{tokens} tokens ({100 * trained / max(tokens, 1):.0f}% trained)")
    if "replay" in stats:
        out += f", {stats['replay']['used']} of them replay ({stats['replay']['share']:.0%})"
    if stats["dropped"]:
        out += (f", dropped {sum(stats['dropped'].values())} ("
                + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) + ")")
    if stats["truncated"]:
        out += f", truncated {stats['truncated']}"
    return out


def print_stats(stats: dict, report: Report) -> None:
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
    print_findings(stats)
    if report.errors:
        ui.warn(f"{report.errors} problem(s) in the data; the affected records were dropped and counted above. "
                f"First ones:")
        for p in report.problems[:5]:
            ui.info(f"  {p}")
        ui.info(f"  run `ollama-ft data validate {stats['source']}` to list them all")


def print_findings(stats: dict, show: int = 5) -> None:
    """Near-duplicates, perplexity outliers, category balance, time split and replay mix."""
    near = stats.get("duplicates", {}).get("near")
    if near:
        ui.info(f"near-duplicates (MinHash, Jaccard >= {near['threshold']}): {near['found']} "
                f"{'dropped' if near['action'] == 'drop' else 'flagged'}")
        for f in near["first"][:show]:
            ui.info(f"  {f['source']} ~ {f['similar_to']} (similarity {f['similarity']})")
    q = stats.get("quality")
    if q:
        mem = f", ~{q['memory_bytes'] / 2**30:.1f} GiB" if q.get("memory_bytes") else ""
        ui.info(f"answer perplexity under the base ({q['dtype']} on {q['device']}{mem}, {q['scored']} scored, "
                f"{q['cached']} cached): "
                f"median {q['median_ppl']}; {q['flagged']} outlier(s) beyond z={q['threshold']} ({q['side']}), "
                f"{q['dropped']} dropped")
        for f in q["first"][:show]:
            ui.info(f"  {f['source']} ({f['split']}): perplexity {f['ppl']}, z {f['z']:+.1f}")
    b = stats.get("balance")
    if b and b.get("categories"):
        rows = [[k, v["count"], f"{v['ratio']:.2f}", "" if abs(v["ratio"] - 1) <= b["tolerance"] else "out of range"]
                for k, v in b["categories"].items()]
        ui.table(f"categories (train): {'balanced' if b['balanced'] else 'NOT balanced'} within "
                 f"1:{1 - b['tolerance']:.1f}-{1 + b['tolerance']:.1f} of the mean"
                 + (f"; downsampling dropped {b['dropped_by_sampling']}" if b["dropped_by_sampling"] else ""),
                 ["category", "examples", "ratio to mean", ""], rows)
    if stats.get("split_method") == "time":
        ranges = {s: v.get("time_range") for s, v in stats["splits"].items() if v.get("time_range")}
        ui.info("time split: " + "; ".join(f"{s} {a} .. {z}" for s, (a, z) in ranges.items()))
    r = stats.get("replay")
    if r:
        ui.info(f"replay: {r['used']} general examples from {Path(r['path']).name} = {r['share']:.1%} of train "
                f"(asked {r['ratio']:.0%}; pool {r['usable']}" + (f", {r['repeated']} repeated" if r["repeated"] else "")
                + ")")
