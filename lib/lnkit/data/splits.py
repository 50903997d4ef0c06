"""Train / validation / test splits, disjoint by construction, and the n-gram check that proves it.

An item's split is a pure function of its ``key`` (a hash), so the same problem can never land in two
splits however many items are drawn, and adding items to one split never moves another's.
:func:`decontamination_report` then checks the result the way benchmark decontamination does: a test
prompt is flagged when it equals a training prompt or when every one of its word n-grams also occurs in
training prompts. (Shorter shared n-grams are expected: all math problems share their template.)
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from lnkit.checkpoints import stage_dir
from lnkit.data.tasks import DOMAINS, MAX_DIFFICULTY, Item, make_item
from lnkit.data.world import World
from lnkit.io import atomic_write_text

# The stage that draws the world and its splits; every later stage reads them from its folder.
WORLD_STAGE = "00_parent"

SPLITS = {"train": (0.0, 0.75), "val": (0.75, 0.85), "test": (0.85, 1.0)}


def split_of(key: str) -> str:
    """Which split a problem belongs to, from its key alone.

    >>> split_of("math:Ava has 3 apples.") in SPLITS
    True
    """
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= u < hi)


def level_cycle(weights: list[float] | None, max_level: int) -> list[int]:
    """The repeating sequence of difficulty levels that realises integer-ish ``weights``.

    >>> level_cycle([2, 1], 2), level_cycle(None, 3)
    ([1, 1, 2], [1, 2, 3])
    """
    if not weights:
        return list(range(1, max_level + 1))
    if len(weights) != max_level or any(w < 0 for w in weights) or not any(weights):
        raise ValueError(f"level weights {weights} must be {max_level} non-negative numbers, not all zero")
    scale = 1 / min(w for w in weights if w > 0)
    return [lvl for lvl, w in enumerate(weights, 1) for _ in range(round(w * scale))]


def make_split(
    world: World, split: str, n_per_domain: dict[str, int], seed: int = 0, unique: bool | None = None,
    level_weights: dict[str, list[float]] | None = None,
) -> list[Item]:
    """Draw ``n_per_domain[d]`` items of each domain ``d`` for ``split``, difficulties cycling evenly
    (or in proportion to ``level_weights[d]``, e.g. more easy math in the parent's training set).

    ``unique`` (default: True except for train) forbids repeated prompts. Domains with few distinct
    problems (chat has one per fact) give fewer unique items than asked; the result then holds all there are.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {tuple(SPLITS)}")
    unique = split != "train" if unique is None else unique
    items: list[Item] = []
    for domain, n in n_per_domain.items():
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
        rng = random.Random(f"{seed}-{split}-{domain}")
        seen: set[str] = set()
        got, attempts = 0, 0
        cycle = level_cycle((level_weights or {}).get(domain), MAX_DIFFICULTY[domain])
        while got < n and attempts < 200 * max(n, 1):
            attempts += 1
            level = cycle[got % len(cycle)]
            it = make_item(domain, rng, level, world)
            if split_of(it.key) != split or (unique and it.prompt in seen):
                continue
            seen.add(it.prompt)
            items.append(Item(**{**it.to_dict(), "id": f"{split}-{domain}-{got:05d}"}))
            got += 1
    return items


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.lower().split()
    if len(words) <= n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def decontamination_report(train: list[Item], test: list[Item], n: int = 8, threshold: float = 0.8) -> dict:
    """Flag test items that near-duplicate one training item.

    A test prompt is flagged when it equals a training prompt, or when a single training prompt contains
    at least ``threshold`` of its word ``n``-grams (so a copy with a word added or changed near one end
    is caught). Overlap pooled over *all* training prompts would be meaningless for templated data:
    every template phrase occurs somewhere. In the default world the largest overlap with any single
    training prompt is about two thirds: two problems that share a template and differ in one number.
    """
    index: dict[tuple[str, ...], list[int]] = {}
    for j, it in enumerate(train):
        for g in _ngrams(it.prompt, n):
            index.setdefault(g, []).append(j)
    train_prompts = {it.prompt for it in train}
    flagged, worst = [], 0.0
    for it in test:
        grams = _ngrams(it.prompt, n)
        hits: dict[int, int] = {}
        for g in grams:
            for j in index.get(g, ()):
                hits[j] = hits.get(j, 0) + 1
        frac = max(hits.values(), default=0) / len(grams)
        worst = max(worst, frac)
        if it.prompt in train_prompts or frac >= threshold:
            flagged.append(it.id)
    return {"n": n, "threshold": threshold, "test_items": len(test), "flagged": len(flagged),
            "flagged_ids": flagged, "max_overlap": round(worst, 4)}


def save_items(items: list[Item], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(it.to_dict()) + "\n" for it in items))


def load_items(path: str | Path) -> list[Item]:
    """Read a JSON-lines task file; a malformed row is an error naming the file and line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Item.from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}, line {i}: {e}") from None
    return out


def load_split(run_dir: str | Path, split: str) -> list[Item]:
    """A split (``train``, ``val`` or ``test``) of a run's world, as stage 00 wrote it."""
    return load_items(stage_dir(run_dir, WORLD_STAGE) / "data" / f"{split}.jsonl")


def load_world(run_dir: str | Path) -> World:
    """A run's fact base, as stage 00 wrote it."""
    w = json.loads((stage_dir(run_dir, WORLD_STAGE) / "data" / "world.json").read_text())
    return World(kinds=w["kinds"], creatures=w["creatures"])


def first_per_domain(items: list[Item], n: int) -> list[Item]:
    """The first ``n`` items of each domain, in domain order (``n == 0``: all items): the evaluation
    subsets of stages 02-06, the same items in each so their figures compare.

    >>> from lnkit.data.world import make_world
    >>> items = make_split(make_world(0), "test", {d: 3 for d in DOMAINS})
    >>> [it.domain for it in first_per_domain(items, 1)]
    ['math', 'science', 'code', 'instruct', 'chat']
    """
    if not n:
        return list(items)
    return [it for d in DOMAINS for it in [i for i in items if i.domain == d][:n]]
