"""The live RL panel: stage 07's (or stage 08's) curves, redrawn from the run's files every few seconds.

It reads only files (``batches.jsonl``, written every rollout batch; ``train_log.csv``, at each checkpoint;
``eval_curve.csv``, at each curve point), so it shows the same thing for a run in progress in this kernel,
a run going on elsewhere (a papermill job, another machine writing to a shared folder) and a finished one.
Point it at a run folder::

    from lnkit import rlview
    rlview.live_panel("runs/tiny")       # in a notebook cell

A background thread redraws it every ``every_s`` seconds while the stage runs and stops once the stage's
completion marker appears (or when the "live" button is switched off). ``stage="08_alignment"`` draws stage
08's phases instead: RLOO's rewards and KL, the reward model's loss and pair accuracy, each RPO or DPO
round's loss and margin, and IFEval and the win rates after each phase.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower().startswith("qt"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lnkit.checkpoints import MARKER, stage_dir

STAGE = "07_grpo"


ALIGNMENT = "08_alignment"


def _rows(path: Path) -> list[dict]:
    try:
        with open(path) as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def read_state(run_dir: str | Path, stage: str = STAGE) -> dict:
    """What the panel draws: ``batches`` (list of dicts), ``log`` and ``curve`` (CSV rows), ``done``; for stage
    08, ``logs`` (each phase's training log) and ``phases`` (its evaluations)."""
    d = stage_dir(run_dir, stage)
    if stage == ALIGNMENT:
        logs = {sub.name: _rows(sub / "train_log.csv") for sub in sorted(d.glob("*")) if (sub / "train_log.csv").exists()}
        return {"logs": logs, "phases": _rows(d / "phases.csv"), "done": (d / MARKER).is_file(), "folder": str(d),
                "batches": []}

    def rows(name):
        return _rows(d / name)

    batches = []
    try:
        batches = [json.loads(x) for x in (d / "batches.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError):
        pass
    return {"batches": batches, "log": rows("train_log.csv"), "curve": rows("eval_curve.csv"),
            "done": (d / MARKER).is_file(), "folder": str(d)}


def alignment_figure(state: dict):
    """Stage 08: RLOO's rewards and KL, the reward model's training, the preference rounds' loss and margin,
    and IFEval and the win rates (gold judge, reward model) after each phase, thinking on."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.4))
    logs = state["logs"]

    def curve(ax, log, name, **kw):
        pts = [(int(r["step"]), float(r[name])) for r in log if r.get(name) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), **kw)

    rloo = logs.get("rloo", [])
    curve(axes[0, 0], rloo, "follow_reward", label="instructions followed")
    curve(axes[0, 0], rloo, "format_reward", label="format")
    axes[0, 0].set_title("RLOO rewards", fontsize=9)
    curve(axes[0, 1], rloo, "kl")
    axes[0, 1].set_title("RLOO: KL to the start (per completion)", fontsize=9)
    rm = logs.get("reward_model_train", [])
    curve(axes[0, 2], rm, "loss", label="loss")
    curve(axes[0, 2], rm, "pair_accuracy", label="pair accuracy (batch)")
    axes[0, 2].set_title("reward model", fontsize=9)
    for name, log in logs.items():
        if name.startswith(("rpo_", "dpo_")):
            curve(axes[1, 0], log, "loss", label=name)
            curve(axes[1, 1], log, "margin", label=name)
    axes[1, 0].set_title("preference loss per round", fontsize=9)
    axes[1, 1].set_title("implicit reward margin (chosen - rejected)", fontsize=9)
    ax = axes[1, 2]
    on = [r for r in state["phases"] if r["mode"] == "on"]
    if on:
        x = range(len(on))
        ax.plot(x, [float(r["prompt_level_strict_acc"]) for r in on], "o-", label="IFEval prompt strict")
        ax.plot(x, [float(r["win_rate_gold"]) for r in on], "s-", label="win rate, gold judge")
        rmw = [(i, float(r["win_rate_rm"])) for i, r in enumerate(on) if r["win_rate_rm"] != ""]
        if rmw:
            ax.plot(*zip(*rmw), "s:", label="win rate, reward model")
        ax.set_xticks(list(x), [r["phase"] for r in on], fontsize=7)
        ax.set_ylim(-0.03, 1.03)
    ax.set_title("after each phase (thinking on)", fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def figure(state: dict):
    """Six panels: reward mean and spread, held-out accuracy on and off, KL, completion length, clip
    fraction, and the latest batch's pass-rate histogram against the curriculum's target."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.4))
    b = state["batches"]
    steps = [e["step"] for e in b]
    ax = axes[0, 0]
    if b:
        mean = np.array([e["reward_mean"] for e in b])
        std = np.array([e["reward_std"] for e in b])
        ax.plot(steps, mean, "o-", ms=3, label="reward mean")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, label="+- std")
        ax.legend(fontsize=7)
    ax.set_title("reward (per rollout batch)", fontsize=9)
    ax = axes[0, 1]
    for mode, style in (("on", "-"), ("off", "--")):
        for domain, color in (("target", "k"), ("math", "C0"), ("science", "C1")):
            pts = sorted((int(r["step"]), float(r["accuracy"])) for r in state["curve"]
                         if r["mode"] == mode and r["domain"] == domain)
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker=".", label=f"{domain} {mode}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("held-out accuracy (greedy)", fontsize=9)
    if state["curve"]:
        ax.legend(fontsize=6, ncol=2)
    log = state["log"]
    for ax, name, title in ((axes[0, 2], "kl", "KL"), (axes[1, 1], "clip_region", "clip fraction")):
        pts = [(int(r["step"]), float(r[name])) for r in log if r.get(name) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(title, fontsize=9)
    ax = axes[1, 0]
    if b:
        ax.plot(steps, [e["completion_len"] for e in b], "o-", ms=3)
    ax.set_title("completion tokens (mean)", fontsize=9)
    ax = axes[1, 2]
    if b:
        last = b[-1]
        bins = len(last["target"])
        hist = np.histogram(last["pass_rates"], bins=bins, range=(0, 1))[0]
        centers = (np.arange(bins) + 0.5) / bins
        ax.bar(centers, hist / max(1, hist.sum()), width=0.8 / bins, alpha=0.6, label="this batch")
        ax.plot(centers, last["target"], "k.-", label="curriculum target")
        ax.set_title(f"pass rates, batch {last['batch']} (target mean {last['target_mean']:.2f})", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.set_title("pass rates of the batch", fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def status(state: dict) -> str:
    if "logs" in state:
        done = [r["phase"] for r in state["phases"] if r["mode"] == "on"]
        steps = {k: len(v) for k, v in state["logs"].items()}
        return (f"{state['folder']}: {'finished' if state['done'] else 'running'}; phases evaluated: "
                f"{', '.join(done) or 'none yet'}; steps logged: {steps or 'none yet'}")
    b = state["batches"]
    if not b:
        return f"{state['folder']}: no rollout batch yet"
    last = b[-1]
    return (f"{state['folder']}: {'finished' if state['done'] else 'running'}; rollout batch {last['batch']} "
            f"(step {last['step']}), reward {last['reward_mean']:.3f} +- {last['reward_std']:.3f}, "
            f"accuracy reward {last['accuracy_reward']:.3f}, {last['completion_len']:.0f} tokens per completion")


def png(state: dict) -> bytes:
    fig = alignment_figure(state) if "logs" in state else figure(state)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def live_panel(run_dir: str | Path, stage: str = STAGE, every_s: float = 5.0, live: bool = True):
    """An ipywidgets panel of the run's RL curves, redrawn every ``every_s`` seconds while ``live``."""
    import ipywidgets as widgets

    image = widgets.Image(format="png")
    text = widgets.HTML()
    toggle = widgets.ToggleButton(value=live, description="live", tooltip="redraw every few seconds")
    refresh = widgets.Button(description="refresh")
    stop = threading.Event()

    def redraw(*_):
        state = read_state(run_dir, stage)
        image.value = png(state)
        text.value = f"<code>{status(state)}</code>"
        return state

    def loop():
        while not stop.wait(every_s):
            if not toggle.value:
                continue
            if redraw()["done"]:
                toggle.value = False
                return

    def on_toggle(change):
        if change["new"] and (panel._thread is None or not panel._thread.is_alive()):
            start()

    def start():
        panel._thread = threading.Thread(target=loop, daemon=True, name="lnkit-live-panel")
        panel._thread.start()

    refresh.on_click(redraw)
    panel = widgets.VBox([widgets.HBox([toggle, refresh]), text, image])
    panel._thread = None
    panel.stop = stop.set
    first = redraw()
    if live and not first["done"]:
        start()
    else:
        toggle.value = False
    toggle.observe(on_toggle, names="value")
    return panel
