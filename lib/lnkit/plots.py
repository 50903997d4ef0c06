"""Figures drawn from the files stages write (per-step CSV, evaluation summaries), never from live state,
so the same figure comes out of JupyterLab, a papermill batch run or ``make reproduce``."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower().startswith("qt"):  # headless machines have no display
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lnkit.io import atomic_path


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
    import numpy as np

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
