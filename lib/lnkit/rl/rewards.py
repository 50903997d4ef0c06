"""GRPO's rewards (paper Section 5.1): accuracy and format, as plain functions with TRL's signature.

Each reward is ``fn(prompts=..., completions=..., **columns) -> list[float]``, TRL's reward-function contract
(TRL's trainer calls them by keyword): the prompts and completions are strings, or TRL's conversational
lists of ``{"role", "content"}`` messages, and every other column of the batch comes as a keyword holding
one value per completion. So TRL's own reward functions run in our loop (``trl:think_format_reward`` in
stage 07's ``rewards``), and ours can be handed to ``trl.GRPOTrainer(reward_funcs=[...])`` unchanged.

- :func:`accuracy_reward`: 1.0 when the completion's final answer (the part after any think block) solves
  the item by the item's own verifier (:mod:`lnkit.verify`: math-verify for math, the option letter with its
  text agreeing for multiple choice, the sandbox running the hidden tests for code), else 0.0. A completion
  cut off by the token limit (``finished=False``) earns 0: an answer never given is not an answer. Columns:
  ``item`` (an :class:`~lnkit.data.tasks.Item` or its dict) or ``gold``/``verifier``/``meta``.
- :func:`format_reward`: 1.0 when the completion follows the mode its prompt's system prompt set: with
  ``detailed thinking on`` exactly one well-formed ``<think>...</think>`` at the start and a non-empty answer
  after it; with ``detailed thinking off`` no think tag at all. The mode comes from the prompt, or from a
  ``mode`` column.

Generated code is hostile input: it only ever runs in :mod:`lnkit.sandbox` (through ``verify_code``).
"""

from __future__ import annotations

from types import SimpleNamespace

from lnkit.data.chat import THINK_CLOSE, THINK_OFF, THINK_ON, THINK_OPEN, split_response
from lnkit.data.tasks import Item
from lnkit.verify import check_many


def text_of(x) -> str:
    """A prompt or completion as text: a string as is, TRL's conversational form as its messages' contents
    joined (a completion is one assistant message)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list):
        return "\n".join(str(m.get("content", "")) for m in x if isinstance(m, dict))
    raise TypeError(f"expected a string or a list of messages, got {type(x).__name__}")


def mode_of_prompt(prompt) -> str | None:
    """'on' or 'off' by the system prompt in a rendered prompt (or a conversational one), None if neither.

    >>> from lnkit.data.chat import render_prompt
    >>> mode_of_prompt(render_prompt("2 + 2?", "on")), mode_of_prompt([{"role": "system", "content": THINK_OFF}])
    ('on', 'off')
    """
    text = text_of(prompt)
    on, off = THINK_ON in text, THINK_OFF in text
    return "on" if on and not off else "off" if off and not on else None


def _item(i: int, columns: dict):
    if "item" in columns:
        it = columns["item"][i]
        return Item.from_dict(it) if isinstance(it, dict) else it
    missing = [k for k in ("gold", "verifier") if k not in columns]
    if missing:
        raise KeyError(f"accuracy_reward needs an 'item' column, or 'gold' and 'verifier'; missing {missing}")
    return SimpleNamespace(id=str(columns["id"][i]) if "id" in columns else str(i), gold=columns["gold"][i],
                           verifier=columns["verifier"][i], meta=(columns["meta"][i] if "meta" in columns else None) or {})


def accuracy_reward(prompts, completions, **columns) -> list[float]:
    """1.0 per completion whose final answer the item's verifier accepts, else 0.0.

    >>> from lnkit.data.chat import render_prompt
    >>> p = render_prompt("What is 2 + 2?", "on")
    >>> accuracy_reward([p, p], ["<think>\\n2 + 2 = 4.\\n</think>\\nThe answer is 4.", "The answer is 5."],
    ...                 gold=["4", "4"], verifier=["math", "math"])
    [1.0, 0.0]
    """
    finished = columns.get("finished") or [True] * len(completions)
    items = [_item(i, columns) for i in range(len(completions))]
    answers = [split_response(text_of(c))[1] for c in completions]
    out = [0.0] * len(completions)
    done = [i for i in range(len(completions)) if finished[i]]
    for i, ok in zip(done, check_many([answers[i] for i in done], [items[i] for i in done])):
        out[i] = 1.0 if ok else 0.0
    return out


def well_formed(completion: str, mode: str) -> bool:
    """The format rule of :func:`format_reward`.

    >>> well_formed("<think>\\nx\\n</think>\\nThe answer is 4.", "on"), well_formed("<think>a</think><think>b</think>4", "on")
    (True, False)
    >>> well_formed("The answer is 4.", "off"), well_formed("</think>4", "off")
    (True, False)
    """
    if mode == "off":
        return THINK_OPEN not in completion and THINK_CLOSE not in completion
    text = completion.lstrip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    thought, _, answer = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    return bool(thought.strip()) and bool(answer.strip())


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 per completion in the format its mode asks for, else 0.0 (a prompt with no mode: no think tags).

    >>> from lnkit.data.chat import render_prompt
    >>> format_reward([render_prompt("Hi?", "off"), render_prompt("Hi?", "on")], ["Hello.", "Hello."])
    [1.0, 0.0]
    """
    modes = columns.get("mode") or [mode_of_prompt(p) for p in prompts]
    return [1.0 if well_formed(text_of(c), m or "off") else 0.0 for c, m in zip(completions, modes)]


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def get_rewards(names: list[str]) -> list:
    """The reward functions named, in order: ours by name, or any of TRL's as ``trl:<function>`` (from
    ``trl.rewards``; they take the conversational form, which the stage passes). An unknown name is an error
    listing the known ones.

    >>> [f.__name__ for f in get_rewards(["accuracy", "format"])]
    ['accuracy_reward', 'format_reward']
    >>> get_rewards(["length"])
    Traceback (most recent call last):
    ...
    ValueError: unknown reward 'length'; known rewards: accuracy, format, or trl:<a function of trl.rewards>
    """
    out = []
    for name in names:
        if name.startswith("trl:"):
            out.append(_trl_reward(name[4:]))
        elif name in REWARDS:
            out.append(REWARDS[name])
        else:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, "
                             "or trl:<a function of trl.rewards>")
    return out


def _trl_reward(fn: str):
    try:
        import trl.rewards
    except ImportError:
        raise ValueError(f"reward 'trl:{fn}' needs trl (pip install trl)") from None
    known = sorted(n for n in dir(trl.rewards) if not n.startswith("_") and callable(getattr(trl.rewards, n)))
    if fn not in known:
        raise ValueError(f"unknown reward 'trl:{fn}'; trl.rewards has {', '.join(known)}")
    return getattr(trl.rewards, fn)
