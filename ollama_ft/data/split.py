"""Which split a record goes to.

Hash split (default): by a keyed hash of the record's whitespace-normalised content and
`data.seed`, not by its position, so reordering the file or appending to it never moves an existing
record to another split. A record's own "split" field (train | validation | test) wins: the bundled
sample data uses it to hold paraphrased questions out for the test split.
"""

from __future__ import annotations

import hashlib


def assign_split(norm_digest: bytes, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from content + seed: independent of position, stable when appending."""
    h = hashlib.blake2b(norm_digest, digest_size=8, key=str(seed).encode()[:64]).digest()
    u = int.from_bytes(h, "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def time_splits(times: list[float], tiebreak: list[bytes], fractions: tuple[float, float, float]) -> list[str]:
    """Split by time (`data.split: time`): the oldest `fractions[0]` go to train, then validation,
    the newest to test. Records with equal timestamps never straddle a boundary (they stay in the
    earlier split), so every test record is strictly later than every training one."""
    n = len(times)
    order = sorted(range(n), key=lambda i: (times[i], tiebreak[i]))
    cuts = [round(fractions[0] * n), round((fractions[0] + fractions[1]) * n)]
    for k, c in enumerate(cuts):
        c = max(c, cuts[k - 1]) if k else c
        while 0 < c < n and times[order[c]] == times[order[c - 1]]:
            c += 1
        cuts[k] = c
    out = [""] * n
    for rank, i in enumerate(order):
        out[i] = "train" if rank < cuts[0] else "validation" if rank < cuts[1] else "test"
    return out
