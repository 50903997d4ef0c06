"""Stage 05: the reasoning SFT data (paper Section 3), from teacher to blend.

Draws a pool of training prompts from the tiny world (the paper harvested AoPS, TACO, ...; here a fresh
draw from the training split, plus a few copies of evaluation problems standing for the benchmark
problems a web harvest contains), has the teacher write ``k`` thinking-on solutions per prompt and the
parent one greedy thinking-off answer, curates them (:func:`lnkit.curation.curate`), draws the blend
and writes it in the released data set's schema (:mod:`lnkit.data.released`) to
``<run_dir>/05_reasoning_data/sft.jsonl``, with ``report.json`` / ``report.csv`` (the funnel and the
blend table) and the funnel figure.

Notebook: ``notebooks/05_reasoning_data.ipynb``; the filters and the blend are :mod:`lnkit.curation`.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lnkit import stage
from lnkit.checkpoints import load_model, model_dir, stage_dir, stage_named
from lnkit.curation import (
    DEFAULT_RATIOS,
    REFERENCE,
    CurationError,
    Sample,
    blend,
    blend_targets,
    curate,
    leaked_prompts,
    model_teacher,
    off_responses,
    prompts_needed,
    reference_teacher,
)
from lnkit.data.chat import split_response
from lnkit.data.released import make_row, write_rows
from lnkit.data.splits import load_split, load_world, make_split
from lnkit.data.tasks import DOMAINS
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json, atomic_write_text, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.verify import check

NAME = "05_reasoning_data"


@dataclass
class Params(RunParams):
    """Stage 05 parameters (fields match ``notebooks/05_reasoning_data.ipynb``'s parameters cell).

    Teacher: ``teacher`` ("reference", or a Hugging Face model folder: absolute, relative to ``run_dir``,
    or a stage name whose ``model/`` to use), ``k``, ``error_rate`` (reference teacher only),
    ``teacher_max_new_tokens``, ``teacher_temperature``. Off-mode responses: ``off_model`` (a stage name
    or model folder, or "reference" for the items' direct answers), ``off_max_new_tokens``, ``off_margin``.
    Curation:
    ``leak_fraction``, ``goldless_domains``, ``decontam_n``, ``decontam_threshold``, ``workers``. Blend:
    ``blend_size``, ``min_examples``, ``domain_ratios``, ``off_fraction``, ``math_level_weights``,
    ``prompt_margin``.
    """

    STAGE = NAME
    teacher: str = param("reference", "'reference' (the tiny world's solver) or a causal-LM folder sampled k times")
    k: int = param(4, "teacher samples per prompt", lo=1, hi=64)
    error_rate: float = param(0.2, "chance that a reference-teacher sample carries a mistake", lo=0.0, hi=1.0)
    teacher_max_new_tokens: int = param(256, "generation limit of a model teacher", lo=8)
    teacher_temperature: float = param(0.6, "sampling temperature of a model teacher (the paper's 0.6)", lo=0.0, hi=2.0)
    off_model: str = param("00_parent", "writes the thinking-off answers: a stage name, a model folder, or 'reference'")
    off_max_new_tokens: int = param(64, "generation limit of thinking-off answers", lo=4)
    off_margin: float = param(1.2, "thinking-off answers generated per domain: this x its off target / the off "
                              "model's measured accuracy there", lo=1.0, hi=100.0)
    leak_fraction: float = param(0.02, "share of the prompt pool that copies evaluation problems", lo=0.0, hi=0.5)
    goldless_domains: list[str] = param(["chat"], "domains judged by majority vote instead of gold", choices=list(DOMAINS))
    decontam_n: int = param(8, "word n-gram length of the decontamination check", lo=1, hi=50)
    decontam_threshold: float = param(0.8, "share of a prompt's n-grams one evaluation prompt may hold", lo=0.0, hi=1.0)
    workers: int = param(4, "sandbox runs at once when verifying code", lo=1, hi=64)
    blend_size: int = param(4000, "training examples in the blend, shared by domain_ratios", lo=1)
    min_examples: int = param(150, "floor per domain with a share: Table 2's smallest categories still hold "
                              "tens of thousands", lo=0)
    domain_ratios: dict[str, float] = param(dict(DEFAULT_RATIOS), "share of each domain in the blend (normalised)", lo=0.0)
    off_fraction: float = param(0.3, "share of thinking-off examples in each domain", lo=0.0, hi=1.0)
    math_level_weights: list[float] = param([1.0, 1.0, 1.0, 1.0, 1.0], "relative share of math levels 1..5", lo=0.0)
    prompt_margin: float = param(1.1, "prompts drawn per domain, as a multiple of its larger mode target", lo=1.0, hi=20.0)

    def check(self):
        bad = sorted(set(self.domain_ratios) - set(DOMAINS))
        if bad:
            raise ParamError(f"stage {self.STAGE}: domain_ratios names unknown domain(s) {bad}; allowed: {list(DOMAINS)}")
        if not any(self.domain_ratios.values()):
            raise ParamError(f"stage {self.STAGE}: domain_ratios={self.domain_ratios} are all zero")
        if len(self.math_level_weights) != 5 or not any(self.math_level_weights):
            raise ParamError(f"stage {self.STAGE}: math_level_weights={self.math_level_weights} must be 5 "
                             "non-negative numbers (levels 1..5), not all zero")
        for name in ("teacher", "off_model"):
            v = getattr(self, name)
            if not v:
                raise ParamError(f"stage {self.STAGE}: {name} is empty; give 'reference', a stage name or a model folder")
            if Path(v).is_absolute() and not Path(v).is_dir():
                raise ParamError(f"stage {self.STAGE}: {name}={v!r} is not a folder")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): the thinking-off answers of ``off_model``, and ``k``
    reasoning traces per prompt when the teacher is a model (the reference teacher generates nothing)."""
    gen = p.blend_size * p.off_fraction * p.off_max_new_tokens
    if p.teacher != "reference":
        gen += p.blend_size * p.k * p.teacher_max_new_tokens
    return Work(generate=gen, gen_len=max(p.off_max_new_tokens, p.teacher_max_new_tokens))


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads: the world's, and those its teacher and off-mode model name."""
    return list(dict.fromkeys(["00_parent", *filter(None, map(stage_named, (p.teacher, p.off_model)))]))


def run(p: Params) -> dict:
    """The whole stage: generate, curate, blend. Returns the report plus ``"metrics"`` and the blend ``"rows"``."""
    stage.check_inputs(p, needs(p))
    stage.start(p)
    report = run_curation(p)
    rows = report.pop("rows")
    report["metrics"] = {
        "funnel": {r["filter"]: r["removed"] for r in report["funnel"]},
        "responses_generated": report["funnel"][0]["after"],
        "responses_kept": report["funnel"][-1]["after"],
        "blend_examples": len(rows),
        "blend_short": {f"{r['domain']}/{r['mode']}": r["short"] for r in report["blend"] if r["short"]},
        "blend_on_fraction": round(sum(r["reasoning"] == "on" for r in rows) / len(rows), 4),
        "audit": report["audit"],
        "seconds": report["seconds"],
    }
    report["rows"] = rows
    return report


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"responses_generated": 22770, "responses_kept": 6019, "blend_examples": 4272,
    ...           "blend_on_fraction": 0.7})
    '6,019 of 22,770 responses kept; blend of 4,272 (70% thinking on)'
    """
    return (f"{metrics['responses_kept']:,} of {metrics['responses_generated']:,} responses kept; blend of "
            f"{metrics['blend_examples']:,} ({metrics['blend_on_fraction']:.0%} thinking on)")


def off_pass_rates(P: Params) -> dict[str, float]:
    """The off-mode model's accuracy per domain, thinking off, from its stage's evaluation summary (stage
    00 writes one), averaged over difficulty levels as the prompt pool draws them; {} when there is none."""
    path = stage_dir(P.run_dir, P.off_model) / "eval_summary.json"
    if P.off_model == "reference" or not path.is_file():
        return {}
    rows = [s for s in read_json(path) if s["mode"] == "off" and s["domain"] in DOMAINS]
    out = {}
    for d in DOMAINS:
        levels = {int(s["difficulty"]): s["accuracy"] for s in rows if s["domain"] == d}
        weights = {lvl: (P.math_level_weights[lvl - 1] if d == "math" else 1.0) for lvl in levels}
        if levels and sum(weights.values()):
            out[d] = sum(levels[lvl] * weights[lvl] for lvl in levels) / sum(weights.values())
    return out


def prompt_pool(P: Params):
    """Fresh training prompts for every domain of the blend, plus the leaked evaluation problems.
    Returns (targets, pool, thinking-off prompts per domain, evaluation items)."""
    targets = blend_targets(P.blend_size, P.domain_ratios, P.off_fraction, P.min_examples)
    need, n_off = prompts_needed(targets, P.prompt_margin, P.off_margin, off_pass_rates(P))
    world = load_world(P.run_dir)
    # A seed of its own: these are not the parent's training prompts (the paper's SFT prompts were new).
    prompts = make_split(world, "train", {d: n for d, n in need.items() if n > 0}, seed=f"{P.seed}-sft",
                         level_weights={"math": P.math_level_weights})
    prompts = [type(it)(**{**it.to_dict(), "id": "sft-" + it.id}) for it in prompts]
    evals = load_split(P.run_dir, "val") + load_split(P.run_dir, "test")
    leaks = leaked_prompts(evals, math.ceil(P.leak_fraction * len(prompts)) if P.leak_fraction else 0, seed=P.seed)
    return targets, prompts + leaks, n_off, evals


def off_prompts(pool, n_off: dict[str, int]) -> list:
    """The prompts that get a thinking-off answer: the first ``n_off[d]`` of each domain (the pool cycles
    through difficulty levels, so every level is represented) and every leaked prompt."""
    seen: dict[str, int] = {}
    out = []
    for it in pool:
        if it.id.startswith("leak-") or seen.get(it.domain, 0) < n_off.get(it.domain, 0):
            out.append(it)
            seen[it.domain] = seen.get(it.domain, 0) + (not it.id.startswith("leak-"))
    return out


def generate_samples(P: Params, pool, n_off: dict[str, int], device: str = "cpu") -> list[Sample]:
    """The teacher's thinking-on samples for every prompt and the off-mode model's answers for
    :func:`off_prompts`."""
    if P.teacher == "reference":
        on = reference_teacher(pool, P.k, P.error_rate, seed=P.seed)
    else:
        path = model_dir(P.run_dir, P.teacher)
        model, tok = load_model(path, device)
        on = model_teacher(model, tok, pool, P.k, name=path.name, max_new_tokens=P.teacher_max_new_tokens,
                           temperature=P.teacher_temperature, seed=P.seed, progress=P.progress)
    pool_off = off_prompts(pool, n_off)
    if P.off_model == "reference":
        off = [Sample(it, "off", it.direct, REFERENCE, "") for it in pool_off]
    else:
        path = model_dir(P.run_dir, P.off_model)
        model, tok = load_model(path, device)
        name = P.off_model if stage_dir(P.run_dir, P.off_model) / "model" == path else path.name
        off = off_responses(model, tok, pool_off, name=name, max_new_tokens=P.off_max_new_tokens, progress=P.progress)
    return on + off


def run_curation(P: Params) -> dict:
    """Generate, curate, blend and write the stage's artifacts; return the report (with the blend's ``rows``)."""
    out = stage_dir(P.run_dir, NAME)
    device = P.setup_torch()
    t0 = time.perf_counter()
    targets, pool, n_off, evals = prompt_pool(P)
    samples = generate_samples(P, pool, n_off, device)
    t_gen = time.perf_counter() - t0
    kept, funnel = curate(samples, eval_items=evals, goldless=tuple(P.goldless_domains), decontam_n=P.decontam_n,
                          decontam_threshold=P.decontam_threshold, workers=P.workers, progress=P.progress)
    chosen, table = blend(kept, targets, level_weights={"math": P.math_level_weights}, seed=P.seed)
    if not chosen:
        raise CurationError(f"the blend is empty: no curated response matches a domain with a share in "
                            f"domain_ratios={P.domain_ratios} (curated domains: {sorted({s.item.domain for s in kept})})")
    rows = [make_row(s.item.prompt, s.output, s.mode, s.item.domain, s.generator) for s in chosen]
    write_rows(rows, out / "sft.jsonl")
    report = {
        "prompts": {"drawn": sum(not it.id.startswith("leak-") for it in pool),
                    "leaked": sum(it.id.startswith("leak-") for it in pool)},
        "responses": {m: sum(s.mode == m for s in samples) for m in ("on", "off")},
        "funnel": funnel,
        "blend": table,
        "audit": audit(kept, chosen, tuple(P.goldless_domains)),
        "seconds": {"generate": round(t_gen, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.csv", funnel_csv(funnel))
    return {**report, "rows": rows}


def audit(kept: list[Sample], chosen: list[Sample], goldless: tuple[str, ...]) -> dict:
    """What curation could not see but the tiny world can: leaked prompts left, mistakes of the reference
    teacher left, and answers of gold-less domains (judged by majority vote) that are wrong by gold.
    Responses of the other domains passed verification against gold, so they are right by construction."""
    voted = [s for s in chosen if s.item.domain in goldless]
    return {
        "leaked_prompts_kept": sum(s.item.id.startswith("leak-") for s in kept),
        "mistakes_in_blend": sum(bool(s.corruption) for s in chosen),
        "voted_in_blend": len(voted),
        "voted_wrong_by_gold": sum(not check(split_response(s.output)[1], s.item) for s in voted),
        "blend_examples": len(chosen),
    }


def funnel_csv(funnel: list[dict]) -> str:
    buf = io.StringIO()
    cols = ["filter", "before", "removed", "after", "removed_on", "removed_off", "mistakes_left", "removed_by_mistake"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in funnel:
        w.writerow({**r, "removed_by_mistake": " ".join(f"{k}={v}" for k, v in r["removed_by_mistake"].items())})
    return buf.getvalue()
