"""core/files: the one digest helper (and its cache for big files), size format and base-metadata loader."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from ollama_ft.core import files
from ollama_ft.core.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "DIGEST_CACHE_MIN_BYTES", 1024)  # "big" for the test: above 1 KB
    return tmp_path / "cache"


def _count_reads(monkeypatch) -> list[int]:
    calls = []
    real = hashlib.sha256

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(files.hashlib, "sha256", counting)
    return calls


def test_big_file_is_hashed_once_and_again_after_a_change(tmp_path, cache, monkeypatch):
    (tmp_path / ".gguf.tmp").mkdir()
    f = tmp_path / ".gguf.tmp" / "model.gguf"
    f.write_bytes(os.urandom(4096))
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    calls = _count_reads(monkeypatch)
    assert files.sha256_file(f) == want
    assert files.digest_file(f) == "sha256:" + want  # register/publish after export: from the cache
    assert len(calls) == 1
    assert (cache / "digests.json").is_file()
    # Renaming the directory it is in (a stage put in place) keeps the entry.
    moved = tmp_path / "gguf"
    os.replace(tmp_path / ".gguf.tmp", moved)
    assert files.sha256_file(moved / f.name) == want and len(calls) == 1
    # The same size, rewritten in place (mtime set back, as a copy tool would): hashed again.
    st = (moved / f.name).stat()
    data = bytearray((moved / f.name).read_bytes())
    data[0] ^= 0xFF
    (moved / f.name).write_bytes(bytes(data))
    os.utime(moved / f.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files.sha256_file(moved / f.name) == hashlib.new("sha256", bytes(data)).hexdigest()
    assert len(calls) == 2


def test_small_files_are_not_cached_and_known_digests_are_used_as_given(tmp_path, cache, monkeypatch):
    f = tmp_path / "Modelfile"
    f.write_text("FROM x\n")
    calls = _count_reads(monkeypatch)
    files.sha256_file(f)
    files.sha256_file(f)
    assert len(calls) == 2 and not (cache / "digests.json").exists()
    known = {str(tmp_path / "." / "Modelfile"): "sha256:" + "ab" * 32}
    assert files.digest_file(f, known) == "sha256:" + "ab" * 32 and len(calls) == 2


def test_damaged_digest_cache_only_costs_a_rehash(tmp_path, cache):
    cache.mkdir(parents=True)
    (cache / "digests.json").write_text("{not json")
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 2048)
    assert files.sha256_file(f) == hashlib.sha256(b"x" * 2048).hexdigest()
    assert len(json.loads((cache / "digests.json").read_text())) == 1


def test_human_bytes_is_binary_everywhere():
    assert files.human_bytes(512) == "512 B"
    assert files.human_bytes(5 << 20) == "5.0 MB"
    assert files.human_bytes(1536 << 20) == "1.5 GB"
    assert files.human_bytes(3 << 40) == "3.0 TB"


def test_read_base_meta(tmp_path):
    assert files.read_base_meta(tmp_path) == {}
    (tmp_path / files.BASE_META).write_text('{"family": "gemma3", "license": "gemma"}')
    assert files.read_base_meta(tmp_path)["family"] == "gemma3"
    (tmp_path / files.BASE_META).write_text('{\n  "family": \n}')
    with pytest.raises(UserError, match=r"ollama_ft_base.json:3"):
        files.read_base_meta(tmp_path)


def test_iter_jsonl_skips_blank_lines_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert list(files.iter_jsonl(good, hint="h")) == [(1, {"a": 1}), (4, {"a": 2})]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    it = files.iter_jsonl(bad, hint="each line is one JSON object")
    assert next(it) == (1, {"a": 1})  # records before the bad line still arrive (streamed)
    with pytest.raises(UserError) as e:
        next(it)
    assert e.value.message.startswith(f"{bad}:2: not valid JSON") and e.value.hint == "each line is one JSON object"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"a": 1}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text"):
        list(files.iter_jsonl(latin1, hint="h"))
