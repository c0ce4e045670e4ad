"""Ollama names (contract §4.3-4.4) and the store layout (§4.1-4.2)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.core.names import ModelName, parse_name
from ollama_ft.ollama.store import (
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MANIFEST,
    MEDIA_MODEL,
    MEDIA_TEMPLATE,
    DigestMismatch,
    Layer,
    Store,
    build_config_blob,
    build_manifest,
    default_store_dir,
    digest_bytes,
    human_number,
    parse_digest,
)

VALID = [
    # input, display, (host, namespace, model, tag)
    ("m", "m:latest", ("registry.ollama.ai", "library", "m", "latest")),
    ("m:v1", "m:v1", ("registry.ollama.ai", "library", "m", "v1")),
    ("my-medical-model", "my-medical-model:latest", ("registry.ollama.ai", "library", "my-medical-model", "latest")),
    ("qwen2.5:0.5b-instruct", "qwen2.5:0.5b-instruct", ("registry.ollama.ai", "library", "qwen2.5", "0.5b-instruct")),
    ("team/m:tag", "team/m:tag", ("registry.ollama.ai", "team", "m", "tag")),
    ("library/m", "m:latest", ("registry.ollama.ai", "library", "m", "latest")),
    ("registry.ollama.ai/library/m:latest", "m:latest", ("registry.ollama.ai", "library", "m", "latest")),
    ("localhost:5000/team/m:v1", "localhost:5000/team/m:v1", ("localhost:5000", "team", "m", "v1")),
    ("127.0.0.1:5000/team/m", "127.0.0.1:5000/team/m:latest", ("127.0.0.1:5000", "team", "m", "latest")),
    ("http://localhost:5000/team/m:v1", "localhost:5000/team/m:v1", ("localhost:5000", "team", "m", "v1")),
    ("https://example.com/ns/m", "example.com/ns/m:latest", ("example.com", "ns", "m", "latest")),
    ("Mixed/Model:Tag", "Mixed/Model:Tag", ("registry.ollama.ai", "Mixed", "Model", "Tag")),
    ("_m:_t", "_m:_t", ("registry.ollama.ai", "library", "_m", "_t")),
    ("m" * 80 + ":" + "t" * 80, "m" * 80 + ":" + "t" * 80, ("registry.ollama.ai", "library", "m" * 80, "t" * 80)),
]

INVALID = [
    # input, words the message must contain
    ("", "empty"),
    ("m:", "tag is empty"),
    ("/m", "namespace is empty"),
    ("localhost:5000/m", "namespace 'localhost:5000'"),  # the two-segment trap (§4.4)
    ("ns.x/m", "namespace 'ns.x'"),  # no '.' in namespaces
    ("-m", "model '-m'"),  # first character
    (".hidden", "model '.hidden'"),
    ("m:-t", "tag '-t'"),
    ("m m", "model 'm m'"),
    ("m@sha256:" + "a" * 64, "model 'm@sha256'"),  # @digest is not parsed
    ("m" * 81, "1-80"),
    ("m:" + "t" * 81, "tag"),
    ("h/" + "n" * 81 + "/m", "namespace"),
    ("h" * 351 + "/ns/m", "host"),
    ("h/n/m/extra", "host 'h/n'"),
    ("http://m", "namespace is empty"),
    ("ftp://h/n/m", "scheme"),
    ("modèle", "model 'modèle'"),
]


@pytest.mark.parametrize(("raw", "display", "parts"), VALID)
def test_valid_names(raw, display, parts):
    n = parse_name(raw)
    assert n.display == display == str(n)
    assert (n.host, n.namespace, n.model, n.tag) == parts
    assert n.manifest_relpath == Path("manifests", *parts)


@pytest.mark.parametrize(("raw", "words"), INVALID)
def test_invalid_names_quote_name_and_rule(raw, words):
    with pytest.raises(UserError) as ei:
        parse_name(raw)
    msg = ei.value.message
    assert "invalid model name" in msg
    assert words in msg
    if raw:
        assert repr(raw) in msg


def test_two_segment_trap_hint_names_the_fix():
    with pytest.raises(UserError) as ei:
        parse_name("localhost:5000/m")
    assert "host:port/namespace/model:tag" in ei.value.hint


def test_scheme_is_kept_apart_and_names_compare_case_insensitively():
    n = parse_name("http://localhost:5000/team/m:v1")
    assert n.scheme == "http" and n.full == "localhost:5000/team/m:v1"
    assert parse_name("Team/M:V1").same_as(parse_name("team/m:v1"))
    assert ModelName(model="m") == parse_name("m")


def test_human_number_like_ollama():
    assert [human_number(x) for x in (8_030_000_000, 494_030_000, 135_000_000, 12_345, 999)] == \
        ["8.0B", "494.03M", "135M", "12K", "999"]


def test_digest_forms():
    hexd = "ab" * 32
    assert parse_digest(f"sha256:{hexd}") == hexd
    assert parse_digest(f"sha256-{hexd.upper()}") == hexd
    for bad in ("", "sha256:abc", f"md5:{hexd}", f"sha256:{hexd}0"):
        with pytest.raises(UserError, match="invalid digest format"):
            parse_digest(bad)


def test_blob_files_are_content_addressed(tmp_path):
    store = Store(tmp_path / "models")
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    want = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    got = store.add_blob_file(src, expected_digest=want)
    assert got == want
    assert store.blob_path(want) == tmp_path / "models" / "blobs" / f"sha256-{want[7:]}"
    assert store.blob_path(want).read_bytes() == src.read_bytes()
    assert store.has_blob(want) and store.has_blob(want.replace(":", "-"))
    assert store.add_blob_bytes(b"hello") == digest_bytes(b"hello")
    # no temp files left behind
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == sorted(
        [f"sha256-{want[7:]}", f"sha256-{hashlib.sha256(b'hello').hexdigest()}"])


def test_blob_mismatch_is_refused_and_leaves_nothing(tmp_path):
    store = Store(tmp_path / "models")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch) as ei:
        store.add_blob_stream(io.BytesIO(b"data"), expected_digest=wrong)
    assert ei.value.actual == digest_bytes(b"data")
    assert list(store.blobs_dir.iterdir()) == []
    # Ollama keeps the upload under its true digest (§1.2): keep_on_mismatch does the same
    with pytest.raises(DigestMismatch):
        store.add_blob_stream(io.BytesIO(b"data"), expected_digest=wrong, keep_on_mismatch=True)
    assert store.has_blob(digest_bytes(b"data"))


def test_manifest_bytes_follow_ollama_schema(tmp_path):
    cfg = build_config_blob("gguf", "llama", model_type="494.03M", file_type="Q4_K_M")
    assert cfg.endswith(b"\n") and b"\n" not in cfg[:-1]
    assert list(json.loads(cfg)) == ["model_format", "model_family", "model_families", "model_type", "file_type",
                                     "architecture", "os"]
    assert json.loads(cfg)["model_families"] == ["llama"]
    cfg2 = build_config_blob("gguf", "qwen2", context_length=4096, renderer="")
    assert json.loads(cfg2)["context_length"] == 4096 and "renderer" not in json.loads(cfg2)
    with pytest.raises(TypeError):
        build_config_blob("gguf", "x", rootfs={})
    layers = [Layer(MEDIA_MODEL, "sha256:" + "1" * 64, 10, from_="model.gguf"),
              Layer(MEDIA_TEMPLATE, "sha256:" + "2" * 64, 3)]
    m = build_manifest(Layer(MEDIA_CONFIG, digest_bytes(cfg), len(cfg)), layers)
    assert m.endswith(b"}\n")
    d = json.loads(m)
    assert list(d) == ["schemaVersion", "mediaType", "config", "layers"]
    assert d["schemaVersion"] == 2 and d["mediaType"] == MEDIA_MANIFEST
    assert d["config"] == {"mediaType": MEDIA_CONFIG, "digest": digest_bytes(cfg), "size": len(cfg)}
    assert d["layers"][0] == {"mediaType": MEDIA_MODEL, "digest": "sha256:" + "1" * 64, "size": 10, "from": "model.gguf"}
    assert "from" not in d["layers"][1]
    # Go's encoder escapes HTML characters
    assert b"\\u003c" in build_manifest(Layer(MEDIA_CONFIG, "sha256:" + "3" * 64, 1),
                                        [Layer(MEDIA_LICENSE, "sha256:" + "4" * 64, 1, from_="<x>")])


def test_store_manifests_roundtrip_list_lookup_delete(tmp_path):
    store = Store(tmp_path / "models")
    gguf = store.add_blob_bytes(b"GGUF fake weights")
    tmpl = store.add_blob_bytes(b"{{ .Prompt }}")
    cfg = build_config_blob("gguf", "llama")
    cfg_d = store.add_blob_bytes(cfg)
    m1 = build_manifest(Layer(MEDIA_CONFIG, cfg_d, len(cfg)),
                        [Layer(MEDIA_MODEL, gguf, 17), Layer(MEDIA_TEMPLATE, tmpl, 13)])
    path = store.write_manifest("Team/My-Model:V1", m1)
    assert path == tmp_path / "models" / "manifests" / "registry.ollama.ai" / "Team" / "My-Model" / "V1"
    assert path.read_bytes() == m1
    data, raw = store.read_manifest("team/my-model:v1")  # lookups ignore case
    assert raw == m1 and data["layers"][0]["digest"] == gguf
    assert store.manifest_digest("team/my-model:v1") == hashlib.sha256(m1).hexdigest()
    assert store.model_gguf_path("Team/My-Model:V1") == store.blob_path(gguf)
    # a second model sharing the GGUF
    m2 = build_manifest(Layer(MEDIA_CONFIG, cfg_d, len(cfg)), [Layer(MEDIA_MODEL, gguf, 17)])
    store.write_manifest("localhost:5000/ns/other", m2)
    assert [n.display for n in store.list_models()] == ["localhost:5000/ns/other:latest", "Team/My-Model:V1"]
    store.delete_model("team/my-model:v1")
    assert not store.has_blob(tmpl)  # only this model used it
    assert store.has_blob(gguf) and store.has_blob(cfg_d)  # still used by the other
    assert [n.display for n in store.list_models()] == ["localhost:5000/ns/other:latest"]
    with pytest.raises(UserError, match="not found"):
        store.read_manifest("team/my-model:v1")


def test_default_store_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "x"))
    assert default_store_dir() == tmp_path / "x"
    monkeypatch.delenv("OLLAMA_MODELS")
    assert default_store_dir() == Path.home() / ".ollama" / "models"
