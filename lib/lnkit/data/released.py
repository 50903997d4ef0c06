"""The released post-training data set's schema: write a blend in it, read any file in it.

NVIDIA released the paper's SFT data as ``Llama-Nemotron-Post-Training-Dataset``: JSON lines, one
training example a line, with the fields

- ``input``: the conversation before the answer, a list of ``{"role", "content"}`` messages (user turns,
  and earlier assistant turns for a multi-turn example), ending with a user turn;
- ``output``: the assistant's answer, ``<think>...</think>`` then the answer when reasoning is on;
- ``reasoning``: ``"on"`` or ``"off"``; ``system_prompt``: ``"detailed thinking on"`` or ``"... off"``;
- ``category`` (math, code, science, chat, safety in the release; the tiny world writes its own domain
  names, so instruction following is ``instruct`` where the release files it under chat), ``license``,
  ``generator`` (the model that wrote ``output``), ``used_in_training``, ``version``.

Stage 05 writes its blend this way and stage 06 reads it back through :func:`load_rows` and
:func:`lnkit.train.batches.encode_row`, so the same code trains on a downloaded release file. A single-turn row gives exactly
the token ids and labels :func:`lnkit.train.batches.encode_item` gives the item it came from.

The first release (v1, the files LN-Super and LN-Nano were trained on, and copies derived from them) has
the other shape of ``input``: one string already rendered with the Llama-3 chat template
(``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|>...``, ending with the
assistant's header) and an ``output`` ending with ``<|eot_id|>``. :func:`untemplate` reads it back into
messages (the system turn, when the text has one, must agree with ``system_prompt``), so both shapes load.

Bad rows: a line that is not JSON, or a row with a missing or mistyped field, an empty conversation, a
``reasoning`` value other than on/off or one that disagrees with the system prompt, or an output whose
think block does not match its mode, is skipped and counted
by reason (a release has a few; a run must not die on line 3,000,001). A ``system_prompt`` that is
neither toggle value is different: it is an error naming the line (:class:`SchemaError`), raised while
loading, before any training. It is not a damaged row but a data set that means something else by its
system prompt (a typo such as ``detailed thinking of``, or another toggle convention); skipping would
silently drop a whole data set and defaulting would train the wrong mode, the same reasoning
:func:`lnkit.data.chat.mode_of` follows.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

from lnkit.data.chat import (
    BOS,
    EOT,
    HDR_END,
    HDR_START,
    MODES,
    THINK_CLOSE,
    THINK_OPEN,
    format_response,
    render_prompt,
)
from lnkit.io import atomic_write_text

FIELDS = ("input", "output", "reasoning", "system_prompt", "category", "license", "generator",
          "used_in_training", "version")
LICENSE, USED_IN_TRAINING, VERSION = "cc-by-4.0", "tiny", "tiny-v1"


class SchemaError(ValueError):
    """A released-schema file cannot be used as it stands (not a skippable bad row)."""


def make_row(prompt: str, output: str, mode: str, category: str, generator: str) -> dict:
    """One example in the released schema.

    >>> r = make_row("2 + 2?", "<think>\\n2 + 2 = 4.\\n</think>\\nThe answer is 4.", "on", "math", "reference-solver")
    >>> r["input"], r["reasoning"], r["system_prompt"]
    ([{'role': 'user', 'content': '2 + 2?'}], 'on', 'detailed thinking on')
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {tuple(MODES)}")
    return {"input": [{"role": "user", "content": prompt}], "output": output, "reasoning": mode,
            "system_prompt": MODES[mode], "category": category, "license": LICENSE, "generator": generator,
            "used_in_training": USED_IN_TRAINING, "version": VERSION}


def item_row(item, mode: str, generator: str = "reference-solver") -> dict:
    """An :class:`~lnkit.data.tasks.Item` with its reference answer in ``mode``."""
    return make_row(item.prompt, format_response(item.reasoning, item.direct, mode), mode, item.domain, generator)


