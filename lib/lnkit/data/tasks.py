"""Verifiable tasks of the tiny world, one generator per domain of the paper's SFT blend.

Every :class:`Item` carries what later stages need: the prompt, the gold answer and the name of the
verifier that checks a response against it, a difficulty level, a full reference reasoning trace (for
"detailed thinking on") and a short direct answer (for "detailed thinking off" and for the parent).
``key`` is the item's identity: two items with the same key are the same problem, and splits are made
on keys (:mod:`lnkit.data.splits`), which is what makes train, validation and test disjoint.

Domains and what makes them hard without working:
- ``math``: a word problem applying 1 to 5 additions and subtractions of single digits to a running
  total. Each step (e.g. ``57 + 8 = 65``) is a fact the parent saw in pretraining
  (:func:`arithmetic_corpus`); the answer without working needs all steps at once.
- ``science``: multiple choice needing two facts combined (creature -> kind, kind -> trait).
- ``code``: write ``f(x)`` from a description and examples; hidden tests run in the sandbox.
- ``instruct``: state a fact under verifiable constraints (case, word count, ending, format).
- ``chat``: a one-fact question about the fact base.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from lnkit.data.world import (
    TRAIT_QUESTION,
    TRAIT_QUESTION_ONE,
    TRAIT_STATEMENT,
    TRAIT_STATEMENT_ONE,
    TRAITS,
    World,
)

DOMAINS = ("math", "science", "code", "instruct", "chat")
MAX_DIFFICULTY = {"math": 5, "science": 3, "code": 3, "instruct": 2, "chat": 1}


@dataclass(frozen=True)
class Item:
    id: str
    domain: str
    difficulty: int
    prompt: str
    gold: str
    verifier: str  # name of a function in lnkit.verify.VERIFIERS
    reasoning: str  # the reference chain of thought (goes inside <think>...</think>)
    direct: str  # the short final answer, with no working
    key: str  # problem identity; splits are made on it
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> Item:
        """Rebuild an item from a row, naming every missing or mistyped field.

        >>> Item.from_dict({"id": "x"})
        Traceback (most recent call last):
        ...
        ValueError: task row 'x': missing field(s) difficulty, direct, domain, gold, key, prompt, reasoning, verifier
        """
        if not isinstance(row, dict):
            raise ValueError(f"task row must be a mapping, got {type(row).__name__}")
        required = {"id", "domain", "difficulty", "prompt", "gold", "verifier", "reasoning", "direct", "key"}
        missing = sorted(required - row.keys())
        name = row.get("id", "?")
        if missing:
            raise ValueError(f"task row {name!r}: missing field(s) {', '.join(missing)}")
        unknown = sorted(row.keys() - required - {"meta"})
        if unknown:
            raise ValueError(f"task row {name!r}: unknown field(s) {', '.join(unknown)}")
        if row["domain"] not in DOMAINS:
            raise ValueError(f"task row {name!r}: domain {row['domain']!r} not in {DOMAINS}")
        if not isinstance(row["difficulty"], int) or not 1 <= row["difficulty"] <= MAX_DIFFICULTY[row["domain"]]:
            raise ValueError(
                f"task row {name!r}: difficulty {row['difficulty']!r} must be an int in "
                f"1..{MAX_DIFFICULTY[row['domain']]} for domain {row['domain']}"
            )
        for f in required - {"difficulty"}:
            if not isinstance(row[f], str):
                raise ValueError(f"task row {name!r}: field {f} must be a string, got {type(row[f]).__name__}")
        meta = row.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"task row {name!r}: field meta must be a mapping")
        return cls(**{k: row[k] for k in required}, meta=meta)


# ---------------------------------------------------------------- math
NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo"]
OBJECTS = ["apples", "coins", "stamps", "shells", "marbles", "cards", "beads", "stones"]
UP = ["finds {n} more", "buys {n} more", "gets {n} more", "wins {n} more"]
DOWN = ["gives away {n}", "loses {n}", "sells {n}", "drops {n}"]
MATH_LEVELS = {1: (1, 1, 9), 2: (2, 1, 9), 3: (3, 10, 30), 4: (4, 10, 60), 5: (5, 10, 99)}  # ops, start range


def math_item(rng: random.Random, difficulty: int) -> Item:
    n_ops, lo, hi = MATH_LEVELS[difficulty]
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    total = rng.randint(lo, hi)
    start, steps, sentences, signed = total, [], [], []
    for _ in range(n_ops):
        n = rng.randint(1, 9)
        if total - n >= 0 and (total + n > 120 or rng.random() < 0.5):
            verb, new = rng.choice(DOWN).format(n=n), total - n
            steps.append(f"{total} - {n} = {new}.")
            signed.append(-n)
        else:
            verb, new = rng.choice(UP).format(n=n), total + n
            steps.append(f"{total} + {n} = {new}.")
            signed.append(n)
        sentences.append(f"Then {name} {verb}.")
        total = new
    prompt = f"{name} has {start} {obj}. " + " ".join(sentences) + f" How many {obj} does {name} have now?"
    reasoning = f"{name} starts with {start} {obj}. " + " ".join(steps) + f" So {name} has {total} {obj}."
    return Item(
        id="", domain="math", difficulty=difficulty, prompt=prompt, gold=str(total), verifier="math",
        reasoning=reasoning, direct=f"The answer is {total}.",
        key=f"math:{name}:{obj}:{start}:{signed}",  # the verbs are wording, not a different problem
    )


def arithmetic_corpus() -> list[str]:
    """Every step a math problem can take: ``a + b = c.`` and ``a - b = c.`` for a in 0..120, b in 1..9.

    >>> c = arithmetic_corpus(); c[0], len(c)
    ('0 + 1 = 1.', 2133)
    """
    out = []
    for a in range(121):
        for b in range(1, 10):
            if a + b <= 129:
                out.append(f"{a} + {b} = {a + b}.")
            if a - b >= 0:
                out.append(f"{a} - {b} = {a - b}.")
    return out


# ---------------------------------------------------------------- science
LETTERS = "ABCD"


def science_item(rng: random.Random, difficulty: int, world: World) -> Item:
    creature = rng.choice(sorted(world.creatures))
    trait = rng.choice(sorted(TRAITS))
    kind = world.creatures[creature]
    answer = world.kinds[kind][trait]
    n_opts = difficulty + 1
    wrong = [world.kinds[k][trait] for k in sorted(world.kinds) if k != kind]
    options = [answer] + rng.sample(wrong, n_opts - 1)
    rng.shuffle(options)
    letter = LETTERS[options.index(answer)]
    lines = [TRAIT_QUESTION_ONE[trait].format(c=creature)] + [f"{LETTERS[i]}) {o}" for i, o in enumerate(options)]
    prompt = "\n".join(lines) + "\nAnswer with a letter."
    kind_fact = TRAIT_STATEMENT[trait].format(k=kind, v=answer)
    reasoning = (
        f"A {creature} is a {kind}. {kind_fact[0].upper() + kind_fact[1:]} "
        f"So {TRAIT_STATEMENT_ONE[trait].format(c=creature, v=answer)}, which is option {letter}."
    )
    return Item(
        id="", domain="science", difficulty=difficulty, prompt=prompt, gold=letter, verifier="choice",
        reasoning=reasoning, direct=f"The answer is {letter}.", key=f"science:{creature}:{trait}",
        meta={"options": options},
    )


# ---------------------------------------------------------------- code
def _code_spec(rng: random.Random, difficulty: int):
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if difficulty == 1:
        op = rng.choice(["add", "sub", "mul"])
        desc = {"add": f"adds {a} to x", "sub": f"subtracts {a} from x", "mul": f"multiplies x by {a}"}[op]
        body = {"add": f"return x + {a}", "sub": f"return x - {a}", "mul": f"return x * {a}"}[op]
        fn = {"add": lambda x: x + a, "sub": lambda x: x - a, "mul": lambda x: x * a}[op]
        why = {"add": f"adds {a}", "sub": f"subtracts {a}", "mul": f"multiplies by {a}"}[op]
        return f"c1:{op}:{a}", desc, body, fn, why
    if difficulty == 2:
        desc, body = f"multiplies x by {a} and then adds {b}", f"return x * {a} + {b}"
        return f"c2:{a}:{b}", desc, body, (lambda x: x * a + b), f"multiplies by {a} then adds {b}"
    desc = f"returns x + {a} if x is even and x - {b} otherwise"
    body = f"if x % 2 == 0:\n        return x + {a}\n    return x - {b}"
    return f"c3:{a}:{b}", desc, body, (lambda x: x + a if x % 2 == 0 else x - b), f"adds {a} to even x, subtracts {b} from odd x"


def code_item(rng: random.Random, difficulty: int) -> Item:
    key, desc, body, fn, why = _code_spec(rng, difficulty)
    xs = rng.sample(range(20), 6)
    shown, hidden = xs[:2], xs[2:]
    examples = ", ".join(f"f({x}) == {fn(x)}" for x in shown)
    prompt = f"Write a Python function f(x) that {desc}. Examples: {examples}."
    code = f"def f(x):\n    {body}"
    checks = " ".join(f"f({x}) = {fn(x)}." for x in shown)
    reasoning = f"The function {why}. Check: {checks} So the code is correct."
    return Item(
        id="", domain="code", difficulty=difficulty, prompt=prompt, gold=code, verifier="code",
        reasoning=reasoning, direct=code, key="code:" + key,  # by function: the same function with other examples is the same problem
        meta={"func": "f", "tests": [[[x], fn(x)] for x in hidden]},
    )


# ---------------------------------------------------------------- instruction following
CONSTRAINTS = ("upper", "lower", "end_word", "words3", "quotes", "bullet")
_CONSTRAINT_TEXT = {
    "upper": "Answer in capital letters.",
    "lower": "Answer in lowercase letters.",
    "end_word": "End your answer with the word {w}.",
    "words3": "Answer in exactly 3 words.",
    "quotes": "Wrap your answer in double quotes.",
    "bullet": "Answer as one bullet point starting with a dash.",
}
END_WORDS = ["done", "okay", "thanks"]
# Pairs that cannot hold together (upper+lower) or that would make the reference awkward.
_CLASH = {frozenset({"upper", "lower"}), frozenset({"end_word", "words3"})}


def apply_constraints(base: str, short: str, constraints: list[str], end_word: str = "") -> str:
    """The reference answer: ``base`` (or ``short`` for a 3-word limit) under every constraint.

    >>> apply_constraints("A zog is a pim.", "Zogs are pims.", ["upper", "quotes"])
    '"A ZOG IS A PIM."'
    """
    text = short if "words3" in constraints else base
    if "end_word" in constraints:
        text = text.rstrip(".") + f", {end_word}."
    if "upper" in constraints:
        text = text.upper()
    if "lower" in constraints:
        text = text.lower()
    if "quotes" in constraints:
        text = f'"{text}"'
    if "bullet" in constraints:
        text = f"- {text}"
    return text


def instruct_item(rng: random.Random, difficulty: int, world: World) -> Item:
    creature = rng.choice(sorted(world.creatures))
    kind = world.creatures[creature]
    while True:
        cons = sorted(rng.sample(CONSTRAINTS, difficulty))
        if not any(frozenset(p) <= set(cons) for p in _CLASH):
            break
    end_word = rng.choice(END_WORDS) if "end_word" in cons else ""
    texts = [_CONSTRAINT_TEXT[c].format(w=end_word) for c in cons]
    prompt = f"Tell me what kind of animal a {creature} is. " + " ".join(texts)
    base, short = f"A {creature} is a {kind}.", f"{creature.capitalize()}s are {kind}s."
    answer = apply_constraints(base, short, cons, end_word)
    reasoning = f"A {creature} is a {kind}. The rules: " + " ".join(texts)
    return Item(
        id="", domain="instruct", difficulty=difficulty, prompt=prompt, gold=kind, verifier="instruct",
        reasoning=reasoning, direct=answer, key=f"instruct:{creature}",  # by creature: two constraint sets on one fact are near-duplicates
        meta={"constraints": cons, "end_word": end_word},
    )


# ---------------------------------------------------------------- chat
def chat_item(rng: random.Random, difficulty: int, world: World) -> Item:
    if rng.random() < 0.6:
        creature = rng.choice(sorted(world.creatures))
        kind = world.creatures[creature]
        prompt, gold, answer = f"What kind of animal is a {creature}?", kind, f"A {creature} is a {kind}."
        reasoning = f"The question asks about the {creature}. The {creature} is a kind of {kind}."
        key, others = f"chat:{creature}:kind", sorted(set(world.kinds) - {kind})
    else:
        kind = rng.choice(sorted(world.kinds))
        trait = rng.choice(sorted(TRAITS))
        gold = world.kinds[kind][trait]
        s = TRAIT_STATEMENT[trait].format(k=kind, v=gold)
        prompt, answer = TRAIT_QUESTION[trait].format(k=kind), s[0].upper() + s[1:]
        reasoning = f"The question asks about {kind}s. It is known that {s}"
        key, others = f"chat:{kind}:{trait}", sorted(set(TRAITS[trait]) - {gold})
    return Item(
        id="", domain="chat", difficulty=1, prompt=prompt, gold=gold, verifier="chat",
        reasoning=reasoning, direct=answer, key=key, meta={"distractors": others},
    )


def make_item(domain: str, rng: random.Random, difficulty: int, world: World) -> Item:
    if domain == "math":
        return math_item(rng, difficulty)
    if domain == "science":
        return science_item(rng, difficulty, world)
    if domain == "code":
        return code_item(rng, difficulty)
    if domain == "instruct":
        return instruct_item(rng, difficulty, world)
    if domain == "chat":
        return chat_item(rng, difficulty, world)
    raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
