"""lm-eval-harness on lnkit's checkpoints and the tiny world's test sets.

lnkit's checkpoints are Hugging Face folders; the Puzzle children's type (``nemotron-nas``) is registered
with transformers' Auto classes when :mod:`lnkit.model` is imported, so lm-eval's ``hf`` model type loads
them in any process that imported it first. This module is that process::

    python -m lnkit.lm_eval --model hf --model_args pretrained=runs/tiny/06_reasoning_sft/model,dtype=float32 \\
        --tasks lnkit_tiny --metadata '{"run_dir": "runs/tiny"}' --device cpu --batch_size 32

takes every argument of the ``lm_eval`` command and adds ``--include_path`` for the tasks shipped in
``lnkit/lm_eval_tasks/`` (``lnkit_math``, ``lnkit_science``, ``lnkit_code``, ``lnkit_instruct``,
``lnkit_chat``, the tag ``lnkit_tiny`` for all five: greedy, thinking off, lnkit's verifiers as the metric,
code run in lnkit's sandbox). At real scale the same command runs lm-eval's own tasks on a converted
checkpoint, e.g. ``--tasks gsm8k,gpqa_diamond_zeroshot,ifeval,minerva_math`` (lm-eval downloads those data
sets; our tasks need no network).

:func:`evaluate` is the same from Python.
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = tuple(f"lnkit_{d}" for d in ("math", "science", "code", "instruct", "chat"))


def evaluate(model_dir: str | Path, run_dir: str | Path, tasks=TASKS, *, limit: int | None = None,
             batch_size: int = 32, device: str = "cpu") -> dict:
    """lm-eval's ``simple_evaluate`` of a checkpoint on the tiny world's tasks (the test split of
    ``run_dir``), with every sample logged (``results["samples"][task]``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import lnkit.model  # noqa: F401  (nemotron-nas for the Auto classes)

    tm = TaskManager(include_path=str(TASKS_DIR), metadata={"run_dir": str(run_dir)})
    return simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                           tasks=list(tasks), task_manager=tm, limit=limit, batch_size=batch_size, device=device,
                           log_samples=True, bootstrap_iters=0)


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import lnkit.model  # noqa: F401

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
