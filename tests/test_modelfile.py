"""Modelfile writer/parser (Ollama's grammar), the /api/create request `ollama create -f` would send,
and the `modelfile` stage on a fake run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.ollama import templates as ct
from ollama_ft.ollama.modelfile import (
    Modelfile,
    ModelfileError,
    convert_parameter,
    format_parameter,
    parse,
    parse_file,
)
from ollama_ft.ollama.stage import build_modelfile, check_run_command

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")

TRICKY_TEMPLATE = ('{{- range .Messages }}{{ if eq .Role "user" }}"quoted" {{ .Content }}{{ end }}'
                   "{{ end }}\n  '{{ \"}}\" }}' # not a comment\n\"\"trailing quote\"\nend")


def _roundtrip(mf: Modelfile) -> None:
    text = mf.render(header="header line\n\nsecond line")
    assert parse(text) == mf, text


# ------------------------------------------------------------------------------------------
# Writer / parser


@pytest.mark.parametrize("mf", [
    Modelfile(from_="model.gguf"),
    Modelfile(from_="../gguf/with space.gguf", template="{{ .Prompt }}"),
    Modelfile(from_="llama3.1:8b", template=TRICKY_TEMPLATE, system='He said "hi" {{ .System }} #1'),
    Modelfile(from_="/abs/m.gguf", system="\n  leading and trailing whitespace \t\n"),
    Modelfile(from_="m.gguf", system=""),
    Modelfile(from_="m.gguf", system='"starts with a quote'),
    Modelfile(from_="m.gguf", system='ends with three quotes"""'),
    Modelfile(from_="m.gguf", system='line one has """ inside\nline two ends with a quote"'),
    Modelfile(from_="m.gguf", system="crlf\r\nline\rcr"),
    Modelfile(from_="m.gguf", system="Ünïcödé 日本語 🙂 — «»"),
    Modelfile(from_="m.gguf", template=ct.get_family("llama3.1").go_template),
    Modelfile(from_="m.gguf", parameters={"stop": ["<|im_end|>", "User:", "two words", '"q"', " sp "],
                                          "temperature": ["0.7"], "num_ctx": ["4096"], "use_mmap": ["false"],
                                          "seed": ["-1"], "top_p": ["1e-3"]}),
    Modelfile(from_="m.gguf", messages=[("system", "be kind"), ("user", "multi\nline"), ("assistant", ""),
                                        ("user", 'quote " inside')]),
    Modelfile(from_="m.gguf", license=["Apache-2.0", "Line 1\n\nLine 3 \"quoted\"\n"], requires="0.14.0",
              renderer="qwen3", parser="qwen3", adapter="lora.gguf", more_from=["mmproj.gguf"]),
], ids=lambda m: (m.system or m.template or m.from_)[:20])
def test_render_parse_roundtrip(mf):
    _roundtrip(mf)


def test_every_family_template_roundtrips():
    for name in ct.family_names():
        fam = ct.get_family(name)
        _roundtrip(Modelfile(from_="x.gguf", template=fam.go_template, parameters={"stop": list(fam.stop)}))


def test_parser_follows_ollama_lexical_rules():
    text = ("  # a comment line\n"
            "from ./model.gguf\n"
            "\n"
            "\tTemplate \"\"\"\nkeep {{ .Content }}\n\"\"\"\n"
            "SyStEm \"a \"b\" c\"\n"
            "PARAMETER stop \"<|im_end|>\"\n"
            "PARAMETER stop 'single' # kept literally\n"
            "PARAMETER temperature 0.5\n"
            "PARAMETER temperature 0.25\n"
            "MESSAGE user hello there\n"
            "LICENSE \"multi\nline\"\n")
    mf = parse(text)
    assert mf.from_ == "./model.gguf"
    assert mf.template == "\nkeep {{ .Content }}\n"  # verbatim, leading/trailing newlines included
    assert mf.system == 'a "b" c'  # no escapes: only the outer quotes go
    assert mf.parameters == {"stop": ["<|im_end|>", "'single' # kept literally"], "temperature": ["0.25"]}
    assert mf.messages == [("user", "hello there")]
    assert mf.license == ["multi\nline"]


