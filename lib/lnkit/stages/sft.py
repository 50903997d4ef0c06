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

Notebook: ``notebooks/06_reasoning_sft.ipynb``. Reads ``00_parent`` (test split, the parent's evaluation),
the student's stage and the data's; writes ``<run_dir>/06_reasoning_sft/``: ``model/``, ``train_log.csv``
and the evaluation in both modes (``eval_rows.jsonl``, ``eval_summary.{csv,json}``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lnkit import stage
from lnkit.checkpoints import load_model, model_dir, save_model, stage_dir, stage_named
from lnkit.data.released import load_rows
from lnkit.data.splits import first_per_domain, load_split
from lnkit.eval import evaluate, save_results, summarize
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json, file_digest, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.train import distributed, launch
from lnkit.train.batches import PackedBatcher, encode_row
from lnkit.train.loop import LoopConfig, read_train_log, train_loop

NAME = "06_reasoning_sft"

CHAT_CATEGORIES = ("chat", "instruct", "instruction following", "safety")
# Fields that change what the student learns: a training checkpoint is resumed when only the others
# (threads, progress, evaluation, figures) differ.
TRAIN_FIELDS = ("seed", "device", "init", "data", "schedule", "stage_fractions", "steps", "rows", "row_len", "accum",
                "lr", "warmup", "ckpt_every", "spike_factor", "max_rollbacks")
PHASES = ("reasoning", "mixed", "chat")


@dataclass
class Params(RunParams):
    """Stage 06 parameters (fields match ``notebooks/06_reasoning_sft.ipynb``'s parameters cell)."""

    STAGE = NAME
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
    processes: int = param(1, "processes that train (torchrun, FSDP2: one per GPU, or gloo on the CPU); the "
                           "evaluation stays in the notebook's process", lo=1)
    eval_n: int = param(0, "test items per domain to evaluate; 0: the whole test split", lo=0)
    eval_k: int = param(1, "samples per prompt with thinking on (pass@1 averaged)", lo=1, hi=64)
    eval_max_new_tokens: int = param(128, "generation limit: the longest reference trace is ~95 tokens", lo=1)

    def check(self):
        if len(self.stage_fractions) != 3 or abs(sum(self.stage_fractions) - 1) > 1e-6:
            raise ParamError(f"stage {self.STAGE}: stage_fractions={self.stage_fractions} must be 3 shares "
                             "(reasoning, mixed, chat) summing to 1")
        if self.rows < self.processes:
            raise ParamError(f"stage {self.STAGE}: rows={self.rows} is fewer than processes={self.processes}: each "
                             "process trains on its rows of every micro-batch")
        if 0 < self.spike_factor <= 1:
            raise ParamError(f"stage {self.STAGE}: spike_factor={self.spike_factor} must be 0 (guard off) or > 1")
        for name in ("init", "data"):
            v = getattr(self, name)
            if not v:
                raise ParamError(f"stage {self.STAGE}: {name} is empty")
            if Path(v).is_absolute() and not Path(v).exists():
                raise ParamError(f"stage {self.STAGE}: {name}={v!r} does not exist")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): the SFT tokens, then the evaluation."""
    return Work(train=p.steps * p.rows * p.row_len * p.accum,
                generate=p.eval_n * 5 * 2 * p.eval_k * p.eval_max_new_tokens, gen_len=p.eval_max_new_tokens, model="child")


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads: the world's, the student's and the data's."""
    return list(dict.fromkeys(["00_parent", *filter(None, map(stage_named, (p.init, p.data)))]))


def run(p: Params) -> dict:
    """Train, then evaluate in both modes. Returns ``{"metrics", "log", "info", "rows", "summary", "items"}``."""
    stage.check_inputs(p, needs(p))
    parent = parent_summary(p.run_dir)  # read before training: a corrupt file stops the stage now, not after it
    out = stage.start(p)
    model, tok, log, info = train_sft(p)
    items = eval_items(p)
    rows = evaluate(model, tok, items, modes=("off", "on"), k=p.eval_k, max_new_tokens=p.eval_max_new_tokens,
                    seed=p.seed, progress=p.progress)
    summary = save_results(rows, out, "eval")          # by mode, domain and difficulty
    by_domain = summarize(rows, by=("mode", "domain"))  # by mode and domain, plus 'all'
    acc = {f"{s['mode']}/{s['domain']}/{s['difficulty']}": s["accuracy"] for s in summary}
    acc.update({f"{s['mode']}/{s['domain']}/all": s["accuracy"] for s in by_domain})
    dom = {(s["mode"], s["domain"]): s for s in by_domain}
    overall = {m: dom[(m, "all")] for m in ("off", "on")}
    metrics = {
        "accuracy": acc,
        "math_on_minus_off": round(dom[("on", "math")]["accuracy"] - dom[("off", "math")]["accuracy"], 4),
        "parent_math_off": {str(s["difficulty"]): s["accuracy"] for s in parent
                            if s["mode"] == "off" and s["domain"] == "math"},
        "compliance": {m: s["compliance"] for m, s in overall.items()},
        "leakage_off": overall["off"]["leakage"],
        "leakage_off_by_domain": {d: s["leakage"] for (m, d), s in dom.items() if m == "off"},
        "mean_tokens": {m: s["mean_tokens"] for m, s in overall.items()},
        "train_seconds": info["train_seconds"],
        "steps_per_second": round(len(log) / max(info["train_seconds"], 1e-9), 3),
        "rollbacks": info["rollbacks"],
        "examples": info["rows"],
        "skipped_rows": info["skipped"],
        "init": info["init"],
    }
    return {"metrics": metrics, "log": log, "info": info, "rows": rows, "summary": summary,
            "by_domain": by_domain, "items": items, "parent": parent}


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"accuracy": {"on/math/all": 0.9, "off/math/all": 0.255}, "compliance": {"on": 0.99, "off": 0.99}})
    'math 90% thinking on vs 26% off; toggle compliance 99% / 99%'
    """
    a, c = metrics["accuracy"], metrics["compliance"]
    return (f"math {a['on/math/all']:.0%} thinking on vs {a['off/math/all']:.0%} off; "
            f"toggle compliance {c['on']:.0%} / {c['off']:.0%}")


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


def make_batches(rows: list[dict], tok, P: Params):
    """``batches(i)`` for the loop (micro-batch ``i``; step ``i // accum``), a pure function of ``i``.
    Returns it with the phase table ``[(phase, first_step, examples)]``."""
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


def train_sft(P: Params, loss_fn=None):
    """Load the student and the data, train, save ``model/``. Returns (model, tok, log, info).

    ``loss_fn`` goes to :func:`lnkit.train.loop.train_loop` (tests use it to inject a bad step). With
    ``processes`` > 1 the training runs in that many processes under torchrun (:func:`train_worker`; the
    same losses as one process, and the same checkpoints to resume with any number), and the model they
    saved is loaded back here."""
    out = stage_dir(P.run_dir, NAME)
    if P.processes > 1 and distributed.world()[1] == 1:
        if loss_fn is not None:
            raise ValueError("loss_fn does not cross into the torchrun processes; use processes=1")
        launch.across(P.processes, "lnkit.stages.sft:train_worker", P.to_dict(), out / "train_processes.log",
                      echo=lambda line: None if not P.progress else print(line))
        model, tok = load_model(out / "model", P.setup_torch())
        return model, tok, read_train_log(out), read_json(out / "train_info.json")
    device = launch.device() if distributed.world()[1] > 1 else P.setup_torch()
    init = model_dir(P.run_dir, P.init)
    model, tok = load_model(init, device)
    data = data_path(P.run_dir, P.data)
    rows, skipped = load_rows(data)
    if not rows:
        raise ValueError(f"stage {P.STAGE}: {data} has no usable rows (skipped: {dict(skipped)})")
    batches, plan = make_batches(rows, tok, P)  # on the CPU: the loop moves each batch to the model's device
    cfg = LoopConfig(steps=P.steps, lr=P.lr, warmup=P.warmup, ckpt_every=P.ckpt_every, accum=P.accum,
                     spike_factor=P.spike_factor, max_rollbacks=P.max_rollbacks)
    # The data and the initial weights belong to the run's identity: a checkpoint trained on another
    # blend or from another student must not be resumed.
    manifest = init / "manifest.json"
    train_params = {f: getattr(P, f) for f in TRAIN_FIELDS}
    fingerprint = (f"{train_params}|data={file_digest(data)}|"
                   f"init={file_digest(manifest) if manifest.exists() else init}")
    t0 = time.perf_counter()
    log = train_loop(model, batches, cfg, out, desc="sft", progress=P.progress, fingerprint=fingerprint,
                     loss_fn=loss_fn)
    rank, size = distributed.world()
    if size > 1:  # the weights are sharded: gather them whole into rank 0, which saves them
        full = distributed.full_model_state(model)
        if rank == 0:
            model, _ = load_model(init, "cpu")
            model.load_state_dict(full)
    if rank == 0:
        save_model(model, tok, out / "model")
    info = {"init": str(init), "data": str(data), "rows": len(rows), "skipped": dict(skipped), "phases": plan,
            # the loop's own clock, which carries over a resume (wall time here would count only the rest)
            "train_seconds": float(log[-1]["elapsed_s"]) if log else round(time.perf_counter() - t0, 1),
            "rollbacks": int(log[-1].get("rollbacks", 0)) if log else 0}
    if size > 1:
        if rank == 0:
            atomic_write_json(out / "train_info.json", info)
        distributed.barrier()
    return model, tok, log, info


def train_worker(values: dict) -> None:
    """One of the torchrun processes of :func:`train_sft` (run by :func:`lnkit.train.launch.across`)."""
    train_sft(Params.from_dict(values))


def eval_items(P: Params):
    """The test split, or its first ``eval_n`` items per domain."""
    items = load_split(P.run_dir, "test")
    if not P.eval_n:
        return items
    return first_per_domain(items, P.eval_n)


def parent_summary(run_dir: str | Path) -> list[dict]:
    """The parent's evaluation summary (stage 00), or [] when it is not there."""
    p = stage_dir(run_dir, "00_parent") / "eval_summary.json"
    return read_json(p) if p.exists() else []
