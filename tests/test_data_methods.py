"""Issue 17, data side: replay mix, near-duplicates, perplexity outliers, category balance, time split."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from ollama_ft.core.config import RunConfig, load_config
from ollama_ft.core.errors import UserError
from ollama_ft.data.commands import inspect_command, validate_command
from ollama_ft.data.stage import build_data, data_files_digest

ROOT = Path(__file__).resolve().parent.parent
GENERAL_CHAT = ROOT / "ollama_ft" / "data_files" / "general_chat.jsonl"
GENERAL_TEXT = sorted((ROOT / "ollama_ft" / "data_files").glob("general_text*.jsonl"))


def _msgs(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _write(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def _cfg(path: Path, *overrides: str) -> RunConfig:
    return load_config(None, [f"data.path={path}", *overrides]).config


def _rows(out: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / f"{split}.parquet").to_pylist()


def _domain(n: int, **extra) -> list[dict]:
    return [{"messages": _msgs(f"where is clinic room {i}", f"clinic room {i} is on floor {i % 7}"), **extra}
            for i in range(n)]


# ------------------------------------------------------------------------------------------
# Replay


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_replay_training_batches_match_the_ratio(tmp_path, tiny_llama, ratio):
    import torch

    from ollama_ft.train.data import load_split

    src = _write(tmp_path / "d.jsonl", _domain(120))
    out = tmp_path / "data"
    build_data(_cfg(src, f"data.replay.ratio={ratio}"), tiny_llama, out)  # default path: the bundled set
    stats = json.loads((out / "stats.json").read_text())
    rows = _rows(out, "train")
    replay = [r["id"].startswith("replay:") for r in rows]
    domain = len(rows) - sum(replay)
    assert sum(replay) == round(ratio / (1 - ratio) * domain) == stats["replay"]["used"]
    assert abs(sum(replay) / len(rows) - ratio) < 0.01 and stats["replay"]["share"] == round(sum(replay) / len(rows), 4)
    assert stats["splits"]["train"]["replay_examples"] == sum(replay) and stats["replay"]["repeated"] == 0
    for s in ("validation", "test"):  # held-out splits stay domain-only: domain metrics stay comparable
        assert not any(r["id"].startswith("replay:") for r in _rows(out, s))
    assert stats["replay"]["held_out"] > 0  # the replay set is split like the domain data
    # What the trainer sees: the train split as the train stage loads it, shuffled into batches of 8.
    ds = load_split(out, "train")
    assert len(ds) == len(rows)
    is_replay = {tuple(r["input_ids"]): r["id"].startswith("replay:") for r in rows}
    g = torch.Generator().manual_seed(0)
    batches = list(torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds, generator=g), 8, False))
    shares = [sum(is_replay[tuple(ds[i]["input_ids"])] for i in b) / len(b) for b in batches]
    assert abs(sum(shares) / len(shares) - ratio) < 0.03
    assert sum(1 for s in shares if s > 0) > 0.8 * len(shares)  # mixed through the epoch, not at its end


def test_replay_is_masked_like_the_domain_data(tmp_path, tiny_llama, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    src = _write(tmp_path / "d.jsonl", _domain(40))
    out = tmp_path / "data"
    build_data(_cfg(src, "data.replay.ratio=0.25"), tiny_llama, out)
    recs = {json.loads(line)["id"]: json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()}
    row = next(r for r in _rows(out, "train") if r["id"].startswith("replay:"))
    trained = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    answer = recs[row["id"]]["messages"][-1]["content"]
    question = recs[row["id"]]["messages"][0]["content"]
    assert trained.strip().startswith(answer.strip()[:20]) and question[:15] not in trained


def test_replay_pool_smaller_than_asked_is_cycled_and_counted(tmp_path, tiny_llama):
    src = _write(tmp_path / "d.jsonl", _domain(30, split="train"))
    small = _write(tmp_path / "general.jsonl", [{"messages": _msgs(f"say hi {i}", f"hi {i}"), "split": "train"}
                                                for i in range(3)])
    out = tmp_path / "data"
    build_data(_cfg(src, f"data.replay.path={small}", "data.replay.ratio=0.5"), tiny_llama, out)
    ids = [r["id"] for r in _rows(out, "train") if r["id"].startswith("replay:")]
    stats = json.loads((out / "stats.json").read_text())["replay"]
    assert len(ids) == 30 and len(set(ids)) == 30 and stats["repeated"] == 27 and stats["usable"] == 3


def test_replay_data_is_in_the_data_fingerprint(tmp_path):
    src = _write(tmp_path / "d.jsonl", _domain(3))
    general = _write(tmp_path / "g.jsonl", [{"messages": _msgs("hi", "hello")}])
    cfg = _cfg(src, f"data.replay.path={general}")
    before = data_files_digest(cfg)
    assert "replay/g.jsonl" in before and "replay/g.jsonl" not in data_files_digest(_cfg(src))
    _write(general, [{"messages": _msgs("hi", "hello there")}])
    assert data_files_digest(cfg) != before
    with pytest.raises(UserError, match="data.replay.path: data not found") as e:
        data_files_digest(_cfg(src, f"data.replay.path={tmp_path / 'missing.jsonl'}"))
    assert "--set data.replay.path=" in e.value.hint


def test_replay_config_is_validated_with_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  replay:\n    ratio: 1.5\n    pth: x.jsonl\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    text = "\n".join(e.value.details)
    assert f"{p}:4" in text and "did you mean 'data.replay.path'" in text and f"{p}:3" in text


def test_general_chat_set_is_disjoint_from_the_forgetting_text():
    """The bundled replay set must not contain what the forgetting check measures."""
    from ollama_ft.data.dedupe import shingles

    chat = [json.loads(line) for line in GENERAL_CHAT.read_text().splitlines()]
    assert 300 <= len(chat) <= 600 and len({c["messages"][0]["content"] for c in chat}) == len(chat)
    assert all(set(c) == {"id", "category", "messages"} for c in chat)
    if not GENERAL_TEXT:
        pytest.skip("the forgetting check's general text is not in this tree")
    text = [json.loads(line)["text"] for f in GENERAL_TEXT for line in f.read_text().splitlines() if line.strip()]
    text_grams = set().union(*(shingles([{"role": "assistant", "content": t}], 5) for t in text))
    for c in chat:
        grams = shingles(c["messages"], 5)
        assert not grams & text_grams, c["id"]


# ------------------------------------------------------------------------------------------
# Near-duplicates


def test_near_duplicates_are_dropped_before_the_split(tmp_path, tiny_llama):
    base = [{"messages": _msgs(f"question number {i} about the opening hours of the north wing pharmacy",
                               f"the north wing pharmacy opens at {i} o'clock every weekday morning")} for i in range(8)]
    twins = [{"messages": _msgs(o["messages"][0]["content"] + "?", o["messages"][1]["content"] + " sharp")}
             for o in base[:3]]
    src = _write(tmp_path / "d.jsonl", base + twins)
    out = tmp_path / "data"
    info = build_data(_cfg(src, "data.quality.near_duplicates.threshold=0.7"), tiny_llama, out)
    near = info["duplicates"]["near"]
    assert near["found"] == 3 and info["dropped"]["duplicate_near"] == 3 and sum(info["counts"].values()) == 8
    assert {f["source"].rsplit(":", 1)[1] for f in near["first"]} == {"9", "10", "11"}
    info = build_data(_cfg(src, "data.quality.near_duplicates.threshold=0.7",
                           "data.quality.near_duplicates.action=flag"), tiny_llama, tmp_path / "flag")
    assert info["duplicates"]["near"]["found"] == 3 and sum(info["counts"].values()) == 11
    # found == 3 at 0.7: the 8 originals share a template but differ in their numbers, and are all kept.


# ------------------------------------------------------------------------------------------
# Perplexity outliers


@pytest.fixture(scope="module")
def fluent_tiny(tmp_path_factory, tiny_llama):
    """The tiny model trained for a few steps on clinic-room answers: those become predictable,
    unrelated text stays surprising (a random model finds everything equally surprising)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fluent_tiny")
    for f in tiny_llama.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    texts = [f"clinic room {i} is on floor {i % 7}" for i in range(60)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    batch = tok(texts[:24], return_tensors="pt", padding=True)
    for _ in range(12):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_perplexity_outliers_flagged_dropped_and_cached(tmp_path, fluent_tiny, monkeypatch):
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))
    garbage = ["zq xv pk wjj qqz vkx", "bnnm xzq kkj pwz", "jjx qzv mmw kxq zzp"]
    splits = ("train", "validation", "test")
    objs = _domain(45, split="train") + [{"id": f"bad{k}", "messages": _msgs("where is clinic room 3", garbage[k]),
                                          "split": splits[k]} for k in range(3)]
    src = _write(tmp_path / "d.jsonl", objs)
    out = tmp_path / "data"
    f32 = "model.compute_dtype=float32"  # bfloat16 where the CPU has it natively; float32 for the exact check
    info = build_data(_cfg(src, "data.quality.perplexity_outliers.action=drop", f32), fluent_tiny, out)
    stats = json.loads((out / "stats.json").read_text())["quality"]
    flagged = {f["id"] for f in stats["first"]}
    assert {"bad0", "bad1", "bad2"} <= flagged and stats["flagged"] <= 5
    assert stats["dropped"] == len(flagged - {"bad2"}) and info["dropped"]["perplexity_outlier"] == stats["dropped"]
    ids = {s: {r["id"] for r in _rows(out, s)} for s in ("train", "validation", "test")}
    assert "bad0" not in ids["train"] and "bad1" not in ids["validation"] and "bad2" in ids["test"]  # test: flag only
    assert stats["scored"] == 48 and stats["cached"] == 0 and stats["dtype"] == "float32"
    scores = [json.loads(line) for line in (out / "quality.jsonl").read_text().splitlines()]
    assert len(scores) == 48 and all(r["ppl"] > 0 for r in scores)
    # The score is the base model's perplexity of the trained tokens, exactly (packed batch == one by one).
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fluent_tiny), dtype=torch.float32).eval()
    test_row = _rows(out, "test")[0]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([test_row["input_ids"]]), labels=torch.tensor([test_row["labels"]])).loss
    by_id = {r["id"]: r for r in scores}
    assert by_id[test_row["id"]]["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-3)
    # Re-running with another action costs no forward pass: the scores are cached per base and tokens.
    again = tmp_path / "again"
    build_data(_cfg(src, "data.quality.perplexity_outliers.action=flag", f32), fluent_tiny, again)
    stats = json.loads((again / "stats.json").read_text())["quality"]
    assert stats["scored"] == 0 and stats["cached"] == 48 and stats["dropped"] == 0
    assert "bad0" in {r["id"] for r in _rows(again, "train")}


# ------------------------------------------------------------------------------------------
# Category balance


def test_category_balance_report_and_downsampling(tmp_path, tiny_llama):
    objs = ([{"messages": _msgs(f"billing question {i}", f"billing answer {i}"), "category": "billing"}
             for i in range(60)]
            + [{"messages": _msgs(f"visit question {i}", f"visit answer {i}"), "category": "visits"} for i in range(20)]
            + [{"messages": _msgs(f"lab question {i}", f"lab answer {i}"), "category": "labs"} for i in range(18)])
    src = _write(tmp_path / "d.jsonl", objs)
    build_data(_cfg(src), tiny_llama, tmp_path / "report")
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["balance"]["balanced"] is False and "billing" in stats["balance"]["out_of_range"]
    assert sum(stats["categories"]["train"].values()) == stats["counts"]["train"]
    build_data(_cfg(src, "data.balance.sampling=downsample"), tiny_llama, tmp_path / "balanced")
    bal = json.loads((tmp_path / "balanced" / "stats.json").read_text())
    train = bal["categories"]["train"]
    mean = sum(train.values()) / len(train)
    assert bal["balance"]["balanced"] and all(0.8 <= v / mean <= 1.2 for v in train.values())
    assert train["billing"] < stats["categories"]["train"]["billing"] and train["labs"] == stats["categories"]["train"]["labs"]
    assert bal["categories"]["test"] == stats["categories"]["test"]  # held-out splits are never resampled
    assert bal["dropped"]["balance_downsample"] == stats["counts"]["train"] - bal["counts"]["train"]


# ------------------------------------------------------------------------------------------
# Time split


def test_time_split_keeps_test_later_than_train(tmp_path, tiny_llama):
    import random

    days = list(range(1, 29)) * 2  # equal timestamps too: they must not straddle a boundary
    random.Random(0).shuffle(days)
    objs = [{"id": f"t{i}", "messages": _msgs(f"ticket {i}", f"resolved {i}"),
             "timestamp": f"2024-02-{d:02d}T10:00:00Z"} for i, d in enumerate(days)]
    objs.append({"messages": _msgs("undated", "no time")})
    when = {o.get("id"): o.get("timestamp") for o in objs}
    src = _write(tmp_path / "d.jsonl", objs)
    out = tmp_path / "data"
    info = build_data(_cfg(src, "data.split=time"), tiny_llama, out)
    times = {s: [when[r["id"]] for r in _rows(out, s)] for s in ("train", "validation", "test")}
    assert max(times["train"]) < min(times["validation"]) <= max(times["validation"]) < min(times["test"])
    assert info["dropped"]["no_timestamp"] == 1 and abs(info["counts"]["train"] - 0.8 * 56) <= 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["split_method"] == "time" and stats["splits"]["test"]["time_range"][1] == "2024-02-28T10:00:00Z"
    with pytest.raises(UserError, match="no record has a timestamp"):
        build_data(_cfg(_write(tmp_path / "n.jsonl", _domain(5)), "data.split=time"), tiny_llama, tmp_path / "n")


def test_bad_timestamp_is_located(tmp_path):
    src = _write(tmp_path / "d.jsonl", [{"messages": _msgs("a", "b"), "timestamp": "last tuesday"}])
    with pytest.raises(UserError):
        validate_command(src)


# ------------------------------------------------------------------------------------------
# validate / inspect show the findings


def test_validate_shows_near_duplicates_balance_and_timestamps(tmp_path, capsys):
    objs = [{"messages": _msgs(f"how do I pay the invoice number {i} online", f"use the billing portal for invoice {i}"),
             "category": "billing" if i < 8 else "visits", "timestamp": 1700000000 + i} for i in range(10)]
    objs.append({"messages": _msgs("how do I pay the invoice number 1 online?", "use the billing portal for invoice 1"),
                 "category": "billing"})
    validate_command(_write(tmp_path / "d.jsonl", objs), near_duplicates=0.7)
    text = capsys.readouterr()
    text = text.out + text.err
    assert "near-duplicates" in text and "d.jsonl:11" in text
    assert "NOT balanced" in text and "billing" in text and "visits" in text
    assert "10 of 11" in text and "2023-11-14" in text


def test_inspect_shows_the_replay_mix(tmp_path, tiny_llama, capsys):
    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_llama, run / "base")
    src = _write(tmp_path / "d.jsonl", _domain(40))
    build_data(_cfg(src, "data.replay.ratio=0.25", "data.quality.near_duplicates.threshold=0.9"),
               run / "base", run / "data")
    capsys.readouterr()
    inspect_command(str(run), n=1)
    text = capsys.readouterr()
    text = text.out + text.err
    assert "replay:" in text and "general_chat.jsonl" in text and "near-duplicates" in text


