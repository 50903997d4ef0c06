"""The shared training loop under torchrun with FSDP2 on the CPU (gloo): 2 processes train the same global
batches to the same losses as 1 process, causal-LM and distillation alike; checkpoints resume across
world sizes (1 -> 2 from the one-file format and from the format before the loop ran across processes,
2 -> 1 from the sharded DCP format, 2 -> 2 after a crash inside a save) and end where an uninterrupted run
ends. The jobs are tests/distributed_worker.py's: the 2-process ones in one torchrun launch (a launch costs
far more than a job), the 1-process ones in this test's own process, a plain process without a process
group, as a single-process stage runs."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
import helpers
from lnkit.io import CheckpointError
from lnkit.train.distill import make_loss_fn
from lnkit.train.loop import train_loop

TOL = 1.01e-5  # the log keeps 5 decimals


def parse(root: Path, job: str) -> tuple[str, Path, str]:
    """``kind:name:crash`` with ``name`` a folder under ``root``."""
    kind, name, crash = job.split(":")
    return kind, root / name, crash


def one_process(root: Path, *jobs: str) -> str:
    """Run ``jobs`` here, one thread as in the worker; their stdout."""
    threads, out = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            for job in jobs:
                worker.run(*parse(root, job))
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def two_processes(root: Path, *jobs: str) -> str:
    """Run ``jobs`` in one ``torchrun --nproc_per_node=2`` launch; its stdout."""
    args = [":".join(map(str, parse(root, job))) for job in jobs]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           worker.__file__, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    out = one_process(root, "lm:one:-", "lm:from_one:12", "lm_old:from_old:12", "kd:kd_one:-")
    shutil.copytree(root / "from_old", root / "from_old_1")  # the 2-process launch resumes from_old in place
    out += two_processes(root, "lm:two:-", "lm:from_one:-", "lm:from_old:-", "lm:from_two:12", "lm:midsave:midsave",
                         "lm:midsave:-", "kd:kd_two:-", "lm_mean_of_means:mean_of_means:-",
                         "kd_label_weighted:kd_label_weighted:-")
    out += one_process(root, "lm:from_two:-", "lm:from_old_1:-")
    return root, out


def column(root: Path, name: str, key: str = "loss") -> list[float]:
    return [r[key] for r in json.loads((root / name / "rows.json").read_text()) if key in r]


def assert_same_run(root: Path, name: str, like: str) -> None:
    assert len(column(root, like)) == 20
    assert column(root, name) == pytest.approx(column(root, like), abs=TOL)
    want, got = (torch.load(root / n / "weights.pt", weights_only=True) for n in (like, name))
    assert want.keys() == got.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


def test_distillation_loss_counts_the_positions_it_averages_over():
    """What weighs each process's KD loss: the real tokens (``kd_positions="all"``), the labels on LM-only
    batches; a sum of means over both cannot be weighed by one count and says so."""
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, 6, 7, -100], [-100, -100, -100, 8]])}
    kd = make_loss_fn(teacher=object(), mode="kd_cpt")
    assert kd.loss_tokens(batch) == 7 and kd.loss_tokens({**batch, "distill": torch.tensor(False)}) == 3
    assert make_loss_fn(teacher=object(), kd_positions="labels", lm_weight=0.5).loss_tokens(batch) == 3
    with pytest.raises(ValueError, match="set kd_positions='labels' or lm_weight=0"):
        make_loss_fn(teacher=object(), lm_weight=0.5).loss_tokens(batch)


def test_two_processes_train_like_one(runs):
    root, _ = runs
    assert_same_run(root, "two", like="one")
    state = torch.load(root / "two" / "train_state" / "state.pt", weights_only=True)
    assert state["step"] == 20 and "model" not in state  # sharded: the weights are in the DCP shards
    assert {p.name for p in (root / "two" / "train_state" / "dcp").iterdir()} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp"}


def test_distillation_two_processes_like_one(runs):
    root, _ = runs
    assert_same_run(root, "kd_two", like="kd_one")
    for key in ("kl", "cosine"):  # KD steps (0-14); steps 15-19 are the LM loss alone
        assert column(root, "kd_two", key) == pytest.approx(column(root, "kd_one", key), abs=TOL)
    assert len(column(root, "kd_one", "kl")) == 15


def test_wrong_weightings_would_be_caught(runs):
    """Each process's mean weighing the same, or KD losses weighted by labels: the losses then differ from
    one process's by far more than the tolerance, so the parity tests above can fail."""
    root, _ = runs
    for name, like in (("mean_of_means", "one"), ("kd_label_weighted", "kd_one")):
        worst = max(abs(a - b) for a, b in zip(column(root, name), column(root, like)))
        assert worst > 100 * TOL, (name, worst)


def assert_resumed(runs, name: str, form: str) -> None:
    """``name`` crashed with a checkpoint of format ``form`` at step 10, resumed from it, ended like ``one``."""
    root, out = runs
    assert json.loads((root / name / "crash.json").read_text()) == {"step": 10, "format": form, "leftovers": []}
    assert f"{name}: resuming from the checkpoint at step 10" in out
    assert_same_run(root, name, like="one")


def test_one_process_checkpoint_resumes_with_two(runs):
    assert_resumed(runs, "from_one", "full")


def test_checkpoint_from_before_the_loop_ran_across_processes_resumes_with_two_and_one(runs):
    assert_resumed(runs, "from_old", "indexed")
    assert_resumed(runs, "from_old_1", "indexed")


def test_sharded_checkpoint_resumes_with_one(runs):
    assert_resumed(runs, "from_two", "sharded")


def test_crash_inside_a_sharded_save_keeps_the_previous_checkpoint_and_resumes_with_two(runs):
    assert_resumed(runs, "midsave", "sharded")


def test_sharded_checkpoint_of_another_model_is_refused(runs, tmp_path):
    """The shapes come from the DCP metadata: a mismatch is named before any shard is read."""
    root, _ = runs
    shutil.copytree(root / "two", tmp_path / "two")
    wider = helpers.tiny_llama(seed=0, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"different model \(tensor model\.layers\.0\.mlp\.down_proj\.weight "
                                              r"is \[64, 128\] in the checkpoint but \[64, 96\] in the model\)"):
        train_loop(wider, worker.lm_batches().__getitem__, worker.CONFIG, tmp_path / "two", progress=False,
                   fingerprint=worker.FINGERPRINT)
