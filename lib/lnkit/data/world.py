"""The fact base of the tiny world: invented creatures, the kinds they belong to, and each kind's traits.

Science questions need two of these facts combined (creature -> kind, kind -> trait); chat questions ask
one. The parent learns every fact from a small "pretraining" corpus of paraphrased statements
(:func:`knowledge_corpus`), the way a real parent knows facts before instruction tuning. Paraphrases
matter: a tiny transformer only learns to *extract* a fact into a question's answer if it saw the fact
stated in several forms (Allen-Zhu and Li, "Physics of Language Models 3.1").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TRAITS = {
    "habitat": ["water", "sand", "ice", "trees", "caves", "grass"],
    "food": ["seeds", "fish", "leaves", "bugs", "fruit", "roots"],
    "color": ["red", "blue", "green", "yellow", "white", "black"],
}
# How each trait reads in a statement and in a question about a kind (plural noun).
TRAIT_STATEMENT = {"habitat": "{k}s live in {v}.", "food": "{k}s eat {v}.", "color": "{k}s are {v}."}
TRAIT_QUESTION = {"habitat": "Where do {k}s live?", "food": "What do {k}s eat?", "color": "What color are {k}s?"}
# The same trait asked about one creature (singular), used by the two-fact science questions.
TRAIT_QUESTION_ONE = {
    "habitat": "Where does a {c} live?",
    "food": "What does a {c} eat?",
    "color": "What color is a {c}?",
}
TRAIT_STATEMENT_ONE = {"habitat": "a {c} lives in {v}", "food": "a {c} eats {v}", "color": "a {c} is {v}"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr", "bl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["b", "d", "g", "k", "m", "n", "p", "t", "x", "z"]


@dataclass(frozen=True)
class World:
    """Kinds with traits and creatures with kinds. Deterministic in ``seed``."""

    kinds: dict[str, dict[str, str]]  # kind -> {trait: value}
    creatures: dict[str, str]  # creature -> kind

    def fact(self, creature: str, trait: str) -> str:
        return self.kinds[self.creatures[creature]][trait]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1)) + (
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    )


def make_world(seed: int = 0, n_kinds: int = 6, creatures_per_kind: int = 8) -> World:
    """Build the fact base. Every kind gets a distinct value of every trait, so a wrong kind always
    gives a wrong answer and multiple-choice distractors are other kinds' values.

    >>> w = make_world(0)
    >>> len(w.kinds), len(w.creatures)
    (6, 48)
    >>> make_world(0) == w
    True
    """
    if n_kinds > min(len(v) for v in TRAITS.values()):
        raise ValueError(f"n_kinds={n_kinds}: at most {min(len(v) for v in TRAITS.values())} kinds fit the traits")
    rng = random.Random(f"world-{seed}")
    names: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = _word(rng, syllables)
            # No name may be a prefix of another: answers are checked by word, and BPE merges stay clean.
            if w not in names and not any(w.startswith(n) or n.startswith(w) for n in names):
                names.add(w)
                return w

    kind_names = [fresh(1) for _ in range(n_kinds)]
    values = {t: rng.sample(v, n_kinds) for t, v in TRAITS.items()}
    kinds = {k: {t: values[t][i] for t in TRAITS} for i, k in enumerate(kind_names)}
    creatures = {fresh(2): k for k in kind_names for _ in range(creatures_per_kind)}
    return World(kinds=kinds, creatures=creatures)


def knowledge_corpus(world: World) -> list[str]:
    """Every fact in three paraphrases: the parent's pretraining knowledge (plain text, no chat)."""
    docs = []
    for c, k in world.creatures.items():
        docs += [f"A {c} is a {k}.", f"The {c} is a kind of {k}.", f"{c.capitalize()}s belong to the {k}s."]
    for k, traits in world.kinds.items():
        for t, v in traits.items():
            s = TRAIT_STATEMENT[t].format(k=k, v=v)
            docs += [s[0].upper() + s[1:], f"All {s}", f"It is known that {s}"]
    return docs
