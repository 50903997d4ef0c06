"""Synthetic reasoning data and its curation (paper Section 3): a teacher writes several solutions per
prompt, filters keep the right ones, and a blend in the paper's domain and on/off proportions goes out.

The teacher (Section 3.1: DeepSeek-R1 with 16 samples, Qwen2.5-Math with 64) is, in the tiny world,
:func:`reference_teacher`: a solver that writes each item's full reference trace, but with probability
``error_rate`` a realistic mistake instead (:func:`corrupt`): a wrong arithmetic step whose result
propagates to the final answer, a misremembered fact that picks the wrong option letter, buggy or
unparsable code, a broken instruction, a wrong fact in a chat answer, or a trace cut off by the length
limit. Any Hugging Face causal LM can be the teacher instead (:func:`model_teacher`, sampled ``k`` times
per prompt). Off-mode responses come from the parent (:func:`off_responses`; the paper used Llama
Instruct models), greedy with thinking off.

Every filter is a function ``(samples, ...) -> (kept, removed)``; :func:`curate` runs them in order and
records how many each removed (by mode and, for the reference teacher, by the kind of mistake it caught):

1. :func:`extract_answers`: the response has the mode's format and a final answer can be extracted;
2. :func:`check_code_parses`: code answers parse (``ast``; the paper used Tree-Sitter);
3. :func:`decontaminate`: the prompt does not near-duplicate any evaluation prompt (val and test);
4. :func:`majority_vote`: where there is no gold (``goldless`` domains), keep the responses that give the
   most common answer among the prompt's thinking-on samples (Section 3.1.3);
5. :func:`verify_gold`: the answer verifies against the gold answer (:func:`lnkit.verify.check`);
6. :func:`deduplicate`: identical responses to the same prompt are kept once (after the vote, which
   counts them).

:func:`blend` then draws the training set: domain shares (default: Table 2), a share of thinking-off
examples and, within math, a share per difficulty level. A filter that empties the data set raises
:class:`CurationError` naming it.
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from lnkit.data.chat import THINK_CLOSE, THINK_OPEN, format_response, render_prompt, split_response
from lnkit.data.splits import decontamination_report
from lnkit.data.tasks import LETTERS, Item
from lnkit.generate import generate
from lnkit.progress import progress_bar
from lnkit.verify import ANSWER_RE, check_many, extract_code

# The paper's Table 2 (SFT samples per category, 33,011,757 in all). The tiny world has no safety data.
PAPER_TABLE2 = {"math": 22_066_397, "code": 10_108_883, "science": 708_920, "instruction following": 56_339,
                "chat": 39_792, "safety": 31_426}
# Table 2 in the tiny world's domains, in percent: safety (0.1%) has no counterpart and is left out.
DEFAULT_RATIOS = {"math": 66.84, "code": 30.62, "science": 2.15, "instruct": 0.17, "chat": 0.12}
CORRUPTIONS = {
    "math": ("arithmetic", "truncated"),
    "science": ("wrong_fact", "truncated"),
    "code": ("bug", "syntax", "truncated"),
    "instruct": ("ignored_rule", "truncated"),
    "chat": ("wrong_fact", "truncated"),
}
REFERENCE = "reference-solver"


class CurationError(RuntimeError):
    """Curation cannot go on (a filter removed everything, a blend share has no data)."""


@dataclass
class Sample:
    """One response to one prompt. ``corruption`` is what the reference teacher broke ('' for a clean
    trace, None when unknown: responses of a model). ``answer`` is set by :func:`extract_answers`."""

    item: Item
    mode: str
    output: str
    generator: str
    corruption: str | None = None
    answer: str | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the reference teacher
STEP_RE = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def _corrupt_math(item: Item, rng: random.Random) -> tuple[str, str]:
    """One step's result off by 1 or 2; every later step starts from the wrong total.

    >>> it = Item("m", "math", 2, "?", "10", "math", "Ava starts with 5 cards. 5 + 3 = 8. 8 + 2 = 10. "
    ...           "So Ava has 10 cards.", "The answer is 10.", "k")
    >>> _corrupt_math(it, random.Random(0))
    ('Ava starts with 5 cards. 5 + 3 = 8. 8 + 2 = 12. So Ava has 12 cards.', 'The answer is 12.')
    """
    steps = STEP_RE.findall(item.reasoning)
    if not steps:
        raise ValueError(f"item {item.id}: no arithmetic steps to corrupt in {item.reasoning!r}")
    bad = rng.randrange(len(steps))
    state = {"i": 0, "total": None}

    def redo(m: re.Match) -> str:
        i = state["i"]
        a = int(m.group(1)) if state["total"] is None else state["total"]
        b, op = int(m.group(3)), m.group(2)
        res = a + b if op == "+" else a - b
        if i == bad:
            res += rng.choice([d for d in (-2, -1, 1, 2) if res + d >= 0])
        state["i"], state["total"] = i + 1, res
        return f"{a} {op} {b} = {res}."

    text = STEP_RE.sub(redo, item.reasoning)
    total = state["total"]
    text = re.sub(r"(So \w+ has )\d+", lambda m: f"{m.group(1)}{total}", text)
    return text, f"The answer is {total}."


def _corrupt_science(item: Item, rng: random.Random) -> tuple[str, str]:
    """A misremembered trait: the conclusion names another option's value and letter."""
    options = item.meta["options"]
    right = LETTERS.index(item.gold)
    wrong = rng.choice([i for i in range(len(options)) if i != right])
    head, _, tail = item.reasoning.rpartition("So ")
    tail = tail.replace(options[right], options[wrong], 1).replace(f"option {item.gold}", f"option {LETTERS[wrong]}")
    return head + "So " + tail, f"The answer is {LETTERS[wrong]}."


