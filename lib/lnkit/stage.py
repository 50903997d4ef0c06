"""A stage's folder: start it, finish it, and tell whether it is already done.

``<run_dir>/<stage>/`` holds the stage's artifacts, ``params.json`` (the parameters used),
``metrics.json`` and, written last, ``_COMPLETE.json`` with the parameters' digest. The runner skips a
stage whose marker matches its parameters; starting a stage removes a stale marker and any half-written
leftovers of a crashed attempt, so a rerun never loads or keeps them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lnkit.io import atomic_write_json, clean_partial
from lnkit.params import StageParams

MARKER = "_COMPLETE.json"


def stage_path(p: StageParams) -> Path:
    return Path(p.run_dir) / p.STAGE


def is_complete(p: StageParams) -> bool:
    m = stage_path(p) / MARKER
    try:
        return json.loads(m.read_text()).get("digest") == p.digest()
    except (OSError, json.JSONDecodeError):
        return False


def start(p: StageParams) -> Path:
    """Prepare the stage folder for a (re)run and record the parameters; returns the folder."""
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


def require(run_dir: str | Path, stage: str) -> Path:
    """The folder of an earlier stage, which must be complete."""
    d = Path(run_dir) / stage
    if not (d / MARKER).exists():
        raise FileNotFoundError(f"stage {stage} has not completed in {run_dir}: run it first "
                                f"(python -m lnkit.runs <run file> --only {stage})")
    return d
