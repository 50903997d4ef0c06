"""Stage 06: reasoning SFT with the toggle (paper Section 4).

The student (by default the distilled Puzzle child of stage 04; any stage's ``model/`` or model folder)
is fine-tuned on a released-schema data set (stage 05's blend, or a downloaded release file): the chat
template with the system prompt ``detailed thinking on/off``, loss on the assistant's tokens only, and
examples packed into fixed-length rows with a block-diagonal mask, so no example attends to another
(:class:`lnkit.train.batches.PackedBatcher`). Training runs on the shared loop: warmup then cosine,
atomic checkpoints and exact resume, and the gradient guard on (LN-Ultra's SFT needed restarts after
gradient explosions, Section 4.2; the guard rolls back to the last checkpoint and lowers the learning
rate instead).

``schedule = "staged"`` follows LN-Nano's three SFT stages (Section 4.2): reasoning-only examples first,
then everything, then chat and instruction following (categories ``chat``, ``instruct``, ``safety``), for
``stage_fractions`` of the steps. ``"single"`` is one pass over the blend, as for LN-Super.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from lnkit.params import ParamError, RunParams, param
from lnkit.stage import stage_path

CHAT_CATEGORIES = ("chat", "instruct", "instruction following", "safety")
# Fields that change what the student learns: a training checkpoint is resumed when only the others
# (threads, progress, evaluation, figures) differ.
TRAIN_FIELDS = ("seed", "device", "init", "data", "schedule", "stage_fractions", "steps", "rows", "row_len", "accum",
                "lr", "warmup", "ckpt_every", "spike_factor", "max_rollbacks")
PHASES = ("reasoning", "mixed", "chat")


@dataclass
class SFTParams(RunParams):
    """Stage 06 parameters (fields match ``notebooks/06_reasoning_sft.ipynb``'s parameters cell)."""

    STAGE = "06_reasoning_sft"
    init: str = param("04_distillation", "the student: a stage whose model/ to load, or a model folder")
    data: str = param("05_reasoning_data", "a stage whose sft.jsonl to train on, or a released-schema .jsonl file")
    schedule: str = param("single", "'single': one blend; 'staged': LN-Nano's reasoning -> mixed -> chat",
                          choices=["single", "staged"])
    stage_fractions: list[float] = param([0.4, 0.4, 0.2], "share of steps per staged phase", lo=0.0, hi=1.0)
    steps: int = param(2400, "optimizer steps", lo=1)
    rows: int = param(8, "packed rows per micro-batch", lo=1)
    row_len: int = param(256, "tokens per packed row", lo=32)
    accum: int = param(1, "micro-batches per optimizer step", lo=1)
    lr: float = param(3e-3, "peak learning rate (warmup then cosine to a tenth)", lo=1e-7, hi=1.0)
    warmup: int = param(30, "warmup steps", lo=0)
    ckpt_every: int = param(100, "steps between training checkpoints (the guard rolls back to the last)", lo=1)
    spike_factor: float = param(25.0, "guard: roll back on a NaN/inf, or a grad norm > this x the recent median "
                                "(late SFT reaches ~9x on ordinary batches); 0 turns it off", lo=0.0)
    max_rollbacks: int = param(3, "guard: rollbacks before a bad step stops the run", lo=0)
    eval_n: int = param(0, "test items per domain to evaluate; 0: the whole test split", lo=0)
    eval_k: int = param(1, "samples per prompt with thinking on (pass@1 averaged)", lo=1, hi=64)
    eval_max_new_tokens: int = param(128, "generation limit: the longest reference trace is ~95 tokens", lo=1)

    def check(self):
        if len(self.stage_fractions) != 3 or abs(sum(self.stage_fractions) - 1) > 1e-6:
            raise ParamError(f"stage {self.STAGE}: stage_fractions={self.stage_fractions} must be 3 shares "
                             "(reasoning, mixed, chat) summing to 1")
        if 0 < self.spike_factor <= 1:
            raise ParamError(f"stage {self.STAGE}: spike_factor={self.spike_factor} must be 0 (guard off) or > 1")
        for name in ("init", "data"):
            v = getattr(self, name)
            if not v:
                raise ParamError(f"stage {self.STAGE}: {name} is empty")
            if Path(v).is_absolute() and not Path(v).exists():
                raise ParamError(f"stage {self.STAGE}: {name}={v!r} does not exist")


def data_path(run_dir: str | Path, spec: str) -> Path:
    """The JSON-lines file ``spec`` names: ``<run_dir>/<spec>/sft.jsonl`` for a stage, else the file."""
    run_dir = Path(run_dir)
    for cand in (run_dir / spec / "sft.jsonl", run_dir / spec, Path(spec)):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no SFT data for {spec!r}: neither {run_dir / spec / 'sft.jsonl'} nor a file {spec} "
                            "exists; run stage 05_reasoning_data first or give a released-schema .jsonl file")