def _corrupt_code(item: Item, kind: str, rng: random.Random) -> str:
    """``bug``: a constant off by one (or ``%`` by 3 instead of 2); ``syntax``: the colon of ``def`` dropped.

    >>> _corrupt_code(Item("c", "code", 1, "", "def f(x):\\n    return x + 3", "code", "", "", "k"), "bug", random.Random(0))
    'def f(x):\\n    return x + 4'
    """
    head, _, body = item.gold.partition("\n")
    if kind == "syntax":
        return head.rstrip(":") + "\n" + body
    nums = list(re.finditer(r"\d+", body))
    m = nums[rng.randrange(len(nums))]
    return head + "\n" + body[: m.start()] + str(int(m.group()) + 1) + body[m.end():]


def corrupt(item: Item, kind: str, rng: random.Random) -> str:
    """The thinking-on response of a teacher that made mistake ``kind`` (see :data:`CORRUPTIONS`)."""
    if kind == "truncated":  # the generation hit its length limit inside the think block
        words = item.reasoning.split()
        return f"{THINK_OPEN}\n" + " ".join(words[: max(1, rng.randrange(len(words)))])
    if kind not in CORRUPTIONS[item.domain]:
        raise ValueError(f"corruption {kind!r} does not apply to domain {item.domain}; "
                         f"choose from {CORRUPTIONS[item.domain]}")
    reasoning, direct = item.reasoning, item.direct
    if item.domain == "math":
        reasoning, direct = _corrupt_math(item, rng)
    elif item.domain == "science":
        reasoning, direct = _corrupt_science(item, rng)
    elif item.domain == "code":
        direct = _corrupt_code(item, kind, rng)
    elif item.domain == "instruct":  # the rules forgotten: the plain statement
        direct = reasoning.split(" The rules:")[0]
    elif item.domain == "chat":
        other = rng.choice(item.meta["distractors"])
        swap = re.compile(rf"\b{re.escape(item.gold)}\b", re.IGNORECASE)
        reasoning, direct = swap.sub(other, reasoning), swap.sub(other, direct)
    return format_response(reasoning, direct, "on")


