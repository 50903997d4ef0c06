"""Stage 10: every paper figure and table the tiny world can reproduce, from the run folders alone.

No training and no generation: each figure is drawn from the files earlier stages wrote, as PNG and SVG, in
``<run_dir>/10_paper_figures/`` and in ``figures_dir`` (the tiny run: the README's ``figures/``), and
``REPORT.md`` puts one row per paper claim beside what this run measured and whether the conclusion holds
here.

=================================  ===========================  ===========================================
figure                             paper                        drawn from
=================================  ===========================  ===========================================
``fig2_4_accuracy_vs_throughput``  Figures 2 and 4              stage 09 (accuracy and measured speed)
``fig3_puzzle_frontier``           Figure 3                     stage 02 (children and uniform baselines)
``table1_recovery``                Table 1                      stage 04 (before and after KD + CPT)
``table3_5_on_off``                Tables 3 and 5               stage 09 (on/off accuracy and length)
``fig5_grpo_accuracy``             Figure 5                     stage 07 (held-out accuracy during GRPO)
``fig6_curriculum_vs_random``      Figure 6                     the GRPO sweep (``sweep``)
``section6_alignment``             Section 6                    stage 08 (IFEval and win rate per phase)
=================================  ===========================  ===========================================

plus the deployment claims recomputed from the released configs (:func:`lnkit.deploy.paper_claims`). A
figure whose stage has not completed is skipped with a note naming the stage and the command that runs it;
the others are drawn.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from lnkit import deploy, plots, stage
from lnkit.checkpoints import MARKER, stage_dir
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json, atomic_write_text, read_json
from lnkit.params import RunParams, param

NAME = "10_paper_figures"


@dataclass
class Params(RunParams):
    """Stage 10 parameters (fields match ``notebooks/10_paper_figures.ipynb``'s parameters cell)."""

    STAGE = NAME
    sweep: str = param("../grpo_sweep", "the GRPO sweep's folder (Figure 6), relative to run_dir")


def work(p: Params, run: dict, config: dict) -> Work:
    """This stage draws from files: no GPU work (:mod:`lnkit.gpuhours`)."""
    return Work()


def needs(p: Params) -> list[str]:
    return []  # draws what is there; a missing stage is a note, not an error


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"drawn": ["a", "b"], "skipped": {"c": "..."}, "claims": 9, "holds": 5})
    '2 figures drawn, 1 skipped; 5 of 9 claims hold here'
    """
    return (f"{len(metrics['drawn'])} figures drawn, {len(metrics['skipped'])} skipped; "
            f"{metrics['holds']} of {metrics['claims']} claims hold here")


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_file(p: Params) -> str:
    """The run file that made ``run_dir`` (named in notes), from the copy the runner keeps there."""
    import yaml

    try:
        name = yaml.safe_load((Path(p.run_dir) / "run.yaml").read_text())["run"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "<run file>"
    return f"papermill_runs/{name}.yaml"


def done(p: Params, name: str) -> bool:
    return (stage_dir(p.run_dir, name) / MARKER).is_file()


def sweep_variants(p: Params) -> tuple[dict, dict]:
    """The sweep's finished stage-07 variants: ``{name: folder}`` and ``{name: {"order", "seed"}}``."""
    root = Path(p.run_dir) / p.sweep if p.sweep else None
    folders, params = {}, {}
    for d in sorted(root.iterdir()) if root and root.is_dir() else []:
        if (d / "07_grpo" / MARKER).is_file():
            pp = read_json(d / "07_grpo" / "params.json")["params"]
            folders[d.name] = d
            params[d.name] = {"order": pp["order"], "seed": pp["seed"]}
    return folders, params


def two_panels(rows):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, mode in zip(axes, ("on", "off")):
        plots.accuracy_vs_throughput(rows, "all", mode, ax=ax, title=f"thinking {mode}")
    fig.suptitle("Figures 2/4 analog: every checkpoint's pass@1 (all domains) against measured decode throughput")
    fig.tight_layout()
    return fig


