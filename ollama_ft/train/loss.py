"""Chunked linear + cross-entropy: the LM head and the loss without the full [tokens, vocab] logits.

With vocabularies of 152k-262k tokens the logits are the largest tensor of a training step (a 4 x 256
micro-batch of Gemma 3 is 1 GB of fp32 logits, plus the same again for their gradient). Here the head
is applied only to positions whose target is trained (label != -100), `chunk` rows at a time, and the
gradient with respect to the hidden states is computed in the same pass, so backward keeps only
[rows, hidden] tensors, never logits. This costs two matmuls per chunk (logits, grad) instead of the
three of a recomputing checkpoint.

Label smoothing (training.label_smoothing = e) follows torch's cross_entropy: the target distribution
is (1 - e) on the label plus e / V on every class, so per token the loss is
lse(z) - (1 - e) z_y - e mean(z) and its gradient softmax(z) - (1 - e) onehot(y) - e / V.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i) (label-smoothed); gradients computed in forward chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, softcap: float | None,  # noqa: D401
                smoothing: float = 0.0):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            y = targets[s:s + chunk]
            logits = h.to(weight.dtype) @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            tgt = logits.gather(1, y[:, None]).squeeze(1)
            if smoothing:
                tgt = (1.0 - smoothing) * tgt + smoothing * logits.mean(dim=-1)
            # Softmax in place on the fp32 buffer (logsumexp would allocate another [rows, vocab] tensor).
            mx = logits.amax(dim=-1, keepdim=True)
            sumexp = logits.sub_(mx).exp_().sum(dim=-1)
            total += (sumexp.log() + mx.squeeze(1) - tgt).sum()
            if need_h or need_w or need_b:
                # d CE / d logits = softmax - onehot.
                g = logits.div_(sumexp[:, None])
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0 - smoothing
                if smoothing:
                    g.sub_(smoothing / g.shape[1])
                if capped is not None:
                    g.mul_(1.0 - capped * capped)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(weight.dtype)
                if need_h:
                    grad_h[s:s + chunk] = (g @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (g.t() @ h.to(weight.dtype)).float()
            del logits, capped
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        out = []
        for has, dt in zip(ctx.has, ctx.dtypes, strict=True):
            out.append((saved.pop(0) * grad_out).to(dt) if has else None)
        return out[0], out[1], out[2], None, None, None, None


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, chunk: int = 256,
                   softcap: float | None = None, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden @ weight.T (+bias)` against `targets`, and the trained-token count.

    hidden: [..., d]; targets: [...] with -100 for positions that carry no loss (and no gradient);
    smoothing: label smoothing as torch's cross_entropy(label_smoothing=...).
    Returns (loss_sum, n) as tensors; divide by the batch's total trained tokens for a mean.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    keep = (t != -100).nonzero().squeeze(1)
    n = keep.numel()
    if n == 0:
        # Keep the graph connected (DDP expects every trainable parameter to get a gradient).
        return hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=h.device)
    loss = _LinearCrossEntropy.apply(h.index_select(0, keep), weight, bias, t.index_select(0, keep),
                                     int(chunk), softcap, float(smoothing))
    return loss, torch.tensor(n, device=h.device)


def full_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None = None,
                smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same quantity through full logits (used by tests and the baseline)."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    t = targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, ignore_index=-100,
                                             reduction="sum", label_smoothing=smoothing)
    return loss, (t != -100).sum()