def test_parser_drops_non_printable_and_reads_boms():
    mf = parse("FROM m.gguf\nSYSTEM a\u200bb\x07c\u00a0d\n")
    assert mf.system == "abcd"
    assert parse(("FROM m.gguf\nSYSTEM hé\n").encode("utf-16")).system == "hé"
    assert parse(b"\xef\xbb\xbfFROM m.gguf\n").from_ == "m.gguf"


@pytest.mark.parametrize("text, message", [
    ("FROM m.gguf\nFOO bar\n", '(line 2): command must be one of "from", "license", "template", "system", '
                               '"adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"'),
    ("FROM1 m.gguf\n", "(line 1): command must be one of"),
    ("FROM m.gguf\nSYSTEM\n", "(line 3): command must be one of"),
    ("FROM m.gguf\nMESSAGE tool hi\n", '(line 2): message role must be one of "system", "user", or "assistant"'),
    ("FROM m.gguf\nPARAMETER Temperature 0.7\n", "unknown parameter 'Temperature'"),
    ("FROM m.gguf\nPARAMETER tfs_z 1\n", "unknown parameter 'tfs_z'"),
    ("FROM m.gguf\nPARAMETER temperature warm\n", "invalid float value [warm]"),
    ("FROM m.gguf\nPARAMETER num_ctx 1.5\n", "invalid int value [1.5]"),
    ("FROM m.gguf\nPARAMETER use_mmap yes\n", "invalid bool value [yes]"),
    ("FROM m.gguf\nPARAMETER temperature\n", "unexpected EOF: temperature"),
    ("FROM m.gguf\nTEMPLATE \"\"\"never closed\n", "unexpected EOF"),
    ("FROM m.gguf\nSYSTEM", "unexpected EOF"),
    ("SYSTEM hi\n# FROM commented out\n", "no FROM line"),
    ("", "no FROM line"),
])
def test_parser_errors_match_ollama(text, message):
    with pytest.raises(ModelfileError) as e:
        parse(text)
    assert e.value.message.startswith(message), e.value.message


def test_deprecated_parameter_is_dropped_with_warning(capsys):
    mf = parse("FROM m.gguf\nPARAMETER mirostat 1\nPARAMETER top_k 5\n")
    assert mf.parameters == {"top_k": ["5"]}
    assert "deprecated" in capsys.readouterr().err


def test_parse_file_names_the_file(tmp_path):
    p = tmp_path / "Modelfile"
    p.write_text("FROM m.gguf\nBOGUS x\n")
    with pytest.raises(UserError) as e:
        parse_file(p)
    assert str(p) in e.value.message and "(line 2)" in e.value.message


def test_writer_refuses_what_a_modelfile_cannot_hold():
    with pytest.raises(ModelfileError, match="U\\+00A0"):
        Modelfile(from_="m.gguf", system="non\u00a0breaking").render()
    with pytest.raises(ModelfileError, match="quotes"):
        Modelfile(from_="m.gguf", system='a"""\n""b"').render()
    with pytest.raises(ModelfileError, match="one value"):
        Modelfile(from_="m.gguf", parameters={"temperature": ["1", "2"]}).render()


def test_parameter_types():
    assert convert_parameter("stop", ["a", "b"]) == ["a", "b"]
    assert convert_parameter("temperature", ["0.1234567891"]) == pytest.approx(0.12345679, abs=0)
    assert convert_parameter("num_ctx", ["+4096"]) == 4096
    assert convert_parameter("use_mmap", ["T"]) is True
    assert format_parameter("temperature", 0.7) == ["0.7"]
    assert format_parameter("stop", "x") == ["x"]
    for name, bad in (("num_ctx", True), ("num_ctx", 1.5), ("use_mmap", "yes"), ("temperature", "hot"),
                      ("stop", 3), ("low_vram", True), ("nope", 1)):
        with pytest.raises(ModelfileError):
            format_parameter(name, bad)


