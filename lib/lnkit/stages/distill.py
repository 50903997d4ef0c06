"""Stage 04: recovery training of the Puzzle / FFN Fusion child by global knowledge distillation
(paper Section 2.2, Table 1; ``notebooks/04_distillation.ipynb``).

Each student (by default the fused child of stage 03) learns to reproduce the parent over the whole
model: forward KL on the next-token distributions plus cosine distance on the final hidden states
(:mod:`lnkit.train.distill`), on the parent's own training mix packed into fixed-length rows. ``mode =
"cpt"`` is continued pretraining instead (LM loss, no teacher), and ``"kd_cpt"`` LN-Ultra's sequence:
distillation for the first steps, then continued pretraining for the last ``cpt_fraction`` of them.
Training runs in the shared loop, so it resumes exactly after a crash and rolls back a diverging step.

Reads ``<run_dir>/00_parent`` (teacher, data, the parent's parameters) and each student's folder; writes
``<run_dir>/04_distillation``: ``model/`` (the first student, distilled: what later stages start from),
``students/<name>/`` (training state and log, loss curve, evaluations before and after, and ``model/`` for
every other student), ``table.csv`` (the Table 1 analog: accuracy per domain of the parent and of each
student before and after distillation, with measured decode speed-up) and ``metrics.json``.

Deviations from the paper: the distillation data is the parent's training mix, not the Distillation
Mix; the token budget is minutes of CPU, not 40-65B tokens; CPT is on the same mix (no Nemotron-H data).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lnkit import stage
from lnkit.checkpoints import load_model, names_stage, require, save_model, stage_dir, stage_named
from lnkit.data.splits import first_per_domain, load_split
from lnkit.data.tasks import DOMAINS
from lnkit.eval import evaluate, save_results, summarize
from lnkit.generate import decode_throughput
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json, folder_digest, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.puzzle.library import as_nas
from lnkit.train.batches import PackedBatcher
from lnkit.train.distill import check_pair, make_loss_fn
from lnkit.train.loop import STATE_DIR, LoopConfig, train_loop
from lnkit.train.mix import parent_mix

NAME = STAGE = "04_distillation"
UNFUSED = "unfused"
# Fields that change what a student learns; the others (evaluation, timing, paths) do not restart training.
TRAIN_FIELDS = ("seed", "mode", "cpt_fraction", "steps", "tokens", "rows", "row_len", "accum", "lr", "warmup", "min_lr_ratio",
                "temperature", "kd_positions", "kl_weight", "cosine_weight", "lm_weight", "spike_factor")


@dataclass
class Params(RunParams):
    """Stage 04 parameters (fields match ``notebooks/04_distillation.ipynb``'s parameters cell)."""

    STAGE = STAGE
    students: list[str] = param(["03_ffn_fusion"], "students: a stage folder holding model/, 'unfused' (the child "
                                "stage 03 fused), or a run_dir-relative model folder; the first becomes model/")
    mode: str = param("kd_cpt", "kd: distill from the parent; cpt: continued pretraining (LM loss, no teacher); "
                      "kd_cpt: distillation, then continued pretraining", choices=["kd", "cpt", "kd_cpt"])
    cpt_fraction: float = param(0.6, "share of the steps of mode kd_cpt spent on CPT, at the end (LN-Ultra: "
                                "88B CPT tokens after 65B of distillation, 0.58)", lo=0.0, hi=1.0)
    steps: int = param(1500, "optimizer steps per student (used when tokens = 0)", lo=1)
    tokens: int = param(0, "token budget per student (rows x row_len x accum per step); > 0 overrides steps", lo=0)
    rows: int = param(8, "packed rows per micro-batch", lo=1)
    row_len: int = param(256, "tokens per packed row", lo=16)
    accum: int = param(1, "micro-batches per optimizer step", lo=1)
    lr: float = param(3e-3, "peak learning rate (warmup then cosine)", lo=1e-7, hi=1.0)
    warmup: int = param(20, "warmup steps", lo=0)
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of lr", lo=0.0, hi=1.0)
    temperature: float = param(1.0, "softmax temperature of the KL term", lo=0.05, hi=20.0)
    kd_positions: str = param("all", "positions the KD loss averages over: every real token, or answer/label ones",
                              choices=["all", "labels"])
    kl_weight: float = param(1.0, "weight of KL(teacher || student) on the logits", lo=0.0)
    cosine_weight: float = param(1.0, "weight of the cosine distance of final hidden states", lo=0.0)
    lm_weight: float = param(0.0, "weight of the LM loss on labels during KD (off: the paper's choice)", lo=0.0)
    spike_factor: float = param(10.0, "roll back a step whose grad norm exceeds this x the recent median; 0: off",
                                lo=0.0)
    eval_n: int = param(200, "test items per domain for the accuracy table (200: the whole test split)", lo=1)
    eval_max_new_tokens: int = param(48, "generation limit per answer", lo=1)
    batch_size: int = param(16, "decode batch for throughput", lo=1)
    prompt_len: int = param(64, "prompt tokens before decoding", lo=1)
    decode_len: int = param(32, "decoded tokens", lo=1)
    timing_repeats: int = param(5, "repeats for throughput (median)", lo=1)

    def check(self):
        if not self.students or any(not s.strip() for s in self.students):
            raise ParamError(f"stage {self.STAGE}: students={self.students!r} must be a non-empty list of "
                             f"non-empty entries (a stage folder, '{UNFUSED}', or a model folder under run_dir)")
        names = [student_name(s) for s in self.students]
        if len(set(names)) != len(names):
            raise ParamError(f"stage {self.STAGE}: students={self.students!r} give the same name twice "
                             f"({names}); each student needs its own folder")
        if self.mode != "cpt" and self.kl_weight + self.cosine_weight + self.lm_weight == 0:
            raise ParamError(f"stage {self.STAGE}: kl_weight, cosine_weight and lm_weight are all 0: nothing to train")
        if 0 < self.spike_factor <= 1:
            raise ParamError(f"stage {self.STAGE}: spike_factor={self.spike_factor} must be 0 (off) or > 1")

    def total_steps(self) -> int:
        """Optimizer steps per student: ``steps``, or the token budget over tokens per step (rounded up).

        >>> Params(tokens=10_000, rows=2, row_len=100, accum=2).total_steps()
        25
        """
        if self.tokens:
            return math.ceil(self.tokens / (self.rows * self.row_len * self.accum))
        return self.steps

    def train_key(self, entry: str) -> str:
        """The fingerprint of one student's training: the fields that change it, and the entry."""
        d = {k: getattr(self, k) for k in TRAIN_FIELDS} | {"student": entry, "steps": self.total_steps()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def student_name(entry: str) -> str:
    """The folder name of a student under ``students/``.

    >>> student_name("03_ffn_fusion"), student_name("unfused"), student_name("02_architecture_search/children/budget_0.40/")
    ('03_ffn_fusion', 'unfused', 'budget_0.40')
    """
    return Path(entry.strip().rstrip("/")).name


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): each student trained on the token budget, the
    teacher's forward on the same tokens (distillation), and each student's evaluation."""
    tokens = p.tokens or p.steps * p.rows * p.row_len * p.accum
    kd = 0.0 if p.mode == "cpt" else (1 - p.cpt_fraction if p.mode == "kd_cpt" else 1.0)
    n = len(p.students)
    return Work(train=n * tokens, forward=n * tokens * kd, generate=n * p.eval_n * 5 * p.eval_max_new_tokens,
                gen_len=p.eval_max_new_tokens, model="child", forward_model="parent")


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads: the parent, and the stages its students name."""
    named = ("03_ffn_fusion" if entry == UNFUSED else stage_named(entry) for entry in p.students)
    return list(dict.fromkeys(["00_parent", *filter(None, named)]))


def run(p: Params) -> dict:
    """The whole stage; returns what :func:`run_distillation` returns plus ``"metrics"``."""
    stage.check_inputs(p, needs(p))
    stage.start(p)
    result = run_distillation(p)
    result["metrics"] = {
        "mode": p.mode,
        "model": next(iter(result["students"])),  # the student written to model/
        "parent_accuracy": result["parent"]["accuracy"],
        "students": result["students"],
    }
    return result


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"model": "03_ffn_fusion", "students": {"03_ffn_fusion": {"accuracy_kept_before": 0.634,
    ...           "accuracy_kept": 1.027, "speedup": 1.99}}})
    "03_ffn_fusion: 63% -> 103% of the parent's accuracy at 1.99x"
    """
    s = metrics["students"][metrics["model"]]
    return (f"{metrics['model']}: {s['accuracy_kept_before']:.0%} -> {s['accuracy_kept']:.0%} of the parent's "
            f"accuracy at {s['speedup']:.2f}x")


def resolve_student(run_dir: str | Path, entry: str) -> Path:
    """The model folder a ``students`` entry names; errors name the entry and what was looked for."""
    run_dir = Path(run_dir)
    if entry == UNFUSED:
        src = run_dir / "03_ffn_fusion" / "source.json"
        if not src.is_file():
            raise FileNotFoundError(f"stage {STAGE}: student '{UNFUSED}' is the child stage 03 started from, read "
                                    f"from {src}, which does not exist: run 03_ffn_fusion first")
        info = json.loads(src.read_text())
        path = run_dir / info["child_dir"]
    elif names_stage(run_dir, entry):
        path = require(run_dir, entry) / "model"  # a stage folder: it must have completed
    else:
        path = run_dir / entry
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stage {STAGE}: student {entry!r} resolves to {path}, which holds no model "
                                "(no config.json); give a stage folder with model/, 'unfused', or a model folder "
                                f"relative to {run_dir}")
    return path


def parent_mix_of(run_dir: str | Path, tok) -> list:
    """The parent's training mix as stage 00 drew it (its seed and ``doc_fraction``, from its ``params.json``)."""
    d = read_json(stage_dir(run_dir, "00_parent") / "params.json")["params"]
    return parent_mix(run_dir, tok, d["seed"], d["doc_fraction"])


