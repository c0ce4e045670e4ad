"""core/gguf_meta: the one GGUF metadata reader agrees with gguf.GGUFReader, and is fast on big vocabularies."""

from __future__ import annotations

import time

import gguf
import pytest

from ollama_ft.core.gguf_meta import BIG_ARRAY, BigArray, GGUFDamaged, file_type_name, read_gguf_meta


def _write(path, n_tokens: int) -> None:
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_string("general.name", "tiny ü")
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("general.tags", ["a", "b"])
    w.add_token_list([f"tok{i}" for i in range(n_tokens)])
    w.add_token_scores([float(i) for i in range(n_tokens)])
    w.add_tensor("a.weight", np.ones((4, 8), dtype=np.float16))
    w.add_tensor("b.weight", np.zeros((3,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("n_tokens", [BIG_ARRAY, 5000])
def test_same_values_as_gguf_reader(tmp_path, n_tokens):
    p = tmp_path / "m.gguf"
    _write(p, n_tokens)
    meta = read_gguf_meta(p)
    ref = gguf.GGUFReader(str(p))
    for f in ref.fields.values():
        if f.name.startswith("GGUF."):
            continue
        want = f.contents()
        got = meta.fields[f.name]
        if isinstance(got, BigArray):
            assert len(want) == got.count > BIG_ARRAY
        else:
            assert got == want, f.name
    assert [(t.name, t.type_name, t.n_elements, t.n_bytes, t.data_offset) for t in meta.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes), int(t.data_offset)) for t in ref.tensors]
    assert meta.data_offset == ref.data_offset and meta.file_type == "Q8_0" and meta.parameter_count == 35


def test_file_type_names_come_from_gguf():
    assert file_type_name(15) == "Q4_K_M" and file_type_name(0) == "F32" and file_type_name(32) == "BF16"
    assert file_type_name(999) == "unknown"


def test_damaged_files(tmp_path):
    p = tmp_path / "m.gguf"
    _write(p, 3000)
    data = p.read_bytes()
    for cut in (3, 20, 200, 30000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFDamaged):
            read_gguf_meta(bad)
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(GGUFDamaged):
        read_gguf_meta(tmp_path / "x.gguf")


@pytest.mark.slow  # GGUFReader on the real 262k vocabulary: 9-16 s on the shared CPUs
def test_big_vocabulary_is_not_decoded(gemma_gguf):
    """The reason the reader is a GGUFReader subclass (see its docstring): timed against GGUFReader itself."""
    t = time.perf_counter()
    meta = read_gguf_meta(gemma_gguf)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    gguf.GGUFReader(str(gemma_gguf))
    theirs = time.perf_counter() - t
    print(f"Gemma 3 270M (262k tokens): read_gguf_meta {ours:.3f} s, GGUFReader {theirs:.2f} s ({theirs / ours:.0f}x)")
    assert meta.fields["tokenizer.ggml.tokens"] == BigArray("STRING", 262144)
    assert meta.file_type == "Q4_K_M" and meta.get("general.architecture") == "gemma3"
    assert ours * 10 < theirs
