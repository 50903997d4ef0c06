"""Token batches for Puzzle: calibration (block library, BLD) and held-out scoring.

Puzzle distils blocks on text drawn from the parent's own training distribution (the paper's
"Distillation Mix"). Here that is the tiny world's instruction items with the parent's direct answers,
under the same random system prompts the parent saw, concatenated and cut into fixed-length rows with no
padding (what :func:`lnkit.puzzle.library.calibrate` expects). Examples may share a row: attention across
an example boundary is ordinary pretraining-style context and the same for parent and candidate.

``token_batches(..., positions=True)`` also marks, per row, the positions whose next token is an assistant token (the part
of the text the parent was trained to predict), so scores can ignore prompts the parent never learned.
"""

from __future__ import annotations

import random

import torch

from lnkit.train.batches import IGNORE, encode_chat


def _streams(tok, items, rows: int, row_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:
        raise ValueError("token_batches needs at least one item")
    rng = random.Random(f"{seed}-calibration")
    order = list(items)
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < rows * row_len:
        rng.shuffle(order)
        for it in order:
            i, lab = encode_chat(tok, it.prompt, it.direct, rng.choice([None, "on", "off"]))
            ids += i
            labels += lab
            if len(ids) >= rows * row_len:
                break
    n = rows * row_len
    return (torch.tensor(ids[:n], dtype=torch.long).view(rows, row_len),
            torch.tensor(labels[:n], dtype=torch.long).view(rows, row_len))


def token_batches(tok, items, *, rows: int, row_len: int, batch_size: int, seed: int = 0, positions: bool = False):
    """``rows`` rows of ``row_len`` tokens in batches of ``batch_size`` (LongTensors ``[B, row_len]``).

    With ``positions=True`` returns ``(batches, masks)``: per batch a bool ``[B, row_len]``, True where the
    *next* token is an assistant token, i.e. where the parent's prediction was trained (a row's last
    position has no next token in the row and is False)."""
    t, labels = _streams(tok, items, rows, row_len, seed)
    batches = [t[i : i + batch_size] for i in range(0, rows, batch_size)]
    if not positions:
        return batches
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE
    return batches, [pos[i : i + batch_size] for i in range(0, rows, batch_size)]
