"""Every figure of the pipeline, drawn from the files stages write (per-step CSV, evaluation summaries,
JSON results), never from live state, so the same figure comes out of JupyterLab, a papermill batch run
or ``make reproduce``, and any of them can be redrawn without recomputing::

    python -m lnkit.plots runs/tiny                  # redraw every figure into its stage folder
    python -m lnkit.plots runs/tiny --figures figures  # ...and into figures/ (the README's)

The drawing functions take plain rows; :data:`FIGURES` maps each figure to its stage, its file name and
the function that reads that stage's files; :func:`draw` is what the notebooks call.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower().startswith("qt"):  # headless machines have no display
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from lnkit.data.tasks import DOMAINS
from lnkit.io import atomic_path, read_json


def save(fig, *paths) -> None:
    """Save ``fig`` atomically to every non-empty path (e.g. the stage folder and ``figures/``)."""
    for p in paths:
        if not p:
            continue
        p = Path(p)
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=p.suffix.lstrip(".") or "png")


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def loss_curve(log_csv: str | Path, title: str = "training loss"):
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="per step")
    ax.plot(steps, smooth(loss, max(1, len(loss) // 50)), lw=1.8, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_by_difficulty(summary: list[dict], title: str = "accuracy by domain and difficulty"):
    """One panel per domain: accuracy against difficulty, a line per mode."""
    domains = sorted({s["domain"] for s in summary if s["domain"] != "all"})
    fig, axes = plt.subplots(1, len(domains), figsize=(2.6 * len(domains), 2.8), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], domains):
        for mode, marker in (("off", "o"), ("on", "s")):
            rows = sorted((s for s in summary if s["domain"] == d and s["mode"] == mode), key=lambda s: s["difficulty"])
            if rows:
                ax.plot([s["difficulty"] for s in rows], [s["accuracy"] for s in rows], marker=marker,
                        label=f"thinking {mode}")
        levels = sorted({s["difficulty"] for s in summary if s["domain"] == d})
        n = next((s["n"] for s in summary if s["domain"] == d and s["mode"] == "off"), None)
        ax.set_title(f"{d}" + (f" (n={n}/level)" if n else ""), fontsize=10)
        ax.set_xticks(levels)
        ax.set_xlim(min(levels) - 0.5, max(levels) + 0.5)
        ax.set_xlabel("difficulty")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass@1")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def library_losses(rows: list[dict], title: str = "block library: loss before and after BLD"):
    """Left: normalised MSE per candidate kind before and after BLD (mean over layers). Right: after BLD,
    per layer and candidate (1.0 = as bad as removing the block)."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    init = [np.mean([float(r["loss_init"]) for r in rows if r["name"] == n]) for n in names]
    bld = [np.mean([float(r["loss_bld"]) for r in rows if r["name"] == n]) for n in names]
    grid = np.full((len(names), len(layers)), np.nan)
    for r in rows:
        grid[names.index(r["name"]), layers.index(int(r["layer"]))] = float(r["loss_bld"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.32 * len(names) + 1.6), gridspec_kw={"width_ratios": [1.2, 1]})
    y = np.arange(len(names))
    a.barh(y - 0.2, init, height=0.4, label="initialised from the parent")
    a.barh(y + 0.2, bld, height=0.4, label="after BLD")
    a.set_yticks(y, names)
    a.invert_yaxis()
    a.set_xlabel("normalised MSE vs the parent sub-block (mean over layers)")
    a.legend(fontsize=8)
    a.grid(axis="x", alpha=0.3)
    im = b.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    b.set_yticks(y, names)
    b.set_xticks(range(len(layers)), layers)
    b.set_xlabel("layer")
    fig.colorbar(im, ax=b, label="normalised MSE after BLD")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def frontier(rows: list[dict], title: str = "Puzzle frontier"):
    """Accuracy against measured decode throughput: Puzzle's children, the baselines, the parent."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    pz = sorted((r for r in rows if r["kind"] == "puzzle" and "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
    ax.plot([r["tokens_per_s"] for r in pz], [r["accuracy"] for r in pz], "o-", label="Puzzle (MIP)")
    alt = [r for r in rows if r["kind"] == "puzzle_alt" and "tokens_per_s" in r]
    if alt:
        ax.scatter([r["tokens_per_s"] for r in alt], [r["accuracy"] for r in alt], facecolors="none",
                   edgecolors="C0", label="Puzzle, next-best distinct solutions")
    for prefix, marker in (("uniform", "s"), ("no attention", "^")):
        base = [r for r in rows if r["kind"] == "baseline" and r["label"].startswith(prefix) and "tokens_per_s" in r]
        ax.scatter([r["tokens_per_s"] for r in base], [r["accuracy"] for r in base], marker=marker,
                   label=f"baseline: {prefix} {'FFN shrink' if prefix == 'uniform' else 'in last layers'}")
    par = next(r for r in rows if r["kind"] == "parent")
    ax.scatter([par["tokens_per_s"]], [par["accuracy"]], marker="*", s=200, c="k", label="parent", zorder=5)
    ax.axvline(2 * par["tokens_per_s"], ls=":", c="grey", lw=1)
    ax.axhline(0.9 * par["accuracy"], ls=":", c="grey", lw=1)
    ax.set_xlabel("measured decode throughput (tokens/s, this CPU)")
    ax.set_ylabel("test accuracy (pass@1, thinking off)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def architecture(layers: list[dict], ax=None, title: str = ""):
    """A two-row heatmap: attention kind and FFN width per layer."""
    att = {"attn_parent": 1.0, "attn_kv2": 0.5, "attn_kv4": 0.25, "attn_linear": 0.1, "attn_noop": 0.0}
    val = [[att.get(r["attention"], 0.5) for r in layers],
           [0.0 if r["ffn"] == "ffn_noop" else 0.05 if r["ffn"] == "ffn_linear" else int(r["ffn"].split("_")[1]) / 100
            for r in layers]]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * len(layers) + 2, 1.6))
    ax.imshow(np.array(val), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for j, r in enumerate(layers):
        ax.text(j, 0, r["attention"].replace("attn_", ""), ha="center", va="center", fontsize=7, color="w")
        ax.text(j, 1, r["ffn"].replace("ffn_", ""), ha="center", va="center", fontsize=7, color="w")
    ax.set_yticks([0, 1], ["attention", "FFN"])
    ax.set_xticks(range(len(layers)))
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    return ax


def dependency(deps: list[dict], groups: list[list[int]], threshold: float, title: str = ""):
    """One heatmap per run: ``D[i, j]`` above the diagonal, each FFN's sequential-vs-parallel distance
    on it; the fused groups outlined."""
    if not deps:
        fig, ax = plt.subplots(figsize=(4.5, 1.6))
        ax.text(0.5, 0.5, "no run of two or more consecutive FFNs:\nnothing to fuse", ha="center", va="center")
        ax.axis("off")
        ax.set_title(title, fontsize=9)
        return fig
    fig, axes = plt.subplots(1, len(deps), figsize=(3.2 * len(deps) + 1.2, 3.4), squeeze=False)
    # the colour scale ends at the threshold (or the largest value): a cell as dark as the bar's top stops a group
    vmax = max(threshold, 1e-3, *(max(max(max(r) for r in d["dependency"]), max(d["parallel"])) for d in deps))
    for ax, d in zip(axes[0], deps):
        L, n = d["layers"], len(d["layers"])
        M = np.full((n, n), np.nan)
        for i in range(n):
            M[i, i] = d["parallel"][i]
            for j in range(i + 1, n):
                M[i, j] = d["dependency"][i][j]
        im = ax.imshow(M, cmap="magma_r", vmin=0, vmax=vmax)
        for i in range(n):
            for j in range(i, n):
                ax.text(j, i, f"{M[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="w" if M[i, j] > vmax / 2 else "k")
        for g in groups:
            if len(g) > 1 and g[0] in L:
                a, b = L.index(g[0]), L.index(g[-1])
                ax.add_patch(Rectangle((a - 0.45, a - 0.45), b - a + 0.9, b - a + 0.9, fill=False, ec="tab:cyan",
                                       lw=2.5, ls="--"))
        ax.set_xticks(range(n), [str(x) for x in L])
        ax.set_yticks(range(n), [str(x) for x in L])
        ax.set_xlabel("FFN j (layer)")
        ax.set_ylabel("FFN i removed (layer)")
    fig.colorbar(im, ax=list(axes[0]), label="cosine distance (mean over tokens)")
    fig.suptitle(title or f"FFN dependency (diagonal: sequential vs parallel); fused groups (cyan) at "
                 f"threshold {threshold}", fontsize=9)
    return fig


def before_after(before: list[dict], after: list[dict], title: str = ""):
    """The child's architecture above the fused one (attention kind, FFN width % of the parent's)."""
    fig, axes = plt.subplots(2, 1, figsize=(0.55 * len(before) + 2.5, 3.4))
    architecture(before, axes[0], "before fusion")
    architecture(after, axes[1], "after fusion (fused FFN in the group's first layer)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def distillation_table(table: list[dict], title: str = "Table 1 analog: accuracy before and after distillation"):
    """Grouped bars per domain (and over all): the parent, then each student before and after."""
    cols = [*DOMAINS, "all"]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 3.6))
    w = 0.8 / len(table)
    for j, r in enumerate(table):
        label = ("parent" if r["phase"] == "parent" else
                 f"{r['model']}, {r['phase']} {r['training']} ({r['speedup']:.2f}x)")
        hatch = "//" if r["phase"] == "before" else None
        ax.bar(np.arange(len(cols)) + (j - (len(table) - 1) / 2) * w, [r[c] for c in cols], w, label=label,
               hatch=hatch, color="k" if r["phase"] == "parent" else f"C{(j + 1) // 2}",
               alpha=0.45 if hatch else 0.9)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test accuracy (pass@1, thinking off)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def student_losses(logs: dict[str, str | Path], title: str = "stage 04: distillation loss"):
    """Per student, the total loss and its logged terms (KL, cosine, LM) against steps, from the CSV logs."""
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.2), squeeze=False, sharey=True)
    for ax, (name, path) in zip(axes[0], logs.items()):
        rows = list(csv.DictReader(open(path)))
        steps = [int(r["step"]) for r in rows]
        for col in ("loss", "kl", "cosine", "lm"):
            xs = [s for s, r in zip(steps, rows) if r.get(col) not in (None, "")]  # kd_cpt: no KL once in CPT
            ys = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
            if ys:
                ax.plot(xs, smooth(ys, max(1, len(ys) // 50)), label=col if col != "loss" else "total")
        switch = [s for s, a, b in zip(steps[1:], rows, rows[1:]) if a.get("kl") and not b.get("kl")]
        for s in switch[:1]:  # kd_cpt: where distillation hands over to continued pretraining
            ax.axvline(s, c="grey", lw=0.8, ls="--", label="KD -> CPT")
        back = [s for s, a, b in zip(steps, rows, rows[1:]) if a.get("rollbacks") != b.get("rollbacks")]
        for s in back:
            ax.axvline(s, c="r", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name + (f" ({len(back)} rollbacks)" if back else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (moving average)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curation_report(report: dict, title: str = "stage 05: curation funnel and blend"):
    """Left: responses left after each filter (removed ones stacked, labelled), then the blend drawn from
    them. Right: the blend, chosen against target per domain and mode."""
    f = report["funnel"] + [{"filter": "blend (the rest not drawn)", "before": report["funnel"][-1]["after"],
                             "after": report["audit"]["blend_examples"]}]
    f[-1]["removed"] = f[-1]["before"] - f[-1]["after"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    y = list(range(len(f)))
    a.barh(y, [r["after"] for r in f], color="tab:blue", label="kept")
    a.barh(y, [r["removed"] for r in f], left=[r["after"] for r in f], color="tab:red", alpha=0.5, label="removed")
    for i, r in enumerate(f):
        if r["removed"]:
            a.text(r["before"], i, f" -{r['removed']:,}", va="center", fontsize=8)
    a.set_yticks(y, [r["filter"] for r in f])
    a.invert_yaxis()
    a.set_xlabel("responses (both modes)")
    a.legend(fontsize=8, loc="lower right")
    a.grid(axis="x", alpha=0.3)
    t = report["blend"]
    labels = [f"{r['domain']} {r['mode']}" for r in t]
    x = list(range(len(t)))
    b.bar([i - 0.2 for i in x], [r["target"] for r in t], width=0.4, label="target", color="tab:gray")
    b.bar([i + 0.2 for i in x], [r["chosen"] for r in t], width=0.4, label="chosen", color="tab:green")
    b.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    b.set_yscale("symlog", linthresh=10)
    b.set_ylabel("examples")
    b.legend(fontsize=8)
    b.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def on_vs_off(summary: list[dict], parent: list[dict], title: str = "stage 06: math accuracy, thinking on vs off"):
    """Math pass@1 by difficulty: the student with thinking on and off, and the parent (thinking off)."""
    def series(rows, mode):
        pts = sorted((int(s["difficulty"]), s["accuracy"]) for s in rows
                     if s["mode"] == mode and s["domain"] == "math" and s["difficulty"] != "all")
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for rows, mode, label, style in ((summary, "on", "SFT student, thinking on", "s-"),
                                     (summary, "off", "SFT student, thinking off", "o-"),
                                     (parent, "off", "parent (stage 00), thinking off", "x--")):
        x, y = series(rows, mode)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set_xlabel("math difficulty (arithmetic steps)")
    ax.set_ylabel("pass@1")
    ax.set_xticks(range(1, 6))
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def grpo_accuracy(curve: list[dict], title: str = "stage 07: held-out accuracy during GRPO"):
    """Figure 5 analog: greedy held-out accuracy against optimizer steps, reasoning on (solid) and off
    (dashed) per RL domain, and the target cells (math 4-5, science 1-3, reasoning on) in black."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = {"math": "C0", "science": "C1", "code": "C2"}
    for (mode, domain), style in [((m, d), "-" if m == "on" else "--") for d in colors for m in ("on", "off")]:
        pts = sorted((int(r["step"]), float(r["accuracy"])) for r in curve if r["mode"] == mode and r["domain"] == domain)
        if pts:
            ax.plot(*zip(*pts), style, color=colors[domain], marker=".", label=f"{domain}, thinking {mode}")
    pts = sorted((int(r["step"]), float(r["accuracy"])) for r in curve if r["domain"] == "target")
    if pts:
        ax.plot(*zip(*pts), "-", color="k", lw=2.2, marker="o", label="target cells, thinking on")
    ax.set_xlabel("GRPO optimizer step")
    ax.set_ylabel("pass@1 (greedy, held-out)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def grpo_training(log: list[dict], batches: list[dict], title: str = "stage 07: GRPO training signals"):
    """Six panels against steps: reward mean and spread, KL, clip fraction, completion length, the share of
    groups that taught nothing (all samples scored alike), and the batch's mean pass rate against the
    curriculum's target."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.2))
    steps = [int(r["step"]) for r in log]

    def col(name):
        return [float(r[name]) for r in log if r.get(name) not in (None, "")]

    mean, std = np.array(col("reward_mean")), np.array(col("reward_std"))
    ax = axes[0, 0]
    if len(mean):
        ax.plot(steps[: len(mean)], mean, label="reward mean")
        ax.fill_between(steps[: len(mean)], mean - std, mean + std, alpha=0.2, label="+- std")
        ax.plot(steps[: len(mean)], col("accuracy_reward")[: len(mean)], lw=1, label="accuracy reward")
    ax.set_title("reward")
    ax.legend(fontsize=7)
    for ax, name, label in ((axes[0, 1], "kl", "KL (k3; to the sampling policy when beta = 0)"),
                            (axes[0, 2], "clip_region", "clipped token share"),
                            (axes[1, 0], "completion_len", "completion tokens (mean)"),
                            (axes[1, 1], "flat_groups", "groups with one reward for all (no signal)")):
        ys = col(name)
        ax.plot(steps[: len(ys)], ys)
        ax.set_title(label, fontsize=9)
    ax = axes[1, 2]
    if batches:
        ax.plot([b["step"] for b in batches], [b["batch_pass_rate"] for b in batches], "o-", label="batch mean")
        ax.plot([b["step"] for b in batches], [b["target_mean"] for b in batches], "k--", label="curriculum target")
    ax.set_title("pass rate of the batch's prompts", fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def alignment_phases(phases: list[dict], title: str = "stage 08: alignment, phase by phase"):
    """Two panels over the aligned policy's phases (start, RLOO, RPO rounds), with the DPO baseline trained on
    the same pairs from the same start drawn apart (hollow, not joined): IFEval prompt-level strict accuracy on
    held-out prompts, and the win rate against the baseline's answers as the gold judge sees it (with its 95%
    interval) and as the reward model sees it, thinking on (solid) and off (dashed)."""
    order = list(dict.fromkeys(r["phase"] for r in phases))
    main = [ph for ph in order if not ph.startswith("dpo")]
    side = [ph for ph in order if ph.startswith("dpo")]
    xs = {ph: i for i, ph in enumerate(main + side)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, style in (("on", "-"), ("off", "--")):
        rows = {r["phase"]: r for r in phases if r["mode"] == mode}

        def series(ax, key, phs, fmt, color, label, hollow=False, err=False, rows=rows, style=style):
            pts = [(xs[ph], float(rows[ph][key]), ph) for ph in phs if rows.get(ph) and rows[ph][key] != ""]
            if not pts:
                return
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            kw = dict(color=color, marker=fmt, mfc="none" if hollow else color, ls="none" if hollow else style,
                      label=label)
            if err:
                lo = [y_ - float(rows[ph]["win_low"]) for (_, y_, ph) in pts]
                hi = [float(rows[ph]["win_high"]) - y_ for (_, y_, ph) in pts]
                ax.errorbar(x, y, yerr=[lo, hi], capsize=3, **kw)
            else:
                ax.plot(x, y, **kw)

        series(a, "prompt_level_strict_acc", main, "o", "C0", f"thinking {mode}")
        series(a, "prompt_level_strict_acc", side, "o", "C0", None, hollow=True)
        series(b, "win_rate_gold", main, "o", "C1", f"gold judge, thinking {mode}", err=True)
        series(b, "win_rate_gold", side, "o", "C1", f"DPO, same pairs, gold, thinking {mode}", hollow=True, err=True)
        series(b, "win_rate_rm", main, "s", "C2", f"reward model, thinking {mode}")
    a.set_title("IFEval prompt-level strict accuracy (held-out)")
    b.set_title("win rate vs the baseline's answers (ties half)")
    b.axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax in (a, b):
        if side:
            ax.axvline(len(main) - 0.5, color="grey", lw=0.8)
        ax.set_xticks(list(xs.values()), list(xs), rotation=20)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

def evaluation_table(rows: list[dict], title: str = "stage 09: every checkpoint, reasoning on and off"):
    """Tables 3 and 5 as a figure: per checkpoint, pass@1 over all domains with its 95% interval (thinking on:
    the mean of k samples; off: greedy) and the mean response length, thinking on and off."""
    get = {(r["model"], r["domain"], r["mode"], r["metric"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = [next(r["label"] for r in rows if r["model"] == m) for m in models]
    x = np.arange(len(models))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for j, (mode, color) in enumerate((("on", "C3"), ("off", "C0"))):
        cells = [get.get((m, "all", mode, "pass@1")) for m in models]
        y = [float(c["value"]) if c else np.nan for c in cells]
        err = [[float(c["value"]) - float(c["low"]) if c else 0 for c in cells],
               [float(c["high"]) - float(c["value"]) if c else 0 for c in cells]]
        a.bar(x + (j - 0.5) * 0.4, y, 0.4, yerr=err, capsize=2, color=color, label=f"thinking {mode}")
        t = [float(get[(m, "all", mode, "tokens")]["value"]) if (m, "all", mode, "tokens") in get else np.nan
             for m in models]
        b.bar(x + (j - 0.5) * 0.4, t, 0.4, color=color, label=f"thinking {mode}")
    a.set_ylabel("pass@1, all test domains")
    a.set_ylim(0, 1)
    b.set_ylabel("mean response length (tokens)")
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=25, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (higher is better in both), by x.

    >>> pareto_front([(1, 0.9), (2, 0.8), (2, 0.5), (3, 0.85)])
    [0, 3]
    """
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def accuracy_vs_throughput(rows: list[dict], domain: str = "all", mode: str = "on", ax=None,
                           title: str = "Figures 2/4 analog: accuracy against measured throughput"):
    """Every checkpoint's pass@1 (``domain``, ``mode``) against its measured decode throughput on this
    machine, with the Pareto front (no checkpoint both faster and more accurate)."""
    get = {(r["model"], r["domain"], r["mode"], r["metric"]): r for r in rows}
    models = [m for m in dict.fromkeys(r["model"] for r in rows)
              if (m, domain, mode, "pass@1") in get and (m, "speed", "-", "decode_tok_s") in get]
    pts = [(float(get[(m, "speed", "-", "decode_tok_s")]["value"]), float(get[(m, domain, mode, "pass@1")]["value"]))
           for m in models]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (m, (x, y)) in enumerate(zip(models, pts)):
        r = get[(m, domain, mode, "pass@1")]
        ax.errorbar([x], [y], yerr=[[y - float(r["low"])], [float(r["high"]) - y]], fmt="o", color=f"C{i % 10}",
                    capsize=2, label=r["label"])
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o--", color="k", mfc="none", ms=13, lw=1,
            label="Pareto front (ringed)")
    ax.set_xlabel("measured decode throughput (tokens/s, this CPU)")
    ax.set_ylabel(f"pass@1, {domain}, thinking {mode}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if own:
        fig.tight_layout()
        return fig
    return ax.figure


def grpo_curriculum_vs_random(folders: dict, params: dict,
                              title: str = "Figure 6 analog: curriculum vs random batching (mean, min-max over seeds)"):
    """From a sweep of stage 07 (``folders``: variant -> run folder; ``params``: variant -> its parameters):
    held-out target-cell accuracy (greedy) and the training reward against steps, one line per ``order`` (the
    mean over its seeds, the band their min-max), and the final evaluation's target score per seed."""
    import statistics

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    by_order: dict[str, list] = {}
    for name, folder in folders.items():
        d = Path(folder) / "07_grpo"
        curve = {int(r["step"]): float(r["accuracy"]) for r in _csv(d / "eval_curve.csv") if r["domain"] == "target"}
        log = {int(r["step"]): float(r["reward_mean"]) for r in _csv(d / "train_log.csv")}
        final = read_json(d / "metrics.json")["target"]
        by_order.setdefault(params[name].get("order", "curriculum"), []).append((curve, log, final, params[name]))
    for k, (order, runs_) in enumerate(sorted(by_order.items())):
        color = f"C{k}"
        for ax, idx in ((axes[0], 0), (axes[1], 1)):
            steps = sorted(set.intersection(*(set(r[idx]) for r in runs_)))
            if not steps:
                continue
            ys = np.array([[r[idx][s] for s in steps] for r in runs_])
            ax.plot(steps, ys.mean(0), "o-" if idx == 0 else "-", color=color, ms=3,
                    label=f"{order} ({len(runs_)} seeds)")
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.2)
        finals = [100 * r[2]["final"] for r in runs_]
        axes[2].scatter([k] * len(finals), finals, color=color, zorder=3)
        axes[2].bar(k, statistics.mean(finals), color=color, alpha=0.35, width=0.6)
        starts = [100 * r[2]["start"] for r in runs_]
        axes[2].hlines(statistics.mean(starts), k - 0.35, k + 0.35, colors="k", linestyles="--")
    axes[0].set_title("held-out target cells, thinking on (greedy)", fontsize=9)
    axes[0].set_ylabel("pass@1")
    axes[1].set_title("training reward (accuracy + format)", fontsize=9)
    axes[2].set_xticks(range(len(by_order)), sorted(by_order))
    axes[2].set_title("final target score, % (dashed: start)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("GRPO optimizer step")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def layer_costs(rows: list[dict], phase: str = "decode", title: str = ""):
    """Stacked bars per layer: attention, FFN and all-reduce seconds of ``phase`` (rows from
    :func:`lnkit.deploy.layer_costs`; the ``lm_head`` row is left out). Returns the figure."""
    body = [r for r in rows if r["layer"] != "head"]
    x = [r["layer"] for r in body]
    scale = 1e3 if phase == "prefill" else 1e6
    parts = [(f"{phase}_attention_s", "attention", "tab:blue"), (f"{phase}_ffn_s", "FFN", "tab:orange"),
             (None, "all-reduce", "tab:gray")]
    fig, ax = plt.subplots(figsize=(max(6, len(body) * 0.06 + 3), 3.2))
    bottom = [0.0] * len(body)
    for key, label, color in parts:
        vals = [(r[key] if key else r[f"{phase}_attention_comm_s"] + r[f"{phase}_ffn_comm_s"]) * scale for r in body]
        ax.bar(x, vals, bottom=bottom, width=0.85, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{phase} time per layer ({'ms' if phase == 'prefill' else 'µs per step'})")
    ax.set_title(title or f"{phase}: where the time goes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- figures from a run's files


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _fusion(d: Path, which: str):
    r = read_json(d / "result.json")
    if which == "dependency":
        return dependency(r["dependencies"], r["groups"], read_json(d / "groups.json")["threshold"])
    return before_after(r["architecture_before"], r["architecture_after"],
                        f"{r['child']}: FFN width as % of the parent's; fused groups {r['fused_groups']}")


def _students(d: Path):
    mode = read_json(d / "params.json")["params"]["mode"]
    logs = {row["model"]: d / "students" / row["model"] / "train_log.csv"
            for row in read_json(d / "table.json") if row["phase"] == "after"}
    return student_losses(logs, f"stage 04: {mode} loss per student")


def _sft_on_off(d: Path):
    parent = d.parent / "00_parent" / "eval_summary.json"
    return on_vs_off(read_json(d / "eval_summary.json"), read_json(parent) if parent.is_file() else [])


# figure name (its file in figures/) -> (stage, file name in the stage folder, draw(stage folder) -> figure)
FIGURES = {
    "00_parent_loss": ("00_parent", "loss.png",
                       lambda d: loss_curve(d / "train_log.csv", "stage 00: parent training loss")),
    "00_parent_accuracy": ("00_parent", "accuracy.png", lambda d: accuracy_by_difficulty(
        read_json(d / "eval_summary.json"), "stage 00: parent accuracy (pass@1)")),
    "01_block_library_losses": ("01_block_library", "library_losses.png", lambda d: library_losses(
        _csv(d / "losses.csv"), "stage 01: block library, loss before and after BLD")),
    "02_frontier": ("02_architecture_search", "frontier.png", lambda d: frontier(
        read_json(d / "frontier.json"), "stage 02: Puzzle children vs naive baselines (before distillation)")),
    "03_ffn_fusion_dependency": ("03_ffn_fusion", "dependency.png", lambda d: _fusion(d, "dependency")),
    "03_ffn_fusion_architecture": ("03_ffn_fusion", "architecture.png", lambda d: _fusion(d, "architecture")),
    "04_distillation_loss": ("04_distillation", "loss.png", _students),
    "04_distillation_table": ("04_distillation", "table.png", lambda d: distillation_table(
        read_json(d / "table.json"), "stage 04: accuracy per domain, parent vs students before and after")),
    "05_curation_funnel": ("05_reasoning_data", "curation_funnel.png",
                           lambda d: curation_report(read_json(d / "report.json"))),
    "06_sft_loss": ("06_reasoning_sft", "loss.png",
                    lambda d: loss_curve(d / "train_log.csv", "stage 06: SFT loss (assistant tokens)")),
    "06_sft_on_vs_off": ("06_reasoning_sft", "on_vs_off.png", _sft_on_off),
    "06_sft_accuracy": ("06_reasoning_sft", "accuracy.png", lambda d: accuracy_by_difficulty(
        read_json(d / "eval_summary.json"), "stage 06: SFT student, pass@1 by domain")),
    "07_grpo_accuracy": ("07_grpo", "accuracy_curve.png", lambda d: grpo_accuracy(_csv(d / "eval_curve.csv"))),
    "07_grpo_training": ("07_grpo", "training.png", lambda d: grpo_training(_csv(d / "train_log.csv"), _jsonl(d / "batches.jsonl"))),
    "08_alignment_phases": ("08_alignment", "phases.png", lambda d: alignment_phases(_csv(d / "phases.csv"))),
    "09_evaluation_table": ("09_evaluation", "table.png", lambda d: evaluation_table(_csv(d / "results.csv"))),
}


# sweep figures (lnkit.sweeps): name -> draw(variant folders, variant parameters) -> figure
SWEEP_FIGURES = {"grpo_curriculum_vs_random": grpo_curriculum_vs_random}


def stage_figures(stage: str) -> list[str]:
    """The names of a stage's figures.

    >>> stage_figures("03_ffn_fusion")
    ['03_ffn_fusion_dependency', '03_ffn_fusion_architecture']
    """
    return [name for name, (s, _, _) in FIGURES.items() if s == stage]


def draw(run_dir: str | Path, name: str, figures_dir: str | Path = ""):
    """Draw figure ``name`` from its stage's files in ``run_dir``; save it in the stage folder and, when
    ``figures_dir`` is given, there too; return the figure (a notebook shows it)."""
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    stage, file, fn = FIGURES[name]
    d = Path(run_dir) / stage
    fig = fn(d)
    save(fig, d / file, Path(figures_dir) / f"{name}.png" if figures_dir else "")
    return fig


def redraw(run_dir: str | Path, figures_dir: str | Path = "") -> list[str]:
    """Redraw every figure whose stage folder holds what it needs; return the names drawn."""
    drawn = []
    for name, (stage, _, _) in FIGURES.items():
        if (Path(run_dir) / stage / "_COMPLETE.json").is_file():
            plt.close(draw(run_dir, name, figures_dir))
            drawn.append(name)
    return drawn


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lnkit.plots", description="Redraw a run's figures from its files.")
    ap.add_argument("run_dir")
    ap.add_argument("--figures", default="", help="also save them here (e.g. figures/, the README's)")
    a = ap.parse_args(argv)
    if not Path(a.run_dir).is_dir():
        print(f"error: run folder {a.run_dir} does not exist", file=sys.stderr)
        return 1
    drawn = redraw(a.run_dir, a.figures)
    print(f"{len(drawn)} figure(s) redrawn from {a.run_dir}: {', '.join(drawn) or 'none (no stage complete)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
