"""The one GGUF metadata reader: header, metadata keys and tensor index, decoded by PyPI `gguf`.

Every stage reads GGUF facts through `read_gguf_meta` (base: a GGUF base model; export: structure
check; ollama: config blob, add_bos, template; eval: the base's quant), so the field decoding is
gguf's own (`GGUFReader` parsing, `ReaderField.contents()`) and the file-type names are
`gguf.LlamaFileType`'s.

Why a subclass and not GGUFReader as it is (measured on the 253 MB Gemma 3 270M Q4_K_M GGUF, 262,144
tokens, AMD EPYC, 2 shared threads, gguf 0.19): `GGUFReader(path)` takes 8.7-15.8 s, because it
makes one numpy view per vocabulary string (and per score and token type); this reader takes
0.06-0.07 s on the same file (tests/test_gguf_meta.py times both: 219x). It overrides two of
GGUFReader's internals: arrays of more than `BIG_ARRAY` items are bounds-checked as one numpy view
(numbers) or walked by their lengths (strings) and kept as a `BigArray` (item type and count), never
decoded; and tensors are indexed without mapping their data. Everything else (magic, version, byte
order, key/value parsing, alignment, duplicate keys) is gguf's code. gguf is pinned below 0.20 in
pyproject.toml; tests/test_gguf_meta.py compares this reader with GGUFReader field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIG_ARRAY = 64  # arrays longer than this are summarised (vocabularies, merges, scores), not decoded


class GGUFDamaged(ValueError):
    """The file is not a GGUF, or its header, metadata or tensor index is cut short or malformed."""


@dataclass(frozen=True)
class BigArray:
    """A metadata array too long to decode here: its item type and length (truthy when not empty)."""

    item_type: str
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest dimension first)
    type_name: str  # gguf.GGMLQuantizationType name: F32, F16, Q4_K, ...
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset of its data in the file


@dataclass(frozen=True)
class GGUFMeta:
    path: Path
    version: int
    fields: dict[str, Any]  # key -> str | int | float | bool | list | BigArray
    tensors: list[TensorInfo]
    data_offset: int
    size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def file_type(self) -> str:
        """general.file_type as a name (Q4_K_M, F16, F32...); 'unknown' when absent or unknown."""
        ft = self.fields.get("general.file_type")
        return file_type_name(int(ft)) if isinstance(ft, int) else "unknown"

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def file_type_name(ft: int) -> str:
    """llama.cpp's file type number as the quant name people write (15 -> Q4_K_M, 0 -> F32)."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(ft).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _reader_class():
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

    class _MetaReader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            if len(raw_itype) != 1 or len(alen) != 1:
                raise GGUFDamaged("metadata cut short")
            count = int(alen[0])
            if count <= BIG_ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            itype = GGUFValueType(int(raw_itype[0]))
            start = orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:  # one view of the whole array: contents() returns all of it
                vals = self._get(start, nptype, count)
                if len(vals) != count:
                    raise GGUFDamaged(f"an array of {count} items runs past the end of the file")
                return 12 + int(vals.nbytes), [raw_itype, alen, vals], [2], [GGUFValueType.ARRAY, itype]
            if itype != GGUFValueType.STRING:
                raise GGUFDamaged(f"unsupported array item type {itype.name}")
            fmt = "<Q" if self.byte_order == "I" else ">Q"
            pos, size = start, len(self.data)
            for _ in range(count):  # skip the strings by their lengths
                if pos + 8 > size:
                    raise GGUFDamaged(f"a string array needs byte {pos + 8}, the file has {size}")
                pos += 8 + struct.unpack_from(fmt, self.data, pos)[0]
            if pos > size:
                raise GGUFDamaged(f"a string array needs byte {pos}, the file has {size}")
            return pos - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, GGUFValueType.STRING]

        def _build_tensors(self, start_offs: int, fields) -> None:
            self.tensor_index: list[TensorInfo] = []
            for field in fields:
                _len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
                try:
                    ttype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise GGUFDamaged(f"tensor {bytes(name_data).decode('utf-8', 'replace')}: unknown type "
                                      f"{int(raw_dtype[0])}") from None
                block, type_size = GGML_QUANT_SIZES[ttype]
                n = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
                self.tensor_index.append(TensorInfo(
                    name=str(bytes(name_data), encoding="utf-8"), shape=tuple(int(d) for d in dims),
                    type_name=ttype.name, n_elements=n, n_bytes=n * type_size // block,
                    data_offset=int(start_offs + offset_tensor[0])))

    return _MetaReader