def eval_items(run_dir, eval_n: int) -> list:
    """The first ``eval_n`` test items of each domain (the subset stage 02's frontier uses)."""
    return first_per_domain(load_split(run_dir, "test"), eval_n)


def accuracy_by_domain(model, tok, items, p: Params, out_dir: Path | None = None, name: str = "eval") -> dict:
    """Greedy thinking-off pass@1 per domain and over all (``all``); rows saved under ``out_dir``."""
    rows = evaluate(model, tok, items, modes=("off",), max_new_tokens=p.eval_max_new_tokens, seed=p.seed,
                    progress=False)
    if out_dir is not None:
        save_results(rows, out_dir, name)
    return {s["domain"]: s["accuracy"] for s in summarize(rows, by=("mode", "domain"))}


def speedup(model, parent_nas, p: Params) -> tuple[float, float, float]:
    """(model tokens/s, parent tokens/s, ratio), measured back to back with one CPU thread (the setting of
    stage 02's figures, and the least noisy on a shared machine)."""
    threads = torch.get_num_threads()
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        torch.set_num_threads(1)
    try:
        args = (p.batch_size, p.prompt_len, p.decode_len, p.timing_repeats)
        par, mod = decode_throughput(parent_nas, *args), decode_throughput(model, *args)
    finally:
        torch.set_num_threads(threads)
    return mod, par, mod / par


