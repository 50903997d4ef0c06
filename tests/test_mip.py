"""Unit tests for lnkit.puzzle.mip: the optimum matches brute force, constraints hold, bad input is named."""

import itertools
import math
import random

import pytest

from lnkit.puzzle.mip import Candidate, InfeasibleBudget, solve, solve_diverse

SOLVERS = ["highs", "cbc"]


def _random_instance(seed: int):
    """3-4 layers, coupled or decoupled slots, 2-4 candidates each, random budgets (some infeasible)."""
    rng = random.Random(seed)
    n_layers = rng.randint(3, 4)
    slots = rng.choice([("block",), ("attention", "ffn")])
    cands = []
    for layer in range(n_layers):
        for slot in slots:
            n = rng.randint(2, 4) if slot == "block" else rng.randint(2, 3)
            for j in range(n):
                name = "no_op" if slot == "attention" and j == 0 else f"{slot}{j}"
                costs = {"memory": rng.uniform(0, 10), "latency": rng.uniform(0, 1)}
                if slot == "block":
                    costs["is_attention"] = rng.randint(0, 1)
                cands.append(Candidate(layer, slot, name, rng.uniform(0, 5), costs))
    kw = {}
    groups = _groups(cands)
    for r in rng.sample(["memory", "latency"], rng.randint(1, 2)):
        lo = sum(min(c.costs[r] for c in g) for g in groups.values())
        hi = sum(max(c.costs[r] for c in g) for g in groups.values())
        kw.setdefault("budgets", {})[r] = lo + rng.uniform(-0.1, 0.7) * (hi - lo)
    if rng.random() < 0.3:
        kw["max_attention_layers"] = rng.randint(0, n_layers)
    if rng.random() < 0.2 and "latency" not in kw.get("budgets", {}):
        kw["min_throughput"] = 1.0 / (0.5 * n_layers * len(slots) * rng.uniform(0.3, 1.2))
    return cands, kw


def _groups(cands):
    groups = {}
    for c in cands:
        groups.setdefault((c.layer, c.slot), []).append(c)
    return groups


def _is_attention(c):
    if "is_attention" in c.costs:
        return c.costs["is_attention"]
    return int(c.slot == "attention" and c.name != "no_op")


def _brute_force(cands, budgets=None, max_attention_layers=None, min_throughput=None):
    """Best summed score over the full product of choices, or None when nothing is feasible."""
    best = None
    for combo in itertools.product(*_groups(cands).values()):
        if any(sum(c.costs[r] for c in combo) > b for r, b in (budgets or {}).items()):
            continue
        if min_throughput is not None and sum(c.costs["latency"] for c in combo) > 1.0 / min_throughput:
            continue
        if max_attention_layers is not None and sum(_is_attention(c) for c in combo) > max_attention_layers:
            continue
        obj = sum(c.score for c in combo)
        best = obj if best is None else min(best, obj)
    return best


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_brute_force_on_random_instances(solver):
    n_infeasible = n_jointly = 0
    for seed in range(50):
        cands, kw = _random_instance(seed)
        expected = _brute_force(cands, **kw)
        if expected is None:
            n_infeasible += 1
            with pytest.raises(InfeasibleBudget) as err:
                solve(cands, solver=solver, **kw)
            n_jointly += "jointly" in str(err.value)
            continue
        sol = solve(cands, solver=solver, **kw)
        assert sol.status == "optimal" and sol.solver == solver
        assert math.isclose(sol.objective, expected, abs_tol=1e-6), (seed, sol.objective, expected)
    # the property covers both kinds of infeasibility: caught up front, and proven by the solver
    assert 0 < n_jointly < n_infeasible < 50


def _decoupled_library(n_layers=4):
    """Attention variants trade KL for memory; the full-attention choice is best on score everywhere."""
    cands = []
    for layer in range(n_layers):
        for name, score, mem in [
            ("mha", 0.0, 4.0),
            ("kv2", 0.2 + 0.1 * layer, 2.0),
            ("no_op", 1.0 + layer, 0.0),
        ]:
            cands.append(Candidate(layer, "attention", name, score, {"memory": mem, "latency": mem / 10}))
        for name, score, mem in [("ffn_100", 0.0, 8.0), ("ffn_50", 0.3, 4.0)]:
            cands.append(Candidate(layer, "ffn", name, score, {"memory": mem, "latency": mem / 10}))
    return cands


