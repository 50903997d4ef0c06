"""The reward model: a tiny Llama with a scalar head learns a preference from Bradley-Terry pairs (held-out
pairwise accuracy), regresses attributes, survives a save and load with the same scores, and refuses
another vocabulary or a folder that is not a reward model."""

from __future__ import annotations

import random

import pytest
import torch

import helpers
from lnkit.io import CheckpointError
from lnkit.rl.reward_model import (
    RewardModel,
    attribute_loss,
    bradley_terry_loss,
    check_vocabulary,
    conversation,
    encode,
    load_reward_model,
    save_reward_model,
    score_texts,
)


@pytest.fixture(autouse=True)
def _one_thread():
    yield from helpers.one_thread()


def pairs(world):
    """A clean answer against the same answer with its last word stammered: a preference a tiny random backbone
    can learn from pairs alone (the stage's reward model starts from the policy, which knows the facts)."""
    out = []
    for c, k in sorted(world.creatures.items()):
        q = f"What kind of animal is a {c}?"
        out.append((conversation(q, f"A {c} is a {k}.", "off"), conversation(q, f"A {c} is a {k} {k} {k}.", "off")))
    return out


def small_lm(tok):
    return helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def test_bradley_terry_learns_a_preference_and_survives_save_and_load(tok, world, tmp_path):
    every = pairs(world)
    random.Random(0).shuffle(every)
    held, train = every[:16], every[16:]  # held-out pairs: creatures no training pair was about
    rm = RewardModel(small_lm(tok))
    before = score_texts(rm, tok, [w for w, _ in held]) + score_texts(rm, tok, [lo for _, lo in held])
    assert len(set(before)) == 1  # a zero head scores everything alike
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for step in range(150):
        batch = [train[(step * 16 + i) % len(train)] for i in range(16)]
        ids, mask = encode(tok, [w for w, _ in batch] + [lo for _, lo in batch])
        s = rm.score(ids, mask)
        loss = bradley_terry_loss(s[:16], s[16:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sw, sl = score_texts(rm, tok, [w for w, _ in held]), score_texts(rm, tok, [lo for _, lo in held])
    accuracy = sum(a > b for a, b in zip(sw, sl)) / len(held)
    assert accuracy >= 0.85, accuracy
    save_reward_model(rm, tok, tmp_path / "rm")
    again, tok2 = load_reward_model(tmp_path / "rm")
    assert score_texts(again, tok2, [w for w, _ in held]) == pytest.approx(sw, abs=1e-5)
    check_vocabulary(tok2, tok, "rm")


def test_attribute_regression_and_its_weighted_score(tok):
    rm = RewardModel(small_lm(tok), "attributes", ("a", "b"), {"a": 1.0, "b": -0.5})
    ids, mask = encode(tok, ["<|begin_of_text|>x", "<|begin_of_text|>y z"])
    with torch.no_grad():
        rm.head.bias.copy_(torch.tensor([2.0, 4.0]))
    out = rm.outputs(ids, mask)
    assert out.shape == (2, 2) and torch.allclose(rm.score(ids, mask), torch.tensor([0.0, 0.0]))
    loss = attribute_loss(out, torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    assert float(loss) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="a weight for each"):
        RewardModel(small_lm(tok), "attributes", ("a", "b"), {"a": 1.0})
    with pytest.raises(ValueError, match="'pairwise'"):
        RewardModel(small_lm(tok), "pairwise")


def test_another_vocabulary_and_a_missing_folder_are_named(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="reward model rm7 has another vocabulary"):
        check_vocabulary(other, tok, "rm7")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="half is not a reward model folder"):
        load_reward_model(tmp_path / "half")
