"""Registration through the Ollama API, against the stand-in server (tests/fake_ollama.py) and,
opt-in, a real Ollama at OLLAMA_HOST.

The first half checks that the stand-in answers as the contract (§1) says; the second half
registers a real tiny GGUF end to end and chats with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.ollama import api as ollama_api
from ollama_ft.ollama import capabilities
from ollama_ft.ollama import run as ollama_run
from ollama_ft.ollama.store import MEDIA_MODEL, MEDIA_PARAMS, MEDIA_SYSTEM, MEDIA_TEMPLATE, gguf_facts
from tests.fake_ollama import format_parameters

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")


def _ndjson(r: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------
# host handling


@pytest.mark.parametrize(("given", "want"), [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
    (":56789", "http://127.0.0.1:56789"),
    ("example.com:56789/", "http://example.com:56789"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:8443/path/", "https://example.com:8443/path"),
    ("[::1]", "http://[::1]:11434"),
    ("[::1]:5000", "http://[::1]:5000"),
])
def test_resolve_host_like_ollama_python(monkeypatch, given, want):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_api.resolve_host(given) == want


def test_resolve_host_precedence(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "envhost:1234")
    assert ollama_api.resolve_host(None) == "http://envhost:1234"
    assert ollama_api.resolve_host("flaghost") == "http://flaghost:11434"
    with pytest.raises(UserError, match="scheme"):
        ollama_api.resolve_host("ftp://x")


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def test_reachability_and_manual_hint(fake_ollama):
    assert ollama_api.is_reachable(fake_ollama.url)
    assert not ollama_api.is_reachable(_dead_url(), timeout=0.5)
    hint = ollama_api.manual_register_hint("my-model:latest", Path("modelfiles/my-model.Modelfile"))
    assert "ollama serve" in hint
    assert "ollama create my-model:latest -f modelfiles/my-model.Modelfile" in hint


# -------------------------------------------------------------------------------------------
# the stand-in server answers as the contract says


def test_small_endpoints(fake_ollama):
    with httpx.Client(base_url=fake_ollama.url) as c:
        assert c.get("/").text == "Ollama is running"
        assert c.get("/api/version").json() == {"version": "0.33.0-rc2"}
        assert c.get("/api/tags").json() == {"models": []}
        r = c.post("/api/show", json={"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
        r = c.post("/api/show", json={})
        assert (r.status_code, r.json()) == (400, {"error": "model is required"})
        r = c.request("DELETE", "/api/delete", json={"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
        r = c.get("/api/nothing")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/plain")


def test_blob_endpoints(fake_ollama):
    data = b"some blob bytes" * 100
    d = _sha(data)
    with httpx.Client(base_url=fake_ollama.url) as c:
        r = c.head("/api/blobs/sha256:xyz")
        assert r.status_code == 400
        r = c.post("/api/blobs/not-a-digest", content=b"x")
        assert (r.status_code, r.json()) == (400, {"error": "invalid digest format"})
        r = c.head(f"/api/blobs/{d}")
        assert r.status_code == 404
        r = c.post(f"/api/blobs/{d}", content=data)
        assert (r.status_code, r.content) == (201, b"")
        assert fake_ollama.store.blob_path(d).read_bytes() == data
        assert c.head(f"/api/blobs/{d}").status_code == 200
        assert c.head(f"/api/blobs/{d.replace(':', '-').upper().replace('SHA256', 'sha256')}").status_code == 200
    with httpx.Client(base_url=fake_ollama.url) as c:
        # already there: 200 and the body is not read
        before = fake_ollama.blob_bytes_received()
        r = c.post(f"/api/blobs/{d}", content=data)
        assert (r.status_code, r.content) == (200, b"")
        assert fake_ollama.blob_bytes_received() == before
    with httpx.Client(base_url=fake_ollama.url) as c:
        other = b"other bytes"
        wrong = "sha256:" + "0" * 64
        r = c.post(f"/api/blobs/{wrong}", content=other)
        assert r.status_code == 400
        assert r.json() == {"error": f'digest mismatch, expected "{wrong}", got "{_sha(other)}"'}
        assert fake_ollama.store.has_blob(_sha(other))  # kept under its true digest
        # a new upload must use `sha256:` + lower-case hex; the `-` form is a mismatch
        third = b"third"
        r = c.post(f"/api/blobs/{_sha(third).replace(':', '-')}", content=third)
        assert r.status_code == 400 and "digest mismatch" in r.json()["error"]


def _upload(url: str, path: Path) -> str:
    d = _sha(path.read_bytes())
    with httpx.Client(base_url=url) as c:
        assert c.post(f"/api/blobs/{d}", content=path.read_bytes()).status_code in (200, 201)
    return d


def test_create_errors(fake_ollama, tiny_gguf, tmp_path):
    missing = "sha256:" + "9" * 64
    with httpx.Client(base_url=fake_ollama.url) as c:
        r = c.post("/api/create", json={"model": "bad name!", "files": {"m.gguf": missing}})
        assert (r.status_code, r.json()) == (400, {"error": "invalid model name"})
        r = c.post("/api/create", json={"model": "x", "modelfile": "FROM ./m.gguf"})  # pre-v0.5.5 request
        assert (r.status_code, r.json()) == (400, {"error": "neither 'from' or 'files' was specified"})
        r = c.post("/api/create", json={"model": "x", "files": {"../m.gguf": missing}})
        assert (r.status_code, r.json()) == (400, {"error": "file path must be relative"})
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": ""}})
        assert (r.status_code, r.json()) == (400, {"error": "invalid digest format"})
        r = c.post("/api/create", json={"model": "x", "files": {"weights.bin": missing}})
        assert (r.status_code, r.json()) == (400, {"error": "unknown type"})
        # .gguf key, blob missing: 200, progress, then an error line; 500 without streaming
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": missing}})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        blob = fake_ollama.store.blob_path(missing)
        assert _ndjson(r) == [{"status": "parsing GGUF"}, {"error": f"open {blob}: no such file or directory"}]
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": missing}, "stream": False})
        assert r.status_code == 500 and "no such file or directory" in r.json()["error"]
        # .gguf key, not a GGUF: streamed error; 400 without streaming
        not_gguf = tmp_path / "fake.gguf"
        not_gguf.write_bytes(b"not a gguf at all")
        d = _upload(fake_ollama.url, not_gguf)
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": d}})
        assert _ndjson(r) == [{"status": "parsing GGUF"}, {"error": "supplied file was not in GGUF format"}]
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": d}, "stream": False})
        assert (r.status_code, r.json()) == (400, {"error": "supplied file was not in GGUF format"})
        r = c.post("/api/create", json={"model": "x", "from": "not-here"})
        assert _ndjson(r) == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    assert fake_ollama.store.list_models() == []


def test_create_show_tags_delete(fake_ollama, tiny_gguf):
    d = _upload(fake_ollama.url, tiny_gguf)
    req = {"model": "team/tiny:v1", "files": {"tiny.gguf": d}, "template": CHATML, "system": "Be brief.",
           "parameters": {"stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.7, "num_ctx": 4096,
                          "num_predict": 1000000},
           "license": "MIT"}
    with httpx.Client(base_url=fake_ollama.url) as c:
        r = c.post("/api/create", json=req)
        lines = _ndjson(r)
        statuses = [x["status"] for x in lines]
        assert statuses[0] == "parsing GGUF" and statuses[1] == f"using existing layer {d}"
        assert sum(s.startswith("creating new layer sha256:") for s in statuses) == 4
        assert statuses[-2:] == ["writing manifest", "success"]
        # again: every layer exists now; stream:false returns only the last object
        r = c.post("/api/create", json={**req, "stream": False})
        assert (r.status_code, r.json()) == (200, {"status": "success"})

        store = fake_ollama.store
        manifest, raw = store.read_manifest("team/tiny:v1")
        media = [x["mediaType"] for x in manifest["layers"]]
        assert media[0] == MEDIA_MODEL and manifest["layers"][0]["from"] == "tiny.gguf"
        assert {MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_PARAMS} <= set(media)
        assert json.loads(store.read_blob_bytes(manifest["config"]["digest"]))["model_family"] == "llama"

        tags = c.get("/api/tags").json()["models"]
        assert [m["name"] for m in tags] == ["team/tiny:v1"]
        assert tags[0]["digest"] == hashlib.sha256(raw).hexdigest()  # hex, no prefix
        assert tags[0]["details"]["format"] == "gguf" and tags[0]["details"]["quantization_level"] == "F16"

        show = c.post("/api/show", json={"model": "team/tiny:v1"}).json()
        assert show["template"] == CHATML and show["system"] == "Be brief." and show["license"] == "MIT"
        assert show["parameters"].splitlines() == [
            f"{'num_ctx':<30} 4096", f"{'num_predict':<30} 1e+06",
            f"{'stop':<30} \"<|im_end|>\"", f"{'stop':<30} \"<|im_start|>\"", f"{'temperature':<30} 0.7"]
        assert ollama_api.parse_show_parameters(show["parameters"]) == req["parameters"]
        assert show["modelfile"].startswith('# Modelfile generated by "ollama show"')
        assert show["model_info"]["general.architecture"] == "llama"
        assert "tokenizer.chat_template" not in show["model_info"]
        assert show["model_info"]["tokenizer.ggml.tokens"] == []  # long arrays emptied unless verbose

        r = c.request("DELETE", "/api/delete", json={"model": "team/tiny:v1"})
        assert (r.status_code, r.content) == (200, b"")
        assert c.get("/api/tags").json() == {"models": []}
        assert not store.has_blob(d)  # no other manifest used it


def test_fault_switches(fake_ollama, tiny_gguf):
    d = _upload(fake_ollama.url, tiny_gguf)
    fake_ollama.fail_create_midstream = "boom in the middle"
    with httpx.Client(base_url=fake_ollama.url) as c:
        lines = _ndjson(c.post("/api/create", json={"model": "m", "files": {"m.gguf": d}, "template": CHATML}))
        assert lines[0] == {"status": "parsing GGUF"} and lines[-1] == {"error": "boom in the middle"}
        assert fake_ollama.store.list_models() == []
        fake_ollama.fail_create_midstream = None
        fake_ollama.fail_status["/api/create"] = (500, "internal trouble")
        r = c.post("/api/create", json={"model": "m", "files": {"m.gguf": d}})
        assert (r.status_code, r.json()) == (500, {"error": "internal trouble"})


def test_format_parameters_matches_go_printing():
    text = format_parameters({"seed": 42, "top_p": 0.9, "min_p": 0.00001, "stop": ["a\"b", "\n"],
                              "use_mmap": True})
    assert text.splitlines() == [f"{'min_p':<30} 1e-05", f"{'seed':<30} 42", f"{'stop':<30} \"a\\\"b\"",
                                 f"{'stop':<30} \"\\n\"", f"{'top_p':<30} 0.9", f"{'use_mmap':<30} true"]
    assert ollama_api.parse_show_parameters(text) == {"min_p": 1e-05, "seed": 42, "stop": ["a\"b", "\n"],
                                                      "top_p": 0.9, "use_mmap": True}


def test_gguf_facts_of_a_real_gguf(tiny_gguf):
    f = gguf_facts(tiny_gguf)
    assert f["architecture"] == "llama" and f["file_type"] == "F16" and f["general_type"] == "model"
    assert f["parameter_count"] > 100_000 and f["parameter_size"].endswith("K")
    assert "<|im_start|>" in f["chat_template"]


# -------------------------------------------------------------------------------------------
# registration end to end


def _make_run(tmp_path: Path, gguf: Path, name: str = "tiny-chat", stop: str = "<|im_end|>"):
    """A run with an exported GGUF and a hand-written Modelfile recorded by the modelfile stage."""
    from ollama_ft.core.config import RunConfig
    from ollama_ft.core.runs import Run

    root = tmp_path / "runs" / "tinyrun"
    (root / "gguf").mkdir(parents=True)
    shutil.copy(gguf, root / "gguf" / "tinyrun-F16.gguf")
    mf = tmp_path / "modelfiles" / "tiny-chat.Modelfile"
    mf.parent.mkdir()
    mf.write_text(
        "# hand-written for the test\n"
        "FROM ../runs/tinyrun/gguf/tinyrun-F16.gguf\n"
        f'TEMPLATE """{CHATML}"""\n'
        'SYSTEM """You are terse."""\n'
        f'PARAMETER stop "{stop}"\n'
        'PARAMETER stop "<|im_start|>"\n'
        "PARAMETER temperature 0.2\n"
        "PARAMETER num_ctx 512\n"
        "LICENSE MIT\n")
    run = Run(root)
    run.record("modelfile", {"modelfile": str(mf)})
    cfg = RunConfig.model_validate({"name": "tinyrun", "runs_dir": str(tmp_path / "runs"), "ollama": {"name": name}})
    return cfg, run, mf


def test_register_end_to_end_then_reregister_sends_nothing(fake_ollama, tiny_gguf, tmp_path):
    import ollama

    cfg, run, mf = _make_run(tmp_path, tiny_gguf)
    size = tiny_gguf.stat().st_size
    info = ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert info["model"] == "tiny-chat:latest" and info["host"] == fake_ollama.url
    assert info["uploaded_bytes"] == size and info["skipped_upload"] is False
    assert fake_ollama.blob_bytes_received() == size  # measured on the server side
    assert info["create_statuses"][-1] == "success"
    _, raw = fake_ollama.store.read_manifest("tiny-chat")
    assert info["digest"] == hashlib.sha256(raw).hexdigest()
    v = info["verify"]
    assert v["template_matches"] and v["parameters_match"] and v["system_matches"]
    assert v["shown_parameters"] == {"stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.2, "num_ctx": 512}
    assert v["chat_reply"].strip(), "the tiny model answered nothing"
    assert "registered" in info["summary"]
    # the stored model is what the Modelfile says, and it chats through the official client
    client = ollama.Client(host=fake_ollama.url)
    show = client.show("tiny-chat")
    assert show.template == CHATML and show.license == "MIT"
    reply = client.chat(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 8, "temperature": 0})
    assert reply.message.content and reply.done_reason in ("stop", "length")

    # idempotent: HEAD says the blob is there, nothing is uploaded, the manifest is the same
    posts_before = len(fake_ollama.calls("POST", "/api/blobs/"))
    again = ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert again["uploaded_bytes"] == 0 and again["skipped_upload"] is True
    assert len(fake_ollama.calls("POST", "/api/blobs/")) == posts_before
    assert fake_ollama.blob_bytes_received() == size
    assert again["digest"] == info["digest"]
    assert [r.status for r in fake_ollama.calls("HEAD", "/api/blobs/")] == [404, 200]


def test_register_refuses_a_bad_name_before_any_request(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf, name="localhost:5000/tiny")
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "invalid model name 'localhost:5000/tiny:latest'" in ei.value.message
    assert fake_ollama.requests == []


def test_register_without_server_explains_what_to_do(tiny_gguf, tmp_path):
    cfg, run, mf = _make_run(tmp_path, tiny_gguf)
    url = _dead_url()
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=url)
    assert url in ei.value.message
    assert "ollama serve" in ei.value.hint and f"ollama create tiny-chat:latest -f {mf}" in ei.value.hint


def test_register_error_line_mid_stream(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    fake_ollama.fail_create_midstream = "error writing layer: disk full"
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert ei.value.message.startswith("Ollama failed while creating tiny-chat:latest after 'creating new layer")
    assert ei.value.message.endswith(": error writing layer: disk full")
    assert fake_ollama.store.list_models() == []


def test_register_http_500(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    fake_ollama.fail_status["/api/create"] = (500, "something broke")
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert ei.value.message == "Ollama refused to create tiny-chat:latest (HTTP 500): something broke"


def test_register_connection_lost_during_upload(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    fake_ollama.drop_uploads = True
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert ei.value.message.startswith(f"lost the connection to Ollama at {fake_ollama.url}")
    assert "not sent twice" in ei.value.hint


def test_register_blob_gone_before_create(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    fake_ollama.prune_before_create = True
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "after 'parsing GGUF'" in ei.value.message and "no such file or directory" in ei.value.message
    assert "blob is missing" in ei.value.hint


def test_register_local_gguf_missing(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, mf = _make_run(tmp_path, tiny_gguf)
    (run.root / "gguf" / "tinyrun-F16.gguf").unlink()
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "is not an existing local file" in ei.value.message and "tinyrun-F16.gguf" in ei.value.message
    assert fake_ollama.requests == []


def test_register_notices_a_server_that_changes_the_template(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    fake_ollama.rewrite_template = lambda t: t.replace("<|im_start|>assistant", "<|im_start|>bot")
    with pytest.raises(UserError, match="TEMPLATE differs"):
        ollama_api.register_run(cfg, run, host=fake_ollama.url)


def test_evaluation_gate(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    run.record("eval", {"gate": {"passed": False, "reason": "ROUGE-L fell from 0.41 to 0.22"}})
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "ROUGE-L fell from 0.41 to 0.22" in ei.value.message and "--force" in ei.value.hint
    assert fake_ollama.requests == []
    info = ollama_api.register_run(cfg, run, host=fake_ollama.url, gate_force=True)
    assert info["model"] == "tiny-chat:latest"


def test_cli_register_through_the_pipeline(fake_ollama, tiny_gguf, tmp_path):
    """`ollama-ft register RUN` end to end in a subprocess: unreachable server first, then the stand-in."""
    import subprocess
    import sys

    cfg, run, mf = _make_run(tmp_path, tiny_gguf)
    (run.root / "run.yaml").write_text("name: tinyrun\nollama:\n  name: tiny-chat\n")

    def cli(*args):
        env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
        return subprocess.run([sys.executable, "-m", "ollama_ft", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)

    dead = _dead_url()
    p = cli("register", str(run.root), "--host", dead)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    err = " ".join(p.stderr.split())
    assert f"Ollama is not reachable at {dead}" in err and "ollama serve" in err
    assert "ollama create tiny-chat -f modelfiles/tiny-chat.Modelfile" in err
    p = cli("register", str(run.root), "--host", fake_ollama.url)
    assert p.returncode == 0, p.stderr
    err = " ".join(p.stderr.split())
    assert "uploading tiny-chat.gguf" not in err and "uploading tinyrun-F16.gguf" in err
    assert "verified: /api/show matches" in err and "registered tiny-chat:latest" in err
    entry = run.entry("register")
    assert entry["info"]["model"] == "tiny-chat:latest"
    assert entry["info"]["digest"] == fake_ollama.store.manifest_digest("tiny-chat")


def test_jinja_override_reasons():
    tools_jinja = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert capabilities.jinja_override_reasons(tools_jinja, CHATML) == ["tools"]
    assert capabilities.jinja_override_reasons(tools_jinja, CHATML + "{{ if .Tools }}{{ end }}") == []
    think = "{{ content.split('</think>')[-1] }} <think>\n"
    assert capabilities.jinja_override_reasons(think, CHATML) == ["thinking"]
    assert capabilities.jinja_override_reasons(None, CHATML) == []


# -------------------------------------------------------------------------------------------
# chat and generate on the stand-in run the stored GGUF with the stored template


def _register(fake, tmp_path, gguf):
    cfg, run, mf = _make_run(tmp_path, gguf)
    ollama_api.register_run(cfg, run, host=fake.url)
    return run


def test_generate_honours_num_predict_and_stop(fake_ollama, tiny_gguf, tmp_path):
    _register(fake_ollama, tmp_path, tiny_gguf)
    with httpx.Client(base_url=fake_ollama.url, timeout=60) as c:
        base = {"model": "tiny-chat", "prompt": "Tell me a story.", "stream": False}
        r = c.post("/api/generate", json={**base, "options": {"num_predict": 5, "temperature": 0}}).json()
        assert r["done"] is True and r["done_reason"] == "length" and 1 <= r["eval_count"] <= 5
        streamed = _ndjson(c.post("/api/generate", json={**base, "stream": True,
                                                         "options": {"num_predict": 24, "temperature": 0}}))
        pieces = [x["response"] for x in streamed[:-1]]
        text = "".join(pieces)
        assert text.startswith(r["response"])  # greedy: the same start
        # stop on a whole token from the second half (a random model also emits partial UTF-8
        # bytes that never print, and a stop string spanning them could not match)
        stop = max(pieces[len(pieces) // 2:], key=lambda x: len(x.strip()))
        assert len(stop.strip()) >= 2, f"no usable stop string in {pieces!r}"
        stopped = c.post("/api/generate", json={**base, "options": {"num_predict": 24, "temperature": 0,
                                                                      "stop": [stop]}}).json()
        assert (stopped["done_reason"], stopped["response"]) == ("stop", text[:text.find(stop)]), (pieces, stop)
        # streaming: NDJSON lines, the last one done with the metrics
        r = c.post("/api/chat", json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                                      "options": {"num_predict": 6, "temperature": 0}})
        lines = _ndjson(r)
        assert r.headers["content-type"] == "application/x-ndjson"
        assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
        assert lines[-1]["done_reason"] in ("stop", "length") and "eval_count" in lines[-1]
        assert "".join(x["message"]["content"] for x in lines).strip()
        r = c.post("/api/chat", json={"model": "nope", "messages": []})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})


def test_chat_prompt_is_the_stored_template_rendered_by_go(fake_ollama, tiny_gguf, tmp_path):
    """The stand-in renders exactly what Ollama would: compare its output with a raw generate on the
    prompt rendered by Go's text/template from the stored TEMPLATE and SYSTEM."""
    from ollama_ft.ollama.templates import render_go

    _register(fake_ollama, tmp_path, tiny_gguf)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    prompt = render_go(CHATML, msgs, system="You are terse.")
    assert prompt == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    opts = {"num_predict": 12, "temperature": 0}
    with httpx.Client(base_url=fake_ollama.url, timeout=60) as c:
        chat = c.post("/api/chat", json={"model": "tiny-chat", "messages": msgs, "stream": False,
                                         "options": opts}).json()
        raw = c.post("/api/generate", json={"model": "tiny-chat", "prompt": prompt, "raw": True, "stream": False,
                                            "options": opts}).json()
    assert chat["message"]["content"] == raw["response"]
    assert chat["prompt_eval_count"] == raw["prompt_eval_count"]


