"""The one training loop every stage shares: AdamW, warmup then cosine decay, gradient clipping and
accumulation, a guard against loss spikes, atomic checkpoints and resume, a per-step CSV log and a
progress bar.

Resume is exact: the loop state (weights, optimizer moments, step, torch's random state, the guard's
history) is checkpointed atomically every ``ckpt_every`` steps and batches are a pure function of their
index (micro-batch ``k`` of step ``s`` is ``next_batch(s * accum + k)``), so a run killed at any point and
started again continues from its last checkpoint and ends with the same weights as an unbroken run.
Under ``torchrun`` with more than one process the model is sharded with FSDP2 and each process trains on
its rows of the same global batch (:mod:`lnkit.train.distributed`): the losses are those of one process.
One process checkpoints the full state in one file; more than one write sharded DCP checkpoints (no
process ever holds the full state). Both formats, and the one of checkpoints written before the loop ran
across processes, load under any number of processes: a run saved with N processes resumes with M.

The guard (``spike_factor > 0``) reproduces what the paper did by hand when LN-Ultra's training blew up
(Section 4.2: restarts after gradient explosions): a step whose loss or gradient norm is not finite, or
whose gradient norm exceeds ``spike_factor`` times the median of the last ``spike_window`` good steps, is
not applied. The loop reloads the last checkpoint (weights, optimizer, random state), multiplies the
learning rate by ``lr_backoff`` for the rest of the run and continues from the checkpoint's step; after
``max_rollbacks`` rollbacks the next bad step raises :class:`TrainingDiverged`. The log's ``rollbacks``
column counts the rollbacks taken before each row's step.

A checkpoint of other parameters (another ``fingerprint`` or loop settings) is discarded and training
starts over; a checkpoint of the same parameters whose tensors do not fit the model (a different
architecture under the same settings, e.g. an upstream stage rerun) is refused with a
:class:`~lnkit.io.CheckpointError` naming its folder, never silently restarted.
"""

from __future__ import annotations

import csv
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lnkit.io import CheckpointError, atomic_dir, atomic_path, verify_checkpoint
from lnkit.progress import progress_bar
from lnkit.train import distributed

STATE_DIR = "train_state"
LOG_FILE = "train_log.csv"
LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens", "elapsed_s", "rollbacks"]
_INT_FIELDS = {"step": int, "tokens": int, "rollbacks": int}
# The fields of the original LoopConfig: always part of the run's fingerprint. Fields added later join it
# only when set away from their default, so checkpoints written before they existed still resume.
_BASE_FIELDS = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "ckpt_every", "betas")
_MIN_HISTORY = 5  # good steps needed before the spike test applies (early gradient norms swing widely)


class TrainingDiverged(RuntimeError):
    """The guard met a bad step after ``max_rollbacks`` rollbacks."""


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ckpt_every: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    accum: int = 1  # micro-batches per optimizer step, each weighing 1/accum of the step's loss
    spike_factor: float = 0.0  # 0: guard off; else roll back when grad norm > factor x median of the window
    spike_window: int = 20  # good steps in the median
    lr_backoff: float = 0.5  # learning-rate multiplier after each rollback (for the rest of the run)
    max_rollbacks: int = 3  # then the next bad step raises TrainingDiverged

    def __post_init__(self):
        for name, ok in (("steps", self.steps >= 1), ("accum", self.accum >= 1), ("ckpt_every", self.ckpt_every >= 1),
                         ("spike_factor", self.spike_factor == 0 or self.spike_factor > 1),
                         ("spike_window", self.spike_window >= 1), ("lr_backoff", 0 < self.lr_backoff <= 1),
                         ("max_rollbacks", self.max_rollbacks >= 0)):
            if not ok:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)!r} is out of range")


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup to ``lr``, then cosine to ``lr * min_lr_ratio`` at the last step.

    >>> c = LoopConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.0)
    >>> lr_at(0, c), lr_at(9, c), round(lr_at(55, c), 3), lr_at(100, c)
    (0.1, 1.0, 0.5, 0.0)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def config_key(cfg: LoopConfig) -> str:
    """The loop settings as they enter a run's fingerprint (new fields only when not at their default).

    >>> config_key(LoopConfig(steps=5, lr=0.1)) == repr(LoopConfig(steps=5, lr=0.1)).split(", accum")[0] + ")"
    True
    >>> "accum=2" in config_key(LoopConfig(steps=5, lr=0.1, accum=2))
    True
    """
    parts = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)
             if f.name in _BASE_FIELDS or getattr(cfg, f.name) != f.default]
    return f"LoopConfig({', '.join(parts)})"