@pytest.mark.parametrize("solver", SOLVERS)
def test_exactly_one_candidate_per_slot(solver):
    cands = _decoupled_library()
    sol = solve(cands, budgets={"memory": 30.0}, solver=solver)
    assert set(sol.choice) == {(layer, slot) for layer in range(4) for slot in ("attention", "ffn")}
    for (layer, slot), c in sol.choice.items():
        assert (c.layer, c.slot) == (layer, slot)
    assert sol.costs["memory"] <= 30.0
    assert sol.objective == pytest.approx(sum(c.score for c in sol.choice.values()))
    assert sol.solve_time_s >= 0


def test_unconstrained_picks_best_score_and_auto_prefers_highs():
    sol = solve(_decoupled_library())
    assert sol.solver == "highs"
    assert all(c.score == 0.0 for c in sol.choice.values()) and sol.attention_layers == 4


@pytest.mark.parametrize("solver", SOLVERS)
def test_max_attention_layers(solver):
    sol = solve(_decoupled_library(), max_attention_layers=1, solver=solver)
    kept = [c for c in sol.choice.values() if c.slot == "attention" and c.name != "no_op"]
    assert len(kept) == sol.attention_layers == 1
    # no_op is cheapest to drop in layer 0 (score 1.0), so the others keep attention... but only one may
    assert sol.objective == pytest.approx(1.0 + 2.0 + 3.0)
    assert solve(_decoupled_library(), max_attention_layers=0, solver=solver).attention_layers == 0


def test_min_throughput_bounds_total_time():
    sol = solve(_decoupled_library(), min_throughput=1 / 3.0)
    assert sol.costs["latency"] <= 3.0 + 1e-9
    assert _brute_force(_decoupled_library(), min_throughput=1 / 3.0) == pytest.approx(sol.objective)


@pytest.mark.parametrize("solver", SOLVERS)
def test_diverse_solutions_differ_and_never_improve(solver):
    cands = _decoupled_library()
    sols = solve_diverse(cands, 6, min_differences=2, budgets={"memory": 36.0}, solver=solver)
    assert len(sols) == 6
    assert sols[0].objective == pytest.approx(solve(cands, budgets={"memory": 36.0}).objective)
    for a, b in itertools.combinations(sols, 2):
        assert sum(a.choice[key].name != b.choice[key].name for key in a.choice) >= 2
    objectives = [s.objective for s in sols]
    assert all(x <= y + 1e-9 for x, y in zip(objectives, objectives[1:]))


def test_diverse_stops_when_the_feasible_set_runs_out():
    cands = [Candidate(0, "block", n, s, {"m": 1.0}) for n, s in [("a", 0.0), ("b", 1.0)]]
    sols = solve_diverse(cands, 5)
    assert [s.choice[(0, "block")].name for s in sols] == ["a", "b"]


