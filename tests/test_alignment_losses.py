"""Stage 08's objectives: RLOO's leave-one-out advantages and clipped sequence loss (loss and gradients equal
TRL's ``RLOOTrainer._compute_loss`` on a fixed batch), RPO's three distances and DPO written out by hand, and
where each pulls the policy."""

from __future__ import annotations

import math

import pytest
import torch

import helpers
from lnkit.rl.grpo import token_logprobs
from lnkit.rl.preference import implicit_reward_gap, preference_loss, rpo_loss
from lnkit.rl.rewards import format_reward
from lnkit.rl.rloo import rloo_advantages, rloo_loss, sequence_kl


@pytest.fixture(autouse=True)
def _one_thread():
    yield from helpers.one_thread()


# ---------------------------------------------------------------------------------------------- RLOO


def test_rloo_loss_and_gradients_equal_trls(tok, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    ours = helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    ours.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    args = trl.RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=7, epsilon=0.2, epsilon_high=0.28, temperature=0.9, report_to=[],
                          use_cpu=True, bf16=False)
    trainer = trl.RLOOTrainer(model=str(tmp_path / "policy"), reward_funcs=[format_reward], args=args,
                              processing_class=tok, train_dataset=datasets.Dataset.from_dict({"prompt": ["Hi?"] * 4}))
    g = torch.Generator().manual_seed(0)
    B, P, T = 4, 6, 7
    prompt_ids = torch.randint(5, len(tok), (B, P), generator=g)
    completion_mask = (torch.arange(T)[None] < torch.tensor([T, 5, 3, 6])[:, None]).long()
    completion_ids = torch.randint(5, len(tok), (B, T), generator=g).masked_fill(completion_mask == 0, tok.pad_token_id)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        now = token_logprobs(ours, ids, mask, T, temperature=0.9)
    old = now + 0.4 * torch.randn(now.shape, generator=g)  # far enough off for some ratios to clip
    advantages = rloo_advantages(torch.tensor([1.0, 0.0, 0.5, 1.0]), 2)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
             "completion_mask": completion_mask, "old_logps": (old * completion_mask).sum(1), "advantages": advantages}
    trainer.model.train()
    ours.train()
    loss_trl = trainer._compute_loss(trainer.model, batch)
    loss_trl.backward()
    logps = token_logprobs(ours, ids, mask, T, temperature=0.9)
    loss, stats = rloo_loss(logps, old, advantages, completion_mask.float(), 0.2, 0.28)
    loss.backward()
    assert abs(loss.item() - loss_trl.item()) < 1e-6
    assert stats["clip_low"] + stats["clip_high"] > 0  # the batch exercises the clip
    grads = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5), name


def test_rloo_advantages_leave_one_out_with_the_kl_in_the_reward():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = rloo_advantages(r, 3)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, -1.0, 0.5, 0.5]))
    kl = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    with_kl = rloo_advantages(r, 3, kl=kl, beta=0.5)  # completion 1's reward becomes -1
    assert torch.allclose(with_kl[:3], torch.tensor([1.5, -1.5, 0.0]))
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
    assert torch.allclose(sequence_kl(old, ref, torch.tensor([[1.0, 1.0], [1.0, 0.0]])), torch.tensor([-0.5, 0.0]))
    with pytest.raises(ValueError, match="k=1"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="groups of k=4"):
        rloo_advantages(r, 4)


