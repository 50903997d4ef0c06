"""The shared training loop under torchrun with FSDP2 on the CPU (gloo): 2 processes train the same global
batches to the same losses as 1 process, and a run saved with 2 processes resumes with 1 and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(nproc: int, out: Path, crash_at: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(WORKER), str(out), str(crash_at)], capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())


def weights(out: Path) -> dict:
    return torch.load(out / "train_state" / "state.pt", weights_only=True)["model"]


def test_two_processes_train_like_one_and_resume_with_one(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for nproc, out in ((1, one), (2, two)):
        proc = torchrun(nproc, out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(one)) == 20
    assert losses(two) == pytest.approx(losses(one), abs=1.01e-5)  # the log keeps 5 decimals
    for k, v in weights(one).items():
        assert torch.allclose(weights(two)[k], v, atol=1e-5), k
    # saved by 2 processes at step 10, crashed at 12, resumed by 1 process
    crashed = torchrun(2, resumed, crash_at=12)
    assert crashed.returncode != 0 and torch.load(resumed / "train_state" / "state.pt", weights_only=True)["step"] == 10
    proc = torchrun(1, resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoint at step 10" in proc.stdout
    assert losses(resumed) == pytest.approx(losses(one), abs=1.01e-5)
    for k, v in weights(one).items():
        assert torch.allclose(weights(resumed)[k], v, atol=1e-5), k
