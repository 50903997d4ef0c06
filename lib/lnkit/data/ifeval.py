"""Instruction following in IFEval's terms (Zhou et al. 2023, as lm-eval-harness's ``ifeval`` task runs it).

A prompt asks one question about the tiny world's facts and adds one to three verifiable instructions, each
an IFEval instruction id with its kwargs (``{"instruction_id_list": [...], "kwargs": [{...}, ...]}``, the
layout of IFEval's data, so its rows can be scored by lm-eval and lm-eval's rows by us). The checkers follow
IFEval's rules; ``tests/test_ifeval.py`` runs lm-eval's own checkers on the same responses and requires the
same verdicts. One deliberate difference: IFEval's two ``change_case`` checkers also require ``langdetect``
to call the text English, which on short texts of invented words is a coin toss (and unseeded), so ours
read the letter case alone.

Metrics (:func:`score`): prompt-level (every instruction followed) and instruction-level (the share of
instructions followed), each strict and loose; loose retries the response with its first line, its last
line or both removed, and with markdown asterisks stripped, as IFEval does.

The phrasing of the six constraints the tiny world's ``instruct`` domain already teaches (case, ending word,
word count, quotes, one bullet) is kept, so a model of this world has a prior on them; the others are new
to it (commas, a postscript, a title, keywords).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lnkit.data.world import TRAIT_QUESTION, TRAIT_STATEMENT, TRAITS, World

RELATIONS = ("less than", "at least")


def count_words(text: str) -> int:
    """Words as IFEval counts them (runs of word characters)."""
    return len(re.findall(r"\w+", text))


@dataclass(frozen=True)
class Instruction:
    """One IFEval instruction type: how to draw its kwargs, say it in a prompt, check it, and make a reference
    answer obey it (``apply``; ``None`` where the type has no fixed transformation)."""

    id: str
    kwargs: Callable[[random.Random, dict], dict]
    describe: Callable[..., str]
    check: Callable[..., bool]
    apply: Callable[..., str] | None = None


def _bullets(text: str) -> int:
    return len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)) + len(re.findall(r"^\s*-.*$", text,
                                                                                            flags=re.MULTILINE))


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = {"P.P.S": r"\s*p\.\s?p\.\s?s", "P.S.": r"\s*p\.\s?s\."}.get(postscript_marker,
                                                                        r"\s*" + postscript_marker.lower())
    return bool(re.findall(marker + r".*$", text.lower(), flags=re.MULTILINE))


def _words(text: str, num_words: int, relation: str) -> bool:
    n = count_words(text)
    return n < num_words if relation == "less than" else n >= num_words


def _title(text: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


END_PHRASES = ("done", "okay", "thanks")
POSTSCRIPT = "Ask me more."
KEYWORDS = ("indeed", "truly", "friend", "simple", "known")


def _end(text: str, end_phrase: str) -> str:
    return text.rstrip().rstrip(".") + f", {end_phrase}"


INSTRUCTIONS: dict[str, Instruction] = {i.id: i for i in [
    Instruction("change_case:english_capital", lambda r, c: {},
                lambda: "Answer in capital letters.", lambda t: t.isupper(), lambda t: t.upper()),
    Instruction("change_case:english_lowercase", lambda r, c: {},
                lambda: "Answer in lowercase letters.", lambda t: t.islower(), lambda t: t.lower()),
    Instruction("startend:end_checker", lambda r, c: {"end_phrase": r.choice(END_PHRASES) + "."},
                lambda end_phrase: f"End your answer with the word {end_phrase.rstrip('.')}.",
                lambda t, end_phrase: t.strip().strip('"').lower().endswith(end_phrase.strip().lower()), _end),
    Instruction("startend:quotation", lambda r, c: {},
                lambda: "Wrap your answer in double quotes.",
                lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"', lambda t: f'"{t}"'),
    Instruction("detectable_format:number_bullet_lists", lambda r, c: {"num_bullets": 1},
                lambda num_bullets: "Answer as one bullet point starting with a dash." if num_bullets == 1 else
                f"Answer as exactly {num_bullets} bullet points, each starting with a dash.",
                lambda t, num_bullets: _bullets(t) == num_bullets, lambda t, num_bullets: f"- {t}"),
    Instruction("length_constraints:number_words",
                lambda r, c: {"relation": r.choice(RELATIONS), "num_words": r.choice([4, 6, 8])},
                lambda relation, num_words: f"Answer in {'fewer than' if relation == 'less than' else 'at least'} "
                                            f"{num_words} words.",
                lambda t, relation, num_words: _words(t, num_words, relation)),
    Instruction("punctuation:no_comma", lambda r, c: {},
                lambda: "Do not use any commas.", lambda t: not re.search(r",", t), lambda t: t.replace(",", "")),
    Instruction("detectable_content:postscript", lambda r, c: {"postscript_marker": "P.S."},
                lambda postscript_marker: f"Add a postscript starting with {postscript_marker}",
                lambda t, postscript_marker: _postscript(t, postscript_marker),
                lambda t, postscript_marker: f"{t}\n{postscript_marker} {POSTSCRIPT}"),
    Instruction("detectable_format:title", lambda r, c: {},
                lambda: "Give your answer a title in double angle brackets, like <<title>>.", _title,
                lambda t: f"<<Facts>>\n{t}"),
    Instruction("keywords:existence", lambda r, c: {"keywords": [r.choice(KEYWORDS)]},
                lambda keywords: f"Use the word {' and the word '.join(keywords)}.",
                lambda t, keywords: all(re.search(k, t, flags=re.IGNORECASE) for k in keywords),
                lambda t, keywords: t.rstrip(".") + ", " + " ".join(keywords) + "."),
    Instruction("keywords:forbidden_words", lambda r, c: {"forbidden_words": [c["subject"].lower()]},
                lambda forbidden_words: f"Do not say the word {' or '.join(forbidden_words)}.",
                lambda t, forbidden_words: not any(re.search(r"\b" + w + r"\b", t, flags=re.IGNORECASE)
                                                   for w in forbidden_words)),
]}
# Pairs that cannot both hold, or whose reference answers would undo each other (IFEval's conflicts, ours).
CONFLICTS = [
    {"change_case:english_capital", "change_case:english_lowercase"},
    {"change_case:english_capital", "detectable_content:postscript"},  # "P.S." stays as it is
    {"change_case:english_lowercase", "detectable_content:postscript"},
    {"change_case:english_capital", "detectable_format:title"},
    {"startend:end_checker", "startend:quotation"},
    {"startend:end_checker", "detectable_content:postscript"},
    {"startend:end_checker", "length_constraints:number_words"},
    {"startend:quotation", "detectable_content:postscript"},
    {"startend:quotation", "detectable_format:title"},
    {"startend:end_checker", "punctuation:no_comma"},  # the ending is added after a comma
    {"keywords:existence", "punctuation:no_comma"},
    {"keywords:existence", "length_constraints:number_words"},
    {"detectable_format:number_bullet_lists", "detectable_format:title"},
    {"detectable_format:number_bullet_lists", "startend:quotation"},
]
# The order a reference answer applies its instructions in (later ones wrap earlier ones).
APPLY_ORDER = ["punctuation:no_comma", "keywords:existence", "startend:end_checker", "change_case:english_capital",
               "change_case:english_lowercase", "startend:quotation", "detectable_format:number_bullet_lists",
               "detectable_format:title", "detectable_content:postscript"]


# The types whose phrasing the tiny world's ``instruct`` domain (and so the SFT blend) teaches, directly or as
# a near neighbour; the others (a postscript, a title, required keywords) a model of this world has never
# seen done, so RLOO's samples almost never follow them and it has nothing to reinforce.
TAUGHT = ("change_case:english_capital", "change_case:english_lowercase", "detectable_format:number_bullet_lists",
          "keywords:forbidden_words", "length_constraints:number_words", "punctuation:no_comma", "startend:end_checker",
          "startend:quotation")


class UnknownInstruction(ValueError):
    """An instruction id this module does not define."""


def instruction(instruction_id: str) -> Instruction:
    try:
        return INSTRUCTIONS[instruction_id]
    except KeyError:
        raise UnknownInstruction(f"unknown instruction id {instruction_id!r}; known: {sorted(INSTRUCTIONS)}") from None


@dataclass
class IFPrompt:
    """One prompt in IFEval's layout, with a reference answer that follows every instruction."""

    key: str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]
    reference: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": self.instruction_id_list,
                "kwargs": self.kwargs, "reference": self.reference, "meta": self.meta}


