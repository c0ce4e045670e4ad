"""One contract, two servers: every behaviour the stand-in (tests/fake_ollama.py) models is checked here
against the real Ollama too, so the two cannot drift apart. What only the stand-in can do on demand
(HTTP 500s, errors mid-stream, dropped connections) stays in tests/test_ollama_api.py.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")


@pytest.fixture(params=["stand-in", pytest.param("real", marks=pytest.mark.ollama)])
def server_url(request, tmp_path):
    if request.param == "real":
        yield request.getfixturevalue("real_ollama").host
    else:
        yield request.getfixturevalue("fake_ollama").url


def _ndjson_last(r: httpx.Response) -> dict:
    import json

    lines = [json.loads(ln) for ln in r.text.splitlines() if ln.strip()]
    return lines[-1]


def test_blob_create_show_list_chat_delete_contract(server_url, tiny_gguf):
    data = tiny_gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    name = "contract-model"
    with httpx.Client(base_url=server_url, timeout=httpx.Timeout(30.0, read=300.0)) as c:
        assert c.get("/api/version").status_code == 200 and "version" in c.get("/api/version").json()
        c.request("DELETE", "/api/delete", json={"model": name})  # idempotent start
        # blobs: unknown 404, upload 201, known 200; a digest that does not match the bytes is refused
        bad = "sha256:" + "0" * 64
        assert c.head(f"/api/blobs/{bad}").status_code == 404
        assert c.post(f"/api/blobs/{bad}", content=b"not these bytes").status_code == 400
        if c.head(f"/api/blobs/{digest}").status_code != 200:
            assert c.post(f"/api/blobs/{digest}", content=data).status_code == 201
        assert c.head(f"/api/blobs/{digest}").status_code == 200

        # create: streamed NDJSON ending in success; a missing blob is an error, not a model
        r = c.post("/api/create", json={"model": name, "files": {"model.gguf": digest}, "template": CHATML,
                                        "system": "You are terse.",
                                        "parameters": {"temperature": 0.2, "stop": ["<|im_end|>"], "num_ctx": 512}})
        assert r.status_code == 200 and _ndjson_last(r).get("status") == "success", r.text[-500:]
        r = c.post("/api/create", json={"model": "contract-missing", "files": {"model.gguf": bad}, "stream": False})
        assert r.status_code >= 400 or "error" in r.text

        # show gives back what was sent
        show = c.post("/api/show", json={"model": name}).json()
        assert show["template"] == CHATML and show["system"] == "You are terse."
        params = show["parameters"]
        assert "temperature" in params and "0.2" in params and '"<|im_end|>"' in params and "num_ctx" in params
        assert show["details"]["format"] == "gguf" and show["details"]["family"] == "llama"
        assert c.post("/api/show", json={"model": "no-such-model"}).status_code == 404

        # list names it as name:latest with the manifest digest
        tags = c.get("/api/tags").json()["models"]
        assert any(m["name"] == f"{name}:latest" and len(m["digest"]) == 64 for m in tags)

        # chat, not streamed: one answer, done with a reason and counts
        j = c.post("/api/chat", json={"model": name, "stream": False,
                                      "messages": [{"role": "user", "content": "hi"}],
                                      "options": {"num_predict": 4, "temperature": 0}}).json()
        assert j["done"] is True and j["done_reason"] in ("stop", "length")
        assert j["message"]["role"] == "assistant" and isinstance(j["message"]["content"], str)
        assert j["eval_count"] >= 1 and j["prompt_eval_count"] >= 1
        assert c.post("/api/chat", json={"model": "no-such-model", "messages": [], "stream": False}).status_code == 404

        # delete: 200, then gone; a second delete is 404
        assert c.request("DELETE", "/api/delete", json={"model": name}).status_code == 200
        assert c.post("/api/show", json={"model": name}).status_code == 404
        assert c.request("DELETE", "/api/delete", json={"model": name}).status_code == 404