def test_run_command_through_ollama_and_local(fake_ollama, tiny_gguf, tmp_path, capsys):
    run = _register(fake_ollama, tmp_path, tiny_gguf)
    text = ollama_run.run_command("tiny-chat", "hello", max_tokens=8, host=fake_ollama.url)
    out = capsys.readouterr().out
    assert text.strip() and text in out
    with pytest.raises(UserError, match="not in Ollama"):
        ollama_run.run_command("other-model", "hello", host=fake_ollama.url)
    with pytest.raises(UserError) as ei:
        ollama_run.run_command("tiny-chat", "hello", host=_dead_url())
    assert "ollama serve" in ei.value.hint and "--local" in ei.value.hint
    local = ollama_run.run_command(str(run.root), "hello", local=True, max_tokens=8)
    out = capsys.readouterr()
    assert local.strip() and local in out.out
    # llama.cpp runs in a child whose native log goes to the run's logs/, not into the answer
    for stream in (out.out, out.err):
        assert "llama_" not in stream and "load_tensors" not in stream
    assert (run.root / "logs" / "llama.log").is_file()


# -------------------------------------------------------------------------------------------
# opt-in: a real Ollama server


def _real_host() -> str | None:
    host = ollama_api.resolve_host(None)
    return host if os.environ.get("OLLAMA_HOST") and ollama_api.is_reachable(host) else None


