"""Preference pair files: one JSON object per line, ``{"prompt", "chosen", "rejected"}`` with optional
``"chosen_score"``/``"rejected_score"`` (RPO's reward-model scores; without them RPO scores the pair itself)
and ``"mode"`` (``"on"``/``"off"``, the reasoning toggle; default ``"off"``). Offline RPO reads one (LN-Nano's
use in the paper); the online iterations write theirs in the same layout.

A row that is not JSON, misses a field, or holds a wrong type is skipped and counted; a file with no usable
row left is an error naming the file and the first bad line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lnkit.io import atomic_write_text


class PairFileError(ValueError):
    """A pair file with no usable row, or one that cannot be read."""


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    mode: str = "off"
    chosen_score: float | None = None
    rejected_score: float | None = None

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "mode": self.mode}
        if self.chosen_score is not None:
            d |= {"chosen_score": self.chosen_score, "rejected_score": self.rejected_score}
        return d


def _row(line: str) -> Pair:
    d = json.loads(line)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(d.get(k), str) or not d[k].strip():
            raise ValueError(f"field {k!r} missing or not a non-empty string")
    mode = d.get("mode", "off")
    if mode not in ("on", "off"):
        raise ValueError(f"mode {mode!r} is neither 'on' nor 'off'")
    scores = [d.get("chosen_score"), d.get("rejected_score")]
    if any(s is not None for s in scores):
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise ValueError("chosen_score and rejected_score must both be numbers when one is given")
        scores = [float(s) for s in scores]
    else:
        scores = [None, None]
    if d["chosen"] == d["rejected"]:
        raise ValueError("chosen and rejected are the same answer")
    return Pair(d["prompt"], d["chosen"], d["rejected"], mode, *scores)


def read_pairs(path: str | Path) -> tuple[list[Pair], list[str]]:
    """The file's usable pairs and, for each skipped line, ``"line N: why"``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PairFileError(f"pair file {path}: cannot read it: {e}") from None
    pairs, skipped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            pairs.append(_row(line))
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            skipped.append(f"line {n}: {e}")
    if not pairs:
        first = skipped[0] if skipped else "the file is empty"
        raise PairFileError(f"pair file {path}: no usable pair ({len(skipped)} bad line(s); {first})")
    return pairs, skipped


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    atomic_write_text(path, "".join(json.dumps(p.to_dict()) + "\n" for p in pairs))
