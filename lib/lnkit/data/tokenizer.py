"""A byte-level BPE tokenizer trained on the tiny world, saved as a Hugging Face tokenizer.

Digits are split one per token (as Llama-3 splits numbers into short chunks) so arithmetic is learnable
by a small model; the chat headers, ``<think>`` and ``</think>`` are single special tokens; the chat
template carries the reasoning toggle (:mod:`lnkit.data.chat`).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lnkit.data.chat import BOS, CHAT_TEMPLATE, EOS_TEXT, EOT, PAD, SPECIAL_TOKENS
from lnkit.io import atomic_dir


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train BPE on ``texts``; the result round-trips any text of the world exactly.

    >>> tok = train_tokenizer(["A zog is a pim. 12 + 3 = 15."] * 10, vocab_size=300)
    >>> tok.decode(tok("A zog is a pim. 12 + 3 = 15.")["input_ids"])
    'A zog is a pim. 12 + 3 = 15.'
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOT, PAD)],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training builds its own batches
    fast.model_max_length = 1024
    fast.end_of_text_token = EOS_TEXT
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    with atomic_dir(path) as tmp:
        tok.save_pretrained(tmp)
