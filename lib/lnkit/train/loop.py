"""The one training loop every stage shares: AdamW, warmup then cosine decay, gradient clipping,
atomic checkpoints and resume, a per-step CSV log and a progress bar.

Resume is exact: the loop state (weights, optimizer moments, step) is checkpointed atomically every
``ckpt_every`` steps and batches are a pure function of the step, so a run killed at any point and
started again continues from its last checkpoint and sees the same data it would have seen.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lnkit.io import CheckpointError, atomic_dir, atomic_path, verify_checkpoint

STATE_DIR = "train_state"
LOG_FILE = "train_log.csv"
LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"]


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


def _save_state(out_dir: Path, model, opt, step: int, fingerprint: str) -> None:
    with atomic_dir(out_dir / STATE_DIR) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "fingerprint": fingerprint}, tmp / "state.pt")


def _load_state(out_dir: Path, model, opt, fingerprint: str) -> int:
    path = out_dir / STATE_DIR
    if not path.exists():
        return 0
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}. Delete {path} to restart this stage from scratch.") from None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        # A checkpoint of a run with other parameters: resuming it would silently mix two runs.
        print(f"ignoring {path}: it belongs to a run with other parameters; training from scratch")
        shutil.rmtree(path)
        (out_dir / LOG_FILE).unlink(missing_ok=True)
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def _read_log(out_dir: Path, upto: int) -> list[dict]:
    p = out_dir / LOG_FILE
    if not p.exists():
        return []
    types = {"step": int, "tokens": int}
    with open(p) as f:
        rows = [{k: types.get(k, float)(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] < upto]


def _write_log(out_dir: Path, rows: list[dict]) -> None:
    with atomic_path(out_dir / LOG_FILE) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def train_loop(model, next_batch: Callable[[int], dict], cfg: LoopConfig, out_dir: str | Path,
               desc: str = "train", progress: bool = True, fingerprint: str = "") -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps on ``next_batch(step)``; resume from ``out_dir`` if a
    checkpoint of the same run is there (same ``fingerprint``, e.g. the stage parameters' digest, and
    the same loop settings). Returns the per-step log (also written to ``out_dir/train_log.csv``)."""
    fingerprint = f"{fingerprint}|{cfg}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    start = _load_state(out_dir, model, opt, fingerprint)
    if start:
        print(f"{desc}: resuming from the checkpoint at step {start} of {cfg.steps}")
    rows = _read_log(out_dir, start)
    model.train()
    t0 = time.perf_counter() - (float(rows[-1]["elapsed_s"]) if rows else 0.0)
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = dict(next_batch(step))
        n_tokens = int(batch.pop("n_tokens")) if "n_tokens" in batch else int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        rows.append({
            "step": step, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg), "grad_norm": round(gn.item(), 4),
            "tokens": n_tokens, "elapsed_s": round(time.perf_counter() - t0, 3),
        })
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            _save_state(out_dir, model, opt, step + 1, fingerprint)
            _write_log(out_dir, rows)
    model.eval()
    return rows
