"""Shared fixtures: a tiny world, a tokenizer and a tiny Llama made on the spot (no hub access)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def world():
    from lnkit.data.world import make_world

    return make_world(0)


@pytest.fixture(scope="session")
def small_splits(world):
    from lnkit.data.splits import make_split
    from lnkit.data.tasks import DOMAINS

    return {
        "train": make_split(world, "train", {d: 200 for d in DOMAINS}),
        "test": make_split(world, "test", {d: 30 for d in DOMAINS}),
    }


@pytest.fixture(scope="session")
def tok(world, small_splits):
    from lnkit.data.chat import THINK_OFF, THINK_ON, format_response, render_prompt
    from lnkit.data.tasks import arithmetic_corpus
    from lnkit.data.tokenizer import train_tokenizer
    from lnkit.data.world import knowledge_corpus

    texts = knowledge_corpus(world) + arithmetic_corpus() + [THINK_ON, THINK_OFF]
    for it in small_splits["train"]:
        texts += [render_prompt(it.prompt, "on"), format_response(it.reasoning, it.direct, "on")]
    return train_tokenizer(texts, vocab_size=600)


@pytest.fixture()
def tiny_llama(tok):
    """A tiny random Llama over the shared tokenizer (:func:`helpers.tiny_llama`, norms left as initialised)."""
    import helpers

    return helpers.tiny_llama(0, perturb=False, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
