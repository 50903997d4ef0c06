"""Token batches for causal-LM training: chat examples with loss on assistant tokens only, and plain
documents with loss on every token.

A chat example is encoded as ``tokens(prompt) + tokens(response + <|eot_id|>)``, concatenated rather than
tokenized as one string, so training sees exactly the token boundary that generation starts from.
Two batchers, both a pure function of the step number (so a resumed run sees the same data as an
unbroken one): :class:`Batcher` pads a batch of examples to its longest, and :class:`PackedBatcher`
packs several examples into each fixed-length row with a block-diagonal causal mask and positions that
restart at every example, so no compute is spent on padding and no example attends to another (the
packing the paper's SFT uses, without cross-example attention).
"""

from __future__ import annotations

import random

import torch

from lnkit.data.chat import BOS, EOS_TEXT, EOT, format_response, render_prompt
from lnkit.data.released import render_conversation, row_mode

IGNORE = -100


def encode_chat(tok, prompt: str, response: str, mode: str | None) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE on the prompt (system, user, assistant header)."""
    p = tok(render_prompt(prompt, mode), add_special_tokens=False)["input_ids"]
    r = tok(response + EOT, add_special_tokens=False)["input_ids"]
    return p + r, [IGNORE] * len(p) + r


def encode_item(tok, item, mode: str | None, direct_only: bool = False) -> tuple[list[int], list[int]]:
    """An item as a training example in ``mode`` (reasoning trace included only when on)."""
    response = item.direct if direct_only else format_response(item.reasoning, item.direct, mode)
    return encode_chat(tok, item.prompt, response, mode)


def encode_doc(tok, text: str) -> tuple[list[int], list[int]]:
    ids = tok(BOS + text + EOS_TEXT, add_special_tokens=False)["input_ids"]
    return ids, [IGNORE] + ids[1:]


class Batcher:
    """``batcher(step)`` returns a padded batch; the same step always gives the same batch."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int = 0, max_len: int = 1024, window: int = 0):
        if not examples:
            raise ValueError("Batcher needs at least one example")
        self.examples = [(ids[:max_len], lab[:max_len]) for ids, lab in examples]
        self.order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i][0]))
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        # Length grouping: draw each batch from `window` x batch_size examples of similar length
        # (0 = from all examples). Narrow windows waste less padding but make batches homogeneous.
        self.window = window or len(self.examples)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}-{step}")
        window = min(len(self.order), self.window * self.batch_size)
        start = rng.randrange(len(self.order) - window + 1)
        idx = rng.sample(self.order[start : start + window], min(self.batch_size, window))
        return collate([self.examples[i] for i in idx], self.pad_id)

    def tokens_per_epoch(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackedBatcher:
    """``batcher(step)`` returns ``rows`` rows of ``row_len`` tokens, each packed with whole examples.

    Each row carries a 4D boolean attention mask (causal within an example, nothing across examples) and
    position ids restarting at 0 for every example, so the model computes exactly what it would for the
    examples one by one. Examples longer than ``row_len`` are truncated.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], rows: int, row_len: int, pad_id: int,
                 seed: int = 0):
        if not examples:
            raise ValueError("PackedBatcher needs at least one example")
        self.examples = [(ids[:row_len], lab[:row_len]) for ids, lab in examples]
        self.rows, self.row_len, self.pad_id, self.seed = rows, row_len, pad_id, seed

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}-{step}")
        R, L = self.rows, self.row_len
        ids = torch.full((R, L), self.pad_id, dtype=torch.long)
        labels = torch.full((R, L), IGNORE, dtype=torch.long)
        pos = torch.zeros((R, L), dtype=torch.long)
        seg = torch.full((R, L), -1, dtype=torch.long)
        n_tokens = 0
        for r in range(R):
            used, k, misses = 0, 0, 0
            while misses < 3:  # stop a row after three examples in a row do not fit
                x, y = self.examples[rng.randrange(len(self.examples))]
                if used + len(x) > L:
                    misses += 1
                    continue
                ids[r, used : used + len(x)] = torch.tensor(x)
                labels[r, used : used + len(x)] = torch.tensor(y)
                pos[r, used : used + len(x)] = torch.arange(len(x))
                seg[r, used : used + len(x)] = k
                used, k = used + len(x), k + 1
            n_tokens += used
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        mask = (same & causal) | torch.eye(L, dtype=torch.bool)  # padding attends to itself only
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask[:, None],
                "n_tokens": torch.tensor(n_tokens)}

    def tokens_per_epoch(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def encode_row(tok, row: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of a row of the released post-training schema (:mod:`lnkit.data.released`):
    loss on the output only (earlier assistant turns are context)."""
    mode = row_mode(row)
    msgs = row["input"]
    if len(msgs) == 1:
        return encode_chat(tok, msgs[0]["content"], row["output"], mode)
    p = tok(render_conversation(msgs, mode), add_special_tokens=False)["input_ids"]
    r = tok(row["output"] + EOT, add_special_tokens=False)["input_ids"]
    return p + r, [IGNORE] * len(p) + r
