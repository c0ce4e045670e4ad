"""The data half of issue 3: readers, validation, dedupe, split, render + mask + tokenize, sample data."""

from __future__ import annotations

import codecs
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ollama_ft.core.config import RunConfig
from ollama_ft.core.errors import UserError
from ollama_ft.data.commands import inspect_command, validate_command
from ollama_ft.data.formats import Report, content_keys, iter_records
from ollama_ft.data.render import ChatRenderer
from ollama_ft.data.split import assign_split
from ollama_ft.data.stage import build_data, resolve_data_path
from ollama_ft.data.writer import token_labels
from tests.tiny_models import CHATML_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
BROKEN = Path(__file__).parent / "fixtures" / "broken"
SAMPLE = ROOT / "ollama_ft" / "data_files" / "clinic_sample.jsonl"
QA = [("Where is intake?", "Room 1B, left of the entrance."), ("When do you open?", "At 7:40 on weekdays."),
      ("Who handles complaints?", "The liaison officer in Room 5E.")]


def _read(path: Path, fmt: str = "auto"):
    report = Report()
    recs = [r for r, _, _ in iter_records(path, fmt, report)]
    return recs, report


def _msgs(q: str, a: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Every format and file type


def test_messages_jsonl(tmp_path):
    recs, rep = _read(_write_jsonl(tmp_path / "m.jsonl", [{"messages": _msgs(q, a, "Be brief.")} for q, a in QA]))
    assert rep.errors == 0 and rep.formats == {"messages": 3}
    assert recs[0].messages == _msgs(*QA[0], "Be brief.")
    assert recs[0].source.endswith("m.jsonl:1") and recs[2].source.endswith("m.jsonl:3")


def test_openai_content_parts_and_developer_role(tmp_path):
    obj = {"messages": [{"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Where "}, {"type": "text", "text": "is it?"}]},
                        {"role": "assistant", "content": "Room 1B."}]}
    recs, rep = _read(_write_jsonl(tmp_path / "m.jsonl", [obj]))
    assert rep.errors == 0
    assert recs[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is it?"},
                                {"role": "assistant", "content": "Room 1B."}]


def test_sharegpt_json_array_maps_roles(tmp_path):
    conv = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q},
                               {"from": "gpt", "value": a}]} for q, a in QA]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(conv, indent=2))
    recs, rep = _read(p)
    assert rep.errors == 0 and rep.formats == {"sharegpt": 3}
    assert recs[1].messages == _msgs(*QA[1], "Be brief.")
    # Line numbers of array elements are the lines where each element starts.
    assert recs[0].source.endswith("s.json:2")
    assert int(recs[1].source.rsplit(":", 1)[1]) > 2


def test_json_object_with_list_and_sharegpt_system_key(tmp_path):
    doc = {"version": 1, "data": [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]}
    p = tmp_path / "o.json"
    p.write_text(json.dumps(doc, indent=1))
    recs, rep = _read(p)
    assert rep.errors == 0 and len(recs) == 3
    assert recs[2].messages == _msgs(*QA[2], "Be brief.")