def test_create_request_like_ollama_create(tmp_path):
    (tmp_path / "gguf").mkdir()
    g = tmp_path / "gguf" / "m-Q4_K_M.gguf"
    g.write_bytes(b"GGUF fake weights")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter.gguf").write_bytes(b"GGUF adapter")
    mf = Modelfile(from_="../gguf/m-Q4_K_M.gguf", adapter="../lora/adapter.gguf", template="{{ .Messages }}",
                   system="sys", parameters={"stop": ["a", "b"], "temperature": ["0.7"], "num_ctx": ["2048"],
                                             "use_mmap": ["true"]},
                   messages=[("user", "hi")], license=["MIT"], requires="v0.14.0")
    (tmp_path / "modelfiles").mkdir()
    req = mf.to_create_request(tmp_path / "modelfiles")
    import hashlib

    digest = "sha256:" + hashlib.sha256(g.read_bytes()).hexdigest()
    assert req.fields["files"] == {"m-Q4_K_M.gguf": digest}
    assert list(req.fields["adapters"]) == ["adapter.gguf"]
    assert req.blobs[digest] == g.resolve()
    assert req.fields["parameters"] == {"stop": ["a", "b"], "temperature": 0.7, "num_ctx": 2048, "use_mmap": True}
    assert req.fields["messages"] == [{"role": "user", "content": "hi"}]
    assert req.fields["license"] == ["MIT"] and req.fields["requires"] == "0.14.0"
    assert req.fields["template"] == "{{ .Messages }}" and req.fields["system"] == "sys"
    json.dumps(req.fields)  # JSON types only
    # A FROM that is not a local path is a model name, sent as `from`.
    assert Modelfile(from_="llama3.1:8b").to_create_request(tmp_path).fields == {"from": "llama3.1:8b"}
    with pytest.raises(ModelfileError, match="ADAPTER"):
        Modelfile(from_="x", adapter="missing.gguf").to_create_request(tmp_path)
    with pytest.raises(ModelfileError, match="semver"):
        Modelfile(from_="x", requires="soon").to_create_request(tmp_path)


def test_create_request_for_a_directory(tmp_path):
    d = tmp_path / "hf"
    (d / "sub").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
                 "sub/config.json", "tokenizer.model", "chat_template.jinja", "README.md"):
        (d / name).write_bytes(name.encode())
    req = Modelfile(from_=str(d)).to_create_request(tmp_path)
    assert sorted(req.fields["files"]) == ["chat_template.jinja", "config.json", "model-00001-of-00002.safetensors",
                                           "model-00002-of-00002.safetensors", "sub/config.json", "tokenizer.model"]


# ------------------------------------------------------------------------------------------
# The stage on a fake run


