"""The one teacher-forced NLL and perplexity: export's verification (HF and llama.cpp), eval and training.

Perplexity = exp(mean negative log-likelihood per token). The mean is capped at PPL_LOG_CAP before exp()
so a diverged model reads as a huge finite number rather than an overflow (float64 exp() overflows just
above 709.78); every real model's perplexity is far below the cap, so the cap never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PPL_LOG_CAP = 700.0


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(nll_sum / n_tokens), capped; NaN when no token was scored."""
    if n_tokens <= 0:
        return float("nan")
    return perplexity_of_mean(nll_sum / n_tokens)


def perplexity_of_mean(mean_nll: float) -> float:
    """exp(mean NLL per token), capped (a training or eval loss is already such a mean)."""
    return float(math.exp(min(mean_nll, PPL_LOG_CAP)))


def token_nll(logits: Any, ids: Sequence[int]) -> Any:
    """Per-token NLL of ids[1:] given logits[:-1] (float64 numpy, shape [len(ids) - 1]).

    logits: [len(ids), vocab] scores (numpy or a CPU torch tensor), the row for position t predicting
    token t + 1. Computed as logsumexp(row) - row[target] in float64, stable for any logit range.
    """
    import numpy as np

    sc = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    m = sc.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(sc - m).sum(axis=1))
    return lse - sc[np.arange(len(ids) - 1), np.asarray(ids[1:])]


class NllSum:
    """Running sums over sequences: all tokens, and the answer tokens when a mask is given."""

    def __init__(self) -> None:
        self.nll, self.n, self.answer_nll, self.answer_n = 0.0, 0, 0.0, 0

    def add(self, losses: Any, mask: Sequence[int] | None = None) -> None:
        import numpy as np

        self.nll += float(losses.sum())
        self.n += len(losses)
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            self.answer_nll += float(losses[m].sum())
            self.answer_n += int(m.sum())

    def as_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "n": self.n, "answer_nll": self.answer_nll, "answer_n": self.answer_n}