def _question(rng: random.Random, world: World) -> dict[str, str]:
    """A question about one fact: its plain answer, a shorter one, one without the subject's name (a pronoun),
    and the subject as the answer writes it (what ``keywords:forbidden_words`` forbids)."""
    if rng.random() < 0.5:
        creature = rng.choice(sorted(world.creatures))
        kind = world.creatures[creature]
        return {"question": f"Tell me what kind of animal a {creature} is.", "answer": f"A {creature} is a {kind}.",
                "short": f"{creature.capitalize()}s are {kind}s.", "pronoun": f"It is a {kind}.", "subject": creature}
    kind = rng.choice(sorted(world.kinds))
    trait = rng.choice(sorted(TRAITS))
    s = TRAIT_STATEMENT[trait].format(k=kind, v=world.kinds[kind][trait])
    answer = s[0].upper() + s[1:]
    return {"question": TRAIT_QUESTION[trait].format(k=kind), "answer": answer, "short": answer,
            "pronoun": "They" + answer[len(kind) + 1:], "subject": f"{kind}s"}


def make_prompt(rng: random.Random, world: World, n_instructions: int, ids: list[str] | None = None) -> IFPrompt:
    """A question about one fact with ``n_instructions`` compatible instructions drawn from ``ids``."""
    pool = sorted(ids or INSTRUCTIONS)
    for i in pool:
        instruction(i)
    q = _question(rng, world)
    for _ in range(1000):
        chosen = sorted(rng.sample(pool, n_instructions))
        if not any(c <= set(chosen) for c in CONFLICTS):
            break
    else:
        raise ValueError(f"no {n_instructions} compatible instructions among {pool}")
    kwargs = [INSTRUCTIONS[i].kwargs(rng, q) for i in chosen]
    text = " ".join(INSTRUCTIONS[i].describe(**kw) for i, kw in zip(chosen, kwargs))
    forbid = "keywords:forbidden_words" in chosen
    bases = [q["pronoun"]] if forbid else [q["answer"], q["short"]]
    ref = next((r for r in (reference_answer(b, chosen, kwargs) for b in bases) if r), "")
    return IFPrompt(key=f"ifeval:{q['question']}|{'+'.join(chosen)}|{kwargs}", prompt=f"{q['question']} {text}",
                    instruction_id_list=chosen, kwargs=kwargs, reference=ref, meta=q)