def reference_teacher(items: list[Item], k: int, error_rate: float, seed: int = 0) -> list[Sample]:
    """``k`` thinking-on responses per item; each is the reference trace or, with probability
    ``error_rate``, a corrupted one (kind drawn uniformly from the domain's :data:`CORRUPTIONS`).

    >>> it = Item("m", "math", 1, "Ava has 5 cards. Then Ava finds 3 more. How many cards does Ava have now?",
    ...           "8", "math", "Ava starts with 5 cards. 5 + 3 = 8. So Ava has 8 cards.", "The answer is 8.", "k")
    >>> [s.corruption for s in reference_teacher([it], k=4, error_rate=0.5, seed=1)]
    ['', '', 'arithmetic', 'arithmetic']
    """
    rng = random.Random(f"{seed}-reference-teacher")
    out = []
    for it in items:
        for _ in range(k):
            if rng.random() < error_rate:
                kind = rng.choice(CORRUPTIONS[it.domain])
                out.append(Sample(it, "on", corrupt(it, kind, rng), REFERENCE, kind))
            else:
                out.append(Sample(it, "on", format_response(it.reasoning, it.direct, "on"), REFERENCE, ""))
    return out


def model_teacher(model, tok, items: list[Item], k: int, *, name: str, max_new_tokens: int = 256,
                  temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, batch_size: int = 64,
                  progress: bool = True) -> list[Sample]:
    """``k`` sampled thinking-on responses per item from any causal LM (the paper's R1 / Qwen-Math role).
    A generation that hit ``max_new_tokens`` keeps its cut-off text; answer extraction removes it."""

    prompts = [render_prompt(it.prompt, "on") for it in items for _ in range(k)]
    with progress_bar(total=len(prompts), desc="teacher", disable=not progress) as bar:
        outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, batch_size=batch_size, progress=bar)
    return [Sample(items[j // k], "on", o["text"], name, None) for j, o in enumerate(outs)]


def off_responses(model, tok, items: list[Item], *, name: str, max_new_tokens: int = 64, batch_size: int = 64,
                  progress: bool = True) -> list[Sample]:
    """One greedy thinking-off response per item (the paper's Llama-Instruct responses, Section 3.2)."""

    prompts = [render_prompt(it.prompt, "off") for it in items]
    with progress_bar(total=len(prompts), desc="off-mode responses", disable=not progress) as bar:
        outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=bar)
    return [Sample(it, "off", o["text"], name, None) for it, o in zip(items, outs)]


def leaked_prompts(eval_items: list[Item], n: int, seed: int = 0) -> list[Item]:
    """``n`` copies of evaluation problems, as a scraped prompt pool contains benchmark problems (the
    paper's AoPS harvest): every other one verbatim, the rest lightly edited (a word added at the end).
    Their ids start with ``leak-`` so a report can check that decontamination removed every one.

    >>> ev = [Item("test-1", "chat", 1, "What kind of animal is a zog?", "pim", "chat", "", "", "k")]
    >>> [it.prompt for it in leaked_prompts(ev, 2)]
    ['What kind of animal is a zog?', 'What kind of animal is a zog please?']
    """
    rng = random.Random(f"{seed}-leaks")
    picks = [eval_items[rng.randrange(len(eval_items))] for _ in range(n)] if eval_items else []
    out = []
    for j, it in enumerate(picks):
        prompt = it.prompt
        if j % 2:
            prompt = prompt[:-1] + " please?" if prompt.endswith("?") else prompt + " Thanks."
        out.append(Item(**{**it.to_dict(), "id": f"leak-{j:04d}-{it.id}", "prompt": prompt}))
    return out


# ---------------------------------------------------------------- the filters
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(sample: Sample) -> str | None:
    """The response's final answer in a comparable form, or None when there is none: the mode's format
    must hold (a closed think block then an answer when on; no think tag when off) and the domain's answer
    must be found (a number, one option letter, a function, a non-empty sentence).

    >>> it = Item("m", "math", 1, "?", "8", "math", "", "", "k")
    >>> extract_answer(Sample(it, "on", "<think>\\n5 + 3 = 8.\\n</think>\\nThe answer is 8.", "t"))
    '8'
    >>> extract_answer(Sample(it, "on", "<think>\\n5 + 3 =", "t")) is None
    True
    """
    text = sample.output
    if sample.mode == "on":
        if not text.lstrip().startswith(THINK_OPEN) or THINK_CLOSE not in text:
            return None
    elif THINK_OPEN in text or THINK_CLOSE in text:
        return None
    _, answer = split_response(text)
    if not answer:
        return None
    verifier = sample.item.verifier
    if verifier == "math":
        boxed = BOXED_RE.findall(answer)
        m = ANSWER_RE.search(answer)
        final = boxed[-1] if boxed else (m.group(1) if m else answer)
        nums = NUMBER_RE.findall(final)
        return nums[-1] if nums else None
    if verifier == "choice":
        m = ANSWER_RE.search(answer)
        letters = re.findall(r"\b([A-D])\b", m.group(1) if m else answer)
        return letters[0] if len(letters) == 1 else None
    if verifier == "code":
        code = extract_code(answer).strip()
        return code if "def " in code else None
    return " ".join(re.findall(r"[a-z0-9']+", answer.lower())) or None


def extract_answers(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Keep responses with the mode's format and an extractable final answer (sets ``sample.answer``)."""
    kept, removed = [], []
    for s in samples:
        s.answer = extract_answer(s)
        (kept if s.answer is not None else removed).append(s)
    return kept, removed


def check_code_parses(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Code answers must parse as Python (the paper validates code segments with Tree-Sitter).

    >>> it = Item("c", "code", 1, "?", "", "code", "", "", "k")
    >>> ok, bad = check_code_parses([Sample(it, "off", "", "t", answer="def f(x)\\n    return x")])
    >>> len(ok), len(bad)
    (0, 1)
    """
    kept, removed = [], []
    for s in samples:
        if s.item.verifier == "code":
            try:
                ast.parse(s.answer)
            except (SyntaxError, ValueError):
                removed.append(s)
                continue
        kept.append(s)
    return kept, removed


def _norm(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def decontaminate(samples: list[Sample], eval_items: list[Item], n: int = 8,
                  threshold: float = 0.8) -> tuple[list[Sample], list[Sample]]:
    """Remove responses to prompts that near-duplicate an evaluation prompt: one evaluation prompt holds
    ``threshold`` of the prompt's word ``n``-grams (:func:`lnkit.data.splits.decontamination_report`, run
    the other way round), or the prompt contains a whole evaluation prompt (words compared, case and
    punctuation ignored). The second test catches light edits of short prompts, which n-grams miss:
    a prompt of fewer than ``n`` words has a single n-gram, itself.

    >>> ev = [Item("t", "chat", 1, "What kind of animal is a zog?", "pim", "chat", "", "", "k")]
    >>> s = [Sample(Item("x", "chat", 1, "What kind of animal is a zog, please?", "pim", "chat", "", "", "k"), "on", "", "t")]
    >>> [len(part) for part in decontaminate(s, ev)]
    [0, 1]
    """
    prompts = list({s.item.id: s.item for s in samples}.values())
    flagged = set(decontamination_report(eval_items, prompts, n=n, threshold=threshold)["flagged_ids"])
    evals = {_norm(e.prompt) for e in eval_items}
    for it in prompts:
        if it.id not in flagged:
            text = _norm(it.prompt)
            if any(e in text for e in evals):
                flagged.add(it.id)
    kept = [s for s in samples if s.item.id not in flagged]
    return kept, [s for s in samples if s.item.id in flagged]


def deduplicate(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Identical (prompt, mode, response) triples are kept once (a deterministic teacher repeats itself)."""
    seen, kept, removed = set(), [], []
    for s in samples:
        key = (s.item.prompt, s.mode, s.output)
        (removed if key in seen else kept).append(s)
        seen.add(key)
    return kept, removed


def verify_gold(samples: list[Sample], goldless: tuple[str, ...] = (), workers: int = 2,
                progress: bool = False) -> tuple[list[Sample], list[Sample]]:
    """Keep responses whose answer verifies against the gold answer; domains in ``goldless`` pass through
    (they have no gold: :func:`majority_vote` judges them). Code runs in the sandbox, ``workers`` at once."""
    judged = [s for s in samples if s.item.domain not in goldless]
    answers = [split_response(s.output)[1] for s in judged]
    with progress_bar(total=len(judged), desc="verify", disable=not progress) as bar:  # advances per distinct answer
        ok = check_many(answers, [s.item for s in judged], workers=workers, progress=bar)
    verdict = {(s.item.id, a): v for s, a, v in zip(judged, answers, ok)}
    kept, removed = [], []
    for s in samples:
        if s.item.domain in goldless or verdict[(s.item.id, split_response(s.output)[1])]:
            kept.append(s)
        else:
            removed.append(s)
    return kept, removed


def majority_vote(samples: list[Sample], domains: tuple[str, ...]) -> tuple[list[Sample], list[Sample]]:
    """For prompts of ``domains`` (no gold answer): the most common answer among the prompt's thinking-on
    responses wins, if no other answer ties it; responses of either mode giving another answer are removed,
    and so is every response to a prompt without a winner. Other domains pass through. With one sample per
    prompt the vote cannot catch anything.

    >>> it = Item("c", "chat", 1, "?", "pim", "chat", "", "", "k")
    >>> votes = [Sample(it, "on", "", "t", answer=a) for a in ("pim", "pim", "dax")]
    >>> kept, removed = majority_vote(votes, ("chat",))
    >>> [s.answer for s in kept], [s.answer for s in removed]
    (['pim', 'pim'], ['dax'])
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        if s.item.domain in domains and s.mode == "on":
            counts[s.item.id][s.answer] += 1
    winner = {}
    for pid, c in counts.items():
        top = c.most_common(2)
        if len(top) == 1 or top[0][1] > top[1][1]:
            winner[pid] = top[0][0]
    kept, removed = [], []
    for s in samples:
        if s.item.domain not in domains or winner.get(s.item.id, object()) == s.answer:
            kept.append(s)
        else:
            removed.append(s)
    return kept, removed


def curate(samples: list[Sample], *, eval_items: list[Item], goldless: tuple[str, ...] = ("chat",),
           decontam_n: int = 8, decontam_threshold: float = 0.8, workers: int = 2,
           progress: bool = False) -> tuple[list[Sample], list[dict]]:
    """Run the filters in order; return the kept responses and one report row per filter."""
    steps = [
        ("answer extraction", extract_answers),
        ("code parses", check_code_parses),
        ("decontamination", lambda s: decontaminate(s, eval_items, decontam_n, decontam_threshold)),
        ("majority vote (no gold)", lambda s: majority_vote(s, goldless)),  # before deduplication: it counts votes
        ("verification against gold", lambda s: verify_gold(s, goldless, workers, progress)),
        ("exact duplicates", deduplicate),
    ]
    report = [_row("generated", samples, [], samples)]
    for name, fn in steps:
        before = samples
        samples, removed = fn(samples)
        report.append(_row(name, before, removed, samples))
        if not samples:
            raise CurationError(f"curation filter '{name}' removed every remaining response "
                                f"({len(before)} -> 0); nothing is left to train on")
    return samples, report


def _row(name: str, before: list[Sample], removed: list[Sample], after: list[Sample]) -> dict:
    by_kind = Counter(s.corruption or "none" for s in removed if s.corruption is not None)
    return {
        "filter": name, "before": len(before), "removed": len(removed), "after": len(after),
        "removed_on": sum(s.mode == "on" for s in removed), "removed_off": sum(s.mode == "off" for s in removed),
        "removed_by_mistake": dict(sorted(by_kind.items())),
        # Mistakes the reference teacher made that are still in the data after this filter.
        "mistakes_left": sum(bool(s.corruption) for s in after),
        "example": _example(removed),  # one removed response, to read what the filter catches
    }


def _example(removed: list[Sample]) -> dict | None:
    if not removed:
        return None
    s = max(removed[:200], key=lambda s: bool(s.corruption) and s.corruption != "none")  # prefer a known mistake
    return {"prompt": s.item.prompt, "mode": s.mode, "output": s.output[:400], "mistake": s.corruption,
            "gold": s.item.gold}


# ---------------------------------------------------------------- the blend
def blend_targets(size: int, ratios: dict[str, float], off_fraction: float,
                  min_examples: int = 0) -> dict[tuple[str, str], int]:
    """Examples wanted per (domain, mode): ``size`` split by ``ratios`` (normalised), raised to
    ``min_examples`` for every domain with a non-zero share, then split by mode.

    >>> blend_targets(100, {"math": 3, "code": 1}, 0.2)
    {('math', 'on'): 60, ('math', 'off'): 15, ('code', 'on'): 20, ('code', 'off'): 5}
    >>> blend_targets(100, {"math": 99, "chat": 1}, 0.5, min_examples=10)[("chat", "on")]
    5
    """
    total = sum(ratios.values())
    out = {}
    for d, r in ratios.items():
        n = max(round(size * r / total), min_examples if r > 0 else 0)
        off = round(n * off_fraction)
        out[(d, "on")], out[(d, "off")] = n - off, off
    return out


def prompts_needed(targets: dict[tuple[str, str], int], margin: float, off_margin: float = 1.0,
                   off_pass: dict[str, float] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Prompts to draw per domain, and how many of them get a thinking-off answer.

    Every prompt gets ``k`` teacher samples, so ``margin`` x the thinking-on target covers the few
    prompts whose samples are all wrong. Thinking-off answers come one per prompt from a model that is
    right only a fraction ``off_pass[d]`` of the time (measured in its own evaluation), so their prompts
    are ``off_margin`` x the off target / that fraction.

    >>> prompts_needed({("math", "on"): 60, ("math", "off"): 15}, 1.5, 1.2, {"math": 0.3})
    ({'math': 90}, {'math': 60})
    """
    on, off = {}, {}
    for (d, mode), n in targets.items():
        if mode == "on":
            on[d] = math.ceil(n * margin)
        else:
            off[d] = math.ceil(n * off_margin / max((off_pass or {}).get(d, 1.0), 0.05))
    return {d: max(on.get(d, 0), off.get(d, 0)) for d in {**on, **off}}, off


def blend(samples: list[Sample], targets: dict[tuple[str, str], int], *, level_weights: dict[str, list[float]] | None = None,
          seed: int = 0) -> tuple[list[Sample], list[dict]]:
    """Draw each (domain, mode) target from the curated responses, one response per prompt first (a
    prompt gets a second response only when the first pass falls short) and, where ``level_weights``
    names the domain, in those proportions over difficulty levels (a level that falls short is made up
    from the others). A share with fewer responses than its target takes them all; the table says by how
    many it fell short."""
    rng = random.Random(f"{seed}-blend")
    pools: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        pools[(s.item.domain, s.mode)].append(s)
    chosen, table = [], []
    for (d, mode), want in targets.items():
        pool = pools.get((d, mode), [])
        weights = (level_weights or {}).get(d)
        if weights:
            levels = list(range(1, len(weights) + 1))
            wants = _apportion(want, dict(zip(levels, weights)))
            groups = {lvl: [s for s in pool if s.item.difficulty == lvl] for lvl in levels}
        else:
            wants, groups = {0: want}, {0: pool}
        got = []
        for lvl, n in wants.items():
            got += _draw(groups[lvl], n, rng)
        if len(got) < want:  # a level fell short: fill from the other levels' leftovers
            taken = {id(s) for s in got}
            got += _draw([s for s in pool if id(s) not in taken], want - len(got), rng)
        chosen += got
        table.append({"domain": d, "mode": mode, "target": want, "available": len(pool), "chosen": len(got),
                      "short": max(0, want - len(got)), "prompts": len({s.item.id for s in got})})
    rng.shuffle(chosen)
    return chosen, table


def _apportion(n: int, weights: dict) -> dict:
    """Split ``n`` in proportion to ``weights``, largest remainders first, so the parts sum to ``n``.

    >>> _apportion(8, {1: 1, 2: 1, 3: 1, 4: 1, 5: 1})
    {1: 2, 2: 2, 3: 2, 4: 1, 5: 1}
    """
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def _draw(pool: list[Sample], n: int, rng: random.Random) -> list[Sample]:
    by_prompt: dict[str, list[Sample]] = defaultdict(list)
    for s in pool:
        by_prompt[s.item.id].append(s)
    ids = sorted(by_prompt)
    rng.shuffle(ids)
    for v in by_prompt.values():
        rng.shuffle(v)
    order = [by_prompt[i][r] for r in range(max((len(v) for v in by_prompt.values()), default=0))
             for i in ids if r < len(by_prompt[i])]
    return order[:n]