def spike_reason(loss: float, grad_norm: float, history: list[float], factor: float,
                 min_history: int = _MIN_HISTORY) -> str:
    """Why a step is bad ('' if it is good): a non-finite loss or grad norm, or a grad norm above
    ``factor`` x the median of ``history`` (the last good steps; needs ``min_history`` of them).

    >>> spike_reason(1.0, 0.5, [0.4] * 10, 4.0), spike_reason(float("nan"), 0.5, [], 4.0)
    ('', 'loss is nan')
    >>> spike_reason(1.0, 3.0, [0.4, 0.5, 0.6, 0.5, 0.5], 4.0)
    'grad norm 3 > 4 x median 0.5 of the last 5 good steps'
    """
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"grad norm is {grad_norm}"
    if factor > 0 and history and len(history) >= min_history:
        med = statistics.median(history)
        if grad_norm > factor * med:
            return f"grad norm {grad_norm:.4g} > {factor:g} x median {med:.4g} of the last {len(history)} good steps"
    return ""


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shapes(state_dict: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _architecture_mismatch(have: dict[str, tuple], model) -> str:
    """'' if tensors of the shapes ``have`` (name: shape) fit ``model``, else the first difference in words."""
    want = _shapes(model.state_dict())  # global shapes, sharded or not
    for k in sorted(set(have) | set(want)):
        if k not in want:
            return f"the checkpoint has tensor {k}, which the model lacks"
        if k not in have:
            return f"the model has tensor {k}, which the checkpoint lacks"
        if have[k] != want[k]:
            return f"tensor {k} is {list(have[k])} in the checkpoint but {list(want[k])} in the model"
    return ""


def _named_opt_state(model, opt, indexed: dict) -> dict:
    """An optimizer state keyed by parameter index (``opt.state_dict()``, as checkpoints written before the
    loop ran across processes hold it) keyed by parameter name, as ``set_state_dict`` takes it."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: s for i, s in indexed["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in indexed["param_groups"]]}


def _save_state(out_dir: Path, model, opt, step: int, fingerprint: str, guard: dict | None = None) -> None:
    """Checkpoint the loop into ``out_dir/train_state``, swapped in whole. One process: the full state in
    ``state.pt``, parameter names as keys. More: each process writes its DCP shards and rank 0 the loop's
    own state (step, random state, guard) in ``state.pt`` (:mod:`lnkit.train.distributed`)."""
    loop_state = {"step": step, "fingerprint": fingerprint, "rng": _rng_state(), "guard": guard or {}}
    rank, size = distributed.world()
    if size == 1:
        model_state, opt_state = distributed.full_state(model, opt)
        with atomic_dir(out_dir / STATE_DIR) as tmp:
            torch.save({"model": model_state, "opt_full": opt_state, **loop_state}, tmp / "state.pt")
        return
    with distributed.shared_atomic_dir(out_dir / STATE_DIR) as tmp:
        distributed.save_sharded(model, opt, tmp / distributed.SHARDS)
        if rank == 0:
            torch.save({**loop_state, "sharded": distributed.SHARDS}, tmp / "state.pt")


def _verify(path: Path) -> None:
    """:func:`~lnkit.io.verify_checkpoint` on rank 0 (every file read once, however many processes); its
    error is raised in every process."""
    rank, size = distributed.world()
    problem = ""
    if rank == 0:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problem = str(e)
    if size > 1:
        problem = distributed.from_rank0(problem)
    if problem:
        raise CheckpointError(f"cannot resume: {problem}. Delete {path} to restart this stage from scratch.")


def _load_state(out_dir: Path, model, opt, fingerprint: str, guard: dict | None = None) -> int:
    """Restore the checkpoint in ``out_dir`` (weights, optimizer, random state and, into ``guard``, the
    guard's state); return its step, or 0 when there is none or it belongs to other parameters. Any of the
    three formats loads under any number of processes: sharded (DCP), full, and full with an optimizer state
    keyed by index (written before the loop ran across processes)."""
    path = out_dir / STATE_DIR
    if not path.exists():
        return 0
    _verify(path)
    rank, size = distributed.world()
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        # A checkpoint of a run with other parameters: resuming it would silently mix two runs.
        print(f"ignoring {path}: it belongs to a run with other parameters; training from scratch")
        if size > 1:
            distributed.barrier()  # every process has read it
        if rank == 0:
            shutil.rmtree(path)
            (out_dir / LOG_FILE).unlink(missing_ok=True)
        return 0
    sharded = state.get("sharded")
    shapes = distributed.sharded_shapes(path / sharded) if sharded else _shapes(state["model"])
    if problem := _architecture_mismatch(shapes, model):
        # Same parameters, other model: an input changed under the run. Restarting would hide that.
        raise CheckpointError(f"cannot resume from {path}: it holds the weights of a different model ({problem}). "
                              f"Delete {path} to train this model from scratch.")
    if sharded:
        distributed.load_sharded(model, opt, path / sharded)
    else:
        opt_state = state["opt_full"] if "opt_full" in state else _named_opt_state(model, opt, state["opt"])
        distributed.load_full_state(model, opt, state["model"], opt_state)
    _set_rng_state(state.get("rng"))
    if guard is not None:
        guard.update(state.get("guard") or {})
    return int(state["step"])


def _read_log(out_dir: Path, upto: int) -> list[dict]:
    p = out_dir / LOG_FILE
    if not p.exists():
        return []
    with open(p) as f:  # empty cells (a column added after the row was written) are left out
        rows = [{k: _INT_FIELDS.get(k, float)(v) for k, v in r.items() if v not in ("", None)}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] < upto]


def read_train_log(out_dir: str | Path) -> list[dict]:
    """The per-step log a :func:`train_loop` wrote to ``out_dir`` (every step it has)."""
    return _read_log(Path(out_dir), upto=2**62)


def _write_log(out_dir: Path, rows: list[dict]) -> None:
    if distributed.world()[0] != 0:  # one writer
        return
    extra = [k for r in rows for k in r if k not in LOG_FIELDS]
    with atomic_path(out_dir / LOG_FILE) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS + list(dict.fromkeys(extra)))
        w.writeheader()
        w.writerows(rows)


def _on_device(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (batches are built on the CPU; a no-op there)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward(model, batch: dict, loss_fn) -> tuple[torch.Tensor, dict[str, float]]:
    batch = _on_device(batch, model)
    out = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError(f"loss_fn returned a dict without a 'loss' entry (keys: {sorted(out)})")
        extras = {k: float(v) for k, v in out.items() if k != "loss"}
        return out["loss"], extras
    return out, {}


def train_loop(model, next_batch: Callable[[int], dict], cfg: LoopConfig, out_dir: str | Path,
               desc: str = "train", progress: bool = True, fingerprint: str = "",
               loss_fn: Callable | None = None) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` optimizer steps; resume from ``out_dir`` if a checkpoint of the
    same run is there (same ``fingerprint``, e.g. the stage parameters' digest, and the same loop settings).

    Step ``s`` accumulates gradients over ``next_batch(s * cfg.accum + k)`` for ``k < cfg.accum``. A batch
    is a dict of model inputs, optionally with ``n_tokens`` (else the attention mask's sum is logged).
    ``loss_fn(model, batch)`` replaces ``model(**batch).loss``; it may return a scalar tensor or a dict
    ``{"loss": tensor, **floats}`` whose other entries are logged as extra columns (mean over micro-batches).
    Across processes each process's loss is weighted by its share of the positions the loss averages over:
    ``loss_fn.loss_tokens(batch)`` counts them if ``loss_fn`` has it, else the causal-LM label count
    (:func:`lnkit.train.distributed.loss_tokens`); a loss that is not a mean over positions needs its own.
    Returns the per-step log (also written to ``out_dir/train_log.csv``).
    """
    fingerprint = f"{fingerprint}|{config_key(cfg)}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, size = distributed.world()
    if size > 1:
        distributed.shard(model)  # before the optimizer: it must hold the sharded parameters
        progress = progress and rank == 0
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    guarded = cfg.spike_factor > 0
    # The guard's state travels with the checkpoint: lr scale, rollbacks so far, recent good grad norms.
    guard = {"lr_scale": 1.0, "rollbacks": 0, "history": []}
    start = _load_state(out_dir, model, opt, fingerprint, guard)
    if start:
        print(f"{desc}: resuming from the checkpoint at step {start} of {cfg.steps}")
    elif guarded:  # a rollback needs a checkpoint to go back to, even before the first save
        _save_state(out_dir, model, opt, 0, fingerprint, guard)
    rows = _read_log(out_dir, start)
    model.train()
    t0 = time.perf_counter() - (float(rows[-1]["elapsed_s"]) if rows else 0.0)
    bar = progress_bar(total=cfg.steps, desc=desc, disable=not progress, initial=start)
    step = start
    while step < cfg.steps:
        lr = lr_at(step, cfg) * guard["lr_scale"]
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum, n_tokens, extras = 0.0, 0, {}
        for k in range(cfg.accum):
            batch = dict(next_batch(step * cfg.accum + k))
            n_tokens += int(batch.pop("n_tokens")) if "n_tokens" in batch else int(batch["attention_mask"].sum())
            share = 1.0
            if size > 1:  # this process's rows, its loss weighted by its share of the batch's loss tokens
                batch = distributed.local_rows(batch, rank, size)
                mine = (getattr(loss_fn, "loss_tokens", None) or distributed.loss_tokens)(batch)
                share = mine / distributed.all_sum(mine)
            loss, ex = _forward(model, batch, loss_fn)
            (loss * (share * size) / cfg.accum).backward()  # FSDP averages gradients over the processes
            loss_sum += distributed.all_sum(loss.item() * share) if size > 1 else loss.item()
            for key, v in ex.items():  # weighted like the loss: exact for terms over the loss's positions
                v = distributed.all_sum(v * share) if size > 1 else v
                extras[key] = extras.get(key, 0.0) + v / cfg.accum
        loss_val = loss_sum / cfg.accum
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        gn = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()  # sharded: a DTensor
        if guarded and (why := spike_reason(loss_val, gn, guard["history"], cfg.spike_factor,
                                                 min(_MIN_HISTORY, cfg.spike_window))):
            if guard["rollbacks"] >= cfg.max_rollbacks:
                bar.close()
                raise TrainingDiverged(
                    f"{desc}: step {step} is bad ({why}) after {guard['rollbacks']} rollbacks "
                    f"(max_rollbacks={cfg.max_rollbacks}, learning rate already x{guard['lr_scale']:g}); "
                    f"the last good checkpoint is in {out_dir / STATE_DIR}. Lower lr or raise spike_factor.")
            scale, n = guard["lr_scale"] * cfg.lr_backoff, guard["rollbacks"] + 1
            opt.zero_grad(set_to_none=True)
            back = _load_state(out_dir, model, opt, fingerprint, guard)
            guard.update(lr_scale=scale, rollbacks=n)
            # Record the new lr scale on disk at once: a crash before the next save must not undo it.
            _save_state(out_dir, model, opt, back, fingerprint, guard)
            rows = [r for r in rows if r["step"] < back]
            _write_log(out_dir, rows)
            msg = (f"{desc}: rollback {n}/{cfg.max_rollbacks} at step {step}: {why}; back to the checkpoint "
                   f"at step {back}, learning rate x{scale:g} from now on")
            (bar.write if progress else print)(msg)
            step = back
            bar.n = step
            bar.refresh()
            continue
        opt.step()
        if guarded:
            guard["history"] = (guard["history"] + [gn])[-cfg.spike_window:]
        rows.append({
            "step": step, "loss": round(loss_val, 5), "lr": lr, "grad_norm": round(gn, 4), "tokens": n_tokens,
            "elapsed_s": round(time.perf_counter() - t0, 3), "rollbacks": guard["rollbacks"],
            **{key: round(v, 5) for key, v in extras.items()},
        })
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}")
        step += 1
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_state(out_dir, model, opt, step, fingerprint, guard)
            _write_log(out_dir, rows)
    bar.close()
    model.eval()
    return rows
