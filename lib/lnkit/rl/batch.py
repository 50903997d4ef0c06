"""Rollouts as a training batch: prompts left-padded, completions right-padded, one row per completion.

The layout is TRL's (``prompt_ids | completion_ids``, attention mask over both, completion mask over the
completion's real tokens, stop token included): :func:`lnkit.rl.grpo.token_logprobs` scores the last
``T`` tokens of each row, positions counted from each row's first real token, as the rollout engine sampled
them.
"""

from __future__ import annotations

import torch

from lnkit.rl.rollout import Rollout


def rollout_batch(rollouts: list[Rollout], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``completion_mask`` (B, T) and ``sampling_logps`` (B, T, the
    engine's log-probabilities, 0 on padding), on ``device`` (the policy's; default the CPU); ``n_tokens``:
    completion tokens.

    >>> from lnkit.rl.rollout import Rollout
    >>> b = rollout_batch([Rollout(0, [5, 6], [7], [-0.5]), Rollout(1, [5], [8, 9], [-0.1, -0.2])], pad_id=0)
    >>> b["input_ids"].tolist(), b["completion_mask"].tolist()
    ([[5, 6, 7, 0], [0, 5, 8, 9]], [[1, 0], [1, 1]])
    """
    if not rollouts:
        raise ValueError("no rollouts to batch")
    P = max(len(r.prompt_ids) for r in rollouts)
    T = max(max(len(r.completion_ids) for r in rollouts), 1)
    B = len(rollouts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.long)
    logps = torch.zeros((B, T))
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, P - p : P] = torch.tensor(r.prompt_ids)
        attn[i, P - p : P + c] = 1
        if c:
            ids[i, P : P + c] = torch.tensor(r.completion_ids)
            cmask[i, :c] = 1
            logps[i, :c] = torch.tensor(r.logprobs)
    out = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "sampling_logps": logps}
    return {**{k: v.to(device) for k, v in out.items()}, "n_tokens": int(cmask.sum())}