def reference_answer(answer: str, ids: list[str], kwargs: list[dict]) -> str:
    """``answer`` made to follow the instructions (word counts: padded with a filler sentence), or ``""`` where
    that is not possible for this combination."""
    text = answer
    by_id = dict(zip(ids, kwargs))
    if "length_constraints:number_words" in by_id:
        kw = by_id["length_constraints:number_words"]
        pad = " It is well known."
        while not _words(text, **kw) and kw["relation"] == "at least" and count_words(text) < 60:
            text = text + pad
    for i in APPLY_ORDER:
        if i in by_id and INSTRUCTIONS[i].apply is not None:
            text = INSTRUCTIONS[i].apply(text, **by_id[i])
    return text if all(check(text, i, kw) for i, kw in zip(ids, kwargs)) else ""


def check(response: str, instruction_id: str, kwargs: dict) -> bool:
    """Strict: the response (non-empty) follows the instruction."""
    spec = instruction(instruction_id)
    return bool(response.strip()) and bool(spec.check(response, **{k: v for k, v in kwargs.items() if v is not None}))


def loose_variants(response: str) -> list[str]:
    """IFEval's loose retries: without the first line, the last, or both; each with asterisks stripped."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut[:1] + [cut[0].replace("*", "")] + cut[1:] + [c.replace("*", "") for c in cut[1:]]


def follow(response: str, ids: list[str], kwargs: list[dict]) -> dict:
    """Per-instruction verdicts, strict and loose."""
    strict = [check(response, i, kw) for i, kw in zip(ids, kwargs)]
    loose = [any(check(v, i, kw) for v in loose_variants(response)) for i, kw in zip(ids, kwargs)]
    return {"strict": strict, "loose": loose}


def score(rows: list[dict]) -> dict[str, float]:
    """IFEval's four metrics over rows holding ``strict`` and ``loose`` verdict lists (from :func:`follow`).

    >>> score([{"strict": [True, False], "loose": [True, True]}, {"strict": [True], "loose": [True]}])
    {'prompt_level_strict_acc': 0.5, 'inst_level_strict_acc': 0.6667, 'prompt_level_loose_acc': 1.0, 'inst_level_loose_acc': 1.0}
    """
    if not rows:
        return {}
    out = {}
    for mode in ("strict", "loose"):
        flat = [v for r in rows for v in r[mode]]
        out[f"prompt_level_{mode}_acc"] = round(sum(all(r[mode]) for r in rows) / len(rows), 4)
        out[f"inst_level_{mode}_acc"] = round(sum(flat) / len(flat), 4)
    return out


def make_prompts(world: World, n: int, seed: int, ids: list[str] | None = None, max_instructions: int = 3,
                 exclude: set[str] | None = None) -> list[IFPrompt]:
    """``n`` distinct prompts (by key) with one to ``max_instructions`` instructions, none of whose keys is in
    ``exclude`` (a train set's, for a disjoint test set). Only prompts with a reference answer are kept."""
    rng = random.Random(f"ifeval-{seed}")
    seen, out = set(exclude or ()), []
    for _ in range(50 * n):
        if len(out) == n:
            break
        p = make_prompt(rng, world, rng.randint(1, max_instructions), ids)
        if p.key not in seen and p.reference:
            seen.add(p.key)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct instruction prompts of the {n} asked for (ids={ids})")
    return out
