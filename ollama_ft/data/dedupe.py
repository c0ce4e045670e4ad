"""Duplicates: exact and whitespace-only copies (always dropped), and near-duplicates by MinHash.

Near-duplicates (`data.quality.near_duplicates`) are found with datasketch's MinHash LSH over the
word n-grams of a record's user and assistant text (system prompts are left out: a shared system
prompt would make every record look alike). The first record seen is kept; a later one whose
estimated Jaccard similarity to a kept record reaches the threshold is flagged or dropped. This
runs before the split, so a paraphrase cannot sit in train and its twin in test.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from .formats import Record

_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(messages: list[dict[str, str]], n: int) -> set[bytes]:
    words = [w.lower() for m in messages if m["role"] != "system" for w in _WORD.findall(m["content"])]
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Deduper:
    """Streams records through exact, whitespace and (optionally) MinHash near-duplicate checks."""

    def __init__(self, near=None):
        self.counts: Counter = Counter()
        self.near = near
        self.findings: list[dict[str, Any]] = []  # near-duplicates: which record resembles which
        self._exact: set[bytes] = set()
        self._norm: set[bytes] = set()
        if near is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=near.threshold, num_perm=near.num_perm)
            self._hashes: dict[str, Any] = {}
            self._names: dict[str, str] = {}

    def check(self, rec: Record, exact: bytes, norm: bytes) -> str | None:
        """The reason to drop `rec` ("exact", "whitespace", "near"), or None to keep it."""
        if exact in self._exact:
            self.counts["exact"] += 1
            return "exact"
        self._exact.add(exact)
        if norm in self._norm:
            self.counts["whitespace"] += 1
            return "whitespace"
        self._norm.add(norm)
        if self.near is None:
            return None
        return self._check_near(rec, norm.hex())

    def _check_near(self, rec: Record, key: str) -> str | None:
        from datasketch import MinHash

        m = MinHash(num_perm=self.near.num_perm, seed=1)
        m.update_batch(list(shingles(rec.messages, self.near.ngram)))
        best, sim = None, 0.0
        for cand in self._lsh.query(m):
            s = m.jaccard(self._hashes[cand])
            if s > sim:
                best, sim = cand, s
        if best is not None and sim >= self.near.threshold:
            self.counts["near"] += 1
            self.findings.append({"id": rec.id, "source": rec.source, "similar_to": self._names[best],
                                  "similarity": round(float(sim), 3)})
            if self.near.action == "drop":
                return "near"
            return None
        self._lsh.insert(key, m)
        self._hashes[key] = m
        self._names[key] = f"{rec.id} ({rec.source})"
        return None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"exact": self.counts["exact"], "whitespace": self.counts["whitespace"]}
        if self.near is not None:
            out["near"] = {"found": self.counts["near"], "action": self.near.action,
                           "threshold": self.near.threshold, "ngram": self.near.ngram,
                           "num_perm": self.near.num_perm, "first": self.findings[:50]}
        return out
