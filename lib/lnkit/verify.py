"""Verifiers: does a response's final answer solve the item? One plain function per kind of task.

Each takes the answer text (the part of the response outside any think block, see
:func:`lnkit.data.chat.split_response`) and the item, and returns True or False. Math answers are compared
with math-verify (so "The answer is 9." and "9" both match 9); multiple-choice letters and instruction
constraints by exact rules; code by running it against the item's hidden tests in :mod:`lnkit.sandbox`.
"""

from __future__ import annotations

import re

from lnkit.sandbox import check_function

ANSWER_RE = re.compile(r"answer is\s*:?\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


def _final(text: str) -> str:
    m = ANSWER_RE.search(text.strip())
    return m.group(1) if m else text.strip()


def verify_math(answer: str, item) -> bool:
    """>>> from types import SimpleNamespace as S
    >>> verify_math("The answer is 12.", S(gold="12")), verify_math("The answer is 13.", S(gold="12"))
    (True, False)
    """
    from math_verify import parse, verify  # 1.8 s to import (measured): only when math is checked

    got = parse(_final(answer))
    return bool(got) and bool(verify(parse(item.gold), got))


def verify_choice(answer: str, item) -> bool:
    """The single option letter the answer names must be the gold letter, and the answer must not name the
    text of another option: a letter that disagrees with the answer's own words is a guess, and must not pay.

    >>> from types import SimpleNamespace as S
    >>> item = S(gold="B", meta={"options": ["red", "blue", "green"]})
    >>> verify_choice("The answer is B.", item), verify_choice("A or B", item)
    (True, False)
    >>> verify_choice("So a shetan is blue, which is option B.", item)
    True
    >>> verify_choice("So a shetan is green, which is option B.", item)  # the text is option C's
    False
    """
    final = _final(answer)
    letters = re.findall(r"\b([A-D])\b", final)
    if len(letters) != 1 or letters[0] != item.gold:
        return False
    options = (getattr(item, "meta", None) or {}).get("options") or []
    chosen = "ABCD".index(letters[0])
    for j, text in enumerate(options):
        named = re.search(rf"\b{re.escape(str(text))}s?\b", answer, re.IGNORECASE)
        if j != chosen and named and (chosen >= len(options) or str(text).lower() != str(options[chosen]).lower()):
            return False
    return True


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check_constraint(answer: str, constraint: str, end_word: str = "") -> bool:
    """One instruction constraint, by an exact rule.

    >>> check_constraint('"A ZOG IS A PIM."', "upper"), check_constraint("zogs are pims, done.", "end_word", "done")
    (True, True)
    """
    a = answer.strip()
    if constraint == "upper":
        return any(c.isalpha() for c in a) and a == a.upper()
    if constraint == "lower":
        return any(c.isalpha() for c in a) and a == a.lower()
    if constraint == "end_word":
        w = _words(a)
        return bool(w) and w[-1].lower() == end_word.lower()
    if constraint == "words3":
        return len(_words(a.replace("'", ""))) == 3
    if constraint == "quotes":
        core = a[2:].strip() if a.startswith("- ") else a
        return len(core) >= 2 and core.startswith('"') and core.endswith('"')
    if constraint == "bullet":
        return a.startswith("- ") and "\n" not in a
    raise ValueError(f"unknown constraint {constraint!r}")


def _word_forms(text: str) -> set[str]:
    """Lower-cased words, each also without a plural 's' ("Zogs" matches the kind "zog")."""
    words = [w.lower() for w in _words(text)]
    return set(words) | {w.rstrip("s") for w in words}


def verify_instruct(answer: str, item) -> bool:
    """Every constraint holds and the answer names the right kind."""
    ok = all(check_constraint(answer, c, item.meta.get("end_word", "")) for c in item.meta["constraints"])
    return ok and item.gold.lower() in _word_forms(answer)


def verify_chat(answer: str, item) -> bool:
    """The gold word appears and no distractor of the same kind does.

    >>> from types import SimpleNamespace as S
    >>> verify_chat("Dips live in water.", S(gold="water", meta={"distractors": ["sand"]}))
    True
    """
    words = _word_forms(answer)
    return item.gold.lower() in words and not any(d.lower() in words for d in item.meta.get("distractors", []))


CODE_RE = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def extract_code(answer: str) -> str:
    m = CODE_RE.search(answer)
    return (m.group(1) if m else answer).strip() + "\n"


def verify_code(answer: str, item) -> bool:
    """Run the answer's function against the item's hidden tests in the sandbox."""
    cases = [(tuple(args), want) for args, want in item.meta["tests"]]
    return check_function(extract_code(answer), item.meta.get("func", "f"), cases).ok


VERIFIERS = {
    "math": verify_math,
    "choice": verify_choice,
    "code": verify_code,
    "instruct": verify_instruct,
    "chat": verify_chat,
}


def check(answer: str, item) -> bool:
    """Verify ``answer`` with the item's own verifier; a verifier crash counts as wrong."""
    fn = VERIFIERS.get(item.verifier)
    if fn is None:
        raise ValueError(f"item {item.id}: unknown verifier {item.verifier!r}; known: {sorted(VERIFIERS)}")
    try:
        return bool(fn(answer, item))
    except Exception:  # a malformed answer must never crash an evaluation or an RL step
        return False
