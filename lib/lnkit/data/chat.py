"""The chat format and the reasoning toggle.

Llama-3-style headers; the system prompt ``detailed thinking on`` or ``detailed thinking off`` sets the
mode (paper Section 3). With thinking on the assistant writes its chain of thought inside
``<think>...</think>`` and then the answer; with thinking off it answers directly, with no think block.
The Jinja template below is saved with the tokenizer, so ``tokenizer.apply_chat_template`` produces the
same text as :func:`render_prompt`; it also takes ``reasoning=True/False`` to add the system prompt.
"""

from __future__ import annotations

BOS, EOS_TEXT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
HDR_START, HDR_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS_TEXT, HDR_START, HDR_END, EOT, THINK_OPEN, THINK_CLOSE, PAD]
THINK_ON, THINK_OFF = "detailed thinking on", "detailed thinking off"
MODES = {"on": THINK_ON, "off": THINK_OFF}

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' and reasoning is defined and reasoning is not none %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\ndetailed thinking ' + ('on' if reasoning else 'off')"
    " + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def mode_of(system_prompt: str | None) -> str | None:
    """The mode a system prompt sets: 'on', 'off', or None for no system prompt.

    Any other system prompt is an error rather than a silent default: a typo such as
    ``detailed thinking of`` would otherwise train or evaluate the wrong mode.

    >>> mode_of("detailed thinking on"), mode_of(None)
    ('on', None)
    >>> mode_of("think hard")
    Traceback (most recent call last):
    ...
    ValueError: system prompt 'think hard' is neither 'detailed thinking on' nor 'detailed thinking off'
    """
    if system_prompt is None:
        return None
    for mode, text in MODES.items():
        if system_prompt.strip() == text:
            return mode
    raise ValueError(f"system prompt {system_prompt!r} is neither {THINK_ON!r} nor {THINK_OFF!r}")


def render_prompt(prompt: str, mode: str | None) -> str:
    """Everything the model sees before it answers, ending with the assistant header.

    >>> render_prompt("Hi?", "off")  # doctest: +NORMALIZE_WHITESPACE
    '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\ndetailed thinking off<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\nHi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n'
    """
    system = "" if mode is None else f"{HDR_START}system{HDR_END}\n\n{MODES[mode]}{EOT}"
    return f"{BOS}{system}{HDR_START}user{HDR_END}\n\n{prompt}{EOT}{HDR_START}assistant{HDR_END}\n\n"


def format_response(reasoning: str, direct: str, mode: str | None) -> str:
    """The assistant's text: think block then answer when on, the answer alone otherwise."""
    if mode == "on":
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{direct}"
    return direct


def split_response(text: str) -> tuple[str | None, str]:
    """Split a response into (thinking or None, answer). An unclosed think block counts as all thinking.

    >>> split_response("<think>\\n2 + 2 = 4.\\n</think>\\nThe answer is 4.")
    ('2 + 2 = 4.', 'The answer is 4.')
    >>> split_response("The answer is 4.")
    (None, 'The answer is 4.')
    """
    if THINK_OPEN not in text:
        return None, text.strip()
    before, _, rest = text.partition(THINK_OPEN)
    if THINK_CLOSE not in rest:
        return rest.strip(), before.strip()
    thought, _, after = rest.partition(THINK_CLOSE)
    return thought.strip(), (before + after).strip()
