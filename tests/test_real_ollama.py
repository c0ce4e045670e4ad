"""Against the real Ollama server (v0.24.0 built from its Go module by `make ollama`), end to end:
register a run's GGUF, /api/show, chat through the official client and the real CLI, re-register
sending nothing, delete; and for every chat family, the prompt the server itself renders
(`_debug_render_only`) equals the training render on every fidelity conversation, including a history
the server truncated to num_ctx.

These run in CI (`make test` builds the server; OLLAMA_FT_REQUIRE_OLLAMA=1 turns a missing one into a
failure); elsewhere they skip with the reason.
"""

from __future__ import annotations

import hashlib
import shutil

import httpx
import pytest

from ollama_ft.ollama import api as ollama_api
from ollama_ft.ollama import templates as ct
from tests.registry_server import oci_registry_fixture  # noqa: F401 - the `oci_registry` fixture
from tests.test_chat_templates import FIXTURES, REFUSED, _fixture
from tests.test_ollama_api import _make_run

pytestmark = [pytest.mark.ollama,
              pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (the fidelity proof needs it)")]


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server.host, timeout=httpx.Timeout(30.0, read=300.0))


def test_register_show_chat_cli_reregister_delete(real_ollama, tiny_gguf, tmp_path):
    import ollama

    name = "ollama-ft-real"
    cfg, run, _ = _make_run(tmp_path, tiny_gguf, name=name)
    info = ollama_api.register_run(cfg, run, host=real_ollama.host)
    assert info["model"] == f"{name}:latest"
    assert info["uploaded_bytes"] == tiny_gguf.stat().st_size and not info["skipped_upload"]
    v = info["verify"]
    assert v["template_matches"] and v["parameters_match"] and v["system_matches"]
    # the server's own render of a multi-turn chat equals the training render
    assert v["served_prompt"]["checked"] and v["served_prompt"]["equal"], v["served_prompt"]
    # the blob landed in the real store under its sha256
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert (real_ollama.models_dir / "blobs" / f"sha256-{digest}").is_file()

    client = ollama.Client(host=real_ollama.host)
    show = client.show(name)
    assert show.template == ct.get_family("chatml").go_template or "<|im_start|>" in (show.template or "")
    reply = client.chat(model=name, messages=[{"role": "user", "content": "hello"}],
                        options={"num_predict": 8, "temperature": 0})
    assert reply.done and reply.eval_count and reply.eval_count >= 1

    p = real_ollama.cli("run", name, "hello", timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]

    again = ollama_api.register_run(cfg, run, host=real_ollama.host)
    assert again["uploaded_bytes"] == 0 and again["skipped_upload"] is True
    assert again["digest"] == info["digest"]

    client.delete(name)
    assert name not in {(m.model or "").split(":")[0] for m in client.list().models}


def _family_models(server, gguf, family: str, template: str, systems: set[str | None]) -> dict[str | None, str]:
    """One model per distinct Modelfile SYSTEM, all on the same GGUF blob with the family's TEMPLATE."""
    import ollama

    client = ollama.Client(host=server.host)
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    with _http(server) as http:
        if http.head(f"/api/blobs/{digest}").status_code != 200:
            with open(gguf, "rb") as f:
                assert http.post(f"/api/blobs/{digest}", content=f.read()).status_code in (200, 201)
    names = {}
    for i, system in enumerate(sorted(systems, key=lambda s: s or "")):
        name = f"fid-{family.replace('.', '-')}-{i}"
        kwargs = {"system": system} if system else {}
        client.create(model=name, files={"model.gguf": digest}, template=template, **kwargs)
        names[system] = name
    return names


def _served_renderer(server, names: dict[str | None, str], options: dict | None = None):
    def render(batch):
        out = []
        with _http(server) as http:
            for messages, system in batch:
                try:
                    text = ollama_api.served_prompt(http, names[system], messages, options)
                    out.append(text if text is not None else RuntimeError("no _debug_info in the reply"))
                except Exception as e:  # noqa: BLE001 - reported per conversation
                    out.append(e)
        return out
    return render


FAMILIES = sorted(set(ct.family_names()) | set(FIXTURES.values()))


@pytest.mark.parametrize("family", FAMILIES)
def test_server_renders_the_training_prompt_for_every_family(real_ollama, tiny_gguf, family, family_tokenizers,
                                                             chat_templates_dir):
    fam = ct.get_family(family)
    stem = next((k for k, v in FIXTURES.items() if v == family), None)
    source = _fixture(chat_templates_dir, stem) if stem else family  # the real HF template where we have it
    names = _family_models(real_ollama, tiny_gguf, family, fam.go_template, {c.system for c in ct.CONVERSATIONS})
    # The GGUF's own add-BOS flag: the server's prompt is text, llama.cpp adds BOS when tokenizing it.
    rep = ct.check_fidelity(source, fam.go_template, tokenizer=family_tokenizers(family),
                            render_served=_served_renderer(real_ollama, names))
    assert rep.ok, [(r.name, r.detail) for r in rep.mismatched]
    skipped = {r.name for r in rep.results if r.status == "skipped"}
    assert skipped == REFUSED.get(family, set())
    assert rep.matched == len(ct.CONVERSATIONS) - len(skipped)