def test_perplexity_pass_that_cannot_fit_stops_before_loading(tmp_path, tiny_llama, monkeypatch):
    import psutil

    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1024})())
    src = _write(tmp_path / "d.jsonl", _domain(4))
    with pytest.raises(UserError, match="scoring needs about") as e:
        build_data(_cfg(src, "data.quality.perplexity_outliers.action=flag", "model.compute_dtype=float32"),
                   tiny_llama, tmp_path / "data")
    assert "batch_size" in e.value.hint


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_screen_memory_matches_the_measured_peak_of_a_scoring_pass(dtype):
    """The perplexity screen's memory formula (what the data stage checks before loading and what
    `ollama-ft plan` shows) against the peak RSS of batch_nll on a tiny model with a real-size vocabulary:
    4 packed examples x 1024 trained positions x 32000 logits. Runs in a child process so the peak is its own."""
    import subprocess
    import sys

    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from ollama_ft.data.quality import batch_nll, screen_memory
torch.set_num_threads(2)
dtype = torch.{dtype}
cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(cfg).to(dtype).eval()
batch = [(list(range(1, 1025)), [-100] + list(range(2, 1025))) for _ in range(4)]
def rss(field):
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(field))
batch_nll(model, [(batch[0][0][:8], batch[0][1][:8])], "cpu")  # kernels loaded, allocator still small
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
batch_nll(model, batch, "cpu")
parts = screen_memory(0, dtype.itemsize, 4, 32000, 1024, 64, 128)
print(rss("VmHWM:") - base, sum(v for k, v in parts.items() if not k.startswith("base")))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    measured, predicted = map(float, p.stdout.split()[-2:])
    # Measured 0.89-1.03 x predicted in bf16 and 0.96 x in fp32 on the AMD EPYC (allocator timing varies).
    assert 0.6 * predicted <= measured <= 1.25 * predicted, (measured, predicted)
