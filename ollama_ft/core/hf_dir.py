"""Readers for an HF model directory that need no torch: safetensors headers, JSON files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import UserError

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
              "U8": "uint8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def safetensors_summary(d: Path) -> dict[str, Any]:
    """Parameter and tensor counts, main dtype and bytes of the *.safetensors in d, from their headers only."""
    params, by_dtype, nbytes, files, tensors = 0, {}, 0, 0, 0
    for f in sorted(Path(d).glob("*.safetensors")):
        files += 1
        fsize = f.stat().st_size
        nbytes += fsize
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > fsize - 8:
                    raise ValueError(f"its header claims {size} bytes but the file has {fsize}")
                header = json.loads(fh.read(size))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                tensors += 1
                n = 1
                for x in v["shape"]:
                    n *= int(x)
                params += n
                by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + n
                if int(v["data_offsets"][1]) > fsize - 8 - size:
                    raise ValueError(f"tensor '{k}' ends past the end of the file (truncated?)")
        except (struct.error, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, AttributeError) as e:
            why = "the file is shorter than a safetensors header" if isinstance(e, struct.error) else \
                f"{e}" if isinstance(e, ValueError) else f"its header is malformed ({type(e).__name__}: {e})"
            raise UserError(f"{f}: not a readable safetensors file: {why}",
                            hint="the weights are damaged or incomplete: download or copy them again") from None
    main = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return {"parameters": params, "dtype": _ST_DTYPES.get(main, main) if main else None, "bytes": nbytes,
            "files": files, "tensors": tensors}


def read_json(path: Path, hint: str = "the model directory looks damaged; fetch it again") -> dict[str, Any]:
    """A JSON object from path ({} when missing); a damaged file is a UserError naming file:line, with
    `hint` saying what to do about it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})", hint=hint) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", hint=hint) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}", hint=hint)
    return data