def test_alpaca_csv_with_and_without_input(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('instruction,input,output\nWhere is intake?,,"Room 1B, left."\nTranslate,hello,bonjour\n')
    recs, rep = _read(p)
    assert rep.errors == 0 and rep.formats == {"alpaca": 2}
    assert recs[0].messages == _msgs("Where is intake?", "Room 1B, left.")
    assert recs[1].messages[0]["content"] == "Translate\n\nhello"


def test_key_facts_are_read_from_every_format_and_kept_on_the_record(tmp_path):
    """A record's "facts" (what eval checks the answer states): a JSON list, a CSV cell "a; b" or a JSON
    list in a cell, a Parquet list column; a malformed value is a warning and the record still trains."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "f.csv"
    csv.write_text('instruction,output,facts\nWhen?,From 7:40 to 18:20.,7:40; 18:20\n'
                   'Where?,Room 3A.,"[""3A""]"\nWho?,Nobody.,\n')
    recs, rep = _read(csv)
    assert [r.facts for r in recs] == [["7:40", "18:20"], ["3A"], None] and rep.errors == 0
    assert recs[0].as_json()["facts"] == ["7:40", "18:20"] and "facts" not in recs[2].as_json()

    pqf = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": ["When?"], "completion": ["At 9:15."], "facts": [["9:15"]]}), pqf)
    assert _read(pqf)[0][0].facts == ["9:15"]

    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"messages": _msgs("When?", "At 9:15."), "facts": {"time": "9:15"}}) + "\n")
    recs, rep = _read(bad)
    assert len(recs) == 1 and recs[0].facts is None and rep.warnings == 1 and rep.errors == 0
    assert "\"facts\" must be a list" in str(rep.problems[0]) and rep.problems[0].where == "1"


@pytest.mark.parametrize(("value", "facts", "warned"), [
    ("   ", None, False), (" ; ", None, False), ([], None, False),  # empty cells are no facts, not mistakes
    ("[3A] room", ["[3A] room"], False),  # not JSON: read as text
    ('["7:40", 18]', ["7:40", "18"], False), ([True], None, True), (["ok", ""], None, True)])
def test_facts_values(value, facts, warned):
    import numpy as np

    from ollama_ft.data.formats import facts_field

    got, problem = facts_field({"facts": value}, "f.csv", "2")
    assert got == facts and (problem is not None) == warned
    assert facts_field({"facts": np.array(["7:40", "18:20"])}, "f", "1") == (["7:40", "18:20"], None)


def test_messages_in_csv_cells_and_tsv(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text("messages\n" + json.dumps(_msgs(*QA[0])) + "\n")
    recs, rep = _read(p)
    assert rep.errors == 0 and recs[0].messages == _msgs(*QA[0])


def test_prompt_completion_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": [q for q, _ in QA], "completion": [a for _, a in QA]}), p)
    recs, rep = _read(p)
    assert rep.errors == 0 and rep.formats == {"prompt_completion": 3}
    assert recs[2].messages == _msgs(*QA[2])
    assert recs[2].source.endswith("pc.parquet:row 3")


def test_messages_parquet_nested(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"messages": [_msgs(q, a) for q, a in QA]}), p)
    recs, rep = _read(p)
    assert rep.errors == 0 and recs[0].messages == _msgs(*QA[0])


def test_conversational_prompt_completion(tmp_path):
    obj = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}
    recs, rep = _read(_write_jsonl(tmp_path / "pc.jsonl", [obj]))
    assert rep.errors == 0 and recs[0].messages == _msgs("hi", "hello")


def test_plain_text_txt_and_jsonl(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("First passage\nstill first.\n\n\nSecond passage.\n")
    recs, rep = _read(p)
    assert rep.errors == 0 and rep.formats == {"text": 2}
    assert recs[0].messages == [{"role": "assistant", "content": "First passage\nstill first."}]
    assert recs[1].source.endswith("t.txt:5")
    recs, _ = _read(_write_jsonl(tmp_path / "t.jsonl", [{"text": "One document."}]))
    assert recs[0].messages == [{"role": "assistant", "content": "One document."}]


def test_directory_of_mixed_files(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    _write_jsonl(d / "a.jsonl", [{"messages": _msgs(*QA[0])}])
    (d / "sub" / "b.csv").write_text("prompt,completion\nWhen do you open?,At 7:40 on weekdays.\n")
    (d / "notes.md").write_text("not data")
    (d / ".hidden.jsonl").write_text("{bad")
    recs, rep = _read(d)
    assert [r.messages for r in recs] == [_msgs(*QA[0]), _msgs(*QA[1])]
    assert rep.errors == 0 and rep.warnings == 1  # notes.md skipped, said so
    assert "notes.md" in str(rep.problems[0]) and "skipped" in str(rep.problems[0])


def test_format_override_reports_missing_fields(tmp_path):
    p = _write_jsonl(tmp_path / "m.jsonl", [{"messages": _msgs(*QA[0])}])
    _, rep = _read(p, "alpaca")
    assert rep.dropped == {"missing_field": 1}
    assert {str(x).split("]: ")[1] for x in rep.problems} == {"missing field 'instruction'", "missing field 'output'"}


def test_json_lines_named_json_is_read_with_warning(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("".join(json.dumps({"messages": _msgs(q, a)}) + "\n" for q, a in QA))
    recs, rep = _read(p)
    assert len(recs) == 3 and rep.errors == 0 and rep.warnings == 1 and "JSON Lines" in rep.problems[0].message


def test_record_ids_kept_or_derived_and_unique(tmp_path):
    p = _write_jsonl(tmp_path / "m.jsonl", [{"id": 7, "messages": _msgs(*QA[0])}, {"id": 7, "messages": _msgs(*QA[1])},
                                            {"messages": _msgs(*QA[2])}])
    recs, _ = _read(p)
    assert [r.id for r in recs[:2]] == ["7", "7-2"]
    assert len(recs[2].id) == 16


# ------------------------------------------------------------------------------------------
# The corpus of broken files: each fault has its own message and location

BROKEN_CASES = [
    ("bad_json.jsonl", "bad_json.jsonl:2", "bad JSON: Expecting value"),
    ("bad_json_file.json", "bad_json_file.json:4", "bad JSON: Expecting ',' delimiter (column 23); records after"),
    ("missing_field.jsonl", "missing_field.jsonl:2 [output]", "missing field 'output'"),
    ("empty_field.jsonl", "empty_field.jsonl:2 [output]", "'output' is empty"),
    ("unknown_role.jsonl", "unknown_role.jsonl:2 [messages[1].role]", "unknown role 'bot'"),
    ("sharegpt_unknown_from.jsonl", "sharegpt_unknown_from.jsonl:1 [conversations[1].from]", "unknown role 'robot'"),
    ("wrong_type.jsonl", "wrong_type.jsonl:2 [messages[1].content]", "'content' must be a string, got int"),
    ("messages_not_list.jsonl", "messages_not_list.jsonl:1 [messages]", "must be a list of turns, got str"),
    ("no_assistant_turn.jsonl", "no_assistant_turn.jsonl:2 [messages[2]]", "ends with a 'user' turn"),
    ("system_not_first.jsonl", "system_not_first.jsonl:1 [messages[1]]", "system message may only come first"),
    ("not_object.jsonl", "not_object.jsonl:2", "record must be a JSON object, got list"),
    ("unknown_format.jsonl", "unknown_format.jsonl:1", "cannot tell the record's format from its keys ('question', 'answer')"),
    ("empty_conversation.jsonl", "empty_conversation.jsonl:2 [messages]", "is an empty list"),
    ("bad_split.jsonl", "bad_split.jsonl:1 [split]", "unknown split 'holdout'"),
    ("image_content.jsonl", "image_content.jsonl:1 [messages[0].content[0]]", "only text content is supported"),
    ("json_without_list.json", "json_without_list.json:1", "top-level object has no list of records"),
    ("csv_extra_field.csv", "csv_extra_field.csv:3", "row has 4 fields but the header has 3"),
    ("csv_empty_cell.csv", "csv_empty_cell.csv:3 [output]", "'output' is empty"),
    ("empty.jsonl", "empty.jsonl", "file is empty"),
    ("not_utf8.jsonl", "not_utf8.jsonl:2", "not valid UTF-8: byte 0xE9 at column 47"),
    ("utf16.jsonl", "utf16.jsonl:1", "file is UTF-16 encoded"),
]


@pytest.mark.parametrize("name,where,message", BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_file_gives_its_own_located_message(name, where, message):
    _, rep = _read(BROKEN / name)
    errors = [str(p) for p in rep.problems if p.severity == "error"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(str(BROKEN / where)), errors[0]
    assert message in errors[0]
    with pytest.raises(UserError, match="problem"):
        validate_command(BROKEN / name, show=5)


def test_broken_corpus_faults_are_distinct():
    kinds = set()
    for name, _, _ in BROKEN_CASES:
        _, rep = _read(BROKEN / name)
        kinds.add((rep.problems[0].kind, rep.problems[0].message.split(":")[0][:30]))
    assert len(kinds) >= 12


def test_utf8_bom_is_reported_but_read():
    recs, rep = _read(BROKEN / "bom.jsonl")
    assert len(recs) == 1 and rep.errors == 0
    assert rep.warnings == 1 and "byte-order mark" in str(rep.problems[0]) and ":1" in str(rep.problems[0])
    validate_command(BROKEN / "bom.jsonl")  # warnings alone do not fail


def test_bom_in_csv_header_does_not_rename_the_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(codecs.BOM_UTF8 + b"instruction,output\nWhere?,Here.\n")
    recs, rep = _read(p)
    assert rep.errors == 0 and recs[0].messages == _msgs("Where?", "Here.")


def test_validate_lists_first_n_and_total(tmp_path, capsys):
    bad = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(30)]
    p = _write_jsonl(tmp_path / "m.jsonl", [{"messages": _msgs(*QA[0])}, *bad])
    with pytest.raises(UserError) as e:
        validate_command(p, show=4)
    out = capsys.readouterr().out
    assert out.count("ends with a 'user' turn") == 4
    assert "and 26 more" in out
    assert "30 problem(s); 30 of 31 records would be dropped" in e.value.message


def test_validate_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(UserError, match="did you mean 'sharegpt'"):
        validate_command(tmp_path, format="sharegtp")
    with pytest.raises(UserError, match="data not found"):
        validate_command(tmp_path / "nope.jsonl")


def test_validate_cli_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "data", "validate", str(BROKEN / "unknown_role.jsonl")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert "unknown_role.jsonl:2" in r.stdout and "error:" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------
# Split and dedupe


def _recs(n: int, start: int = 0) -> list[dict]:
    return [{"messages": _msgs(f"Question number {i}?", f"Answer number {i}.")} for i in range(start, start + n)]


def test_split_is_stable_when_reordered_and_appended(tmp_path):
    def splits(objs):
        out = {}
        for r, _, norm in iter_records(_write_jsonl(tmp_path / "d.jsonl", objs), "auto", Report()):
            out[r.messages[0]["content"]] = assign_split(norm, 1234, (0.8, 0.1, 0.1))
        return out

    base = _recs(300)
    a = splits(base)
    shuffled = base[:]
    random.Random(0).shuffle(shuffled)
    b = splits(shuffled + _recs(100, start=300))
    assert all(b[k] == v for k, v in a.items())
    counts = {s: list(a.values()).count(s) for s in ("train", "validation", "test")}
    assert 200 <= counts["train"] <= 280 and counts["validation"] > 10 and counts["test"] > 10
    # A different seed gives a different assignment; whitespace does not.
    _, norm = content_keys(_msgs("Question number 1?", "Answer number 1."))
    _, norm_ws = content_keys(_msgs("Question  number 1? ", "Answer number\n1."))
    assert norm == norm_ws
    assert len({assign_split(content_keys(_msgs(str(i), "x"))[1], s, (0.5, 0.25, 0.25))
                for i in range(5) for s in (1, 2, 3)}) > 1


# ------------------------------------------------------------------------------------------
# The data stage on the tiny model


def _cfg(path: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path = str(path)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _rows(out: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / f"{split}.parquet").to_pylist()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_build_data_writes_the_stage_contract(tmp_path, tiny_llama, tok):
    objs = [{"messages": _msgs(f"what is form {i}", f"the form for visit {i}", "be brief")} for i in range(40)]
    objs.append({**objs[0]})  # exact duplicate
    objs.append({"messages": _msgs("what is  form 1 ", "the form for\nvisit 1", "be brief")})  # whitespace dup
    objs.append({"messages": [{"role": "user", "content": "no answer"}]})  # invalid: counted
    src = _write_jsonl(tmp_path / "d.jsonl", objs)
    out = tmp_path / "data"
    info = build_data(_cfg(src), tiny_llama, out)
    for s in ("train", "validation", "test"):
        assert (out / f"{s}.jsonl").is_file() and (out / f"{s}.parquet").is_file()
    assert (out / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    assert sum(info["counts"].values()) == 40
    assert info["duplicates"] == {"exact": 1, "whitespace": 1}
    assert info["dropped"] == {"duplicate_exact": 1, "duplicate_whitespace": 1, "no_assistant_turn": 1}
    assert "train" in info["summary"] and "dropped 3" in info["summary"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"] == info["counts"] and 0 < stats["masked_fraction"] < 1
    assert set(stats["length"]) == {"p50", "p90", "p99", "max"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "train.parquet")
    assert schema.names == ["id", "input_ids", "labels"]
    assert schema.field("input_ids").type.value_type == pa.int32() == schema.field("labels").type.value_type
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "messages"}
    assert [r["id"] for r in _rows(out, "train")][0] == first["id"]


def test_a_csv_records_facts_reach_the_eval_through_test_jsonl(tmp_path, tiny_llama):
    from ollama_ft.eval import facts as ef

    rows = ["instruction,output,facts"] + [f"When is slot {i}?,Slot {i} starts at {i % 12 + 1}:15.,{i % 12 + 1}:15"
                                           for i in range(40)]
    src = tmp_path / "d.csv"
    src.write_text("\n".join(rows) + "\n")
    build_data(_cfg(src), tiny_llama, tmp_path / "data")
    test = [json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert test and all(r["facts"] == [r["messages"][-1]["content"].split(" at ")[1].rstrip(".")] for r in test)
    facts, source = ef.example_facts(test, {})  # nothing read from the source file
    assert source == "the data file's \"facts\"" and [f.text for f in facts[0]] == test[0]["facts"]


def test_masking_trains_only_assistant_turns_and_end_of_turn(tmp_path, tiny_llama, tok):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the desk"},
            {"role": "assistant", "content": "room one"}, {"role": "user", "content": "and the ward"},
            {"role": "assistant", "content": "room two"}]
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": conv, "split": "train"}])
    out = tmp_path / "data"
    build_data(_cfg(src), tiny_llama, out)
    (row,) = _rows(out, "train")
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i] for i in trained)
    # Two runs of trained tokens: "room one<|im_end|>" and "room two<|im_end|>", nothing else.
    runs, cur = [], [trained[0]]
    for i in trained[1:]:
        if i == cur[-1] + 1:
            cur.append(i)
        else:
            runs.append(cur)
            cur = [i]
    runs.append(cur)
    texts = [tok.decode([ids[i] for i in r]) for r in runs]
    assert texts == ["room one<|im_end|>", "room two<|im_end|>"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(ids[r[-1]] == im_end for r in runs)


def test_train_on_prompt_trains_everything(tmp_path, tiny_llama):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs("where", "here"), "split": "train"}])
    build_data(_cfg(src, train_on_prompt=True), tiny_llama, tmp_path / "data")
    (row,) = _rows(tmp_path / "data", "train")
    assert row["labels"][1:] == row["input_ids"][1:]


def test_system_prompt_added_when_missing(tmp_path, tiny_llama):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs("where", "here"), "split": "train"},
                                              {"messages": _msgs("who", "me", "own"), "split": "train"}])
    build_data(_cfg(src, system_prompt="You work at the clinic."), tiny_llama, tmp_path / "data")
    recs = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert recs[0]["messages"][0] == {"role": "system", "content": "You work at the clinic."}
    assert recs[1]["messages"][0] == {"role": "system", "content": "own"}


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_truncate_or_drop(tmp_path, tiny_llama, policy):
    long = " ".join(["the clinic opens at eight"] * 20)
    objs = [{"messages": _msgs("when", long), "split": "train"}, {"messages": _msgs("who", "me"), "split": "train"}]
    out = tmp_path / "data"
    info = build_data(_cfg(_write_jsonl(tmp_path / "d.jsonl", objs), max_length=40, overlong=policy), tiny_llama, out)
    rows = _rows(out, "train")
    if policy == "truncate":
        assert info["truncated"] == 1 and len(rows) == 2
        assert max(len(r["input_ids"]) for r in rows) == 40
        assert "truncated 1" in info["summary"]
    else:
        assert info["truncated"] == 0 and info["dropped"] == {"overlong": 1} and len(rows) == 1


def test_truncation_that_removes_every_answer_token_is_counted(tmp_path, tiny_llama):
    long_q = " ".join(["what is the protocol"] * 20)
    objs = [{"messages": _msgs(long_q, "yes"), "split": "train"}, {"messages": _msgs("who", "me"), "split": "train"}]
    info = build_data(_cfg(_write_jsonl(tmp_path / "d.jsonl", objs), max_length=40), tiny_llama, tmp_path / "data")
    assert info["dropped"] == {"no_trained_tokens_after_truncation": 1}


def test_template_refusal_is_counted_not_fatal(tmp_path, tiny_llama):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
              "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (base / "chat_template.jinja").write_text(strict)
    objs = [{"messages": _msgs("where", "here", "sys"), "split": "train"}, {"messages": _msgs("who", "me"), "split": "train"}]
    info = build_data(_cfg(_write_jsonl(tmp_path / "d.jsonl", objs)), base, tmp_path / "data")
    assert info["counts"]["train"] == 1 and info["dropped"] == {"template_error": 1}


def test_bos_in_template_is_not_doubled(tmp_path, tiny_llama, tok):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    (base / "chat_template.jinja").write_text("{{ bos_token }}" + CHATML_TEMPLATE)
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs("where", "here"), "split": "train"}])
    build_data(_cfg(src), base, tmp_path / "data")
    (row,) = _rows(tmp_path / "data", "train")
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"][1] != tok.bos_token_id
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["add_special_tokens"] is False


def test_plain_text_trains_all_and_ends_with_eos(tmp_path, tiny_llama, tok):
    src = tmp_path / "t.txt"
    src.write_text("the clinic opens at eight\n")
    cfg = _cfg(src, split=(1.0, 0.0, 0.0))
    build_data(cfg, tiny_llama, tmp_path / "data")
    (row,) = _rows(tmp_path / "data", "train")
    assert row["input_ids"][0] == tok.bos_token_id and row["labels"][0] == -100
    assert row["labels"][1:] == row["input_ids"][1:] and row["input_ids"][-1] == tok.eos_token_id


def test_family_fallback_and_missing_template(tmp_path, tiny_llama):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    (base / "chat_template.jinja").unlink()
    cfgj = json.loads((base / "tokenizer_config.json").read_text())
    cfgj.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfgj))
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs("where", "here"), "split": "train"}])
    with pytest.raises(UserError, match="no chat template"):
        build_data(_cfg(src), base, tmp_path / "d1")
    pytest.importorskip("ollama_ft.ollama.templates")
    (base / "ollama_ft_base.json").write_text(json.dumps({"family": "chatml"}))
    info = build_data(_cfg(src), base, tmp_path / "d2")
    assert "chatml" in info["chat_template_source"] and info["counts"]["train"] == 1


def test_empty_result_and_missing_path_are_user_errors(tmp_path, tiny_llama):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match="no usable examples"):
        build_data(_cfg(src), tiny_llama, tmp_path / "data")
    with pytest.raises(UserError, match="data not found"):
        build_data(_cfg(tmp_path / "missing.jsonl"), tiny_llama, tmp_path / "data2")


def test_token_labels_from_offsets():
    ids = [1, 10, 11, 12, 13]
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 12)]
    labels, n = token_labels(ids, offsets, [(4, 9)])  # overlaps tokens 11 (3-6) and 12 (6-9)
    assert labels == [-100, -100, 11, 12, -100] and n == 2


def test_many_batches_use_the_render_pool(tmp_path, tiny_llama):
    # More than one batch of 2048 switches to worker processes; results must equal in-process ones.
    objs = [{"messages": _msgs(f"q {i}", f"a {i}")} for i in range(2100)]
    src = _write_jsonl(tmp_path / "d.jsonl", objs)
    info = build_data(_cfg(src), tiny_llama, tmp_path / "data")
    assert sum(info["counts"].values()) == 2100
    small = _write_jsonl(tmp_path / "s.jsonl", objs[-5:])
    build_data(_cfg(small), tiny_llama, tmp_path / "small")
    big_rows = {r["id"]: r for s in ("train", "validation", "test") for r in _rows(tmp_path / "data", s)}
    for s in ("train", "validation", "test"):
        for r in _rows(tmp_path / "small", s):
            assert big_rows[r["id"]] == r


# ------------------------------------------------------------------------------------------
# Templates from real models (shared fixtures): spans cover answer + end-of-turn marker

MULTI = [{"role": "user", "content": "Where is intake?"}, {"role": "assistant", "content": "Room 1B."},
         {"role": "user", "content": "And the pharmacy?"}, {"role": "assistant", "content": "Room 3A."}]


@pytest.mark.parametrize("name", ["gemma3-it", "llama3.1-instruct", "qwen2.5-instruct", "deepseek-r1-distill-qwen",
                                  "deepseek-llm-chat", "mistral-instruct", "phi3-mini"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_spans_on_real_templates(chat_templates_dir, name, system):
    # Some templates move the system prompt (Mistral: into the last user turn), so prompts
    # rendered for a prefix of the conversation are not prefixes of the full rendering.
    r = ChatRenderer((chat_templates_dir / f"{name}.jinja").read_text(),
                     {"bos_token": "<s>", "eos_token": "</s>"})
    msgs = ([{"role": "system", "content": system}] if system else []) + MULTI
    text, spans = r.spans(msgs)
    assert len(spans) == 2
    for (a, b), answer in zip(spans, ["Room 1B.", "Room 3A."], strict=True):
        seg = text[a:b]
        assert seg.lstrip().startswith(answer), (name, seg)
        assert seg.strip() != answer, f"{name}: no end-of-turn marker trained after {answer!r}: {seg!r}"
        assert "Where is intake" not in seg and "pharmacy" not in seg and "brief" not in seg


def test_spans_when_template_drops_earlier_think_blocks():
    # Like reasoning-model templates: <think> is kept only in the final assistant turn.
    tpl = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% set c = m['content'] %}"
           "{% if not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
           "{{ '<|a|>' + c + '<|end|>\n' }}{% else %}{{ '<|u|>' + m['content'] + '<|end|>\n' }}{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|a|>' }}{% endif %}")
    r = ChatRenderer(tpl, {"eos_token": "</s>"})
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>hmm</think>\nA one."},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>ok</think>\nA two."}]
    text, spans = r.spans(msgs)
    assert [text[a:b] for a, b in spans] == ["A one.<|end|>", "<think>ok</think>\nA two.<|end|>"]


def test_template_without_end_marker_gets_eos():
    r = ChatRenderer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}", {"eos_token": "</s>"})
    text, spans = r.spans(_msgs("hi", "hello"))
    assert text.endswith("hello</s>") and text[spans[0][0]:spans[0][1]] == "hello</s>"


# ------------------------------------------------------------------------------------------
# Inspect, the sample dataset, path resolution


def test_inspect_highlights_trained_tokens(tmp_path, tiny_llama, capsys):
    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_llama, run / "base")
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs("where is the desk", "room one"), "split": "train"}])
    build_data(_cfg(src), run / "base", run / "data")
    capsys.readouterr()
    inspect_command(str(run), n=2, split="train")
    out = capsys.readouterr().out
    assert "room one" in out and "trained" in out and "where is the desk" in out
    with pytest.raises(UserError, match="unknown split"):
        inspect_command(str(run), split="dev")
    with pytest.raises(UserError, match="no prepared data"):
        shutil.rmtree(run / "data")
        inspect_command(str(run))


def test_sample_dataset_is_generated_small_and_holds_out_paraphrases():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_data.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert SAMPLE.stat().st_size < 300_000
    recs = [json.loads(x) for x in SAMPLE.read_text().splitlines()]
    assert 250 <= len(recs) <= 600
    by_split = {s: [x for x in recs if x["split"] == s] for s in ("train", "validation", "test")}
    assert len(by_split["test"]) >= 40 and len(by_split["validation"]) >= 40
    train_q = {x["messages"][1]["content"] for x in by_split["train"]}
    train_a = {x["messages"][2]["content"] for x in by_split["train"]}
    for x in by_split["test"]:
        assert x["messages"][1]["content"] not in train_q  # a paraphrase, never a training question
        assert x["messages"][2]["content"] in train_a  # of a fact that is trained
        assert len(x["messages"][2]["content"]) < 160  # short answers: learnable on CPU
    facts = json.loads((SAMPLE.parent / "clinic_facts.json").read_text())
    assert "FICTIONAL" in facts["about"]


def test_sample_split_field_is_honoured(tmp_path, tiny_llama):
    info = build_data(RunConfig(), tiny_llama, tmp_path / "data")  # the default data.path
    recs = [json.loads(x) for x in SAMPLE.read_text().splitlines()]
    expected = {s: sum(1 for x in recs if x["split"] == s) for s in ("train", "validation", "test")}
    assert info["counts"] == expected
    test_ids = [json.loads(x)["id"] for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert test_ids and all(i.endswith("-p") for i in test_ids)


def test_default_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("ollama_ft/data_files/clinic_sample.jsonl") == SAMPLE.resolve()


def test_data_stage_fingerprint_follows_the_data_files(tmp_path):
    from ollama_ft.pipeline import stage_settings

    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": _msgs(*QA[0])}])
    cfg = _cfg(src)
    before = stage_settings(cfg, "data")
    assert stage_settings(cfg, "data") == before
    _write_jsonl(src, [{"messages": _msgs(*QA[1])}])
    assert stage_settings(cfg, "data") != before


@pytest.mark.slow
def test_gemma_tokenizer_on_the_sample_data(gemma_gguf, tmp_path):
    """The demo path: Gemma 3 tokenizer (from the offline GGUF) + gemma3 family template + sample data."""
    pytest.importorskip("ollama_ft.ollama.templates")
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    tok.save_pretrained(base)
    (base / "ollama_ft_base.json").write_text(json.dumps({"family": "gemma3"}))
    info = build_data(RunConfig(), base, tmp_path / "data")
    assert "gemma3" in info["chat_template_source"] and info["counts"]["test"] > 0
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    recs = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()}
    for row in _rows(tmp_path / "data", "test"):
        ids, labels = row["input_ids"], row["labels"]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # exactly one BOS
        trained = [t for t in labels if t != -100]
        assert trained[-1] == end
        assert tok.decode(trained[:-1]) == recs[row["id"]]["messages"][-1]["content"]


def test_json_object_with_several_lists_is_ambiguous(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}))
    _, rep = _read(p)
    assert rep.errors == 1 and "several lists ('train', 'test')" in str(rep.problems[0])