@pytest.mark.parametrize("family", ["chatml", "llama3.1", "deepseek-r1-distill", "qwen2.5"])
def test_a_history_truncated_by_num_ctx_renders_like_training(real_ollama, tiny_gguf, family):
    """A chat longer than num_ctx: the server drops the oldest turns (keeping the system message); what it
    then renders must equal the training render of exactly the messages it kept."""
    fam = ct.get_family(family)
    system = "Answer from the clinic protocols."
    turns = []
    for k in range(20):
        turns += [{"role": "user", "content": f"Question {k}: when does room {k} open on weekdays?"},
                  {"role": "assistant", "content": f"Room {k} opens at {7 + k % 3}:40 and closes at 18:20."}]
    messages = [{"role": "system", "content": system}, *turns, {"role": "user", "content": "And on Saturday?"}]
    names = _family_models(real_ollama, tiny_gguf, family, fam.go_template, {None})
    with _http(real_ollama) as http:
        cut = ollama_api.served_prompt(http, names[None], messages, {"num_ctx": 256})

    def train_render(msgs):  # BOS is added at tokenization on both sides (the GGUF's flag), not in the text
        text = ct.render_hf(fam.jinja, msgs, bos_token=fam.bos_token, eos_token=fam.eos_token, **fam.detect_kwargs)
        return text.removeprefix(fam.bos_token or "")

    served = cut.removeprefix(fam.bos_token or "")
    rest = messages[1:]
    assert served != train_render(messages), "num_ctx 256 did not truncate; make the history longer"
    kept = [k for k in range(1, len(rest)) if served == train_render([messages[0], *rest[k:]])]
    assert kept, "the truncated prompt equals no training render of a suffix of the history"
    assert system in cut  # the system message survives truncation


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed (apt)")
def test_real_push_then_install_keeps_every_config_field(real_ollama, oci_registry, tiny_gguf, tmp_path):
    """A model pushed by the real `ollama push --insecure` to docker-registry, installed back with
    `ollama-ft install` into the real server: the same layers and the config fields a real Ollama
    writes (renderer, parser, requires) survive."""
    import json as _json

    import ollama

    from ollama_ft.ollama import registry_pull as registry

    client = ollama.Client(host=real_ollama.host)
    digest = "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    with _http(real_ollama) as http:
        with open(tiny_gguf, "rb") as f:
            http.post(f"/api/blobs/{digest}", content=f.read())
        r = http.post("/api/create", json={
            "model": "pushsrc", "files": {"model.gguf": digest}, "template": ct.get_family("chatml").go_template,
            "system": "You are terse.", "parameters": {"temperature": 0.3, "stop": ["<|im_end|>"]},
            "renderer": "qwen3-coder", "parser": "qwen3-coder", "requires": "0.24.0", "stream": False})
        assert r.status_code == 200, r.text
    target = f"{oci_registry.host}/team/pushed:v1"
    p = real_ollama.cli("cp", "pushsrc", target, check=False)
    assert p.returncode == 0, p.stderr
    p = real_ollama.cli("push", "--insecure", target, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]

    res = registry.install_command(target, host=real_ollama.host, insecure=True, name="installed:v1")
    assert res["model"] == "installed:v1"

    def manifest_and_config(name: str, tag: str) -> tuple[dict, dict]:
        path = real_ollama.models_dir / "manifests"
        m = next(p for p in path.rglob(tag) if p.parent.name == name)
        man = _json.loads(m.read_text())
        cfg = _json.loads((real_ollama.models_dir / "blobs" / man["config"]["digest"].replace(":", "-")).read_text())
        return man, cfg

    src_m, src_cfg = manifest_and_config("pushsrc", "latest")
    got_m, got_cfg = manifest_and_config("installed", "v1")
    assert [layer["digest"] for layer in got_m["layers"]] == [layer["digest"] for layer in src_m["layers"]]
    for k in ("renderer", "parser", "requires", "model_format", "model_family", "file_type"):
        assert got_cfg.get(k) == src_cfg.get(k), (k, src_cfg, got_cfg)
    assert got_cfg["renderer"] == "qwen3-coder" and got_cfg["requires"] == "0.24.0"
    show = client.show("installed:v1")
    assert "temperature" in (show.parameters or "") and show.template == ct.get_family("chatml").go_template


