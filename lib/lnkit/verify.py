"""Verifiers: does a response's final answer solve the item? One plain function per kind of task.

Each takes the answer text (the part of the response outside any think block, see
:func:`lnkit.data.chat.split_response`) and the item, and returns True or False. Math answers are compared
with math-verify (so "The answer is 9." and "9" both match 9); multiple-choice letters and instruction
constraints by exact rules; code by running it against the item's hidden tests in :mod:`lnkit.sandbox`.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from lnkit.sandbox import check_function

SANDBOX_WORKERS = max(2, os.cpu_count() or 1)  # sandboxed programs at once: the waiting is on the child

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


_CODE_VERDICTS: dict[tuple, bool] = {}  # (program, function, cases) -> passed: the same program, the same verdict
_CODE_VERDICTS_MAX = 100_000


def check_many(answers: list[str], items: list, *, workers: int = SANDBOX_WORKERS, progress=None) -> list[bool]:
    """:func:`check` for each (answer, item) pair, each distinct pair verified once.

    Code runs in the sandbox ``workers`` programs at once (each a subprocess of its own: threads overlap the
    waiting), and a program already run against the same tests in this process is not run again (the
    correct solutions of several models, or of many RL steps, are mostly the same text). math-verify's
    timeouts use signals, so the other verifiers stay on this thread. ``progress``: a bar advanced once per
    distinct pair.

    >>> from types import SimpleNamespace as S
    >>> it = S(id="m1", gold="4", verifier="math", meta={})
    >>> check_many(["The answer is 4.", "The answer is 5.", "The answer is 4."], [it, it, it])
    [True, False, True]
    """
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} items")
    todo: dict[tuple, int] = {}
    for j, (a, it) in enumerate(zip(answers, items)):
        todo.setdefault(_key(a, it), j)
    verdict: dict[tuple, bool] = {}

    def one(key):
        j = todo[key]
        return key, check(answers[j], items[j])

    def done(key, ok):
        verdict[key] = ok
        if progress is not None:
            progress.update(1)

    sandboxed = []
    for key in todo:
        if key[0] != "code":
            done(*one(key))
        elif key in _CODE_VERDICTS:
            done(key, _CODE_VERDICTS[key])
        else:
            sandboxed.append(key)
    if sandboxed:
        with ThreadPoolExecutor(max(1, min(workers, len(sandboxed)))) as pool:
            for key, ok in pool.map(one, sandboxed):
                if len(_CODE_VERDICTS) >= _CODE_VERDICTS_MAX:
                    _CODE_VERDICTS.clear()
                _CODE_VERDICTS[key] = ok
                done(key, ok)
    return [verdict[_key(a, it)] for a, it in zip(answers, items)]


def _key(answer: str, item) -> tuple:
    """What a verdict depends on: for code the program and the tests (not the item's id: two worlds may reuse
    an id), for the rest the item's id and the answer (within one call)."""
    if item.verifier == "code":
        meta = item.meta or {}
        return ("code", extract_code(answer), meta.get("func", "f"), repr(meta.get("tests")))
    return (item.verifier, item.id, answer)