# ---------------------------------------------------------------------------------------------- RPO and DPO


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("delta, gap", [(0.3, 1.0), (-2.0, 0.5), (4.0, -1.0), (0.0, 0.0)])
def test_rpo_distances_and_dpo_equal_their_formulas(delta, gap):
    beta, eta = 0.5, 2.0
    p, q = sig(beta * delta), sig(eta * gap)
    d, g = torch.tensor([delta], dtype=torch.float64), torch.tensor([gap], dtype=torch.float64)
    bwd = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    fwd = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(rpo_loss(d, g, beta, eta, "bwd_kl")) == pytest.approx(bwd, abs=1e-12)
    assert float(rpo_loss(d, g, beta, eta, "fwd_kl")) == pytest.approx(fwd, abs=1e-12)
    assert float(rpo_loss(d, g, beta, eta, "sq")) == pytest.approx(0.5 * (beta * delta - eta * gap) ** 2, abs=1e-12)
    assert float(preference_loss("dpo", d, None, beta=beta)) == pytest.approx(-math.log(p), abs=1e-12)
    assert float(implicit_reward_gap(torch.tensor(-3.0), torch.tensor(-5.0), torch.tensor(-4.0),
                                     torch.tensor(-4.5))) == pytest.approx(1.5)


def test_rpo_pulls_the_gap_to_the_reward_models_and_dpo_always_pushes():
    """RPO's gradient is zero where beta * delta = eta * gap and points back there from either side; DPO's
    always pushes the chosen further up, however small the reward model's gap."""
    beta, eta, gap = 0.5, 2.0, torch.tensor([0.25])
    for distance in ("bwd_kl", "fwd_kl", "sq"):
        grads = []
        for delta in (eta * 0.25 / beta - 1.0, eta * 0.25 / beta, eta * 0.25 / beta + 1.0):
            d = torch.tensor([delta], requires_grad=True)
            rpo_loss(d, gap, beta, eta, distance).sum().backward()
            grads.append(float(d.grad))
        assert grads[0] < 0 and abs(grads[1]) < 1e-6 and grads[2] > 0, (distance, grads)
    for delta in (-1.0, 1.0, 10.0):
        d = torch.tensor([delta], requires_grad=True)
        preference_loss("dpo", d, None, beta=beta).sum().backward()
        assert float(d.grad) < 0


@pytest.mark.parametrize("kw, match", [
    (dict(kind="rpo", beta=0.0), "beta=0.0"), (dict(kind="rpo", beta=0.1, eta=-1.0), "eta=-1.0"),
    (dict(kind="dpo", beta=-0.1), "beta=-0.1"), (dict(kind="ipo", beta=0.1), "'ipo'"),
    (dict(kind="rpo", beta=0.1, distance="l1"), "'l1'")])
def test_bad_settings_are_named(kw, match):
    kind = kw.pop("kind")
    with pytest.raises(ValueError, match=match):
        preference_loss(kind, torch.zeros(1), torch.zeros(1), **kw)


# ---------------------------------------------------------------------------------------------- pair files


def test_pair_file_rows_are_skipped_and_counted_and_an_empty_one_is_named(tmp_path):
    from lnkit.data.pairs import Pair, PairFileError, read_pairs, write_pairs

    good = Pair("Where do dips live?", "Dips live in grass.", "Dips live in ice.", "on", 1.5, -0.5)
    f = tmp_path / "pairs.jsonl"
    write_pairs(f, [good])
    text = f.read_text() + "\n".join([
        "{not json",
        '{"prompt": "q", "chosen": "a"}',
        '{"prompt": "q", "chosen": "a", "rejected": "a"}',
        '{"prompt": "q", "chosen": "a", "rejected": "b", "mode": "maybe"}',
        '{"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1}',
        '[1, 2]',
        '{"prompt": "q", "chosen": "a", "rejected": "b"}',
    ]) + "\n"
    f.write_text(text)
    pairs, skipped = read_pairs(f)
    assert pairs[0] == good and pairs[1] == Pair("q", "a", "b")
    assert [s.split(":")[0] for s in skipped] == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "'rejected'" in skipped[1] and "the same answer" in skipped[2] and "both be numbers" in skipped[4]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n\n{oops\n')
    with pytest.raises(PairFileError, match=r"bad.jsonl: no usable pair \(2 bad line\(s\); line 1: field 'chosen'"):
        read_pairs(bad)
    with pytest.raises(PairFileError, match="cannot read it"):
        read_pairs(tmp_path / "missing.jsonl")
