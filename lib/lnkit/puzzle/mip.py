"""The Puzzle mixed-integer program (paper Section 2, Figure 3 step 2): pick one block variant per layer.

Puzzle scores every candidate block in isolation (the "replace-1-block" score, e.g. the KL divergence of
the parent's outputs when only that block is swapped in) and measures its resource costs (memory,
per-token time, parameters). Because both scores and costs are treated as additive over layers, choosing
the child architecture is a multiple-choice knapsack: one binary per (layer, slot, candidate), exactly one
chosen per (layer, slot), summed score minimised, summed cost of each resource under its budget. This
module holds that program and nothing else: no block library, no scoring, no model surgery.

Slots: a library is either *coupled* (one ``"block"`` slot per layer: the attention+FFN pair is one
candidate) or *decoupled* (``"attention"`` and/or ``"ffn"`` slots per layer, chosen independently, which
is what the LN models used). Layers are numbered ``0..L-1`` and every layer must offer a candidate for
every slot the library uses.

Throughput: Puzzle's throughput target is expressed as an additive per-token time cost. If each
candidate's ``costs[time_resource]`` is the seconds per token that block adds, the child's per-token time
is the sum, and "throughput >= target tokens/s" is the linear constraint ``sum(time) <= 1 / target``.

Solvers: HiGHS (through ``highspy``) when it is importable, else CBC (the binary PuLP ships). Both are
asked for a zero optimality gap, so ``Solution.status == "optimal"`` means proven optimal.

Run: ``solve(candidates, budgets={"memory": 8e9})``; ``benchmarks/bench_mip.py`` times the LN-Ultra scale
(162 layers x 64 candidates). Deviation from the paper: the paper's Puzzle also bounds KV-cache memory
through batch size and sequence length; here any such bound is just another additive resource column.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pulp

SLOTS = ("attention", "ffn", "block")
# Attention-slot variants that keep no KV cache, so they do not count towards ``max_attention_layers``
# unless a candidate says otherwise with ``costs["is_attention"]``.
ATTENTION_FREE_NAMES = frozenset({"no_op", "linear", "attn_noop", "attn_linear"})  # the last two: lnkit.puzzle.space
SOLVERS = ("auto", "highs", "cbc")
FEAS_TOL = 1e-9  # relative: each bound row is divided by its limit


@dataclass(frozen=True)
class Candidate:
    """One block variant for one (layer, slot), with its replace-1-block score and additive costs.

    ``costs`` may carry ``"is_attention"`` (0 or 1): whether this choice keeps real attention in its layer,
    counted by ``max_attention_layers``. It is not a resource and need not appear on every candidate.
    """

    layer: int
    slot: str  # "attention" | "ffn" | "block" (coupled attention+FFN)
    name: str  # e.g. "kv2", "no_op", "linear", "ffn_50"
    score: float  # lower is better (KL from the parent when only this block is replaced)
    costs: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        return f"layer {self.layer} {self.slot} {self.name!r}"


@dataclass
class Solution:
    """The chosen architecture: one candidate per (layer, slot), and what it costs."""

    choice: dict[tuple[int, str], Candidate]
    objective: float  # summed score of the chosen candidates
    costs: dict[str, float]  # summed per resource over the chosen candidates
    status: str  # "optimal", or "feasible (stopped at the time limit, not proven optimal)"
    solver: str  # "highs" | "cbc"
    solve_time_s: float  # wall time of the solver call, including PuLP handing the model over
    attention_layers: int = 0  # layers whose choice keeps real attention


class InfeasibleBudget(ValueError):
    """No choice of candidates meets the budgets; the message says by how much and which ones.

    ``smallest`` maps each constrained quantity to the smallest value any architecture can reach.
    """

    def __init__(self, message: str, smallest: dict[str, float]):
        super().__init__(message)
        self.smallest = smallest


def solve(
    candidates: list[Candidate],
    *,
    budgets: dict[str, float] | None = None,
    min_throughput: float | None = None,
    time_resource: str = "latency",
    max_attention_layers: int | None = None,
    solver: str = "auto",
    time_limit_s: float | None = None,
) -> Solution:
    """Choose one candidate per (layer, slot) minimising the summed score under the budgets.

    ``budgets`` are upper bounds on each resource's summed cost. ``min_throughput`` (tokens/s) adds
    ``sum(costs[time_resource]) <= 1 / min_throughput``. ``max_attention_layers`` bounds how many layers
    keep real attention. Raises ``InfeasibleBudget`` when nothing fits, ``ValueError`` on bad input.

    >>> lib = [Candidate(0, "block", "full", 0.0, {"mem": 2.0}), Candidate(0, "block", "half", 0.3, {"mem": 1.0}),
    ...        Candidate(1, "block", "full", 0.0, {"mem": 2.0}), Candidate(1, "block", "half", 0.1, {"mem": 1.0})]
    >>> sol = solve(lib, budgets={"mem": 3.0})
    >>> [sol.choice[(layer, "block")].name for layer in (0, 1)], round(sol.objective, 6), sol.status
    (['full', 'half'], 0.1, 'optimal')
    """
    _validate(candidates)
    kept = undominated(candidates, _constrained(budgets, min_throughput, time_resource, max_attention_layers))
    return solve_diverse(
        kept,
        1,
        budgets=budgets,
        min_throughput=min_throughput,
        time_resource=time_resource,
        max_attention_layers=max_attention_layers,
        solver=solver,
        time_limit_s=time_limit_s,
    )[0]


def _constrained(budgets, min_throughput, time_resource, max_attention_layers) -> list[str]:
    keys = list(budgets or {})
    if min_throughput is not None and time_resource not in keys:
        keys.append(time_resource)
    if max_attention_layers is not None:
        keys.append("is_attention")
    return keys


def undominated(candidates: list[Candidate], resources) -> list[Candidate]:
    """Drop every candidate another one in its (layer, slot) dominates: no worse score, no more of any
    constrained ``resources``, strictly better in one (or identical and listed earlier).

    Exact for one optimal solution: swapping a dominated choice for its dominator keeps every bound and
    never raises the objective, so the optimum is the same. At LN-Ultra scale most of a random library is
    dominated and the MIP shrinks several times. Not used for :func:`solve_diverse`, whose next-best
    solutions may need dominated blocks. Unknown resource names are left to the solver's checks.

    >>> lib = [Candidate(0, "block", "a", 0.1, {"mem": 1.0}), Candidate(0, "block", "b", 0.2, {"mem": 1.0}),
    ...        Candidate(0, "block", "c", 0.3, {"mem": 0.5})]
    >>> [c.name for c in undominated(lib, ["mem"])]
    ['a', 'c']
    """
    flags = [_attention_flag(c) for c in candidates] if "is_attention" in resources else None
    if flags is not None and None in flags:
        return list(candidates)
    keys = [r for r in resources if r != "is_attention"]
    if any(r not in c.costs or not _is_finite_number(c.costs[r]) for c in candidates for r in keys):
        return list(candidates)
    groups: dict = {}
    for i, c in enumerate(candidates):
        groups.setdefault((c.layer, c.slot), []).append(i)
    keep = []
    for idx in groups.values():
        cols = [[candidates[i].score for i in idx]] + [[candidates[i].costs[r] for i in idx] for r in keys]
        if flags is not None:
            cols.append([flags[i] for i in idx])
        m = np.array(cols, dtype=float).T  # (n, 1 + resources)
        le = (m[:, None, :] <= m[None, :, :]).all(-1)  # le[j, i]: j no worse than i everywhere
        lt = (m[:, None, :] < m[None, :, :]).any(-1)
        earlier = np.arange(len(idx))[:, None] < np.arange(len(idx))[None, :]
        dominated = (le & (lt | earlier)).any(0)
        keep += [i for i, d in zip(idx, dominated) if not d]
    return [candidates[i] for i in sorted(keep)]


def solve_diverse(
    candidates: list[Candidate],
    k: int,
    *,
    min_differences: int = 1,
    budgets: dict[str, float] | None = None,
    min_throughput: float | None = None,
    time_resource: str = "latency",
    max_attention_layers: int | None = None,
    solver: str = "auto",
    time_limit_s: float | None = None,
) -> list[Solution]:
    """Up to ``k`` solutions, best first, each differing from every earlier one in >= ``min_differences`` slots.

    Puzzle trains only a few children, so a handful of distinct near-optimal architectures hedges against
    the replace-1-block scores being wrong about block interactions. After each solve a no-good cut
    ``sum(x[chosen]) <= n_slots - min_differences`` forbids that solution's neighbourhood; each solve
    optimises over a subset of the previous feasible set, so objectives never decrease. Returns fewer than
    ``k`` when the cuts exhaust the feasible set; raises ``InfeasibleBudget`` if even the first fails.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    groups = _validate(candidates)
    n_slots = len(groups)
    if isinstance(min_differences, bool) or not isinstance(min_differences, int):
        raise ValueError(f"min_differences must be an integer, got {min_differences!r}")
    if not 1 <= min_differences <= n_slots:
        raise ValueError(
            f"min_differences must be in 1..{n_slots} (the number of slots), got {min_differences}"
        )
    solver_name = _pick_solver(solver)
    if time_limit_s is not None and not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    bounds = _bounds(candidates, groups, budgets, min_throughput, time_resource, max_attention_layers)

    prob, xs = _build(candidates, groups, bounds)
    solutions: list[Solution] = []
    for _ in range(k):
        sol = _run(prob, xs, candidates, groups, bounds, solver_name, time_limit_s)
        if sol is None:
            if not solutions:
                raise _jointly_infeasible(bounds)
            break
        solutions.append(sol)
        chosen = [xs[id(c)] for c in sol.choice.values()]
        prob += pulp.lpSum(chosen) <= n_slots - min_differences, f"nogood_{len(solutions)}"
    return solutions


