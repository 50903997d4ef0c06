"""A stage's life in its folder: start it, finish it, and tell whether it is already done.

``<run_dir>/<stage>/`` holds the stage's artifacts, ``params.json`` (the parameters used),
``metrics.json`` and, written last, ``_COMPLETE.json`` with the parameters' digest. The runner skips a
stage whose marker matches its parameters; starting a stage removes a stale marker and any half-written
leftovers of a crashed attempt, so a rerun never loads or keeps them. Which folder a stage name means is
:mod:`lnkit.checkpoints`'s business.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lnkit.checkpoints import MARKER, StageNotComplete, stage_dir
from lnkit.io import atomic_write_json, clean_partial
from lnkit.params import StageParams
from lnkit.progress import show_library_bars

__all__ = ["MARKER", "stage_path", "is_complete", "start", "finish", "check_inputs", "missing_input"]


def stage_path(p: StageParams) -> Path:
    return stage_dir(p.run_dir, p.STAGE)


def is_complete(p: StageParams) -> bool:
    m = stage_path(p) / MARKER
    try:
        return json.loads(m.read_text()).get("digest") == p.digest()
    except (OSError, json.JSONDecodeError):
        return False


def missing_input(p: StageParams, needs: list[str]) -> str | None:
    """The first of the earlier stages ``needs`` that has not completed in ``p.run_dir``, or None."""
    return next((need for need in needs if not (stage_dir(p.run_dir, need) / MARKER).is_file()), None)


def check_inputs(p: StageParams, needs: list[str], command_for=None) -> None:
    """Raise :class:`~lnkit.checkpoints.StageNotComplete` naming the first of the earlier stages ``needs``
    that has not completed in ``p.run_dir``, and the command that runs it (``command_for(stage)`` when
    given: the runner knows the run file); write nothing."""
    need = missing_input(p, needs)
    if need is not None:
        how = command_for(need) if command_for else f"python -m lnkit.runs <run file> --until {need}"
        raise StageNotComplete(f"stage {p.STAGE} reads stage {need}, which has not completed in {p.run_dir}. "
                               f"Run it first: {how}")


def start(p: StageParams) -> Path:
    """Prepare the stage folder for a (re)run and record the parameters; returns the folder. Library
    progress bars follow ``p.progress`` from here on."""
    show_library_bars(p.progress)
    d = stage_path(p)
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).unlink(missing_ok=True)
    clean_partial(d)
    atomic_write_json(d / "params.json", {"stage": p.STAGE, "digest": p.digest(), "params": p.to_dict()})
    return d


def finish(p: StageParams, metrics: dict) -> Path:
    """Write ``metrics.json`` then the completion marker (last, so a crash before it means 'not done')."""
    d = stage_path(p)
    atomic_write_json(d / "metrics.json", metrics)
    atomic_write_json(d / MARKER, {"stage": p.STAGE, "digest": p.digest(), "finished": time.strftime("%F %T")})
    return d