def write_rows(rows: list[dict], path: str | Path) -> None:
    """JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_TURN = re.compile(re.escape(HDR_START) + r"(\w+)" + re.escape(HDR_END) + r"\n\n(.*?)(?:" + re.escape(EOT) + r"|$)",
                   re.DOTALL)


def untemplate(row: dict) -> tuple[dict, str]:
    """A v1 row (``input`` one chat-templated string) as a row of messages, and '' ; or the row and why
    it cannot be read. The trailing assistant header goes, ``output`` loses its ``<|eot_id|>``, and a
    system turn in the text fills a missing ``system_prompt`` (or must agree with it).

    >>> v1 = {"input": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\ndetailed thinking off"
    ...       "<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n2 + 2?<|eot_id|>"
    ...       "<|start_header_id|>assistant<|end_header_id|>\\n\\n", "output": "The answer is 4.<|eot_id|>"}
    >>> row, why = untemplate(v1)
    >>> row["input"], row["output"], row["system_prompt"], why
    ([{'role': 'user', 'content': '2 + 2?'}], 'The answer is 4.', 'detailed thinking off', '')
    """
    text = row["input"].removeprefix(BOS)
    turns = _TURN.findall(text)
    if not turns or not text.startswith(HDR_START):
        return row, "input is a string but not the Llama-3 chat template (v1)"
    if turns[-1][0] == "assistant" and not turns[-1][1].strip():
        turns = turns[:-1]  # the header the answer follows
    system = [c.strip() for r, c in turns if r == "system"]
    sp = row.get("system_prompt")
    if system and isinstance(sp, str) and sp.strip() and sp.strip() != system[0]:
        return row, "v1 system turn disagrees with system_prompt"
    out = row.get("output")
    row = {**row, "input": [{"role": r, "content": c} for r, c in turns if r != "system"],
           "output": out.removesuffix(EOT).rstrip() if isinstance(out, str) else out}
    if system and not (isinstance(sp, str) and sp.strip()):
        row["system_prompt"] = system[0]
    return row, ""


def row_problem(row) -> str:
    """Why a parsed row cannot be used ('' if it can). The system prompt is checked separately.

    >>> row_problem({"input": [], "output": "x"})
    'missing field(s) category, generator, license, reasoning, system_prompt, used_in_training, version'
    """
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    missing = sorted(set(FIELDS) - row.keys())
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for f in FIELDS:
        if f != "input" and not isinstance(row[f], str):
            return f"field {f} is {type(row[f]).__name__}, not a string"
    msgs = row["input"]
    if not isinstance(msgs, list) or not msgs:
        return "input is not a non-empty list of messages"
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return "input holds a message that is not {role, content} strings"
        if m["role"] not in ("user", "assistant"):
            return f"input holds a message of role {m['role']!r} (only user and assistant; the system prompt has its own field)"
    if msgs[-1]["role"] != "user":
        return "input does not end with a user turn"
    if row["reasoning"] not in MODES:
        return f"reasoning is {row['reasoning']!r}, not 'on' or 'off'"
    if not row["output"].strip():
        return "output is empty"
    return ""


def row_mode(row: dict, where: str = "row") -> str:
    """The mode a row's system prompt sets; :class:`SchemaError` if it is neither toggle value.

    >>> row_mode({"system_prompt": "detailed thinking off"})
    'off'
    >>> try:
    ...     row_mode({"system_prompt": "detailed thinking of"}, "x.jsonl line 3")
    ... except SchemaError as e:
    ...     print(e)
    x.jsonl line 3: system_prompt 'detailed thinking of' is neither 'detailed thinking on' nor 'detailed thinking off'; this loader trains the toggle and will not guess a mode
    """
    sp = row["system_prompt"].strip()
    for mode, text in MODES.items():
        if sp == text:
            return mode
    raise SchemaError(f"{where}: system_prompt {row['system_prompt']!r} is neither {MODES['on']!r} nor "
                      f"{MODES['off']!r}; this loader trains the toggle and will not guess a mode")


def load_rows(path: str | Path) -> tuple[list[dict], Counter]:
    """Read a released-schema JSON-lines file. Returns the usable rows and a count of skipped lines by
    reason; raises :class:`SchemaError` for an unknown system prompt (see the module docstring)."""
    rows, skipped = [], Counter()
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # a damaged row: skipped and counted, its place named
                skipped["not UTF-8 text"] += 1
                warnings.warn(f"{path} line {i}: not UTF-8 text (byte {e.start}); row skipped", stacklevel=2)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["not valid JSON"] += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("input"), str):  # the first release's shape
                row, why = untemplate(row)
                if why:
                    skipped[why] += 1
                    continue
            problem = row_problem(row)
            if problem:
                skipped[problem.split(" (")[0]] += 1
                continue
            mode = row_mode(row, f"{path} line {i}")
            if mode != row["reasoning"]:
                skipped["reasoning disagrees with system_prompt"] += 1
                continue
            if not output_format_ok(row):
                skipped["output does not match its mode (think block)"] += 1
                continue
            rows.append(row)
    return rows, skipped


def render_conversation(messages: list[dict], mode: str | None) -> str:
    """Everything before the answer for a (possibly multi-turn) conversation; one user turn gives exactly
    :func:`lnkit.data.chat.render_prompt`.

    >>> m = [{"role": "user", "content": "Hi?"}]
    >>> render_conversation(m, "off") == render_prompt("Hi?", "off")
    True
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return render_prompt(messages[0]["content"], mode)
    system = "" if mode is None else f"{HDR_START}system{HDR_END}\n\n{MODES[mode]}{EOT}"
    turns = "".join(f"{HDR_START}{m['role']}{HDR_END}\n\n{m['content']}{EOT}" for m in messages)
    return f"{BOS}{system}{turns}{HDR_START}assistant{HDR_END}\n\n"


def output_format_ok(row: dict) -> bool:
    """Whether the output matches its mode: a think block first when on, no think tag when off.

    >>> output_format_ok({"reasoning": "off", "output": "The answer is 4."})
    True
    >>> output_format_ok({"reasoning": "on", "output": "The answer is 4."})
    False
    """
    out = row["output"]
    if row["reasoning"] == "on":
        return out.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in out
    return THINK_OPEN not in out and THINK_CLOSE not in out