def phase_rows(rows: list[dict], phase: str) -> list[dict]:
    """The rows a staged phase trains on.

    >>> rows = [{"reasoning": "on", "category": "math"}, {"reasoning": "off", "category": "chat"}]
    >>> [len(phase_rows(rows, p)) for p in PHASES]
    [1, 2, 1]
    """
    if phase == "reasoning":
        return [r for r in rows if r["reasoning"] == "on"]
    if phase == "chat":
        return [r for r in rows if r["category"] in CHAT_CATEGORIES]
    return list(rows)


def make_batches(rows: list[dict], tok, P: SFTParams):
    """``batches(i)`` for the loop (micro-batch ``i``; step ``i // accum``), a pure function of ``i``.
    Returns it with the phase table ``[(phase, first_step, examples)]``."""
    from lnkit.data.released import encode_row
    from lnkit.train.batches import PackedBatcher

    if P.schedule == "single":
        plan = [("mixed", 0, rows)]
    else:
        bounds, acc = [], 0.0
        for f in P.stage_fractions:
            bounds.append(round(acc * P.steps))
            acc += f
        plan = [(ph, b, phase_rows(rows, ph)) for ph, b, f in zip(PHASES, bounds, P.stage_fractions) if f > 0]
        empty = [ph for ph, _, r in plan if not r]
        if empty:
            raise ValueError(f"stage {P.STAGE}: schedule='staged' but phase(s) {empty} have no examples in the data "
                             f"(reasoning needs reasoning=on rows, chat needs categories {CHAT_CATEGORIES})")
    batchers = [PackedBatcher([encode_row(tok, r) for r in ex], P.rows, P.row_len, tok.pad_token_id,
                              seed=P.seed + j) for j, (_, _, ex) in enumerate(plan)]
    starts = [b for _, b, _ in plan]

    def batches(i: int):
        step = i // P.accum
        j = max(k for k, s in enumerate(starts) if s <= step)
        return batchers[j](i)

    return batches, [(ph, b, len(ex)) for ph, b, ex in plan]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def train_sft(P: SFTParams, loss_fn=None):
    """Load the student and the data, train, save ``model/``. Returns (model, tok, log, info).

    ``loss_fn`` goes to :func:`lnkit.train.loop.train_loop` (tests use it to inject a bad step)."""
    from lnkit.curation_stage import model_path
    from lnkit.data.released import load_rows
    from lnkit.parent import load_model, save_model
    from lnkit.train.loop import LoopConfig, train_loop

    out = stage_path(P)
    device = P.setup_torch()
    init = model_path(P.run_dir, P.init)
    model, tok = load_model(init, device)
    data = data_path(P.run_dir, P.data)
    rows, skipped = load_rows(data)
    if not rows:
        raise ValueError(f"stage {P.STAGE}: {data} has no usable rows (skipped: {dict(skipped)})")
    batches, plan = make_batches(rows, tok, P)
    if device != "cpu":
        cpu_batches = batches
        batches = lambda i: {k: v.to(device) for k, v in cpu_batches(i).items()}  # noqa: E731
    cfg = LoopConfig(steps=P.steps, lr=P.lr, warmup=P.warmup, ckpt_every=P.ckpt_every, accum=P.accum,
                     spike_factor=P.spike_factor, max_rollbacks=P.max_rollbacks)
    # The data and the initial weights belong to the run's identity: a checkpoint trained on another
    # blend or from another student must not be resumed.
    manifest = init / "manifest.json"
    train_params = {f: getattr(P, f) for f in TRAIN_FIELDS}
    fingerprint = (f"{train_params}|data={_file_digest(data)}|"
                   f"init={_file_digest(manifest) if manifest.exists() else init}")
    t0 = time.perf_counter()
    log = train_loop(model, batches, cfg, out, desc="sft", progress=P.progress, fingerprint=fingerprint,
                     loss_fn=loss_fn)
    save_model(model, tok, out / "model")
    info = {"init": str(init), "data": str(data), "rows": len(rows), "skipped": dict(skipped), "phases": plan,
            # the loop's own clock, which carries over a resume (wall time here would count only the rest)
            "train_seconds": float(log[-1]["elapsed_s"]) if log else round(time.perf_counter() - t0, 1),
            "rollbacks": int(log[-1].get("rollbacks", 0)) if log else 0}
    return model, tok, log, info


def eval_items(P: SFTParams):
    """The test split, or its first ``eval_n`` items per domain."""
    from lnkit.parent import load_data

    items = load_data(P.run_dir, "test")
    if not P.eval_n:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.domain, 0) < P.eval_n:
            out.append(it)
            seen[it.domain] = seen.get(it.domain, 0) + 1
    return out


def parent_summary(run_dir: str | Path) -> list[dict]:
    """The parent's evaluation summary (stage 00), or [] when it is not there."""
    import json

    p = Path(run_dir) / "00_parent" / "eval_summary.json"
    return json.loads(p.read_text()) if p.exists() else []


def plot_on_vs_off(summary: list[dict], parent: list[dict], title: str = "stage 06: math accuracy, thinking on vs off"):
    """Math pass@1 by difficulty: the student with thinking on and off, and the parent (thinking off)."""
    import matplotlib.pyplot as plt

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
