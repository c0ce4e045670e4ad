"""Category balance: the report (records carrying a `category` field) and balanced sampling.

The guides keep category ratios within 1:0.8-1.2: here a category's ratio is its count over the
mean count, balanced when every ratio is within 1 +/- `data.balance.tolerance`. `sampling:
downsample` caps the training examples per category at the largest cap that makes the training
split balanced (so as little as possible is dropped); which examples stay is decided by a keyed
hash of their content, not by file order. Validation and test are never resampled.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from statistics import fmean
from typing import Any

NONE = "(none)"


def report(counts: Counter, tolerance: float) -> dict[str, Any]:
    cats = {k: v for k, v in counts.items() if k != NONE}
    if not cats:
        return {}
    mean = fmean(cats.values())
    ratios = {k: round(v / mean, 3) for k, v in sorted(cats.items())}
    out = [k for k, r in ratios.items() if abs(r - 1) > tolerance + 1e-9]
    return {"categories": {k: {"count": cats[k], "ratio": ratios[k]} for k in ratios},
            "uncategorised": counts.get(NONE, 0), "mean": round(mean, 2), "tolerance": tolerance,
            "balanced": not out, "out_of_range": out}


def _balanced(counts: list[int], cap: int, tolerance: float) -> bool:
    capped = [min(c, cap) for c in counts]
    mean = fmean(capped)
    return all(abs(c / mean - 1) <= tolerance + 1e-9 for c in capped)


def balanced_cap(counts: list[int], tolerance: float) -> int:
    """The largest per-category cap under which the capped counts are balanced (the smallest
    count always is: every category equal). Balance is monotone in the cap, so binary search."""
    lo, hi = min(counts), max(counts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _balanced(counts, mid, tolerance):
            lo = mid
        else:
            hi = mid - 1
    return lo


def downsample(pairs: list[tuple], tolerance: float, seed: int) -> tuple[list[tuple], int]:
    """Keep every (record, split, norm) pair except the training examples of categories above the
    balanced cap. Returns (kept pairs in their order, number dropped)."""
    train = [p for p in pairs if p[1] == "train" and p[0].category]
    counts = Counter(p[0].category for p in train)
    if len(counts) < 2:
        return pairs, 0
    cap = balanced_cap(list(counts.values()), tolerance)
    key = str(seed).encode()[:64]
    drop: set[int] = set()
    for cat, n in counts.items():
        if n <= cap:
            continue
        members = sorted((p for p in train if p[0].category == cat),
                         key=lambda p: hashlib.blake2b(p[2], digest_size=8, key=key).digest())
        drop.update(id(p) for p in members[cap:])
    return [p for p in pairs if id(p) not in drop], len(drop)