def source_fingerprint(out: Path, key: str, entry: str, path: Path) -> str:
    """The fingerprint of a student's training: its parameters (``key``) and a digest of the model it
    starts from, recorded in ``out``. When the student changed since a training in ``out`` began (an
    upstream stage rerun), the fingerprints differ and the loop starts over instead of resuming another
    model's training; this says so."""
    record, digest = out / "student_source.json", folder_digest(path)
    if (out / STATE_DIR).exists() and record.is_file():
        old = json.loads(record.read_text())
        if old.get("train_key") == key and old.get("source") != digest:
            print(f"student {entry!r} ({path}) changed since its training in {out} began: distilling it from the start")
    atomic_write_json(record, {"train_key": key, "source": digest, "path": str(path)})
    return f"{key}|source={digest}"


def distill_student(p: Params, entry: str, teacher, tok, batches, out: Path):
    """Load a student, train it (resuming from ``out/train_state``) and return (student, log rows)."""
    path = resolve_student(p.run_dir, entry)
    dev = next(teacher.parameters()).device
    student, s_tok = load_model(path, dev)
    if p.mode != "cpt":
        check_pair(student, teacher, f"student {entry!r} ({path})", "the parent")
    if len(s_tok) != len(tok):
        raise ValueError(f"student {entry!r} ({path}) has a tokenizer of {len(s_tok)} tokens, the parent's "
                         f"{len(tok)}; they must be the same tokenizer")
    loss_fn = make_loss_fn(teacher if p.mode != "cpt" else None, mode=p.mode, temperature=p.temperature,
                           kd_positions=p.kd_positions, kl_weight=p.kl_weight, cosine_weight=p.cosine_weight,
                           lm_weight=p.lm_weight, pad_id=tok.pad_token_id)
    fingerprint = source_fingerprint(out, p.train_key(entry), entry, path)
    steps = p.total_steps()
    cfg = LoopConfig(steps=steps, lr=p.lr, warmup=min(p.warmup, steps - 1), min_lr_ratio=p.min_lr_ratio,
                     accum=p.accum, ckpt_every=max(25, steps // 10), spike_factor=p.spike_factor)
    if p.mode == "kd_cpt":  # the last cpt_fraction of the steps: LM loss only (the loss_fn reads the flag)
        switch = round(steps * (1 - p.cpt_fraction)) * p.accum
        batches = _flagged(batches, switch)
    dev_batches = (lambda i: {k: v.to(dev) for k, v in batches(i).items()}) if dev.type != "cpu" else batches
    rows = train_loop(student, dev_batches, cfg, out, desc=f"{p.mode} {student_name(entry)}", progress=p.progress,
                      fingerprint=fingerprint, loss_fn=loss_fn)
    return student, rows


def _flagged(batches, switch: int):
    """``batches`` with ``distill`` true for micro-batches before index ``switch``, false after."""
    return lambda i: {**batches(i), "distill": torch.tensor(i < switch)}


def recipe(mode: str) -> str:
    """How a mode reads in tables and legends.

    >>> recipe("kd"), recipe("kd_cpt")
    ('KD', 'KD then CPT')
    """
    return {"kd": "KD", "cpt": "CPT", "kd_cpt": "KD then CPT"}[mode]


def run_distillation(p: Params) -> dict:
    """Distill every student; returns {"parent", "students", "table"} and writes ``table.{csv,json}`` and the models."""
    parent_dir = require(p.run_dir, "00_parent")
    sources = {student_name(e): resolve_student(p.run_dir, e) for e in p.students}  # fail before any compute
    out = stage_dir(p.run_dir, NAME)
    teacher, tok = load_model(parent_dir / "model", p.setup_torch())
    for q in teacher.parameters():
        q.requires_grad_(False)
    items = eval_items(p.run_dir, p.eval_n)
    parent_acc = accuracy_by_domain(teacher, tok, items, p, out, "eval_parent")
    parent_nas = as_nas(teacher)
    # A distillation order of its own (seed + 4), not the parent's: the student sees the same mix, reshuffled.
    batches = PackedBatcher(parent_mix_of(p.run_dir, tok), p.rows, p.row_len,
                            tok.pad_token_id, seed=p.seed + 4)
    students, table = {}, [{"model": "parent", "phase": "parent", "training": "", **parent_acc, "kept": 1.0,
                            "speedup": 1.0}]
    for i, entry in enumerate(p.students):
        name = student_name(entry)
        sdir = out / "students" / name
        before_model, _ = load_model(sources[name], teacher.device)
        before = accuracy_by_domain(before_model, tok, items, p, sdir, "eval_before")
        del before_model
        student, rows = distill_student(p, entry, teacher, tok, batches, sdir)
        after = accuracy_by_domain(student, tok, items, p, sdir, "eval_after")
        tps, parent_tps, ratio = speedup(student, parent_nas, p)
        save_model(student, tok, out / "model" if i == 0 else sdir / "model")
        kept = {ph: (acc["all"] / parent_acc["all"] if parent_acc["all"] > 0 else float("nan"))
                for ph, acc in (("before", before), ("after", after))}
        students[name] = {
            "entry": entry, "source": str(sources[name].relative_to(p.run_dir)) if sources[name].is_relative_to(p.run_dir)
            else str(sources[name]), "model_dir": str((out / "model" if i == 0 else sdir / "model").relative_to(p.run_dir)),
            "steps": len(rows), "tokens": int(sum(r["tokens"] for r in rows)),
            "train_seconds": float(rows[-1]["elapsed_s"]) if rows else 0.0,
            "final_loss": sum(r["loss"] for r in rows[-20:]) / max(1, len(rows[-20:])),
            "rollbacks": int(rows[-1].get("rollbacks", 0)) if rows else 0,
            "accuracy_before": before, "accuracy_after": after,
            "accuracy_kept_before": kept["before"], "accuracy_kept": kept["after"],
            "tokens_per_s": tps, "parent_tokens_per_s": parent_tps, "speedup": ratio,
        }
        table += [{"model": name, "phase": "before", "training": recipe(p.mode), **before, "kept": kept["before"],
                   "speedup": ratio},
                  {"model": name, "phase": "after", "training": recipe(p.mode), **after, "kept": kept["after"],
                   "speedup": ratio}]
    cols = ["model", "phase", "training", *DOMAINS, "all", "kept", "speedup"]
    pd.DataFrame(table)[cols].to_csv(out / "table.csv", index=False)
    atomic_write_json(out / "table.json", table)
    parent = {"accuracy": parent_acc}
    return {"parent": parent, "students": students, "table": table}
