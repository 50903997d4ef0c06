"""Preference objectives on (chosen, rejected) pairs: RPO (paper Section 6.2) and DPO, its baseline.

Both read a pair through the policy's implicit reward, the log-ratio to the reference policy summed over the
response's tokens: ``delta = [log pi(w) - log ref(w)] - [log pi(l) - log ref(l)]``.

- **DPO** (Rafailov et al. 2023): ``-log sigmoid(beta * delta)``: push the chosen above the rejected, however
  far apart a judge would put them.
- **RPO** (Nemotron-4 340B's reward-aware preference optimisation, as NeMo-Aligner implements it): make the
  implicit reward gap ``beta * delta`` match the reward model's gap ``eta * (r_w - r_l)``, so a pair the
  reward model barely separates is moved a little and a clear one a lot. The distance ``D(policy || target)``:

  - ``bwd_kl`` (the default, the paper's): Bernoulli KL from the target's ``q = sigmoid(eta * dr)`` to the
    policy's ``p = sigmoid(beta * delta)``: ``q log(q/p) + (1 - q) log((1 - q)/(1 - p))``;
  - ``fwd_kl``: the other direction, ``p log(p/q) + (1 - p) log((1 - p)/(1 - q))``;
  - ``sq``: ``(beta * delta - eta * dr)^2 / 2``.

Losses are per pair (the caller averages); each is checked against its formula written out by hand in
``tests/test_alignment_losses.py``, and DPO against TRL's ``DPOTrainer`` loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lnkit.rl.grpo import token_logprobs

PREFERENCE_LOSSES = ("rpo", "dpo")
RPO_DISTANCES = ("bwd_kl", "fwd_kl", "sq")


def sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens (rows laid out as
    :func:`lnkit.rl.batch.rollout_batch` lays them out), at temperature 1."""
    n = completion_mask.shape[1]
    return (token_logprobs(model, input_ids, attention_mask, n) * completion_mask).sum(-1)


def implicit_reward_gap(pi_w, pi_l, ref_w, ref_l) -> torch.Tensor:
    """``delta``: the chosen's log-ratio to the reference minus the rejected's."""
    return (pi_w - ref_w) - (pi_l - ref_l)


def dpo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta)


def rpo_loss(delta: torch.Tensor, score_gap: torch.Tensor, beta: float, eta: float,
             distance: str = "bwd_kl") -> torch.Tensor:
    """The distance between ``beta * delta`` and ``eta * score_gap`` (see the module docstring)."""
    a, t = beta * delta, eta * score_gap
    if distance == "sq":
        return 0.5 * (a - t) ** 2
    logp, log1mp = F.logsigmoid(a), F.logsigmoid(-a)
    logq, log1mq = F.logsigmoid(t), F.logsigmoid(-t)
    if distance == "bwd_kl":
        return logq.exp() * (logq - logp) + log1mq.exp() * (log1mq - log1mp)
    if distance == "fwd_kl":
        return logp.exp() * (logp - logq) + log1mp.exp() * (log1mp - log1mq)
    raise ValueError(f"RPO distance {distance!r}: expected one of {RPO_DISTANCES}")


def preference_loss(kind: str, delta: torch.Tensor, score_gap: torch.Tensor | None, *, beta: float, eta: float = 1.0,
                    distance: str = "bwd_kl") -> torch.Tensor:
    """Per-pair loss of ``kind`` ("rpo" needs ``score_gap``, the reward model's chosen minus rejected)."""
    if beta <= 0 or (kind == "rpo" and eta <= 0):
        raise ValueError(f"beta={beta}, eta={eta}: both must be > 0")
    if kind == "dpo":
        return dpo_loss(delta, beta)
    if kind == "rpo":
        if score_gap is None:
            raise ValueError("RPO needs the reward model's score gap of each pair")
        return rpo_loss(delta, score_gap, beta, eta, distance)
    raise ValueError(f"preference loss {kind!r}: expected one of {PREFERENCE_LOSSES}")