def figure_specs(p: Params) -> dict:
    """name -> (what it needs, a function drawing it). ``needs`` is a stage name or ``"sweep"``."""
    d = lambda s: stage_dir(p.run_dir, s)  # noqa: E731
    return {
        "fig2_4_accuracy_vs_throughput": ("09_evaluation", lambda: two_panels(_csv(d("09_evaluation") / "results.csv"))),
        "fig3_puzzle_frontier": ("02_architecture_search", lambda: plots.frontier(
            read_json(d("02_architecture_search") / "frontier.json"),
            "Figure 3 analog: Puzzle children vs uniform baselines (before distillation)")),
        "table1_recovery": ("04_distillation", lambda: plots.distillation_table(
            read_json(d("04_distillation") / "table.json"), "Table 1 analog: accuracy before and after KD + CPT")),
        "table3_5_on_off": ("09_evaluation", lambda: plots.evaluation_table(
            _csv(d("09_evaluation") / "results.csv"), "Tables 3/5 analog: every checkpoint, reasoning on and off")),
        "fig5_grpo_accuracy": ("07_grpo", lambda: plots.grpo_accuracy(
            _csv(d("07_grpo") / "eval_curve.csv"), "Figure 5 analog: held-out accuracy during GRPO")),
        "fig6_curriculum_vs_random": ("sweep", lambda: plots.grpo_curriculum_vs_random(*sweep_variants(p))),
        "section6_alignment": ("08_alignment", lambda: plots.alignment_phases(
            _csv(d("08_alignment") / "phases.csv"), "Section 6 analog: IFEval after RLOO, win rate per RPO round")),
    }


def missing_note(p: Params, need: str) -> str | None:
    if need == "sweep":
        if not p.sweep:
            return "no sweep named (parameter sweep is empty)"
        return None if sweep_variants(p)[0] else (
            f"no finished GRPO sweep in {p.sweep} (beside the run folder): python -m lnkit.sweeps "
            "papermill_runs/grpo_sweep.yaml (about 14 minutes after the tiny run)")
    if not done(p, need):
        return f"stage {need} has not completed in run {Path(p.run_dir).name}: python -m lnkit.runs {run_file(p)} --until {need}"
    return None


# ---------------------------------------------------------------------------------------------- claims


def _pct(x) -> str:
    return f"{100 * float(x):.1f}%"