def test_adapter_route_where_the_server_can_load_it(real_ollama, tiny_llama, tiny_gguf, tmp_path):
    """FROM base GGUF + ADAPTER LoRA GGUF (llama runs on llama.cpp's runner in v0.24.0, which loads LoRAs):
    created and answering through the real server; the refusal for Go-engine bases is in test_ollama_api."""
    import ollama

    from ollama_ft.core.config import RunConfig
    from ollama_ft.export.stage import build_gguf
    from ollama_ft.merge.stage import copy_side_files, merge_streamed
    from tests.test_export import make_run
    from tests.test_merge import make_adapter

    run = make_run(tmp_path, tiny_llama)
    base = run.root / "base"
    for f in tiny_llama.iterdir():
        shutil.copy(f, base / f.name)
    make_adapter(base, run.root / "adapter", alpha=16)
    merge_streamed(base, run.root / "adapter", run.root / "merged")
    copy_side_files(base, run.root / "data", run.root / "merged")
    cfg = RunConfig(name="tinyrun")
    cfg.export.quants = ["F16"]
    cfg.export.adapter_gguf = True
    out = tmp_path / "gguf"
    out.mkdir()
    build_gguf(cfg, run, run.root / "merged", out)
    lora = out / "tinyrun-lora-F16.gguf"

    digests = {}
    with _http(real_ollama) as http:
        for p in (tiny_gguf, lora):
            d = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            assert http.post(f"/api/blobs/{d}", content=p.read_bytes()).status_code in (200, 201)
            digests[p] = d
        r = http.post("/api/create", json={"model": "with-adapter", "files": {"model.gguf": digests[tiny_gguf]},
                                           "adapters": {"adapter.gguf": digests[lora]},
                                           "template": ct.get_family("chatml").go_template, "stream": False})
        assert r.status_code == 200, r.text
    client = ollama.Client(host=real_ollama.host)
    reply = client.chat(model="with-adapter", messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 4, "temperature": 0})
    assert reply.done and reply.eval_count >= 1
    client.delete("with-adapter")


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.1", "mistral", "deepseek-r1-distill"])
def test_tools_are_refused_not_misrendered(real_ollama, tiny_gguf, family):
    """Tool definitions and calls cannot be rendered as the HF template would (Go's json vs HF tojson), so
    the TEMPLATE does not advertise tools or thinking (nor does the GGUF, see test_capabilities): the
    server then refuses a tools request outright instead of serving a prompt training never saw."""
    import ollama

    fam = ct.get_family(family)
    names = _family_models(real_ollama, tiny_gguf, family, fam.go_template, {None})
    client = ollama.Client(host=real_ollama.host)
    assert set(client.show(names[None]).capabilities or []) == {"completion"}
    tool = {"type": "function", "function": {"name": "opening_hours", "description": "Opening hours of a room",
                                             "parameters": {"type": "object", "required": ["room"],
                                                            "properties": {"room": {"type": "string"}}}}}
    with pytest.raises(ollama.ResponseError, match="does not support tools") as e:
        client.chat(model=names[None], messages=[{"role": "user", "content": "When does room 4 open?"}],
                    tools=[tool], options={"num_predict": 4})
    assert e.value.status_code == 400


def test_a_parameter_newer_than_the_server_stops_before_upload(real_ollama, tiny_gguf, tmp_path):
    """draft_num_predict exists since Ollama v0.30; v0.24.0 would refuse it at create after the upload."""
    from ollama_ft.core.errors import UserError

    cfg, run, mf = _make_run(tmp_path, tiny_gguf, name="ollama-ft-newparam")
    mf.write_text(mf.read_text() + "PARAMETER draft_num_predict 4\n")
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    blob = real_ollama.models_dir / "blobs" / f"sha256-{digest}"
    had_blob = blob.exists()
    with pytest.raises(UserError, match=r"Ollama 0\.24\.0 does not know PARAMETER draft_num_predict") as e:
        ollama_api.register_run(cfg, run, host=real_ollama.host)
    assert "nothing was uploaded" in e.value.message and "ollama.parameters" in (e.value.hint or "")
    assert blob.exists() == had_blob
    # the rule is the server's: its own CLI refuses the PARAMETER, and through the API v0.24.0 stores it but
    # ignores it at load ("invalid option provided" in its log): either way the setting would not take effect
    mf2 = tmp_path / "newparam.Modelfile"
    mf2.write_text(f"FROM {tiny_gguf}\nPARAMETER draft_num_predict 4\n")
    p = real_ollama.cli("create", "ollama-ft-newparam", "-f", str(mf2), timeout=120, check=False)
    assert p.returncode != 0 and "unknown parameter 'draft_num_predict'" in p.stderr
