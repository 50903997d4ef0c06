"""Stage 02: score the block library, price it, and let the MIP pick children along a Pareto sweep
(``notebooks/02_architecture_search.ipynb``).

Reads ``<run_dir>/00_parent`` and ``<run_dir>/01_block_library``; writes ``<run_dir>/02_architecture_search``:
``scores.csv`` (replace-1-block KL, LM loss, cosine on held-out text), ``costs.csv`` (the MIP's prices) and
``cost_table.json`` (the table they came from, with the machine it was measured on), ``frontier.csv`` /
``frontier.json`` (one row per budget and per baseline: architecture, MIP status and time, priced and
measured speed-up, test accuracy), ``best_2x.json`` and one ``nemotron-nas`` checkpoint per Puzzle child.

Prices are deterministic by default: block costs come from a cost table (:mod:`lnkit.puzzle.cost_table`)
measured once, median over rounds, and packaged for the embedded runs, so the MIP picks the same children
on every machine and every rerun (timing blocks afresh each run made the pick a lottery: docs/LOG.md,
2026-12-01). ``cost_source="measured"`` times this machine once and keeps the table in the run folder;
``"analytic"`` prices for a named GPU through :mod:`lnkit.deploy`. Budgets are fractions of the parent's
summed per-block decode time as priced. The 2x child for stage 03 is picked by the priced speed-up,
``(parent blocks + rest) / (child blocks + rest)`` with the table's embedding/norm/LM-head step as the rest.

Throughput is still measured on the whole assembled model (KV-cache decode steps at ``batch_size`` after a
``prompt_len`` prefill), against the parent measured in the same run, and reported with its spread over
``timing_repeats``: a ratio within one run, never an input to a decision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from lnkit import plots, stage
from lnkit.checkpoints import load_model, require, save_model, stage_dir
from lnkit.data.splits import first_per_domain, load_split
from lnkit.deploy import GPUS
from lnkit.eval import evaluate, summarize
from lnkit.generate import decode_throughput, decode_throughput_rounds
from lnkit.gpuhours import Work
from lnkit.io import ArtifactError, atomic_write_json
from lnkit.params import ParamError, RunParams, param
from lnkit.progress import progress_bar
from lnkit.puzzle import cost_table
from lnkit.puzzle.calibration import token_batches
from lnkit.puzzle.costs import analytic_costs, costs_from_table, to_mip_candidates
from lnkit.puzzle.library import assemble, load_library
from lnkit.puzzle.mip import InfeasibleBudget, solve, solve_diverse
from lnkit.puzzle.scoring import score_candidates
from lnkit.puzzle.space import PARENT_NAMES, split_name

NAME = "02_architecture_search"


@dataclass
class Params(RunParams):
    """Stage 02 parameters (fields match ``notebooks/02_architecture_search.ipynb``'s parameters cell)."""

    STAGE = NAME
    threads: int = param(1, "torch CPU threads for scoring and timing; 1 is the least noisy on 2 cores", lo=0, hi=256)
    score: str = param("kl", "replace-1-block score the MIP minimises", choices=["kl", "lm_loss", "cosine"])
    score_tokens: str = param("all", "positions the score counts: all, or those predicting an assistant token",
                              choices=["all", "assistant"])
    score_rows: int = param(32, "held-out (validation) rows for scoring", lo=1)
    score_len: int = param(128, "tokens per scoring row", lo=8)
    cost_source: str = param("table", "price blocks from the packaged cost table for this setup, by timing them "
                             "here once (stored in the run folder), or analytically for `gpu`",
                             choices=["table", "measured", "analytic"])
    remeasure_costs: bool = param(False, "measured costs: time the blocks again instead of reusing the run's table")
    cost_rounds: int = param(5, "measured costs: rounds of timing per block (the median is kept)", lo=1)
    gpu: str = param("H100", "GPU for analytic costs (see lnkit.deploy.GPUS)")
    batch_size: int = param(16, "decode batch for costs and throughput", lo=1)
    prompt_len: int = param(64, "prompt tokens before decoding", lo=1)
    decode_len: int = param(32, "decoded tokens (costs at the mean context)", lo=1)
    budgets: list[float] = param([0.8, 0.65, 0.5, 0.4, 0.3], "decode-time budgets as fractions of the parent's", lo=0.01, hi=1.0,
                                 min_items=1)
    memory_budget: float = param(0.0, "cap on weights + KV cache as a fraction of the parent's (0: none)", lo=0.0, hi=1.0)
    param_budget: float = param(0.0, "cap on parameters in the layers as a fraction of the parent's (0: none)", lo=0.0, hi=1.0)
    max_attention_layers: int = param(-1, "cap on attention layers (-1: none)", lo=-1)
    diverse_k: int = param(1, "distinct solutions per budget (MIP no-good cuts), each assembled and evaluated", lo=1, hi=10)
    min_differences: int = param(1, "slots in which each extra solution differs from the earlier ones", lo=1)
    solver: str = param("auto", "MIP solver", choices=["auto", "highs", "cbc"])
    baselines: bool = param(True, "evaluate uniform FFN shrinking and last-layers attention removal too")
    eval_n: int = param(60, "test items per domain for the frontier's accuracy", lo=1)
    eval_max_new_tokens: int = param(48, "generation limit per answer", lo=1)
    timing_repeats: int = param(5, "repeats for throughput (median)", lo=1)

    def check(self):
        if not any(b < 1.0 for b in self.budgets):
            raise ParamError(f"stage {self.STAGE}: parameter budgets={self.budgets} holds no budget below 1.0: the "
                             "sweep would assemble no child (stage 03 fuses one of them)")
        if self.cost_source == "analytic" and self.gpu not in GPUS:
            raise ParamError(f"stage {self.STAGE}: gpu={self.gpu!r} is not in the catalogue; known: {sorted(GPUS)}")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): one forward of the model over the scoring rows per
    candidate block (each layer's variants, scored one at a time), then the frontier's evaluation."""
    lib = run.get("01_block_library")
    per_layer = 2 + (len(lib.kv_factors) + lib.attention_linear + lib.attention_no_op + len(lib.ffn_fractions)
                     + lib.ffn_linear + lib.ffn_no_op if lib else 8)
    layers = int(config.get("num_hidden_layers", 1))
    return Work(forward=layers * per_layer * p.score_rows * p.score_len,
                generate=len(p.budgets) * p.eval_n * 5 * p.eval_max_new_tokens, gen_len=p.eval_max_new_tokens)


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads."""
    return ["00_parent", "01_block_library"]


def run(p: Params) -> dict:
    """The whole stage. Writes ``scores.csv``, ``costs.csv``, ``frontier.{csv,json}`` (every child with its
    architecture) and ``best_2x.json`` (the child stage 03 fuses by default); returns what
    :func:`run_search` returns plus ``"metrics"``."""
    stage.check_inputs(p, needs(p))
    out = stage.start(p)
    result = run_search(p)
    atomic_write_json(out / "frontier.json", result["frontier"])
    best = best_2x(result["frontier"])
    atomic_write_json(out / "best_2x.json", best)
    result["metrics"] = {
        "parent_tokens_per_s": result["parent"]["tokens_per_s"],
        "parent_accuracy": result["parent"]["accuracy"],
        "children": [{k: v for k, v in r.items() if k not in ("architecture", "status")} for r in result["frontier"]],
        "best_2x": best,
    }
    return result


def best_2x(frontier: list[dict]) -> dict | None:
    """The most accurate Puzzle child priced at >= 2x the parent's decode speed, or None.

    Picked by the priced speed-up (from the cost table: the same on every machine and every rerun), not by
    the measured one, whose noise on a small CPU would make the pick a lottery; both are reported.

    >>> best_2x([{"kind": "puzzle", "label": "a", "priced_speedup": 2.1, "speedup": 1.9, "accuracy": 0.5,
    ...           "accuracy_kept": 0.8},
    ...          {"kind": "puzzle", "label": "b", "priced_speedup": 1.5, "speedup": 2.2, "accuracy": 0.7,
    ...           "accuracy_kept": 1.0}])
    {'label': 'a', 'priced_speedup': 2.1, 'speedup': 1.9, 'accuracy': 0.5, 'accuracy_kept': 0.8}
    """
    ok = [r for r in frontier if r["kind"] in ("puzzle", "puzzle_alt") and r.get("priced_speedup", 0) >= 2.0]
    best = max(ok, key=lambda r: (r["accuracy"], r["priced_speedup"])) if ok else None
    keys = ("label", "priced_speedup", "speedup", "accuracy", "accuracy_kept")
    return None if best is None else {k: best[k] for k in keys}


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"best_2x": {"label": "budget 0.40", "priced_speedup": 2.1, "speedup": 2.08,
    ...                       "accuracy_kept": 0.64}, "children": []})
    "best child priced >= 2x: budget 0.40, 2.10x priced (2.08x measured) at 64% of the parent's accuracy"
    >>> headline({"best_2x": None, "children": [{"kind": "puzzle", "priced_speedup": 1.5}]})
    'no child priced at 2x (fastest Puzzle child 1.50x)'
    """
    b = metrics["best_2x"]
    if b:
        return (f"best child priced >= 2x: {b['label']}, {b['priced_speedup']:.2f}x priced ({b['speedup']:.2f}x "
                f"measured) at {b['accuracy_kept']:.0%} of the parent's accuracy")
    fastest = max((r.get("priced_speedup", 0) for r in metrics["children"] if r["kind"] == "puzzle"), default=0)
    return f"no child priced at 2x (fastest Puzzle child {fastest:.2f}x)"


def baseline_choices(num_layers: int, names: dict) -> dict[str, dict]:
    """Hand-made children at matched cost: every FFN shrunk uniformly, and attention removed from the
    last k layers (the two naive ways to make a model cheaper)."""
    out = {}
    for n in names["ffn"]:
        if n.startswith("ffn_") and n not in ("ffn_100", "ffn_noop", "ffn_linear"):
            out[f"uniform {n}"] = {(i, "ffn"): n for i in range(num_layers)}
    for k in range(1, num_layers):
        out[f"no attention in last {k}"] = {(i, "attention"): "attn_noop" for i in range(num_layers - k, num_layers)}
    return out


def couple_choice(choice: dict, num_layers: int) -> dict:
    """A decoupled choice ``{(layer, "attention"|"ffn"): name}`` as the coupled library's ``(layer, "block")``
    keys (unchosen slots keep the parent's variant).

    >>> couple_choice({(1, "ffn"): "ffn_50"}, 2)
    {(0, 'block'): 'attn_parent+ffn_100', (1, 'block'): 'attn_parent+ffn_50'}
    """
    return {(i, "block"): "+".join(choice.get((i, s), PARENT_NAMES[s]) for s in ("attention", "ffn"))
            for i in range(num_layers)}


def describe(choice: dict, num_layers: int) -> list[dict]:
    """Per-layer architecture rows, for tables and the heatmap (a coupled choice is split into its parts)."""
    flat = {}
    for (i, slot), name in choice.items():
        flat.update({(i, s): n for s, n in split_name(slot, name).items()})
    return [{"layer": i, "attention": flat.get((i, "attention"), "attn_parent"),
             "ffn": flat.get((i, "ffn"), "ffn_100")} for i in range(num_layers)]


def price_blocks(p: Params, library, parent_config) -> tuple[list[dict], float]:
    """``(cost rows, seconds of a decode step outside the layers)``, priced as ``cost_source`` says.

    ``table``: the packaged table measured for exactly this setup (:mod:`lnkit.puzzle.cost_table`); without
    one, as ``measured``. ``measured``: the table of this run folder
    (``<run_dir>/cost_tables/<setup>.json``), timed here the first time and reused after, unless
    ``remeasure_costs``. ``analytic``: the GPU roofline (nothing outside the layers is priced). The table used
    is copied into the stage folder as ``cost_table.json``, so the run says what priced it."""
    out = stage_dir(p.run_dir, NAME)
    if p.cost_source == "analytic":
        return analytic_costs(library, parent_config.to_dict(), p.gpu, p.batch_size, p.prompt_len, p.decode_len), 0.0
    cands = [e.candidate for e in library.entries.values()]
    setup = cost_table.setup_of(parent_config, p.batch_size, p.prompt_len, p.decode_len)

    def measure_into(path):
        table = cost_table.measure(cands, parent_config, p.batch_size, p.prompt_len, p.decode_len,
                                   rounds=p.cost_rounds, progress=p.progress)
        cost_table.save(table, path)
        return table

    path = cost_table.packaged(setup) if p.cost_source == "table" else None
    if path is None:
        path = Path(p.run_dir) / "cost_tables" / f"{cost_table.setup_digest(setup)}.json"
        if p.cost_source == "table":
            print(f"no packaged cost table for this setup ({setup}): timing blocks on this machine once")
        if p.remeasure_costs or not path.exists():
            measure_into(path)
    table = cost_table.load(path)
    if table["setup"] != setup:
        raise ArtifactError(f"{path}: measured for {table['setup']}, not this setup {setup}")
    if cost_table.missing(table, cands):  # the library grew new blocks since the table was measured
        if p.cost_source == "table" and path.parent == cost_table.PACKAGED:
            raise ArtifactError(f"{path} lacks blocks of this library: {cost_table.missing(table, cands)[:3]}; "
                                "set cost_source='measured' to time them here")
        table = measure_into(path)
    print(f"prices: {cost_table.describe(table, path)}")
    cost_table.save(table, out / "cost_table.json")
    return costs_from_table(library, parent_config, table), float(table["rest_decode_s"])


def run_search(p: Params) -> dict:
    """Score, price, solve, assemble and measure; returns {"scores", "costs", "frontier", "parent", ...} and
    writes them as CSV."""
    parent_dir = require(p.run_dir, "00_parent")
    lib_dir = require(p.run_dir, "01_block_library")
    out = stage_dir(p.run_dir, NAME)
    parent, tok = load_model(parent_dir / "model", p.setup_torch())
    library = load_library(lib_dir / "library")
    held_out = dict(rows=p.score_rows, row_len=p.score_len, batch_size=8, seed=p.seed + 1)
    val = load_split(p.run_dir, "val")
    batches, positions = token_batches(tok, val, **held_out, positions=True)
    positions = positions if p.score_tokens == "assistant" else None
    dev = next(parent.parameters()).device
    scores = score_candidates(parent, library, [b.to(dev) for b in batches], progress=p.progress, positions=positions)
    costs, rest_decode_s = price_blocks(p, library, parent.config)
    pd.DataFrame(scores).to_csv(out / "scores.csv", index=False)
    pd.DataFrame(costs).to_csv(out / "costs.csv", index=False)
    cands = to_mip_candidates(scores, costs, score=p.score, cost_keys=("decode_s", "memory_bytes", "params"))
    score_of = {(r["layer"], r["slot"], r["name"]): r[p.score] for r in scores}
    decode_of = {(c["layer"], c["slot"], c["name"]): c["decode_s"] for c in costs}
    slots = sorted({c["slot"] for c in costs})  # ["attention", "ffn"], or ["block"] for a coupled library
    parent_time = sum(decode_of[(i, slot, PARENT_NAMES[slot])]
                      for i in range(parent.config.num_hidden_layers) for slot in slots)
    parent_cost = {key: sum(c[key] for c in costs if c["name"] == PARENT_NAMES[c["slot"]])
                   for key in ("memory_bytes", "params")}
    fixed_budgets = {key: frac * parent_cost[key] for key, frac in
                     (("memory_bytes", p.memory_budget), ("params", p.param_budget)) if frac > 0}

    test = first_per_domain(load_split(p.run_dir, "test"), p.eval_n)
    n_layers = parent.config.num_hidden_layers

    def measure(model) -> dict:
        rows = evaluate(model, tok, test, modes=("off",), max_new_tokens=p.eval_max_new_tokens, progress=False)
        acc = summarize(rows)
        rounds = decode_throughput_rounds(model, p.batch_size, p.prompt_len, p.decode_len, p.timing_repeats)
        return {"accuracy": next(s["accuracy"] for s in acc if s["domain"] == "all"),
                "math_accuracy": sum(r["correct"] for r in rows if r["domain"] == "math") / max(1, sum(r["domain"] == "math" for r in rows)),
                "tokens_per_s": statistics.median(rounds), "tokens_per_s_spread": [min(rounds), max(rounds)]}

    def priced_speedup(blocks_s: float) -> float:
        return (parent_time + rest_decode_s) / (blocks_s + rest_decode_s) if blocks_s + rest_decode_s > 0 else math.inf

    # The parent is measured as an all-parent nemotron-nas model: the same code path as every child, so
    # the speed-ups compare architectures, not model classes.
    parent_nas = assemble(parent, {}, library)
    parent_row = {"kind": "parent", "label": "parent", "budget": 1.0, **measure(parent_nas), "objective": 0.0,
                  "status": "", "solve_time_s": 0.0, "priced_decode_fraction": 1.0, "priced_speedup": 1.0,
                  "architecture": describe({}, n_layers)}
    frontier = [parent_row]
    names = {s: sorted({n.get(s) for c in cands for n in [split_name(c.slot, c.name)]} - {None}) for s in ("attention", "ffn")}
    jobs = [("puzzle", f"budget {b:.2f}", b, None) for b in p.budgets if b < 1.0]
    if p.baselines:
        jobs += [("baseline", label, None, ch) for label, ch in baseline_choices(n_layers, names).items()]
    def add_child(row: dict, choice: dict, save: bool):
        blocks_s = sum(decode_of[(i, slot, choice.get((i, slot), PARENT_NAMES[slot]))]
                       for i in range(n_layers) for slot in slots)
        row["priced_decode_fraction"] = blocks_s / parent_time
        row["priced_speedup"] = priced_speedup(blocks_s)
        child = assemble(parent, choice, library)
        row.update(measure(child), architecture=describe(choice, n_layers))
        if save:
            save_model(child, tok, out / "children" / row["label"].replace(" ", "_").replace("#", "alt"))
        frontier.append(row)

    for kind, label, budget, choice in progress_bar(jobs, desc="children", disable=not p.progress):
        row = {"kind": kind, "label": label, "budget": budget, "status": "", "solve_time_s": 0.0}
        if kind == "baseline":
            if slots == ["block"]:
                choice = couple_choice(choice, n_layers)
            row["objective"] = sum(score_of[(*k, v)] for k, v in choice.items())
            add_child(row, choice, save=False)
            continue
        try:
            sols = solve_diverse(cands, p.diverse_k, min_differences=p.min_differences, solver=p.solver,
                                 budgets={"decode_s": budget * parent_time, **fixed_budgets},
                                 max_attention_layers=None if p.max_attention_layers < 0 else p.max_attention_layers)
        except InfeasibleBudget as e:
            frontier.append({**row, "status": f"infeasible: {e}"})
            continue
        for j, sol in enumerate(sols):
            alt = {**row, "label": label if j == 0 else f"{label} #{j + 1}", "kind": "puzzle" if j == 0 else "puzzle_alt",
                   "status": sol.status, "solve_time_s": sol.solve_time_s, "objective": sol.objective}
            add_child(alt, {k: c.name for k, c in sol.choice.items()}, save=True)
    # The parent is timed again after the children and its faster round kept: every speed-up divides by
    # this one number, and a round that ran slow measured the machine, not the model (the tiny run once
    # timed the parent at 1,966 tokens/s here and at 3,220 in stage 04). Conservative: children get one round.
    rounds = [parent_row["tokens_per_s"], decode_throughput(parent_nas, p.batch_size, p.prompt_len, p.decode_len,
                                                            p.timing_repeats)]
    parent_row.update(tokens_per_s=max(rounds), tokens_per_s_rounds=rounds)
    for r in frontier:
        r["speedup"] = r.get("tokens_per_s", float("nan")) / parent_row["tokens_per_s"]
        if "tokens_per_s_spread" in r:  # the child's own spread over repeats, against the parent's one figure
            r["speedup_spread"] = [t / parent_row["tokens_per_s"] for t in r["tokens_per_s_spread"]]
        r["accuracy_kept"] = (r.get("accuracy", math.nan) / parent_row["accuracy"]
                              if parent_row["accuracy"] > 0 else math.nan)  # an untrained smoke parent
    flat = [{k: v for k, v in r.items() if k != "architecture"} for r in frontier]
    pd.DataFrame(flat).to_csv(out / "frontier.csv", index=False)
    return {"scores": scores, "costs": costs, "frontier": frontier, "parent": parent_row, "candidates": cands,
            "parent_cost": {"decode_s": parent_time, **parent_cost}, "fixed_budgets": fixed_budgets}


def solve_at(result: dict, budget: float, p: Params) -> dict:
    """The MIP's child at a decode-time ``budget`` (fraction of the parent's) under the stage's other budgets,
    without assembling it: its architecture and priced costs as fractions of the parent's. For the explorer
    (milliseconds per solve); raises :class:`~lnkit.puzzle.mip.InfeasibleBudget` like the sweep."""
    pc = result["parent_cost"]
    sol = solve(result["candidates"], budgets={"decode_s": budget * pc["decode_s"], **result["fixed_budgets"]},
                solver=p.solver, max_attention_layers=None if p.max_attention_layers < 0 else p.max_attention_layers)
    n_layers = 1 + max(layer for layer, _ in sol.choice)
    return {"architecture": describe({k: c.name for k, c in sol.choice.items()}, n_layers),
            "objective": sol.objective, "status": sol.status, "solve_time_s": sol.solve_time_s,
            **{f"{k}_fraction": sol.costs[k] / pc[k] for k in pc if pc[k] > 0}}


def explore_budget(result: dict, budget: float, p: Params):
    """For the explorer's slider: ``(figure or None, text)``: the MIP's child at ``budget`` as a per-layer
    heatmap, its priced costs, and its measured speed and accuracy when the sweep assembled that budget."""
    try:
        s = solve_at(result, budget, p)
    except InfeasibleBudget as e:
        return None, str(e)
    fig, ax = plt.subplots(figsize=(7, 1.8))
    plots.architecture(s["architecture"], ax, f"budget {budget:.2f}: summed {p.score} {s['objective']:.3f}")
    lines = [f"priced decode time {s['decode_s_fraction']:.0%}, memory {s['memory_bytes_fraction']:.0%}, "
             f"parameters {s['params_fraction']:.0%} of the parent's; MIP {s['status']} in {s['solve_time_s'] * 1e3:.0f} ms"]
    measured = {r["budget"]: r for r in result["frontier"] if r["kind"] == "puzzle" and "accuracy" in r}
    r = measured.get(round(budget, 2))
    kept = (f"{r['accuracy_kept']:.0%} of the parent's accuracy" if r and math.isfinite(r["accuracy_kept"])
            else "accuracy not comparable (the parent scores 0)")
    lines.append(f"measured: {r['speedup']:.2f}x decode throughput, {kept}"
                 if r else "not assembled in the sweep (budgets: " + ", ".join(f"{b:.2f}" for b in sorted(measured)) + ")")
    return fig, "\n".join(lines)
