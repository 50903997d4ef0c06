"""Jobs of 20 steps of the shared training loop on a tiny Llama, one after another in the same processes (a
process start costs more than a job): tests/test_distributed.py runs them under `torchrun`, and calls
:func:`run` in its own process for single-process jobs.

    distributed_worker.py KIND:OUT:CRASH [KIND:OUT:CRASH ...]

KIND: ``lm`` (causal-LM batches whose rows have different numbers of loss tokens, as packed SFT rows do),
``kd`` (LN-Ultra's distillation recipe, ``kd_cpt``: KL + cosine from a frozen teacher on padded rows of
different lengths, then the LM loss alone from step 15), ``lm_old`` (``lm``, checkpointed as the loop did
before it ran across processes), and two deliberately wrong weightings the test must tell apart:
``lm_mean_of_means`` (every process's loss weighs the same) and ``kd_label_weighted`` (KD losses weighted
by label counts, not by the positions they average over). CRASH: ``-`` (none), a step (the run stops
there, as a killed one would, after its checkpoint at step 10), or ``midsave`` (it stops inside the step-20
checkpoint, after every process wrote its shards, before the swap). A crash ends the job, not the
processes: the next job starts from a fresh model. Each job leaves in OUT ``rows.json`` (its log) and
``weights.pt`` (the full final weights), or ``crash.json`` (the step and format of the checkpoint on disk
after the crash, and any temporary folders left beside it).
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402
from lnkit.io import atomic_dir  # noqa: E402
from lnkit.train import distributed, loop  # noqa: E402
from lnkit.train.distill import make_loss_fn  # noqa: E402
from lnkit.train.loop import LoopConfig, train_loop  # noqa: E402

STEPS, CPT_FROM = 20, 15
CONFIG = LoopConfig(steps=STEPS, lr=3e-3, warmup=2, ckpt_every=10)
FINGERPRINT = "distributed-test"


class Crash(Exception):
    """Stops a job where a killed run would stop; the worker goes on to its next job."""


def lm_batches() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(3, 101, (4, 24), generator=g)
        labels = ids.clone()
        for r, cut in enumerate(torch.randint(2, 20, (4,), generator=g).tolist()):
            labels[r, :cut] = -100  # a prompt of its own length, no loss on it
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def kd_batches() -> list[dict]:
    g = torch.Generator().manual_seed(6)
    batches = []
    for i in range(STEPS):
        ids = torch.randint(3, 101, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        lengths = torch.randint(6, 25, (4,), generator=g).tolist()
        cuts = torch.randint(1, 6, (4,), generator=g).tolist()
        for r, (n, cut) in enumerate(zip(lengths, cuts)):
            ids[r, n:], mask[r, n:], labels[r, n:] = 0, 0, -100  # right padding
            labels[r, :cut] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                        "distill": torch.tensor(i < CPT_FROM)})
    return batches


def old_save_state(out_dir, model, opt, step, fingerprint, guard=None):
    """How the loop checkpointed before it ran across processes (optimizer state keyed by index)."""
    with atomic_dir(out_dir / loop.STATE_DIR) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "fingerprint": fingerprint,
                    "rng": loop._rng_state(), "guard": guard or {}}, tmp / "state.pt")


def crash_in_second_save():
    """``save_sharded`` that, the second time (step 20), crashes once every process has written its shards."""
    calls, save = [], distributed.save_sharded

    def save_then_crash(model, opt, folder):
        save(model, opt, folder)
        calls.append(folder)
        if len(calls) == 2:
            raise Crash
    return mock.patch.object(distributed, "save_sharded", save_then_crash)


def patches(kind: str, crash: str):
    stack = contextlib.ExitStack()
    if kind == "lm_old":
        stack.enter_context(mock.patch.object(loop, "_save_state", old_save_state))
    if kind == "lm_mean_of_means":
        stack.enter_context(mock.patch.object(distributed, "loss_tokens", lambda batch: 1))
    if crash == "midsave":
        stack.enter_context(crash_in_second_save())
    return stack


def loss_fn_for(kind: str):
    if not kind.startswith("kd"):
        return None
    teacher = helpers.tiny_llama(seed=1).requires_grad_(False)  # replicated: each process holds all of it
    kd = make_loss_fn(teacher, mode="kd_cpt")
    if kind == "kd_label_weighted":
        return lambda model, batch: kd(model, batch)  # no loss_tokens: the loop counts labels
    return kd


def run(kind: str, out: Path, crash: str) -> None:
    rank = distributed.world()[0]
    loss_fn = loss_fn_for(kind)
    model = helpers.tiny_llama(seed=0)
    batches = kd_batches() if kind.startswith("kd") else lm_batches()

    def next_batch(i):
        if crash.isdigit() and i == int(crash):
            raise Crash
        return batches[i]

    try:
        with patches(kind, crash):
            rows = train_loop(model, next_batch, CONFIG, out, desc=out.name, progress=False,
                              fingerprint=FINGERPRINT, loss_fn=loss_fn)
    except Crash:
        if rank == 0:
            state = torch.load(out / loop.STATE_DIR / "state.pt", weights_only=True)
            form = "sharded" if "sharded" in state else "full" if "opt_full" in state else "indexed"
            left = sorted(p.name for p in out.iterdir() if p.name.startswith(loop.STATE_DIR + ".tmp-"))
            crashed = {"step": state["step"], "format": form, "leftovers": left}
            (out / "crash.json").write_text(json.dumps(crashed))
        return
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
        torch.save(weights, out / "weights.pt")


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for job in sys.argv[1:]:
        kind, out, crash = job.split(":")
        run(kind, Path(out), crash)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pytest imports this file when it collects doctests: nothing runs then
    main()