# ----------------------------------------------------------------------------------------------------------
# Validation


def _validate(candidates: list[Candidate]) -> dict[tuple[int, str], list[int]]:
    """Check the library and group candidate indices by (layer, slot), in a stable order."""
    if not candidates:
        raise ValueError("candidates is empty: need at least one candidate per (layer, slot)")
    resource_keys: frozenset[str] | None = None
    first = None
    seen: set[tuple[int, str, str]] = set()
    groups: dict[tuple[int, str], list[int]] = {}
    for i, c in enumerate(candidates):
        if not isinstance(c, Candidate):
            raise ValueError(f"candidates[{i}] is a {type(c).__name__}, not a Candidate")
        if isinstance(c.layer, bool) or not isinstance(c.layer, int) or c.layer < 0:
            raise ValueError(f"candidates[{i}] has layer {c.layer!r}: layers are integers 0..L-1")
        if c.slot not in SLOTS:
            raise ValueError(f"{c.label}: slot must be one of {SLOTS}, got {c.slot!r}")
        if not isinstance(c.name, str) or not c.name:
            raise ValueError(f"candidates[{i}] (layer {c.layer} {c.slot}) has no name")
        if (c.layer, c.slot, c.name) in seen:
            raise ValueError(f"{c.label} appears twice: names must be unique within a (layer, slot)")
        seen.add((c.layer, c.slot, c.name))
        if not _is_finite_number(c.score):
            raise ValueError(f"{c.label} has score {c.score!r}: scores must be finite numbers")
        if not isinstance(c.costs, dict):
            raise ValueError(
                f"{c.label}: costs must be a dict of resource -> cost, got {type(c.costs).__name__}"
            )
        for key, value in c.costs.items():
            if not _is_finite_number(value):
                raise ValueError(f"{c.label} has costs[{key!r}] = {value!r}: costs must be finite numbers")
        if "is_attention" in c.costs and c.costs["is_attention"] not in (0, 1):
            raise ValueError(
                f"{c.label}: costs['is_attention'] must be 0 or 1, got {c.costs['is_attention']!r}"
            )
        keys = frozenset(c.costs) - {"is_attention"}
        if resource_keys is None:
            resource_keys, first = keys, c
        elif keys != resource_keys:
            raise ValueError(
                f"{c.label} has cost keys {sorted(keys)} but {first.label} has {sorted(resource_keys)}: "
                "every candidate must price the same resources"
                + (f" (missing {sorted(resource_keys - keys)})" if resource_keys - keys else "")
                + (f" (extra {sorted(keys - resource_keys)})" if keys - resource_keys else "")
            )
        groups.setdefault((c.layer, c.slot), []).append(i)

    slots_used = {slot for _, slot in groups}
    if "block" in slots_used and slots_used - {"block"}:
        coupled = min(layer for layer, slot in groups if slot == "block")
        decoupled = min(layer for layer, slot in groups if slot != "block")
        raise ValueError(
            "a library is either coupled ('block' slots) or decoupled ('attention'/'ffn' slots), not both: "
            f"layer {coupled} has a 'block' candidate and layer {decoupled} a decoupled one"
        )
    n_layers = max(layer for layer, _ in groups) + 1
    slots = [s for s in SLOTS if s in slots_used]
    missing = [(layer, s) for layer in range(n_layers) for s in slots if (layer, s) not in groups]
    if missing:
        shown = ", ".join(f"(layer {layer}, {s!r})" for layer, s in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ValueError(f"no candidate for {len(missing)} (layer, slot) pair(s): {shown}{more}")
    return {key: groups[key] for key in sorted(groups, key=lambda ls: (ls[0], SLOTS.index(ls[1])))}


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _attention_flag(c: Candidate) -> int | None:
    """1 if this choice keeps real attention in its layer, 0 if not, None if unknown (a 'block' without a flag)."""
    if "is_attention" in c.costs:
        return int(c.costs["is_attention"])
    if c.slot == "attention":
        return 0 if c.name in ATTENTION_FREE_NAMES else 1
    if c.slot == "ffn":
        return 0
    return None


# ----------------------------------------------------------------------------------------------------------
# Bounds: every constraint is "sum over chosen candidates of coef <= bound", checked before solving


@dataclass
class _Bound:
    label: str  # how the message names it
    coef: list[float]  # one per candidate
    limit: float
    smallest: float  # every slot at its smallest coefficient


def _bounds(candidates, groups, budgets, min_throughput, time_resource, max_attention_layers) -> list[_Bound]:
    """Turn budgets/throughput/attention limits into bounds; raise InfeasibleBudget if one alone is unreachable."""
    resources = set(candidates[0].costs) - {"is_attention"}
    budgets = dict(budgets or {})
    rows: list[tuple[str, str, list[float], float]] = []  # (label, violation text template, coef, limit)
    for key, limit in budgets.items():
        if key not in resources:
            raise ValueError(f"budget for {key!r} but candidates price only {sorted(resources)}")
        if not _is_finite_number(limit):
            raise ValueError(f"budget for {key!r} is {limit!r}: budgets must be finite numbers")
        rows.append((key, f"{key} budget {limit:.6g}", [c.costs[key] for c in candidates], float(limit)))
    if min_throughput is not None:
        if not _is_finite_number(min_throughput) or min_throughput <= 0:
            raise ValueError(f"min_throughput must be a positive number of tokens/s, got {min_throughput!r}")
        if time_resource not in resources:
            raise ValueError(
                f"min_throughput needs a per-token time cost {time_resource!r} on every candidate "
                f"(set time_resource to one of {sorted(resources)})"
            )
        limit = 1.0 / min_throughput
        rows.append(
            (
                f"throughput ({time_resource})",
                f"min_throughput {min_throughput:.6g} tokens/s needs summed {time_resource} <= {limit:.6g}, which",
                [c.costs[time_resource] for c in candidates],
                limit,
            )
        )
    if max_attention_layers is not None:
        if (
            isinstance(max_attention_layers, bool)
            or not isinstance(max_attention_layers, int)
            or max_attention_layers < 0
        ):
            raise ValueError(
                f"max_attention_layers must be a non-negative integer, got {max_attention_layers!r}"
            )
        flags = [_attention_flag(c) for c in candidates]
        unknown = [c.label for c, f in zip(candidates, flags) if f is None]
        if unknown:
            raise ValueError(
                f"max_attention_layers needs costs['is_attention'] on coupled 'block' candidates; missing on {unknown[0]}"
                + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
            )
        if not any(c.slot in ("attention", "block") for c in candidates):
            raise ValueError(
                "max_attention_layers given but the library has no 'attention' or 'block' slots to choose"
            )
        rows.append(
            (
                "attention layers",
                f"max_attention_layers {max_attention_layers}",
                flags,
                float(max_attention_layers),
            )
        )

    bounds, violated = [], []
    for label, text, coef, limit in rows:
        smallest = sum(min(coef[i] for i in idx) for idx in groups.values())
        bounds.append(_Bound(label, coef, limit, smallest))
        if smallest > limit:
            violated.append(
                f"{text} is below the smallest achievable {smallest:.6g} (every layer at its cheapest candidate)"
            )
    if violated:
        raise InfeasibleBudget("infeasible: " + "; ".join(violated), {b.label: b.smallest for b in bounds})
    return bounds


def _jointly_infeasible(bounds: list[_Bound]) -> InfeasibleBudget:
    parts = ", ".join(f"{b.label} <= {b.limit:.6g} (smallest achievable {b.smallest:.6g})" for b in bounds)
    return InfeasibleBudget(
        f"infeasible: each bound is achievable on its own ({parts}) but no architecture meets them jointly; "
        "the cheapest candidates for one resource are not the cheapest for another",
        {b.label: b.smallest for b in bounds},
    )


# ----------------------------------------------------------------------------------------------------------
# Model and solve


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner to the process's stdout (fd 1, past Python's ``sys.stdout``) when
    its first ``Highs`` object is built, whatever ``msg`` says; build that first one with fd 1 pointed at
    /dev/null, so ``msg=False`` (and ``progress=False`` above it) means a silent solve."""
    try:
        import highspy  # optional: only when HiGHS is installed
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pick_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    _silence_highs_banner()
    highs_ok = pulp.HiGHS(msg=False).available()
    if solver == "auto":
        solver = "highs" if highs_ok else "cbc"
    if solver == "highs" and not highs_ok:
        raise ValueError(
            "solver='highs' but highspy is not importable (pip install highspy), use solver='cbc'"
        )
    if solver == "cbc" and not _cbc(msg=False).available():
        raise ValueError("solver='cbc' but PuLP's bundled CBC binary is not available, use solver='highs'")
    return solver


def _cbc(**opts):
    """PuLP's bundled CBC (2.10.3), with its Cgl preprocessing off.

    That preprocessing wrongly fixes variables on some small multiple-choice instances and reports a
    suboptimal choice as "Optimal" (found by the brute-force test, e.g. seed 6 there); without it CBC
    agrees with brute force and HiGHS. PuLP 3.3 warns that PULP_CBC_CMD goes away in PuLP 4.0; the
    warning is silenced here because the bundled binary is the point of the CBC fallback.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(options=["preprocess off"], **opts)


