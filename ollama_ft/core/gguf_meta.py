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
