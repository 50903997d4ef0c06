"""A function run by ``n`` processes under ``torchrun``, from a process that is not distributed itself.

::

    launch.across(2, "lnkit.stages.sft:train_worker", {...params...}, log_file)

starts ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m lnkit.train.launch <target>
<payload.json>`` (one node, a free rendezvous port); each process joins a process group (NCCL and its own GPU
where CUDA is, gloo on the CPU), calls ``target(payload)``, and leaves. Their output goes to ``log_file`` and
is echoed here line by line; a failure raises with the log's last lines. A stage notebook keeps its own
single process for everything else (evaluation, plots) and hands only training across: see
:func:`lnkit.stages.sft.train_sft`. Multi-node launches (a rendezvous across Slurm nodes) are not done here.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path


def across(n: int, target: str, payload: dict, log_file: str | Path, echo=print) -> None:
    """Run ``target`` ("module:function") in ``n`` processes under torchrun with ``payload``; raise
    RuntimeError naming the log when any process fails."""
    if n < 2:
        raise ValueError(f"n={n}: across() is for 2 or more processes")
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lnkit-launch-") as tmp:
        spec = Path(tmp) / "payload.json"
        spec.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "lnkit.train.launch", target, str(spec)]
        tail: deque[str] = deque(maxlen=30)
        with open(log_file, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True, bufsize=1) as proc:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                echo(line.rstrip())
        if proc.returncode:
            raise RuntimeError(f"{target} across {n} processes failed (exit {proc.returncode}); {log_file} ends:\n"
                               + "\n".join(tail))


def device() -> str:
    """This process's device: its own GPU (``LOCAL_RANK``) where CUDA is, else the CPU."""
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    target, payload = argv
    module, fn = target.split(":")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    try:
        getattr(importlib.import_module(module), fn)(json.loads(Path(payload).read_text()))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