def _build(candidates, groups, bounds):
    """The MIP: binaries x, exactly one per (layer, slot), each bound as one row, summed score minimised."""
    prob = pulp.LpProblem("puzzle", pulp.LpMinimize)
    # PuLP 3.3 deprecates free-standing LpVariable in favour of prob.add_variable; 2.x only has the former.
    make = getattr(prob, "add_variable", None) or pulp.LpVariable
    xs = {id(c): make(f"x{i}", cat=pulp.LpBinary) for i, c in enumerate(candidates)}
    var = [xs[id(c)] for c in candidates]
    prob += pulp.LpAffineExpression([(var[i], float(c.score)) for i, c in enumerate(candidates)])
    for n, ((layer, slot), idx) in enumerate(groups.items()):
        prob += pulp.LpAffineExpression([(var[i], 1.0) for i in idx]) == 1, f"one_{layer}_{slot}_{n}"
    for n, b in enumerate(bounds):
        # Each row is divided by its limit: solvers judge feasibility to an absolute tolerance (~1e-7 in
        # HiGHS), which on raw seconds per token (~1e-7 per block) would accept any violation.
        scale = 1.0 / b.limit if b.limit > 0 else 1.0
        terms = [(var[i], float(a) * scale) for i, a in enumerate(b.coef) if a != 0]
        prob += pulp.LpAffineExpression(terms) <= b.limit * scale, f"bound_{n}"
    return prob, xs


