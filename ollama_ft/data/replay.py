"""Replay against forgetting (`data.replay`): general-domain examples mixed into training.

`ratio` is the share of the training examples that are replay: with D domain training examples,
round(ratio / (1 - ratio) * D) replay examples are added (0.25 -> general:domain 1:3, the guides'
mix). Replay records go through the same reading, dedupe, system prompt, rendering and masking as
the domain data, and the same content-hash split with `data.seed`: only their train share is used,
so validation and test stay domain-only and the domain metrics stay comparable across ratios.
Which replay examples are used is decided by a keyed hash of their content (a fixed shuffle); when
the pool is smaller than asked for, it is cycled and the repeats are counted. Their ids start with
`replay:` in the split files, so the mix can be checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .formats import Record, Report, iter_records
from .split import assign_split

PREFIX = "replay:"


def wanted(ratio: float, domain_train: int) -> int:
    return round(ratio / (1 - ratio) * domain_train) if ratio > 0 else 0


def pool(path: Path, fmt: str, seed: int, fractions: tuple[float, float, float],
         seen_exact: set[bytes]) -> tuple[list[tuple[Record, str, bytes]], dict[str, Any]]:
    """The replay records of the train share, in their fixed shuffled order, and what was read."""
    report = Report()
    out, held_out, dups = [], 0, 0
    for rec, exact, norm in iter_records(path, fmt, report):
        if exact in seen_exact:  # also in the domain data (or twice in the replay set)
            dups += 1
            continue
        seen_exact.add(exact)
        split = rec.split or assign_split(norm, seed, fractions)
        if split != "train":
            held_out += 1
            continue
        rec.id = PREFIX + rec.id
        out.append((rec, "train", norm))
    key = str(seed).encode()[:64]
    out.sort(key=lambda p: hashlib.blake2b(p[2], digest_size=8, key=key).digest())
    info = {"path": str(path), "records_read": report.rows, "records_valid": report.records,
            "pool_train": len(out), "held_out": held_out, "duplicates": dups, "problems": report.errors}
    return out, info


def cycle(items: list, n: int) -> tuple[list, int]:
    """The first n of `items`, cycling when there are fewer; (chosen, repeats)."""
    if not items or n <= 0:
        return [], 0
    chosen = [items[i % len(items)] for i in range(n)]
    return chosen, max(0, n - len(items))
