"""Token batches for Puzzle: calibration (block library, BLD) and held-out scoring.

Puzzle distils blocks on text drawn from the parent's own training distribution (the paper's
"Distillation Mix"). Here that is the tiny world's instruction items with the parent's direct answers,
under the same random system prompts the parent saw, concatenated and cut into fixed-length rows with no
padding (what :func:`lnkit.puzzle.library.calibrate` expects). Examples may share a row: attention across
an example boundary is ordinary pretraining-style context and the same for parent and candidate.
"""

from __future__ import annotations

import random

import torch

from lnkit.train.batches import encode_chat


def token_batches(tok, items, *, rows: int, row_len: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``rows`` rows of ``row_len`` tokens in batches of ``batch_size`` (LongTensors ``[B, row_len]``)."""
    if not items:
        raise ValueError("token_batches needs at least one item")
    rng = random.Random(f"{seed}-calibration")
    order = list(items)
    stream: list[int] = []
    while len(stream) < rows * row_len:
        rng.shuffle(order)
        for it in order:
            ids, _ = encode_chat(tok, it.prompt, it.direct, rng.choice([None, "on", "off"]))
            stream += ids
            if len(stream) >= rows * row_len:
                break
    t = torch.tensor(stream[: rows * row_len], dtype=torch.long).view(rows, row_len)
    return [t[i : i + batch_size] for i in range(0, rows, batch_size)]