def _fake_gguf(path: Path, add_bos: bool) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def fake_run(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """runs/r with base/, data/, merged/ (tiny tokenizer) and gguf/ (a GGUF with tokenizer metadata only)."""
    from ollama_ft.core.config import RunConfig
    from ollama_ft.core.runs import Run

    monkeypatch.chdir(tmp_path)
    run = Run.open("r", tmp_path / "runs", create=True)

    def data(out: Path):
        (out / "chat_template.jinja").write_text((tiny_tokenizer_dir / "chat_template.jinja").read_text())
        recs = [{"id": "1", "messages": [{"role": "user", "content": "When does the clinic open?"},
                                         {"role": "assistant", "content": "At eight."}]},
                {"id": "2", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Fever?"},
                                         {"role": "assistant", "content": "Rest."}]}]
        (out / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return {}

    def base(out: Path):
        (out / "ollama_ft_base.json").write_text(json.dumps({"license": "Apache-2.0", "family": "chatml"}))
        return {}

    def merged(out: Path):
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
        return {}

    def export(out: Path):
        _fake_gguf(out / "mymodel-Q4_K_M.gguf", add_bos=True)
        _fake_gguf(out / "mymodel-F16.gguf", add_bos=True)
        return {}

    for stage, fn in (("pull", base), ("data", data), ("merge", merged), ("export", export)):
        run.run_stage(stage, {}, fn)
    cfg = RunConfig(name="r", runs_dir=str(tmp_path / "runs"),
                    ollama={"name": "mymodel", "system": "You are a clinic assistant.",
                            "parameters": {"temperature": 0.7, "num_ctx": 2048, "stop": ["###"]}})
    return cfg, run


@needs_go
def test_build_modelfile_on_a_fake_run(fake_run, tmp_path):
    cfg, run = fake_run
    res = run.run_stage("modelfile", {}, lambda out: build_modelfile(cfg, run, out))
    info = res.entry["info"]
    assert info["family"] == "chatml" and info["gguf"] == "mymodel-Q4_K_M.gguf"
    fid = info["fidelity"]
    assert fid["mismatched"] == 0 and fid["strings"] and fid["token_ids"]
    assert fid["matched"] == len(ct.CONVERSATIONS) + 2  # plus the two data conversations
    shared = Path(info["modelfile"])
    assert shared == tmp_path / "modelfiles" / "mymodel.Modelfile"
    in_run = parse_file(run.root / "modelfile" / "Modelfile")
    mf = parse_file(shared)
    assert in_run.from_ == "../gguf/mymodel-Q4_K_M.gguf"
    assert (shared.parent / mf.from_).resolve() == (run.root / "gguf" / "mymodel-Q4_K_M.gguf").resolve()
    # The tiny tokenizer adds BOS and so does the GGUF: the TEMPLATE must not write it.
    assert mf.template == ct.get_family("chatml").go_template
    assert mf.system == "You are a clinic assistant." and mf.license == ["Apache-2.0"]
    # repeat_penalty is written out: Ollama v0.24.0 defaults it to 1.1, later versions (and eval) use 1.0
    assert mf.parameters == {"stop": ["<|im_start|>", "<|im_end|>", "###"], "temperature": ["0.7"],
                             "num_ctx": ["2048"], "repeat_penalty": ["1.0"]}
    # `ollama create -f modelfiles/mymodel.Modelfile` and the run's Modelfile make the same request.
    a = mf.to_create_request(shared.parent).fields
    b = in_run.to_create_request(run.root / "modelfile").fields
    assert a == b and list(a["files"]) == ["mymodel-Q4_K_M.gguf"]
    report = json.loads((run.root / "modelfile" / "fidelity.json").read_text())
    assert report["family"] == "chatml" and all(r["status"] == "match" for r in report["results"])

    check_run_command(str(run.root))  # the same proof for the written Modelfile
    text = (run.root / "modelfile" / "Modelfile").read_text()
    (run.root / "modelfile" / "Modelfile").write_text(text.replace("<|im_start|>assistant\n{{ end }}",
                                                                             "<|im_start|>assistant {{ end }}", 1))
    with pytest.raises(UserError, match="does not reproduce"):
        check_run_command(str(run.root))


@needs_go
def test_build_modelfile_writes_bos_when_the_gguf_does_not(fake_run, tiny_tokenizer_dir):
    cfg, run = fake_run
    _fake_gguf(run.root / "gguf" / "mymodel-Q4_K_M.gguf", add_bos=False)
    res = run.run_stage("modelfile", {}, lambda out: build_modelfile(cfg, run, out))
    assert res.entry["info"]["fidelity"]["add_bos"] is False
    mf = parse_file(run.root / "modelfile" / "Modelfile")
    assert mf.template.startswith("<s>{{")  # training had BOS (the tokenizer added it): the template writes it


def test_build_modelfile_without_go_uses_the_family_reference(fake_run, monkeypatch):
    cfg, run = fake_run
    monkeypatch.setattr(shutil, "which", lambda name: None)
    info = run.run_stage("modelfile", {}, lambda out: build_modelfile(cfg, run, out)).entry["info"]
    assert info["fidelity"]["strings"] is False and info["fidelity"]["mismatched"] == 0
    with pytest.raises(UserError, match="Go is not installed"):
        check_run_command(str(run.root))


def test_build_modelfile_refuses_unknown_templates_and_bad_parameters(fake_run):
    cfg, run = fake_run
    tpl = run.root / "data" / "chat_template.jinja"
    tpl.write_text(ct.family_jinja("qwen2.5").replace("You are Qwen, created by Alibaba Cloud.", "You are Bob."))
    with pytest.raises(UserError) as e:
        build_modelfile(cfg, run, run.root / ".mf")
    assert "matches no chat family" in e.value.message and any("chatml" in d and "differs" in d for d in e.value.details)
    tpl.write_text(ct.family_jinja("chatml"))
    cfg.ollama.parameters = {"Temperature": 1}
    with pytest.raises(UserError, match="ollama.parameters.Temperature: unknown parameter 'Temperature'"):
        build_modelfile(cfg, run, run.root / ".mf")
    cfg.ollama.parameters = {}
    cfg.ollama.quant = "Q8_0"
    with pytest.raises(UserError, match="Q8_0"):
        build_modelfile(cfg, run, run.root / ".mf")


def test_gguf_metadata_reads_header_values(tmp_path):
    import gguf

    from ollama_ft.core.gguf_meta import gguf_add_bos, gguf_metadata

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hé", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, 1.5, 2.5, 3.0])
    w.add_string("tokenizer.chat_template", "{{ messages }} 🙂")
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = gguf_metadata(p, {"tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "general.architecture"})
    assert got == {"tokenizer.chat_template": "{{ messages }} 🙂", "tokenizer.ggml.add_bos_token": False,
                   "general.architecture": "llama"}
    assert gguf_add_bos(p) is False
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE")
    with pytest.raises(UserError, match="not a readable GGUF"):
        gguf_add_bos(bad)


@pytest.mark.slow  # a subprocess that imports transformers: about 20 s on the shared CPUs
@needs_go
def test_cli_modelfile_check_exits_1_on_mismatch(fake_run):
    import subprocess
    import sys

    cfg, run = fake_run
    run.run_stage("modelfile", {}, lambda out: build_modelfile(cfg, run, out))
    mf = run.root / "modelfile" / "Modelfile"
    mf.write_text(mf.read_text().replace("<|im_start|>assistant\n{{ end }}", "<|im_start|>model\n{{ end }}", 1))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "ollama_ft", "modelfile", str(run.root), "--check"],
                          capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr
    assert "TEMPLATE fidelity" in proc.stdout and "mismatch" in proc.stdout
    assert "does not reproduce the training chat template" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_go
def test_build_modelfile_dated_llama32_uses_the_training_day(fake_run, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    cfg, run = fake_run
    jinja = ct.family_jinja("llama3.2")
    (run.root / "data" / "chat_template.jinja").write_text(jinja)
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = ct.render_hf(jinja, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                        bos_token=tok.bos_token, eos_token=tok.eos_token, prefill=True, date_string="03 Feb 2026")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pq.write_table(pa.table({"id": ["1"], "input_ids": [ids], "labels": [ids]}), run.root / "data" / "train.parquet")
    info = run.run_stage("modelfile", {}, lambda out: build_modelfile(cfg, run, out), force=True).entry["info"]
    assert info["family"] == "llama3.2" and info["fidelity"]["mismatched"] == 0
    mf = parse_file(run.root / "modelfile" / "Modelfile")
    assert "Today Date: 03 Feb 2026\n" in mf.template and "26 Jul 2024" not in mf.template
    (run.root / "data" / "train.parquet").unlink()
    with pytest.raises(UserError, match="could not be read back"):
        build_modelfile(cfg, run, run.root / ".mf")


def test_think_filter_names_are_recognised_like_ollama():
    from ollama_ft.ollama.stage import think_filter_applies

    for name in ("deepseek-r1", "deepseek-r1:7b", "team/deepseek-r1:latest", "host:5000/x/deepseek-r1:1"):
        assert think_filter_applies(name), name
    for name in ("deepseek-r1-7b", "my-r1", "deepseek-r1x:7b"):
        assert not think_filter_applies(name), name
    assert think_filter_applies("anything", "qwen3")
