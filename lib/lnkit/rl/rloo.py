"""RLOO (paper Section 6.1; Ahmadian et al. 2024), as TRL's ``RLOOTrainer`` defines it.

k completions per prompt, each scored by a verifier. The KL to the reference enters the *reward*, not the
loss: ``r_i - beta * sum_t (log pi_old - log pi_ref)`` (the first-order estimate summed over the completion's
tokens, which can be negative). Each completion's advantage is its reward minus the mean of its k - 1
siblings' (the leave-one-out baseline), optionally normalised over the batch. The loss is per sequence:
``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho`` the ratio of the completion's whole
probability under the policy being trained to the one that sampled it, averaged over completions.
``tests/test_alignment_losses.py`` checks advantages, loss and gradients against TRL's own
``RLOOTrainer._compute_loss`` on a fixed batch.
"""

from __future__ import annotations

import torch


def rloo_advantages(rewards: torch.Tensor, k: int, *, kl: torch.Tensor | None = None, beta: float = 0.0,
                    normalize: bool = False) -> torch.Tensor:
    """Leave-one-out advantages of ``rewards`` (prompt-major: prompt 0's k, then prompt 1's...).

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    tensor([ 1.0000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000])
    """
    if k < 2:
        raise ValueError(f"k={k}: RLOO needs at least 2 completions per prompt")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of k={k}")
    if kl is not None and beta:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    adv = (grouped - baseline).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-4)
    return adv


def sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each completion's summed first-order KL estimate ``sum_t (log pi_old - log pi_ref)``."""
    return ((old_logps - ref_logps) * mask).sum(-1)


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The clipped sequence-level policy-gradient loss over per-token log-probabilities (rows: completions)."""
    log_ratio = (logps * mask).sum(-1) - (old_logps * mask).sum(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float().mean()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float().mean()
    return loss, {"clip_low": float(low), "clip_high": float(high), "ratio": float(ratio.detach().mean())}
