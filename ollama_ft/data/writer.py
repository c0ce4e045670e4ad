"""Token labels from character spans, and the streaming writer of one split (jsonl + parquet)."""

from __future__ import annotations

import json
import os
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path

from .formats import Record

IGNORE = -100
_BATCH = 2048

def _start(o: tuple[int, int]) -> int:
    return o[0]


def _end(o: tuple[int, int]) -> int:
    return o[1]


def token_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Labels (ids on tokens overlapping a span, -100 elsewhere) and the count of trained tokens."""
    labels = [IGNORE] * len(ids)
    trained = 0
    for a, b in spans:
        # Offsets are non-decreasing, so two binary searches find the tokens overlapping [a, b).
        i = bisect_right(offsets, a, key=_end)  # first token ending after a
        j = bisect_left(offsets, b, key=_start)  # first token starting at or after b
        if j > i:
            labels[i:j] = ids[i:j]
            trained += j - i
    return labels, trained


class SplitWriter:
    """Streams one split to {split}.jsonl and {split}.parquet (temp names, renamed on close)."""

    def __init__(self, out: Path, split: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.out, self.split = out, split
        self.schema = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                 ("labels", pa.list_(pa.int32()))])
        self._jsonl_tmp = out / f".{split}.jsonl.tmp"
        self._pq_tmp = out / f".{split}.parquet.tmp"
        self._f = open(self._jsonl_tmp, "w", encoding="utf-8")
        self._pq = pq.ParquetWriter(self._pq_tmp, self.schema)
        self._buf: tuple[list, list, list] = ([], [], [])
        self.n = self.tokens = self.trained = 0
        self.lengths: list[int] = []
        self.categories: Counter = Counter()
        self.replay = 0
        self.times: list[float] = []

    def add(self, rec: Record, ids: list[int], labels: list[int], trained: int) -> None:
        self._f.write(json.dumps(rec.as_json(), ensure_ascii=False) + "\n")
        self._buf[0].append(rec.id)
        self._buf[1].append(ids)
        self._buf[2].append(labels)
        self.n += 1
        self.tokens += len(ids)
        self.trained += trained
        self.lengths.append(len(ids))
        if rec.id.startswith("replay:"):  # general data: outside the domain's category balance
            self.replay += 1
        else:
            self.categories[rec.category or "(none)"] += 1
        if rec.timestamp is not None:
            self.times.append(rec.timestamp)
        if len(self._buf[0]) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._buf[0]:
            return
        pa = self.pa
        t = pa.Table.from_arrays([pa.array(self._buf[0], pa.string()),
                                  pa.array(self._buf[1], pa.list_(pa.int32())),
                                  pa.array(self._buf[2], pa.list_(pa.int32()))], schema=self.schema)
        self._pq.write_table(t)
        self._buf = ([], [], [])

    def close(self) -> None:
        self._flush()
        self._pq.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._jsonl_tmp, self.out / f"{self.split}.jsonl")
        os.replace(self._pq_tmp, self.out / f"{self.split}.parquet")

    def abort(self) -> None:
        for closer in (self._pq.close, self._f.close):
            try:
                closer()
            except Exception:
                pass
        for p in (self._jsonl_tmp, self._pq_tmp):
            p.unlink(missing_ok=True)


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    import numpy as np

    a = np.asarray(values)
    return {"p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max())}
