"""Training data for the train stage: tokenized parquet splits and the batch collators.

Packing (default): a micro-batch of examples becomes ONE row with no padding; `position_ids` restart
at 0 for every example. transformers (masking_utils.find_packed_sequence_indices) turns restarting
position ids into a block-diagonal causal mask for sdpa/eager and into varlen calls for
flash-attention, so packed examples never attend to each other (tests/test_train.py checks it).
Without packing, a micro-batch is padded to its longest example only.

Targets are shifted here, per example (`shift_labels[t] = labels[t+1]`, last position -100), so a
packed row never predicts the first token of the next example and the trainer's token count is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError


class TokenizedSplit(torch.utils.data.Dataset):
    """Rows of a data-stage parquet split: {"input_ids": list[int], "labels": list[int]}."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    @property
    def n_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)

    @property
    def n_trained(self) -> int:
        return sum(sum(1 for x in r["labels"][1:] if x != -100) for r in self.rows)


def load_split(data_dir: Path, split: str, required: bool = True) -> TokenizedSplit | None:
    """Read `<data_dir>/<split>.parquet`; examples with no trained token are dropped (they carry no loss)."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        if required:
            raise UserError(f"training data not found: {path}",
                            hint="run the data stage first: `ollama-ft train CONFIG --until data`")
        return None
    table = pq.read_table(path, columns=["input_ids", "labels"])
    rows = []
    for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True):
        if len(ids) != len(labels):
            raise UserError(f"{path}: an example has {len(ids)} input_ids but {len(labels)} labels",
                            hint="re-run the data stage with --force data")
        if len(ids) >= 2 and any(x != -100 for x in labels[1:]):
            rows.append({"input_ids": ids, "labels": labels})
    if required and not rows:
        raise UserError(f"{path}: no example has a trained (assistant) token",
                        hint="check the data: every record needs an assistant reply")
    return TokenizedSplit(rows)


def _shifted(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [-100]


class PackingCollator:
    """Concatenate a micro-batch into one padding-free row with per-example position ids.

    transformers' DataCollatorWithFlattening does the flattening (ids, restarting position_ids, the
    first label of each example set to -100, and cu_seq_lens for flash-attention when asked); here the
    targets are shifted on top of it. Shifting its labels left by one gives exactly the per-example
    shift (`test_packing_collator_equals_per_example_shift`), because the -100 it puts on each
    example's first token is what the previous example's last position would otherwise predict.
    """

    def __init__(self, flash_attn_kwargs: bool = False):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100,
                                                  return_flash_attn_kwargs=flash_attn_kwargs)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.flatten([{"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])}
                              for ex in examples])
        labels = batch.pop("labels")
        tgt = torch.cat([labels[:, 1:], torch.full((1, 1), -100, dtype=labels.dtype)], dim=1)
        return {**batch, "shift_labels": tgt, "labels": tgt}


class PaddingCollator:
    """Pad a micro-batch to its longest example (right padding, attention mask)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(ex["input_ids"]) for ex in examples)
        ids, mask, tgt = [], [], []
        for ex in examples:
            k = len(ex["input_ids"])
            ids.append(list(ex["input_ids"]) + [self.pad_id] * (n - k))
            mask.append([1] * k + [0] * (n - k))
            tgt.append(_shifted(ex["labels"]) + [-100] * (n - k))
        t = torch.tensor
        return {"input_ids": t(ids), "attention_mask": t(mask), "shift_labels": t(tgt), "labels": t(tgt)}
