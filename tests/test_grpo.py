"""The GRPO objective: advantages, the clipped surrogate, the KL term and each loss aggregation, checked against
TRL's own ``GRPOTrainer._compute_loss`` on the same fixed batch (loss and every gradient to 1e-6)."""

from __future__ import annotations

import pytest
import torch

import helpers
from lnkit.rl.grpo import LOSS_TYPES, LossConfig, group_advantages, grpo_loss, token_logprobs
from lnkit.rl.rewards import format_reward


@pytest.fixture(autouse=True)
def _one_thread():
    yield from helpers.one_thread()


def fixed_batch(tok, model, seed=0, B=4, P=6, T=7):
    """Prompts of one length (TRL scores them without position ids), completions of varying length, old and
    reference log-probs moved off the policy's so ratios clip and the KL is not zero."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, len(tok), (B, P), generator=g)
    completion_ids = torch.randint(5, len(tok), (B, T), generator=g)
    lengths = torch.tensor([T, T - 2, 3, T - 1])[:B]
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
        now = token_logprobs(model, ids, mask, T, temperature=0.9)
    old = now + 0.3 * torch.randn(now.shape, generator=g)
    ref = now + 0.2 * torch.randn(now.shape, generator=g)
    advantages = torch.randn(B, generator=g)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
            "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_equal_trls(loss_type, beta, tok, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    ours = helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    ours.save_pretrained(tmp_path / "policy")  # TRL loads the policy (and, for beta > 0, its reference) by path
    tok.save_pretrained(tmp_path / "policy")
    max_len = 7
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=max_len, loss_type=loss_type, beta=beta, epsilon=0.2,
                          epsilon_high=0.28, temperature=0.9, report_to=[], use_cpu=True, bf16=False)
    trainer = trl.GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[format_reward], args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["Hi?"] * 4}))
    batch = fixed_batch(tok, ours)
    trainer.model.train()
    ours.train()
    trainer.current_gradient_accumulation_steps = 1
    loss_trl = trainer._compute_loss(trainer.model, batch)
    loss_trl.backward()

    cfg = LossConfig(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta, max_completion_length=max_len)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps = token_logprobs(ours, ids, mask, max_len, temperature=0.9)
    loss, stats = grpo_loss(logps, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"], cfg,
                            ref_logps=batch["ref_per_token_logps"], num_items=float(batch["num_items_in_batch"]))
    loss.backward()
    assert abs(loss.item() - loss_trl.item()) < 1e-6, (loss.item(), loss_trl.item())
    assert stats["clip_region"] > 0  # the batch exercises the clip
    grads_trl = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads_trl[name].grad, atol=1e-6, rtol=1e-5), name


def test_advantages_are_group_normalised():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv[:4].sum(), torch.tensor(0.0), atol=1e-6) and adv[0] > 0 > adv[1]
    assert torch.equal(adv[4:], torch.zeros(4))  # a group whose samples all scored the same teaches nothing
    assert torch.allclose(group_advantages(r, 4, "none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, "rank")


def test_loss_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss_type"):
        LossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=-1)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2), LossConfig(beta=0.1))


def test_on_policy_loss_is_minus_the_advantage_and_its_gradient_pushes_good_tokens_up():
    logps = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    loss, stats = grpo_loss(logps, None, torch.tensor([2.0]), torch.ones(1, 2))
    assert float(loss) == pytest.approx(-2.0) and stats["ratio"] == pytest.approx(1.0)
    loss.backward()
    assert (logps.grad < 0).all()  # descending the loss raises the sampled tokens' log-probabilities
