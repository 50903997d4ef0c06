"""The pass-rate curriculum of the paper's GRPO (Section 5.1): which prompts go into each RL batch.

Each training prompt's pass rate is estimated beforehand from k samples of a model (the paper used LN-Super's
for LN-Ultra; stage 07 defaults to its own starting model). Prompts the model already solves at least
``max_pass_rate`` of the time are dropped: their groups would score all-correct and teach nothing. The rest
are batched by a Gaussian over pass rate whose mean moves from easy (a high pass rate) to hard (a low one)
as training proceeds: early batches hold what the model can nearly do, later ones what it can rarely do.
``order="random"`` draws uniformly instead (the paper's baseline in Figure 6).

Batches are a pure function of ``(seed, step)``, so a run resumed at step s draws the same batch s as an
uninterrupted one: the curriculum's position is the step number, nothing else.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ORDERS = ("curriculum", "random")


class EmptyPromptSet(ValueError):
    """No prompt is left after the pass-rate filter."""


def filter_by_pass_rate(pass_rates: dict[str, float], max_pass_rate: float) -> dict[str, float]:
    """The prompts whose estimated pass rate is below ``max_pass_rate``; none left is an error naming the
    filter and the threshold.

    >>> filter_by_pass_rate({"a": 0.0, "b": 0.5, "c": 1.0}, 0.75)
    {'a': 0.0, 'b': 0.5}
    """
    kept = {k: p for k, p in pass_rates.items() if p < max_pass_rate}
    if not kept:
        raise EmptyPromptSet(f"no prompt left after the pass-rate filter: all {len(pass_rates)} prompts have an "
                             f"estimated pass rate >= max_pass_rate={max_pass_rate}")
    return kept


@dataclass(frozen=True)
class Curriculum:
    """Draws batches of prompt ids for step ``step`` of ``total_steps``.

    ``start_mean`` / ``end_mean``: the Gaussian's mean over pass rate at the first and the last step (linear in
    between); ``sigma``: its width. Within a batch prompts are distinct (drawn without replacement, weight
    ``exp(-(p - mean)^2 / 2 sigma^2)``); across batches they repeat.
    """

    pass_rates: dict[str, float]
    total_steps: int
    order: str = "curriculum"
    start_mean: float = 0.7
    end_mean: float = 0.1
    sigma: float = 0.15
    seed: int = 0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r} not in {ORDERS}")
        if not self.pass_rates:
            raise EmptyPromptSet("the curriculum has no prompts")
        if self.total_steps < 1 or self.sigma <= 0:
            raise ValueError(f"total_steps={self.total_steps}, sigma={self.sigma}: expected >= 1 and > 0")

    def mean_at(self, step: int) -> float:
        """The target pass rate at ``step``.

        >>> Curriculum({"a": 0.5}, total_steps=5, start_mean=0.8, end_mean=0.0).mean_at(2)
        0.4
        """
        t = min(max(step, 0), self.total_steps - 1) / max(self.total_steps - 1, 1)
        return round(self.start_mean + (self.end_mean - self.start_mean) * t, 12)

    def weights(self, step: int) -> dict[str, float]:
        if self.order == "random":
            return {k: 1.0 for k in self.pass_rates}
        mu = self.mean_at(step)
        return {k: math.exp(-((p - mu) ** 2) / (2 * self.sigma**2)) + 1e-12 for k, p in self.pass_rates.items()}

    def batch(self, step: int, size: int) -> list[str]:
        """``size`` distinct prompt ids (fewer if there are fewer prompts) for ``step``; the same for the same
        ``(seed, step)`` in any process."""
        rng = random.Random(f"{self.seed}:{step}")
        weights = self.weights(step)
        ids = sorted(weights)
        keys = [rng.random() ** (1.0 / weights[k]) for k in ids]  # Efraimidis-Spirakis weighted sampling
        return [ids[i] for i in sorted(range(len(ids)), key=lambda i: -keys[i])[:size]]

    def target(self, step: int, bins: int = 10) -> list[float]:
        """The curriculum's target distribution over ``bins`` pass-rate bins at ``step`` (for the live panel's
        histogram), as the share of the batch expected in each bin."""
        w = self.weights(step)
        total = sum(w.values())
        out = [0.0] * bins
        for k, p in self.pass_rates.items():
            out[min(int(p * bins), bins - 1)] += w[k] / total
        return out
