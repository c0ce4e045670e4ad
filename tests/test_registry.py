"""publish / install against a real OCI registry (Debian's docker-registry, distribution 2.8).

The registry runs on 127.0.0.1 (fixture `oci_registry` in tests/registry_server.py). Bytes sent
are measured with an httpx event hook that counts PATCH bodies as they leave the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.core.runs import Run
from ollama_ft.ollama.registry_client import Target, parse_ref, parse_registry
from ollama_ft.ollama.registry_pull import install_command
from ollama_ft.ollama.registry_push import publish_command, push
from ollama_ft.ollama.registry_source import resolve_source
from ollama_ft.ollama.store import (
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    MEDIA_MODEL,
    MEDIA_TEMPLATE,
    Layer,
    Store,
    build_config_blob,
    build_manifest,
)
from tests import fake_ollama as fake_mod
from tests.registry_server import HoldingProxy, free_port, oci_registry_fixture  # noqa: F401 - `oci_registry`

TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n')
MODELFILE = f'''FROM ../gguf/demo-F16.gguf
TEMPLATE """{TEMPLATE}"""
SYSTEM """You answer briefly."""
PARAMETER stop <|im_end|>
PARAMETER temperature 0
PARAMETER num_ctx 256
LICENSE """Apache-2.0 (test model)"""
'''


class Meter:
    """Counts what the client sends (PATCH bodies) through an httpx event hook."""

    def __init__(self, fail_after_patches: int | None = None):
        self.patch_bytes = 0
        self.patches = 0
        self.methods: list[str] = []
        self.fail_after = fail_after_patches

    def hook(self, request: httpx.Request) -> None:
        self.methods.append(request.method)
        if request.method == "PATCH":
            if self.fail_after is not None and self.patches >= self.fail_after:
                # The connection dies before this chunk leaves: a kill between two chunks.
                raise httpx.ConnectError("connection lost (test)", request=request)
            self.patches += 1
            self.patch_bytes += int(request.headers["Content-Length"])

    def client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self.hook]}, timeout=30)


def _blob(store: Store, data: bytes, media: str) -> Layer:
    return Layer(media, store.add_blob_bytes(data), len(data))


def make_store_model(root: Path, name: str = "demo:latest", sizes=(300_000, 200_000)) -> Store:
    """A store model with a model layer and an adapter layer of random bytes (publish does not parse them)."""
    st = Store(root)
    layers = [_blob(st, os.urandom(sizes[0]), MEDIA_MODEL), _blob(st, os.urandom(sizes[1]), MEDIA_ADAPTER),
              _blob(st, TEMPLATE.encode(), MEDIA_TEMPLATE)]
    cfg = build_config_blob(model_family="llama", model_type="1M", file_type="F16")
    st.write_manifest(name, build_manifest(_blob(st, cfg, MEDIA_CONFIG), layers))
    return st


def make_run(root: Path, gguf: Path, name: str = "demo") -> Run:
    """A run whose export and modelfile stages are done (real runs.py bookkeeping)."""
    run = Run(root / name)

    def export(out: Path) -> dict:
        shutil.copy(gguf, out / "demo-F16.gguf")
        return {"summary": "test export"}

    def modelfile(out: Path) -> dict:
        (out / "Modelfile").write_text(MODELFILE)
        return {"modelfile": str(out / "Modelfile")}

    run.run_stage("export", {"name": name}, export)
    run.run_stage("modelfile", {"name": name, "ollama": {"tag": "latest"}}, modelfile)
    return run


def registry_manifest(server, repo: str, tag: str) -> tuple[dict, bytes, httpx.Response]:
    r = httpx.get(f"{server.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MEDIA_MANIFEST})
    assert r.status_code == 200, r.text
    return json.loads(r.content), r.content, r


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------
# Names and schemes (no registry needed)


def test_scheme_is_http_only_for_loopback_unless_insecure():
    assert parse_registry("127.0.0.1:5000/team") == ("127.0.0.1:5000", "team", "http")
    assert parse_registry("localhost:5000") == ("localhost:5000", None, "http")
    assert parse_registry("[::1]:5000/x")[2] == "http"
    assert parse_registry("registry.example.com/team")[2] == "https"
    assert parse_registry("registry.example.com/team", insecure=True)[2] == "http"
    with pytest.raises(UserError, match="plain HTTP"):
        parse_registry("http://registry.example.com/team")
    assert parse_registry("http://10.0.0.5:5000/team", insecure=True) == ("10.0.0.5:5000", "team", "http")


def test_names_the_registry_or_ollama_would_reject_are_refused():
    ok = parse_ref("127.0.0.1:5000/team/my-model.v2:q4_k_m")
    assert (ok.host, ok.repository, ok.tag, ok.scheme) == ("127.0.0.1:5000", "team/my-model.v2", "q4_k_m", "http")
    assert parse_ref("127.0.0.1:5000/team/m").tag == "latest"
    bad = {
        "127.0.0.1:5000/Team/m:v1": "upper case",        # registries need lower-case repositories
        "127.0.0.1:5000/team/My-Model:v1": "upper case",
        "127.0.0.1:5000/te.am/m:v1": "Ollama would reject",  # Ollama: no '.' in a namespace
        "127.0.0.1:5000/team/m:-v1": "tag",
        "127.0.0.1:5000/team/_m:v1": "registry would reject",
        "127.0.0.1:5000/m:v1": "expected HOST:PORT/namespace/NAME",  # Ollama's two-segment trap
    }
    for ref, why in bad.items():
        with pytest.raises(UserError) as e:
            parse_ref(ref)
        assert why in str(e.value), (ref, str(e.value))


# -------------------------------------------------------------------------------------------
# Round trip


def test_publish_store_model_then_install_into_store(oci_registry, tmp_path):
    src = make_store_model(tmp_path / "src")
    _, local_bytes = src.read_manifest("demo:latest")
    meter = Meter()
    source = resolve_source("demo", tmp_path / "src")
    target = Target(oci_registry.host, "team", "demo", "v1", "http")
    digest, stats = push(source, target, client=meter.client(), chunk_size=64 << 10)
    assert digest == sha(local_bytes)  # pushed verbatim: same model ID
    assert stats.bytes_sent == source.total_bytes == meter.patch_bytes
    assert meter.patches > 8  # chunked (300 kB at 64 KiB) with progress per chunk

    m, raw, r = registry_manifest(oci_registry, "team/demo", "v1")
    assert r.headers["Content-Type"] == MEDIA_MANIFEST and raw == local_bytes
    assert m["config"]["mediaType"] == MEDIA_CONFIG
    assert [x["mediaType"] for x in m["layers"]] == [MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_TEMPLATE]
    for d in [*m["layers"], m["config"]]:
        blob = httpx.get(f"{oci_registry.url}/v2/team/demo/blobs/{d['digest']}").content
        assert sha(blob) == d["digest"] and len(blob) == d["size"]

    # A second publish sends nothing: every blob is already there (HEAD).
    meter2 = Meter()
    _, stats2 = push(source, target, client=meter2.client())
    assert stats2.bytes_sent == 0 == meter2.patch_bytes and "PATCH" not in meter2.methods
    assert len(stats2.skipped) == 4

    dest = tmp_path / "models"
    info = install_command(f"{oci_registry.host}/team/demo:v1", store=dest)
    st = Store(dest)
    path = dest / "manifests" / "registry.ollama.ai" / "library" / "demo" / "v1"
    assert Path(info["manifest"]) == path and path.read_bytes() == local_bytes
    names = sorted(p.name for p in (dest / "blobs").iterdir())
    assert names == sorted(f"sha256-{d['digest'][7:]}" for d in [*m["layers"], m["config"]])
    for n in names:
        assert hashlib.sha256((dest / "blobs" / n).read_bytes()).hexdigest() == n[7:]
    assert sorted(p.name for p in dest.iterdir()) == ["blobs", "manifests"]  # no temp leftovers
    assert st.list_models()[0].display == "demo:v1"


@pytest.fixture
def ollama_stub(tmp_path):
    """The stand-in Ollama server (tests/fake_ollama.py) with its own store."""
    fake = fake_mod.FakeOllama(store_dir=tmp_path / "ollama-models").start()
    try:
        yield fake
    finally:
        fake.stop()


def test_round_trip_run_to_registry_to_ollama_and_store(oci_registry, ollama_stub, tiny_gguf, tmp_path):
    """publish (CLI, from a run's artifacts) -> registry API -> install via the API and into a store -> chat."""
    run = make_run(tmp_path / "runs", tiny_gguf)
    p = subprocess.run([sys.executable, "-m", "ollama_ft", "publish", "demo", "--registry", f"{oci_registry.host}/team",
                        "--tag", "v1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"ollama-ft install {oci_registry.host}/team/demo:v1" in p.stdout

    # What the registry's own API shows.
    tags = httpx.get(f"{oci_registry.url}/v2/team/demo/tags/list").json()
    assert tags == {"name": "team/demo", "tags": ["v1"]}
    m, raw, r = registry_manifest(oci_registry, "team/demo", "v1")
    assert r.headers["Content-Type"] == MEDIA_MANIFEST and r.headers["Docker-Content-Digest"] == sha(raw)
    assert m["schemaVersion"] == 2 and m["mediaType"] == MEDIA_MANIFEST
    assert m["config"]["mediaType"] == MEDIA_CONFIG
    kinds = [x["mediaType"].rsplit(".", 1)[-1] for x in m["layers"]]
    assert kinds == ["model", "template", "system", "license", "params"]
    gguf_bytes = (run.root / "gguf" / "demo-F16.gguf").read_bytes()
    assert m["layers"][0]["digest"] == sha(gguf_bytes) and m["layers"][0]["size"] == len(gguf_bytes)
    blobs = {x["mediaType"].rsplit(".", 1)[-1]: httpx.get(f"{oci_registry.url}/v2/team/demo/blobs/{x['digest']}").content
             for x in [*m["layers"], m["config"]]}
    for x in [*m["layers"], m["config"]]:
        assert sha(blobs[x["mediaType"].rsplit(".", 1)[-1]]) == x["digest"]
    assert blobs["template"].decode() == TEMPLATE and blobs["system"] == b"You answer briefly."
    assert json.loads(blobs["params"]) == {"num_ctx": 256, "stop": ["<|im_end|>"], "temperature": 0}
    cfg = json.loads(blobs["v1+json"])  # the config blob
    assert cfg["model_format"] == "gguf" and cfg["model_family"] == "llama" and cfg["file_type"] == "F16"
    pub = run.entry("publish")["info"]
    assert pub["manifest_digest"] == sha(raw) and pub["bytes_sent"] == sum(len(b) for b in blobs.values())

    # Into the local Ollama (stand-in) through its API, then chat.
    info = install_command(f"{oci_registry.host}/team/demo:v1", host=ollama_stub.url)
    assert info["model"] == "demo:v1" and info["uploaded_bytes"] == len(gguf_bytes)
    show = httpx.post(f"{ollama_stub.url}/api/show", json={"model": "demo:v1"}).json()
    assert show["template"] == TEMPLATE and show["system"] == "You answer briefly."
    assert show["license"] == "Apache-2.0 (test model)"
    import ollama

    reply = ollama.Client(host=ollama_stub.url).chat(
        model="demo:v1", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 6, "seed": 1})
    assert reply.done and isinstance(reply.message.content, str)
    assert ollama_stub.calls("POST", "/api/chat")
    # A second install uploads no weights: Ollama already has them (HEAD).
    again = install_command(f"{oci_registry.host}/team/demo:v1", host=ollama_stub.url, name="demo:again")
    assert again["uploaded_bytes"] == 0 and again["bytes_downloaded"] < 4096

    # Into a store directory, in exactly Ollama's layout.
    dest = tmp_path / "models"
    install_command(f"{oci_registry.host}/team/demo:v1", store=dest, name="demo:v1")
    assert (dest / "manifests" / "registry.ollama.ai" / "library" / "demo" / "v1").read_bytes() == raw
    for x in [*m["layers"], m["config"]]:
        f = dest / "blobs" / f"sha256-{x['digest'][7:]}"
        assert f.stat().st_size == x["size"] and sha(f.read_bytes()) == x["digest"]
    assert len(list((dest / "blobs").iterdir())) == 6


# -------------------------------------------------------------------------------------------
# Faults


def test_registry_down_is_a_clear_error(tmp_path):
    make_store_model(tmp_path / "src")
    port = free_port()  # nothing listens there
    with pytest.raises(UserError) as e:
        publish_command("demo", registry=f"127.0.0.1:{port}/team", store=tmp_path / "src")
    assert f"http://127.0.0.1:{port}" in e.value.message and "cannot reach the registry" in e.value.message
    assert "docker-registry serve" in e.value.hint
    with pytest.raises(UserError) as e:
        install_command(f"127.0.0.1:{port}/team/demo:v1", store=tmp_path / "dest")
    assert f"127.0.0.1:{port}" in e.value.message
    assert not (tmp_path / "dest" / "manifests").exists()


def test_interrupted_upload_resumes_and_sends_only_missing_bytes(oci_registry, tmp_path):
    chunk = 32 << 10
    src = make_store_model(tmp_path / "src", sizes=(400_000, 300_000))
    source = resolve_source("demo", tmp_path / "src")
    model, adapter = source.layers[0], source.layers[1]
    target = Target(oci_registry.host, "team", "demo", "v1", "http")
    # The connection dies after the model blob and 4 chunks of the adapter blob went out.
    model_chunks = -(-model.size // chunk)
    first = Meter(fail_after_patches=model_chunks + 4)
    with pytest.raises(UserError, match="cannot reach the registry"):
        push(source, target, client=first.client(), chunk_size=chunk)
    state = json.loads(source.state_path.read_text())["uploads"]
    (entry,) = state.values()
    assert entry["offset"] == 4 * chunk and entry["size"] == adapter.size

    second = Meter()
    digest, stats = push(source, target, client=second.client(), chunk_size=chunk)
    missing = source.total_bytes - model.size - 4 * chunk
    assert second.patch_bytes == stats.bytes_sent == missing
    assert stats.skipped == [model.digest] and stats.resumed == {adapter.digest: 4 * chunk}
    assert not source.state_path.exists()  # finished uploads leave no state behind
    print(f"\nresume: total {source.total_bytes} B, first try sent {first.patch_bytes} B, "
          f"retry sent {second.patch_bytes} B (= missing {missing} B), resent 0 B")
    m, raw, _ = registry_manifest(oci_registry, "team/demo", "v1")
    assert raw == src.read_manifest("demo:latest")[1] and digest == sha(raw)
    blob = httpx.get(f"{oci_registry.url}/v2/team/demo/blobs/{adapter.digest}").content
    assert sha(blob) == adapter.digest


def test_killed_mid_upload_then_retried_sends_only_missing_bytes(oci_registry, tmp_path):
    """A real `ollama-ft publish` process is SIGKILLed while a chunk is in flight, then run again."""
    chunk = 64 << 10
    make_store_model(tmp_path / "src", sizes=(1_000_000, 600_000))
    source = resolve_source("demo", tmp_path / "src")
    model, adapter = source.layers[0], source.layers[1]
    proxy = HoldingProxy(oci_registry.url).start()
    try:
        proxy.hold_after = -(-model.size // chunk) + 3  # the model blob and 3 adapter chunks get through
        args = [sys.executable, "-m", "ollama_ft", "publish", "demo", "--registry", f"{proxy.host}/team",
                "--tag", "v1", "--store", str(tmp_path / "src"), "--chunk-mb", str(chunk / (1 << 20))]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proxy.held.wait(60), proc.communicate(timeout=5)
        finally:
            proc.kill()  # SIGKILL: no cleanup code runs in the client
            proc.wait(timeout=30)
        proxy.release.set()
        first_sent = proxy.patch_bytes
        assert first_sent == model.size + 3 * chunk
        (entry,) = json.loads(source.state_path.read_text())["uploads"].values()
        assert entry["offset"] == 3 * chunk

        proxy.hold_after, proxy.patch_bytes = None, 0
        meter = Meter()
        info = publish_command("demo", registry=f"{proxy.host}/team", tag="v1", store=tmp_path / "src",
                                 chunk_size=chunk, client=meter.client())
        missing = source.total_bytes - first_sent
        assert meter.patch_bytes == proxy.patch_bytes == info["bytes_sent"] == missing
        assert info["resumed"] == {adapter.digest: 3 * chunk} and info["skipped"] == 1
        print(f"\nkill -9 mid-upload: total {source.total_bytes} B; before the kill {first_sent} B reached the "
              f"registry; the retry sent {meter.patch_bytes} B (exactly the missing bytes), resent 0 B")
    finally:
        proxy.stop()
    m, raw, _ = registry_manifest(oci_registry, "team/demo", "v1")
    for d in [*m["layers"], m["config"]]:
        assert sha(httpx.get(f"{oci_registry.url}/v2/team/demo/blobs/{d['digest']}").content) == d["digest"]


def test_stale_upload_url_restarts_only_that_blob(oci_registry, tmp_path):
    """A chunk cut off mid-body leaves the registry ahead of the signed upload URL: it drops it."""
    chunk = 32 << 10
    make_store_model(tmp_path / "src", sizes=(200_000, 100_000))
    source = resolve_source("demo", tmp_path / "src")
    target = Target(oci_registry.host, "team", "demo", "v1", "http")
    with pytest.raises(UserError):
        push(source, target, client=Meter(fail_after_patches=2).client(), chunk_size=chunk)
    (entry,) = json.loads(source.state_path.read_text())["uploads"].values()
    # Send part of the next chunk behind the client's back, as a killed PATCH would have.
    model = source.layers[0]
    with open(model.path, "rb") as f:
        f.seek(entry["offset"])
        part = f.read(1000)
    httpx.patch(entry["location"], content=part,
                headers={"Content-Range": f"{entry['offset']}-{entry['offset'] + 999}",
                         "Content-Type": "application/octet-stream"})
    meter = Meter()
    _, stats = push(source, target, client=meter.client(), chunk_size=chunk)
    assert stats.restarted == [model.digest] and stats.resumed == {}
    assert meter.patch_bytes == source.total_bytes  # that blob again from 0, the others once
    assert httpx.head(f"{oci_registry.url}/v2/team/demo/blobs/{model.digest}").status_code == 200


def test_corrupt_local_blob_is_refused_before_upload(oci_registry, tmp_path):
    st = make_store_model(tmp_path / "src")
    m, _ = st.read_manifest("demo:latest")
    victim = st.blob_path(m["layers"][1]["digest"])
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    meter = Meter()
    source = resolve_source("demo", tmp_path / "src")
    with pytest.raises(UserError, match="do not match their digest") as e:
        push(source, Target(oci_registry.host, "team", "demo", "v1", "http"), client=meter.client())
    assert str(victim) in "\n".join(e.value.details)
    assert meter.methods == []  # not even a HEAD
    assert httpx.get(f"{oci_registry.url}/v2/_catalog").json()["repositories"] == []


def test_bad_names_are_refused_before_any_request(oci_registry, tmp_path):
    make_store_model(tmp_path / "src", name="Demo:latest")
    source = resolve_source("Demo", tmp_path / "src")
    meter = Meter()
    with pytest.raises(UserError, match="upper case"):
        push(source, Target(oci_registry.host, "team", "Demo", "v1", "http"), client=meter.client())
    with pytest.raises(UserError, match="invalid registry name"):
        publish_command("Demo", registry=f"{oci_registry.host}/team", store=tmp_path / "src")
    with pytest.raises(UserError, match="Ollama would reject"):
        publish_command("Demo", registry=f"{oci_registry.host}/my.team", tag="v1", store=tmp_path / "src")
    assert meter.methods == []
    assert httpx.get(f"{oci_registry.url}/v2/_catalog").json()["repositories"] == []


def _corrupt_registry_blob(server, digest: str) -> None:
    hexd = digest[7:]
    data = server.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_install_refuses_a_blob_whose_digest_does_not_match(oci_registry, ollama_stub, tmp_path):
    st = make_store_model(tmp_path / "src")
    source = resolve_source("demo", tmp_path / "src")
    push(source, Target(oci_registry.host, "team", "demo", "v1", "http"))
    m, _ = st.read_manifest("demo:latest")
    _corrupt_registry_blob(oci_registry, m["layers"][1]["digest"])  # the registry serves it as stored
    dest = tmp_path / "models"
    with pytest.raises(UserError, match="digest mismatch") as e:
        install_command(f"{oci_registry.host}/team/demo:v1", store=dest)
    assert m["layers"][1]["digest"] in e.value.message
    assert not (dest / "manifests").exists()  # nothing registered
    assert not (dest / "blobs").exists() or list((dest / "blobs").iterdir()) == []
    assert [p.name for p in dest.iterdir()] in ([], ["blobs"])  # staging removed
    # Through the Ollama API: refused before any blob upload or create.
    with pytest.raises(UserError, match="digest mismatch"):
        install_command(f"{oci_registry.host}/team/demo:v1", host=ollama_stub.url)
    assert ollama_stub.calls("POST", "/api/blobs/") == [] and ollama_stub.calls("POST", "/api/create") == []
    assert ollama_stub.store.list_models() == []


def test_install_refuses_bad_local_name_and_unreachable_ollama(oci_registry, tmp_path):
    with pytest.raises(UserError, match="invalid model name"):
        install_command(f"{oci_registry.host}/team/demo:v1", store=tmp_path / "m", name="bad name")
    assert not (tmp_path / "m").exists()
    make_store_model(tmp_path / "src")
    push(resolve_source("demo", tmp_path / "src"), Target(oci_registry.host, "team", "demo", "v1", "http"))
    port = free_port()
    with pytest.raises(UserError, match="cannot connect to Ollama") as e:
        install_command(f"{oci_registry.host}/team/demo:v1", host=f"http://127.0.0.1:{port}")
    assert "--store" in e.value.hint


def test_https_to_a_plain_http_registry_suggests_insecure(oci_registry, tmp_path):
    make_store_model(tmp_path / "src")
    source = resolve_source("demo", tmp_path / "src")
    with pytest.raises(UserError) as e:
        push(source, Target(oci_registry.host, "team", "demo", "v1", "https"))
    assert f"https://{oci_registry.host}" in e.value.message and "--insecure" in e.value.hint


def test_cli_reports_registry_down_as_one_error_line(tmp_path):
    make_store_model(tmp_path / "src")
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "ollama_ft", "publish", "demo", "--registry", f"127.0.0.1:{port}/team",
                        "--store", str(tmp_path / "src")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "cannot reach the registry" in p.stderr and f"127.0.0.1:{port}" in p.stderr
    assert "Traceback" not in p.stderr and "hint:" in p.stderr