def read_gguf_meta(path: Path | str) -> GGUFMeta:
    """Header, metadata and tensor index of a GGUF. Raises GGUFDamaged (a ValueError) on a damaged file."""
    from gguf import GGUFValueType

    path = Path(path)
    try:
        r = _reader_class()(str(path), "r")
        fields: dict[str, Any] = {}
        for f in r.fields.values():
            if f.name.startswith("GGUF."):  # the reader's own version/count pseudo-fields
                continue
            if len(f.types) > 1 and f.types[0] == GGUFValueType.ARRAY and int(f.parts[4][0]) > BIG_ARRAY:
                fields[f.name] = BigArray(f.types[-1].name, int(f.parts[4][0]))  # parts: key, type, item type, count
            else:
                fields[f.name] = f.contents()
        version = int(r.fields["GGUF.version"].parts[0][0])
        return GGUFMeta(path=path, version=version, fields=fields, tensors=list(r.tensor_index),
                        data_offset=int(r.data_offset), size=len(r.data))
    except GGUFDamaged:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
        # what GGUFReader raises on a cut-short or malformed file (bad magic, a short read, bad UTF-8...)
        raise GGUFDamaged(f"{type(e).__name__}: {e}") from None


DAMAGED_HINT = "the file is damaged or incomplete; re-create it (`ollama-ft export RUN --force`) or download it again"


def check_gguf(path: str | Path) -> dict[str, Any]:
    """The structure check every GGUF gets before it is used or registered: a UserError if it is not a
    GGUF, is truncated (a tensor's data past the end) or lacks the basic keys (architecture, tokenizer).

    Returns {path, bytes, architecture, type, name, tensors, file_type, chat_template, tokenizer_model,
    tokenizer_pre, lineage, adapter?}. export/gguf.verify_gguf_file adds llama.cpp's load check.
    """
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    hint = DAMAGED_HINT
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')", hint=hint)
    try:
        meta = read_gguf_meta(path)
    except GGUFDamaged as e:
        raise UserError(f"{path}: GGUF header or metadata is corrupted or truncated ({e})", hint=hint) from None
    problems = [f"tensor {t.name} ends at byte {t.data_offset + t.n_bytes} but the file has {size}"
                for t in meta.tensors if t.data_offset + t.n_bytes > size]
    if not meta.tensors:
        problems.append("no tensors")
    fields = meta.fields
    arch = fields.get("general.architecture")
    gtype = fields.get("general.type") or "model"
    if not arch:
        problems.append("general.architecture missing")
    if gtype != "adapter" and fields.get("tokenizer.ggml.model") is None:
        problems.append("tokenizer.ggml.model missing")
    if gtype != "adapter" and not fields.get("tokenizer.ggml.tokens"):
        problems.append("tokenizer.ggml.tokens missing")
    if problems:
        raise UserError(f"{path}: GGUF is corrupted or truncated", hint=hint, details=problems[:10])
    info: dict[str, Any] = {
        "path": str(path), "bytes": size, "architecture": arch, "type": gtype,
        "name": fields.get("general.name"), "tensors": len(meta.tensors), "file_type": fields.get("general.file_type"),
        "chat_template": fields.get("tokenizer.chat_template"), "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
        "lineage": {k: v for k, v in fields.items() if isinstance(v, str | int | float | list) and k.startswith(
            ("general.base_model.", "general.dataset.", "general.finetune"))},
    }
    if gtype == "adapter":
        info["adapter"] = {k: v for k, v in fields.items() if k.startswith("adapter.")}
    return info


def gguf_metadata(gguf_path: Path, keys: set[str]) -> dict[str, Any]:
    """The wanted metadata keys that the GGUF has; a damaged file is a UserError."""
    from .errors import UserError

    try:
        meta = read_gguf_meta(gguf_path)
    except (GGUFDamaged, OSError) as e:
        raise UserError(f"{gguf_path} is not a readable GGUF file: {e}", hint="re-run the export stage") from None
    return {k: meta.fields[k] for k in keys if k in meta.fields}


def gguf_add_bos(gguf_path: Path) -> bool | None:
    """tokenizer.ggml.add_bos_token of a GGUF (what llama.cpp, hence Ollama, does), None when unset."""
    v = gguf_metadata(Path(gguf_path), {"tokenizer.ggml.add_bos_token"}).get("tokenizer.ggml.add_bos_token")
    return None if v is None else bool(v)