@pytest.mark.ollama
def test_register_against_a_real_ollama(tiny_gguf, tmp_path, request):
    """The user's own Ollama when OLLAMA_HOST answers (any version), else the one `make ollama` built."""
    import ollama

    host = _real_host() or request.getfixturevalue("real_ollama").host
    name = f"ollama-ft-test-{os.getpid()}"
    cfg, run, _ = _make_run(tmp_path, tiny_gguf, name=name)
    client = ollama.Client(host=host)
    try:
        info = ollama_api.register_run(cfg, run, host=host)
        assert info["verify"]["template_matches"] and info["verify"]["parameters_match"]
        again = ollama_api.register_run(cfg, run, host=host)
        assert again["uploaded_bytes"] == 0 and again["skipped_upload"] is True
        reply = client.chat(model=name, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 8})
        assert reply.message.content is not None
    finally:
        try:
            client.delete(name)
        except ollama.ResponseError:
            pass


def test_register_refuses_a_truncated_gguf_before_any_upload(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    path = run.root / "gguf" / "tinyrun-F16.gguf"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "tinyrun-F16.gguf" in ei.value.message
    assert fake_ollama.blob_bytes_received() == 0
    assert not fake_ollama.calls("POST", "/api/create")


def test_register_refuses_a_gguf_changed_since_export(fake_ollama, tiny_gguf, tmp_path):
    cfg, run, _ = _make_run(tmp_path, tiny_gguf)
    run.record("export", {"summary": "test"})
    run.update_manifest(lambda m: m["stages"]["export"].__setitem__("outputs", {"tinyrun-F16.gguf": "0" * 64}))
    with pytest.raises(UserError, match="changed since the export stage verified it"):
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert fake_ollama.blob_bytes_received() == 0


def _gguf_with_arch(path: Path, arch: str, adapter: bool = False) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if adapter:
        w.add_type("adapter")
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<s>", "a"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_adapter_on_a_go_engine_architecture_is_refused_before_upload(fake_ollama, tmp_path):
    root = tmp_path / "runs" / "adrun"
    (root / "gguf").mkdir(parents=True)
    _gguf_with_arch(root / "gguf" / "base.gguf", "gemma3")
    _gguf_with_arch(root / "gguf" / "lora.gguf", "gemma3", adapter=True)
    mf = root / "Modelfile"
    mf.write_text("FROM gguf/base.gguf\nADAPTER gguf/lora.gguf\n")
    from ollama_ft.core.config import RunConfig
    from ollama_ft.core.runs import Run

    run = Run(root)
    run.record("modelfile", {"modelfile": str(mf)})
    cfg = RunConfig.model_validate({"name": "adrun", "runs_dir": str(tmp_path / "runs"), "ollama": {"name": "ad"}})
    with pytest.raises(UserError) as ei:
        ollama_api.register_run(cfg, run, host=fake_ollama.url)
    assert "cannot load a LoRA ADAPTER on a gemma3 model" in ei.value.message and "nothing was uploaded" in ei.value.message
    assert "merged model" in ei.value.hint
    assert fake_ollama.blob_bytes_received() == 0 and not fake_ollama.calls("POST", "/api/create")
