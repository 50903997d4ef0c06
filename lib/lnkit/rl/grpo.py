"""The GRPO objective (paper Section 5.1; Shao et al. 2024), as TRL's ``GRPOTrainer`` defines it.

For each prompt, G completions are sampled and scored; a completion's advantage is its reward minus its
group's mean, divided by the group's standard deviation (``scale="group"``; ``"batch"``: the batch's;
``"none"``: not divided, Dr. GRPO's choice). Each completion token's loss is the clipped surrogate

    -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),    r_t = pi_theta(o_t | ...) / pi_old(o_t | ...)

plus, when ``beta > 0``, ``beta`` times the k3 estimate of KL(pi_theta || pi_ref):
``exp(ref - logp) - (ref - logp) - 1``, times ``r_t`` by default (TRL's bias correction: the tokens were
sampled from pi_old, not pi_theta). ``pi_old`` is the policy that sampled the batch: several optimizer
steps on one rollout batch (``num_iterations``; the paper takes 2) move ``pi_theta`` away from it, which the
ratio corrects and the clip bounds. Tokens are aggregated as TRL's ``loss_type`` says:

- ``grpo``: mean over each completion's tokens, then over completions (long answers weigh less per token);
- ``bnpo``: mean over all tokens of the micro-batch;
- ``dr_grpo``: sum over tokens divided by (completions x ``max_completion_length``): no length bias;
- ``dapo``: sum over tokens divided by the number of completion tokens in the whole rollout batch
  (``num_items``), so every token weighs the same however the batch is split.

``is_weights`` multiplies each token's policy loss (not the KL), as TRL does with vLLM's importance-sampling
correction: stage 07 passes truncated importance weights ``min(pi_old / pi_rollout, C)`` when rollouts come
from a different policy (an FP8 copy). A test checks loss and gradients against TRL's own ``_compute_loss``
on the same batch for each ``loss_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


@dataclass(frozen=True)
class LossConfig:
    """GRPO loss settings, named as TRL's ``GRPOConfig`` names them."""

    loss_type: str = "grpo"
    epsilon_low: float = 0.2  # TRL's `epsilon`
    epsilon_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    beta: float = 0.0  # KL coefficient (0: no reference model needed)
    delta: float | None = None  # two-sided clipping: cap on the unclipped ratio
    kl_bias_correction: bool = True  # TRL's `use_bias_correction_kl`: the KL term weighted by the ratio r_t
    max_completion_length: int = 256  # dr_grpo's constant normaliser

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} not in {LOSS_TYPES}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_low={self.epsilon_low}, epsilon_high={self.epsilon_high}: expected "
                             "0 <= epsilon_low < 1 and epsilon_high >= 0")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: expected >= 0")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantages of ``rewards`` laid out group after group (``[p0 g0..gG-1, p1 g0..]``), as TRL computes them:
    minus the group mean, divided by the (Bessel-corrected) standard deviation plus 1e-4.

    >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist()
    [0.7070068120956421, -0.7070068120956421, 0.0, 0.0]
    """
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} not in {SCALES}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size}: expected >= 2 and dividing the {rewards.numel()} rewards")
    groups = rewards.view(-1, group_size)
    adv = (groups - groups.mean(1, keepdim=True)).reshape(-1)
    if scale == "group":
        adv = adv / (groups.std(1).repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (B, ``n_completion``) of the last ``n_completion`` tokens of each row under ``model``,
    logits divided by ``temperature`` (the sampling temperature, as TRL does). Rows may be left-padded:
    positions count from each row's first real token, as the rollout engine sampled them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -n_completion - 1 : -1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -n_completion:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: LossConfig = LossConfig(), *, ref_logps: torch.Tensor | None = None, num_items: float | None = None,
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch and its statistics (``kl``, ``clip_low``, ``clip_high``, ``clip_region``,
    ``ratio``), all masked means over completion tokens.

    ``logps``/``old_logps``/``ref_logps``: (B, T) per-token log-probabilities under the policy being trained
    (with grad), the policy that sampled (None: the same, detached) and the reference; ``advantages``: (B,);
    ``mask``: (B, T), 1 on completion tokens; ``num_items``: completion tokens in the whole rollout batch
    (``dapo``; default: this micro-batch's)."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if cfg.kl_bias_correction:  # the k3 estimate is for samples of pi_theta; these came from pi_old
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
    tokens = mask.sum().clamp(min=1.0)
    if cfg.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif cfg.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * cfg.max_completion_length)
    else:  # dapo
        loss = (per_token * mask).sum() / max(float(num_items if num_items is not None else tokens), 1.0)

    def masked_mean(x):
        return float((x * mask).sum() / tokens)

    low = ((ratio < 1 - cfg.epsilon_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + cfg.epsilon_high) & (adv > 0)).to(mask.dtype)
    stats = {"clip_low": masked_mean(low), "clip_high": masked_mean(high), "clip_region": masked_mean(low + high),
             "ratio": masked_mean(ratio.detach()), "kl": masked_mean(kl.detach()) if kl is not None else 0.0}
    return loss, stats