def _run(prob, xs, candidates, groups, bounds, solver_name, time_limit_s) -> Solution | None:
    """Solve once; None when the solver proves infeasibility."""
    opts = {"msg": False, "timeLimit": time_limit_s, "gapRel": 0.0, "gapAbs": 1e-9}
    # HiGHS's default feasibility tolerance (1e-6 on the budget-normalised rows) accepted a choice over
    # budget by 1e-6 of it, 0.002% better than the true optimum (bench_mip.py seed 2); tightened here.
    backend = (pulp.HiGHS(**opts, mip_feasibility_tolerance=FEAS_TOL, primal_feasibility_tolerance=FEAS_TOL)
               if solver_name == "highs" else _cbc(**opts))
    t0 = time.perf_counter()
    prob.solve(backend)
    elapsed = time.perf_counter() - t0
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return None
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible (stopped at the time limit, not proven optimal)"
    else:
        raise RuntimeError(
            f"{solver_name} found no solution (status {pulp.LpStatus[prob.status]!r}"
            + (f", time limit {time_limit_s} s" if time_limit_s else "")
            + ")"
        )
    choice = {}
    for key, idx in groups.items():
        best = max(idx, key=lambda i: xs[id(candidates[i])].value() or 0.0)
        choice[key] = candidates[best]
    chosen = list(choice.values())
    index = {id(c): i for i, c in enumerate(candidates)}
    for b in bounds:  # the solver's tolerance is not ours: check every bound on the exact sums
        used = math.fsum(b.coef[index[id(c)]] for c in chosen)
        if used > b.limit + FEAS_TOL * max(1.0, abs(b.limit)):
            raise RuntimeError(f"{solver_name} returned a choice over the {b.label} bound: {used:.9g} > {b.limit:.9g}")
    resources = sorted(set(candidates[0].costs) - {"is_attention"})
    return Solution(
        choice=choice,
        objective=math.fsum(c.score for c in chosen),
        costs={r: math.fsum(c.costs[r] for c in chosen) for r in resources},
        status=status,
        solver=solver_name,
        solve_time_s=elapsed,
        attention_layers=sum(_attention_flag(c) or 0 for c in chosen),
    )