def test_infeasible_budget_states_smallest_achievable():
    cands = _decoupled_library()  # cheapest memory: no_op (0) + ffn_50 (4) per layer = 16
    with pytest.raises(InfeasibleBudget) as err:
        solve(cands, budgets={"memory": 12.0, "latency": 100.0})
    msg = str(err.value)
    assert "memory budget 12 is below the smallest achievable 16" in msg and "latency" not in msg
    assert err.value.smallest["memory"] == pytest.approx(16.0)
    with pytest.raises(InfeasibleBudget, match="max_attention_layers 0 is below the smallest achievable 2"):
        solve([c for c in cands if c.name != "no_op" or c.layer >= 2], max_attention_layers=0)
    with pytest.raises(InfeasibleBudget, match=r"min_throughput 10 tokens/s needs summed latency <= 0\.1"):
        solve(cands, min_throughput=10.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_jointly_infeasible_budgets_say_so(solver):
    # a is cheap in memory, b cheap in time; each budget alone is reachable, both together are not
    cands = [
        Candidate(layer, "block", n, 0.0, {"memory": m, "latency": t})
        for layer in range(2)
        for n, m, t in [("a", 0.0, 1.0), ("b", 1.0, 0.0)]
    ]
    with pytest.raises(InfeasibleBudget, match="no architecture meets them jointly"):
        solve(cands, budgets={"memory": 0.5, "latency": 0.5}, solver=solver)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda cs: [c for c in cs if (c.layer, c.slot) != (1, "ffn")], r"\(layer 1, 'ffn'\)"),
        (lambda cs: [c for c in cs if c.layer != 2], r"\(layer 2, 'attention'\), \(layer 2, 'ffn'\)"),
        (
            lambda cs: cs + [Candidate(3, "ffn", "ffn_25", 0.5, {"memory": 2.0})],
            r"layer 3 ffn 'ffn_25' has cost keys \['memory'\].*missing \['latency'\]",
        ),
        (
            lambda cs: cs + [Candidate(0, "ffn", "odd", 0.5, {"memory": 2.0, "latency": 0.1, "flops": 1.0})],
            r"layer 0 ffn 'odd'.*extra \['flops'\]",
        ),
        (
            lambda cs: cs + [Candidate(1, "ffn", "nan", float("nan"), {"memory": 1.0, "latency": 0.1})],
            "layer 1 ffn 'nan' has score nan",
        ),
        (
            lambda cs: cs + [Candidate(1, "ffn", "inf", 0.1, {"memory": math.inf, "latency": 0.1})],
            r"layer 1 ffn 'inf' has costs\['memory'\] = inf",
        ),
        (lambda cs: cs + [cs[0]], "appears twice"),
        (
            lambda cs: cs + [Candidate(0, "mlp", "x", 0.1, {"memory": 1.0, "latency": 0.1})],
            "slot must be one of",
        ),
        (
            lambda cs: cs + [Candidate(5, "block", "x", 0.1, {"memory": 1.0, "latency": 0.1})],
            "either coupled",
        ),
        (lambda cs: [], "candidates is empty"),
    ],
)
def test_bad_libraries_are_named(mutate, match):
    with pytest.raises(ValueError, match=match):
        solve(mutate(_decoupled_library()))


def test_bad_arguments_are_named():
    cands = _decoupled_library()
    with pytest.raises(ValueError, match="budget for 'flops' but candidates price only"):
        solve(cands, budgets={"flops": 1.0})
    with pytest.raises(ValueError, match="solver must be one of"):
        solve(cands, solver="gurobi")
    with pytest.raises(ValueError, match="min_differences must be in 1..8"):
        solve_diverse(cands, 2, min_differences=9)
    with pytest.raises(ValueError, match="time_resource"):
        solve(cands, min_throughput=1.0, time_resource="seconds")
    blocks = [Candidate(0, "block", "a", 0.0, {"m": 1.0})]
    with pytest.raises(ValueError, match="is_attention.*layer 0 block 'a'"):
        solve(blocks, max_attention_layers=1)


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_tiny_cost_units_still_respect_the_budget(solver):
    """Costs of 1e-7 seconds per block: constraint rows are normalised, so the absolute feasibility
    tolerance of the solver cannot let a violated budget through."""
    from lnkit.puzzle.mip import Candidate, solve

    cands = []
    for layer in range(6):
        cands += [Candidate(layer, "ffn", "ffn_100", 0.0, {"decode_s": 1e-7}),
                  Candidate(layer, "ffn", "ffn_50", 1.0, {"decode_s": 0.5e-7}),
                  Candidate(layer, "ffn", "ffn_noop", 3.0, {"decode_s": 0.0})]
    budget = 0.7 * 6e-7
    sol = solve(cands, budgets={"decode_s": budget}, solver=solver)
    assert sol.costs["decode_s"] <= budget * (1 + 1e-9)
    # budget 4.2 units of 1e-7: two full FFNs and four halves (4.0 units) is the optimum, score 4
    assert sol.objective == pytest.approx(4.0)