def claims(p: Params) -> list[dict]:
    """One row per paper claim this run can test: what the paper reports, what was measured here, whether
    the conclusion holds here (``yes``, ``no``, ``not shown``: the effect is inside the noise), and where
    the figure comes from. A claim whose stage is missing is listed as not measured."""
    out = []

    def add(claim, paper, source, compute):
        need = source.split(" ")[0]
        note = missing_note(p, need) if need in ("sweep",) or need[:2].isdigit() else None
        if note:
            out.append({"claim": claim, "paper": paper, "measured": "not measured: " + note, "holds": "-",
                        "source": source})
            return
        measured, holds = compute()
        out.append({"claim": claim, "paper": paper, "measured": measured, "holds": holds, "source": source})

    def frontier():
        rows = read_json(stage_dir(p.run_dir, "02_architecture_search") / "frontier.json")
        pz = [r for r in rows if r["kind"] == "puzzle" and "tokens_per_s" in r]
        base = [r for r in rows if r["kind"] == "baseline" and "tokens_per_s" in r]
        wins = 0
        for b in base:
            rivals = [r["accuracy"] for r in pz if r["tokens_per_s"] >= 0.95 * b["tokens_per_s"]]
            wins += bool(rivals) and max(rivals) >= b["accuracy"]
        return (f"a Puzzle child at least as fast (within 5%) is at least as accurate as {wins} of {len(base)} "
                "uniform baselines", "yes" if base and wins == len(base) else "no")

    add("Puzzle's per-layer search beats uniform compression at equal speed (Figure 3)",
        "MIP-chosen heterogeneous blocks trace a better accuracy-throughput frontier",
        "02_architecture_search frontier.json", frontier)

    def recovery():
        t = read_json(stage_dir(p.run_dir, "04_distillation") / "table.json")
        par = next(r for r in t if r["phase"] == "parent")
        bef = next(r for r in t if r["phase"] == "before")
        aft = next(r for r in t if r["phase"] == "after")
        if not par["all"]:
            return "the parent scores 0: no share of it to recover", "-"
        kept = aft["all"] / par["all"]
        return (f"{_pct(bef['all'] / par['all'])} -> {_pct(kept)} of the parent's accuracy at "
                f"{aft['speedup']:.2f}x its measured decode speed", "yes" if kept >= 0.9 else "no")

    add("Distillation and continued pretraining recover the compressed model (Table 1)",
        "LN-Ultra-CPT meets or beats Llama-3.1-405B (MATH500 80.4 vs 69.6)", "04_distillation table.json", recovery)

    def results():
        return _csv(stage_dir(p.run_dir, "09_evaluation") / "results.csv")

    def get(rows, model, domain, mode, metric):
        return next((r for r in rows if (r["model"], r["domain"], r["mode"], r["metric"]) ==
                     (model, domain, mode, metric)), None)

    def final_vs_parent():
        rows = results()
        models = list(dict.fromkeys(r["model"] for r in rows))
        par, fin = models[0], models[-1]
        a0, a1 = get(rows, par, "all", "on", "pass@1"), get(rows, fin, "all", "on", "pass@1")
        s1 = get(rows, fin, "speed", "-", "decode_tok_s_vs_parent")
        faster = float(s1["value"]) > 1
        d = 100 * (float(a1["value"]) - float(a0["value"]))
        if float(a1["low"]) > float(a0["high"]):
            holds = "yes" if faster else "no (more accurate, not faster)"
        elif float(a1["high"]) < float(a0["low"]):
            holds = "no (less accurate)"
        else:
            holds = f"not shown ({'faster; ' if faster else ''}accuracy {d:+.1f} points, the intervals overlap)"
        return (f"{a1['label']}: pass@1 (on) {_pct(a1['value'])} [{_pct(a1['low'])}-{_pct(a1['high'])}] against the "
                f"parent's {_pct(a0['value'])} [{_pct(a0['low'])}-{_pct(a0['high'])}], at {float(s1['value']):.2f}x its "
                "measured decode throughput", holds)

    add("The final model is both faster and more accurate than its parent (Figures 2 and 4)",
        "LN-Ultra beats Llama-3.1-405B and DeepSeek-R1 in accuracy and efficiency", "09_evaluation results.csv",
        final_vs_parent)

    def toggle():
        rows = results()
        sft = "06_reasoning_sft"
        math_on, math_off = get(rows, sft, "math", "on", "pass@1"), get(rows, sft, "math", "off", "pass@1")
        t_on, t_off = get(rows, sft, "all", "on", "tokens"), get(rows, sft, "all", "off", "tokens")
        c_on, c_off = get(rows, sft, "all", "on", "compliance"), get(rows, sft, "all", "off", "compliance")
        if not all((math_on, math_off, t_on, t_off, c_on, c_off)):
            return "stage 09 did not evaluate 06_reasoning_sft", "-"
        measured = (f"SFT model: compliance {_pct(c_on['value'])} on / {_pct(c_off['value'])} off; "
                    f"{float(t_on['value']):.0f} tokens on vs {float(t_off['value']):.0f} off; math pass@1 "
                    f"{_pct(math_on['value'])} on vs {_pct(math_off['value'])} off")
        gain = float(math_on["low"]) > float(math_off["high"])
        return measured, ("toggle yes; reasoning gain no" if not gain else "yes")

    add("One model, a reasoning toggle: thinking on reasons at length and scores higher on reasoning tasks (Table 3)",
        "off-mode is shorter and sometimes less accurate; e.g. LN-Nano MATH500 95.4% with thinking on",
        "09_evaluation results.csv", toggle)

    def grpo():
        t = read_json(stage_dir(p.run_dir, "07_grpo") / "metrics.json")["target"]
        holds = "yes" if t["low"] > 0 else "no" if t["high"] < 0 else "not shown (inside the noise)"
        return (f"target cells {_pct(t['start'])} -> {_pct(t['final'])} ({100 * t['change']:+.1f} points, 95% CI "
                f"{100 * t['low']:+.1f}..{100 * t['high']:+.1f})", holds)

    add("GRPO raises reasoning accuracy steadily (Figure 5)", "GPQA-Diamond rises through LN-Ultra's RL",
        "07_grpo metrics.json", grpo)

    def curriculum():
        folders, params = sweep_variants(p)
        change = {}
        for n, f in folders.items():
            t = read_json(f / "07_grpo" / "metrics.json")["target"]
            change.setdefault(params[n]["order"], []).append(t["change"])
        cur, rnd = change.get("curriculum", []), change.get("random", [])
        if not cur or not rnd:
            return "the sweep lacks one of the two orders", "-"
        separated = min(cur) > max(rnd)
        return (f"target change, curriculum {', '.join(f'{100 * x:+.1f}' for x in cur)} vs random "
                f"{', '.join(f'{100 * x:+.1f}' for x in rnd)} points (means {100 * statistics.mean(cur):+.1f} vs "
                f"{100 * statistics.mean(rnd):+.1f})",
                "yes" if separated else "direction only (ranges overlap)" if statistics.mean(cur) > statistics.mean(rnd)
                else "no")

    add("The pass-rate curriculum beats random batching (Figure 6)", "higher, steadier accuracy with the curriculum",
        "sweep 07_grpo metrics.json", curriculum)

    def rloo():
        m = read_json(stage_dir(p.run_dir, "08_alignment") / "metrics.json")["ifeval"]
        parts = [f"{mode} {_pct(m[mode]['start'])} -> {_pct(m[mode]['after_rloo'])}" for mode in ("on", "off")]
        gains = [m[mode]["after_rloo"] - m[mode]["start"] for mode in ("on", "off")]
        return ("IFEval prompt-level strict after RLOO: " + ", ".join(parts),
                "yes" if min(gains) >= 0.05 else "partly" if max(gains) > 0 else "no")

    add("A short RLOO run lifts instruction following (Section 6.1)", "IFEval up to 89.2 for LN-Super",
        "08_alignment metrics.json", rloo)

    def rpo():
        m = read_json(stage_dir(p.run_dir, "08_alignment") / "metrics.json")
        lo = {mode: m["win_interval"][mode][0] for mode in ("on", "off")}
        parts = [f"{mode} {_pct(m['win_rate'][mode])} [{_pct(m['win_interval'][mode][0])}-"
                 f"{_pct(m['win_interval'][mode][1])}]" for mode in ("on", "off")]
        return ("gold-judged win rate vs the SFT model's answers after two RPO rounds: " + ", ".join(parts) +
                f"; DPO on the same pairs {_pct(m['dpo_win_rate']['on'])} / {_pct(m['dpo_win_rate']['off'])}",
                "yes" if min(lo.values()) > 0.5 else "partly" if max(lo.values()) > 0.5 else "not shown")

    add("Online RPO against a reward model lifts chat quality (Section 6.2)", "Arena-Hard 69.1 -> 88.1 (LN-Super)",
        "08_alignment metrics.json", rpo)

    for c in deploy.paper_claims():
        if c["paper_figure"] is None:  # context rows (the parents), not claims
            continue
        out.append({"claim": c["claim"], "paper": f"{c['paper_figure']:,} {c['unit']}",
                    "measured": f"{c['reproduced_figure']:,.{0 if c['unit'] == 'tokens' else 2}f} {c['unit']} "
                                f"({c['assumptions'].split(';')[0]})",
                    "holds": "yes" if c["within_tolerance"] else "no", "source": "lnkit.deploy.paper_claims"})
    return out


