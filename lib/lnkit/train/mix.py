"""The parent's training mix: direct-answer instruction examples plus "pretraining" documents.

Stage 00 trains the tiny parent on it, and stage 04 distills students on it (the paper distills on the
parent's own kind of data), so it lives here rather than in either stage.
"""

from __future__ import annotations

import random
from pathlib import Path

from lnkit.data.splits import load_split, load_world
from lnkit.data.tasks import arithmetic_corpus
from lnkit.data.world import knowledge_corpus
from lnkit.train.batches import encode_chat, encode_doc


def parent_mix(run_dir: str | Path, tok, seed: int, doc_fraction: float) -> list[tuple[list[int], list[int]]]:
    """Direct-answer instruction examples of the run's training split plus documents of its facts and
    arithmetic, in the ``doc_fraction`` ratio; the system prompt is absent, "on" or "off" at random."""
    rng = random.Random(f"{seed}-parent-mix")
    world = load_world(run_dir)
    chats = []
    for it in load_split(run_dir, "train"):
        mode = rng.choice([None, None, "on", "off"])  # the parent never learns what the toggle means
        chats.append(encode_chat(tok, it.prompt, it.direct, mode))
    facts = knowledge_corpus(world) + arithmetic_corpus()
    n_docs = int(len(chats) * doc_fraction / (1 - doc_fraction))
    docs = []
    while len(docs) < n_docs:  # several facts per document, reshuffled each pass
        rng.shuffle(facts)
        docs += [encode_doc(tok, " ".join(facts[i : i + 6])) for i in range(0, len(facts), 6)]
    return chats + docs[:n_docs]
