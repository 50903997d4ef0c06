"""Chat about the tiny world's facts, judged by a hidden gold judge in HelpSteer2's attributes (stage 08).

Prompts ask about creatures and kinds in several forms (what a creature is, what it eats, where a kind
lives, yes/no checks, "tell me about"), each with a **rubric**: the facts an answer must state (``asks``),
the true facts that would make it more helpful (``related``), and the answer the question expects.

The **gold judge** (:func:`judge`) reads an answer sentence by sentence against the world: each statement
of a fact it recognises is true or false; anything else is noise. From that it rates HelpSteer2's five
attributes on 0-4 (helpfulness, correctness, coherence, complexity, verbosity) and a scalar
(:data:`GOLD_WEIGHTS`, ours), which is what the Arena-Hard analog compares. The model being trained never
sees the judge: it learns from **preference pairs** labelled by noisy simulated annotators
(:func:`annotate`: each attribute perturbed as annotators disagree, then the noisy scalars compared), through
a reward model trained on those labels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from lnkit.data.world import TRAIT_QUESTION, TRAIT_QUESTION_ONE, TRAITS, World

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# The gold scalar: what a careful rater of this world values (right facts, clearly said, more of them), less a
# little for length for its own sake. Our choice of weights, on HelpSteer2's attributes.
GOLD_WEIGHTS = {"helpfulness": 0.6, "correctness": 0.8, "coherence": 0.4, "complexity": 0.3, "verbosity": -0.2}
VERB = {"habitat": "live in", "food": "eat", "color": "are"}
VERB_ONE = {"habitat": "lives in", "food": "eats", "color": "is"}


@dataclass
class ChatPrompt:
    key: str
    prompt: str
    asks: list[tuple]  # facts the answer must state: ("kind", creature, kind) or (trait, kind, value)
    related: list[tuple]  # true facts that add to an answer
    expected: str  # the short answer the question wants
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "asks": [list(a) for a in self.asks],
                "related": [list(r) for r in self.related], "expected": self.expected, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> ChatPrompt:
        return cls(key=d["key"], prompt=d["prompt"], asks=[tuple(a) for a in d["asks"]],
                   related=[tuple(r) for r in d["related"]], expected=d["expected"], meta=d.get("meta", {}))


def _traits(world: World, kind: str) -> list[tuple]:
    return [(t, kind, world.kinds[kind][t]) for t in sorted(TRAITS)]


def all_prompts(world: World) -> list[ChatPrompt]:
    """Every chat prompt of the world, in a fixed order."""
    out = []
    for c, k in sorted(world.creatures.items()):
        kind_fact = ("kind", c, k)
        out.append(ChatPrompt(f"kind:{c}", f"What kind of animal is a {c}?", [kind_fact], _traits(world, k),
                              f"A {c} is a {k}."))
        out.append(ChatPrompt(f"about:{c}", f"Tell me about the {c}.", [kind_fact], _traits(world, k),
                              f"A {c} is a {k}."))
        for t in sorted(TRAITS):
            v = world.kinds[k][t]
            out.append(ChatPrompt(f"one:{c}:{t}", TRAIT_QUESTION_ONE[t].format(c=c), [(t, k, v)],
                                  [kind_fact] + [x for x in _traits(world, k) if x[0] != t],
                                  f"A {c} {VERB_ONE[t]} {v}."))
        for k2 in sorted(world.kinds):
            yes = k2 == k
            out.append(ChatPrompt(f"is:{c}:{k2}", f"Is a {c} a {k2}?", [kind_fact], _traits(world, k),
                                  f"{'Yes' if yes else 'No'}, a {c} is a {k}.", {"yes_no": yes}))
    for k in sorted(world.kinds):
        out.append(ChatPrompt(f"about:{k}", f"Tell me about {k}s.", _traits(world, k)[:1], _traits(world, k)[1:],
                              f"{k.capitalize()}s {VERB[sorted(TRAITS)[0]]} {world.kinds[k][sorted(TRAITS)[0]]}."))
        for t in sorted(TRAITS):
            v = world.kinds[k][t]
            out.append(ChatPrompt(f"trait:{k}:{t}", TRAIT_QUESTION[t].format(k=k), [(t, k, v)],
                                  [x for x in _traits(world, k) if x[0] != t], f"{k.capitalize()}s {VERB[t]} {v}."))
            for v2 in TRAITS[t]:
                yes = v2 == v
                q = {"habitat": f"Do {k}s live in {v2}?", "food": f"Do {k}s eat {v2}?",
                     "color": f"Are {k}s {v2}?"}[t]
                out.append(ChatPrompt(f"check:{k}:{t}:{v2}", q, [(t, k, v)],
                                      [x for x in _traits(world, k) if x[0] != t],
                                      f"{'Yes' if yes else 'No'}, {k}s {VERB[t]} {v}.", {"yes_no": yes}))
    return out


def split_prompts(world: World, n_train: int, n_test: int, seed: int = 0) -> tuple[list[ChatPrompt], list[ChatPrompt]]:
    """Disjoint train and test prompts (by key), drawn at random from :func:`all_prompts`."""
    pool = all_prompts(world)
    if n_train + n_test > len(pool):
        raise ValueError(f"the world has {len(pool)} chat prompts; {n_train} + {n_test} asked for")
    random.Random(f"chat-{seed}").shuffle(pool)
    return pool[:n_train], pool[n_train:n_train + n_test]


# ---------------------------------------------------------------------------------------------- the judge


def statements(world: World, text: str) -> list[tuple]:
    """Each sentence of ``text`` as the fact it states, ``("noise", sentence)`` where none is recognised; a
    "No, ..." or "Yes, ..." answer keeps its clause."""
    creatures, kinds = set(world.creatures), set(world.kinds)
    out = []
    for raw in re.split(r"(?<=[.!?])\s+|\n+", text.strip()):
        s = raw.strip().strip('"').strip()
        if not s:
            continue
        s_low = re.sub(r"^(yes|no),\s*", "", s.lower()).rstrip(".!?")
        fact = _parse(s_low, creatures, kinds)
        out.append(fact if fact else ("noise", s))
    return out


def _parse(s: str, creatures: set[str], kinds: set[str]):
    m = re.fullmatch(r"(?:a|the) (\w+) is (?:a|an) (\w+)", s) or re.fullmatch(r"(\w+)s are (\w+)s", s)
    if m and m.group(1) in creatures and m.group(2) in kinds:
        return ("kind", m.group(1), m.group(2))
    for t in TRAITS:
        m = re.fullmatch(r"(\w+)s " + VERB[t] + r" (\w+)", s)
        if m and m.group(1) in kinds and m.group(2) in TRAITS[t]:
            return (t, m.group(1), m.group(2))
        m = re.fullmatch(r"(?:a|the) (\w+) " + VERB_ONE[t] + r" (\w+)", s)
        if m and m.group(1) in creatures and m.group(2) in TRAITS[t]:
            return (t + "_one", m.group(1), m.group(2))
    return None


def _true(world: World, fact: tuple) -> bool:
    kind_of = world.creatures
    if fact[0] == "kind":
        return kind_of.get(fact[1]) == fact[2]
    if fact[0].endswith("_one"):
        t = fact[0][:-4]
        return fact[1] in kind_of and world.kinds[kind_of[fact[1]]][t] == fact[2]
    return fact[1] in world.kinds and world.kinds[fact[1]][fact[0]] == fact[2]


def _covers(world: World, stated: set[tuple], fact: tuple) -> bool:
    """Whether the true statements cover ``fact`` (a trait of a creature's kind may be said of the creature)."""
    if fact in stated:
        return True
    t, k, v = fact
    return t in TRAITS and any(s[0] == t + "_one" and world.creatures.get(s[1]) == k and s[2] == v for s in stated)


def judge(world: World, prompt: ChatPrompt, answer: str) -> dict:
    """The gold judge: HelpSteer2's five attributes (0-4) and the gold scalar for one answer."""
    facts = statements(world, answer)
    recognised = [f for f in facts if f[0] != "noise"]
    true = {f for f in recognised if _true(world, f)}
    false = [f for f in recognised if not _true(world, f)]
    noise = [f for f in facts if f[0] == "noise"]
    answered = all(_covers(world, true, a) for a in prompt.asks)
    related = sum(_covers(world, true, r) for r in prompt.related)
    yes_no = prompt.meta.get("yes_no")
    said = answer.strip().lower()
    wrong_polarity = yes_no is not None and said.startswith(("yes", "no")) and said.startswith("yes") != yes_no
    words = len(re.findall(r"\w+", answer))
    repeats = len(recognised) - len(set(recognised))
    correctness = 0 if not recognised else max(0, 4 - 2 * len(false) - 2 * wrong_polarity - (0 if answered else 2))
    helpfulness = (3 + min(1, related)) if answered and not false and not wrong_polarity else (
        1 if true and not false else 0)
    coherence = max(0, 4 - 2 * len(noise) - repeats - (0 if answer.strip().endswith((".", "!", "?", '"')) else 1))
    complexity = min(4, len(true))
    verbosity = 0 if words < 4 else 1 if words < 10 else 2 if words < 20 else 3 if words < 35 else 4
    attrs = {"helpfulness": helpfulness, "correctness": correctness, "coherence": coherence,
             "complexity": complexity, "verbosity": verbosity}
    return {**attrs, "score": round(sum(GOLD_WEIGHTS[a] * v for a, v in attrs.items()), 4)}


def win(score_a: float, score_b: float) -> float:
    """1 if a is judged better, 0 if worse, 0.5 for a tie (Arena-Hard counts ties half)."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def annotate(attrs_a: dict, attrs_b: dict, rng: random.Random, noise: float = 0.7, flip: float = 0.1) -> int | None:
    """A simulated annotator's preference between two rated answers: 0 (a), 1 (b) or None (no preference).
    Each attribute is read with Gaussian noise (sd ``noise``, rounded, clipped to 0-4), the noisy scalars are
    compared, and with probability ``flip`` the annotator picks the other one."""
    def noisy(attrs):
        return sum(GOLD_WEIGHTS[a] * min(4, max(0, round(attrs[a] + rng.gauss(0, noise)))) for a in ATTRIBUTES)

    sa, sb = noisy(attrs_a), noisy(attrs_b)
    if sa == sb:
        return None
    pick = 0 if sa > sb else 1
    return 1 - pick if rng.random() < flip else pick