def report(p: Params, rows: list[dict], drawn: list[str], skipped: dict[str, str]) -> str:
    lines = ["# The paper's claims on this run", "",
             f"Drawn by stage 10 from the run folder `{Path(p.run_dir).name}` alone (`python -m lnkit.runs {run_file(p)} --only {NAME}`). "
             "'not shown' means the effect points the paper's way but sits inside the 95% interval.", "",
             "| claim | paper | measured here | holds here | from |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['paper']} | {r['measured']} | {r['holds']} | `{r['source']}` |")
    lines += ["", "## Figures", ""]
    lines += [f"![{n}]({n}.png)" for n in drawn]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{n}`: {why}" for n, why in skipped.items()]
    return "\n".join(lines) + "\n"


def run(p: Params) -> dict:
    import matplotlib.pyplot as plt

    out = stage.start(p)
    drawn, skipped = [], {}
    for name, (need, draw) in figure_specs(p).items():
        note = missing_note(p, need)
        if note:
            skipped[name] = note
            continue
        fig = draw()
        for folder in filter(None, (out, p.figures_dir)):
            plots.save(fig, Path(folder) / f"{name}.png", Path(folder) / f"{name}.svg")
        plt.close(fig)
        drawn.append(name)
    rows = claims(p)
    text = report(p, rows, drawn, skipped)
    atomic_write_text(out / "REPORT.md", text)
    if p.figures_dir:
        atomic_write_text(Path(p.figures_dir) / "REPORT.md", text)
    atomic_write_json(out / "claims.json", rows)
    holds = sum(r["holds"] == "yes" for r in rows)
    metrics = {"drawn": drawn, "skipped": skipped, "claims": len(rows), "holds": holds}
    return {"metrics": metrics, "claims": rows, "report": text}
