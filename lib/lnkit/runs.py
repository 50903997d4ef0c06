"""Run the stage notebooks headlessly with papermill, from one YAML run file.

    python -m lnkit.runs papermill_runs/tiny.yaml [--from STAGE] [--only STAGE] [--force]

A run file names the run, its artifact folder, parameters shared by every stage and parameters per
stage::

    run: tiny                 # executed notebooks go to papermill_runs/output/tiny/
    run_dir: runs/tiny        # artifacts go to runs/tiny/<stage>/
    shared: {seed: 0}         # given to every stage that has the field
    stages:
      00_parent: {steps: 1500}

All stages' parameters are validated before anything runs. A stage whose completion marker matches its
parameters is skipped (``--force`` reruns it), unless an earlier stage of the run completed after it did:
then its inputs changed and it reruns. A failing stage stops the run with exit code 1 and names
the notebook, the cell and the error; earlier stages' artifacts are left as they are.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import fields
from pathlib import Path

import yaml

from lnkit.params import ParamError, StageParams
from lnkit.stage import MARKER, is_complete

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
OUTPUT = REPO / "papermill_runs" / "output"
# Stage name -> parameters class. The notebook is notebooks/<stage>.ipynb. Order is run order.
STAGES = {
    "00_parent": "lnkit.parent:ParentParams",
    "01_block_library": "lnkit.puzzle.library_stage:LibraryParams",
    "02_architecture_search": "lnkit.puzzle.search_stage:SearchParams",
    "03_ffn_fusion": "lnkit.fusion_stage:FusionParams",
    "04_distillation": "lnkit.distill_stage:DistillParams",
    "05_reasoning_data": "lnkit.curation_stage:CurationParams",
    "06_reasoning_sft": "lnkit.train.sft:SFTParams",
}
RUN_KEYS = {"run", "run_dir", "shared", "stages"}


class RunError(RuntimeError):
    """A run file is invalid or a stage failed."""


def params_class(stage: str) -> type[StageParams]:
    if stage not in STAGES:
        raise RunError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    mod, cls = STAGES[stage].split(":")
    return getattr(importlib.import_module(mod), cls)


def load_run(path: str | Path) -> tuple[dict, dict[str, StageParams]]:
    """Parse and validate a run file; return its header and every stage's parameters, in run order."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"run file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunError(f"run file {path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise RunError(f"run file {path}: expected a mapping with keys {sorted(RUN_KEYS)}")
    unknown = set(spec) - RUN_KEYS
    if unknown:
        raise RunError(f"run file {path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(RUN_KEYS)}")
    for key in ("run", "run_dir", "stages"):
        if key not in spec:
            raise RunError(f"run file {path}: missing required key {key!r}")
    if not isinstance(spec["stages"], dict) or not spec["stages"]:
        raise RunError(f"run file {path}: 'stages' must map stage names to parameters")
    shared = spec.get("shared") or {}
    run_dir = Path(spec["run_dir"])
    run_dir = run_dir if run_dir.is_absolute() else (Path.cwd() / run_dir).resolve()
    for stage in spec["stages"]:
        params_class(stage)  # unknown stage -> RunError naming the known ones
    used_shared = set()
    params: dict[str, StageParams] = {}
    for stage in STAGES:
        if stage not in spec["stages"]:
            continue
        cls = params_class(stage)
        names = {f.name for f in fields(cls)}
        own = spec["stages"][stage] or {}
        if not isinstance(own, dict):
            raise RunError(f"run file {path}: parameters of stage {stage} must be a mapping")
        values = {k: v for k, v in shared.items() if k in names}
        used_shared |= values.keys()
        values.update(own)
        values["run_dir"] = str(run_dir)
        for k, v in values.items():  # paths in a run file are relative to where the run is started
            if k.endswith(("_dir", "_checkpoint")) and isinstance(v, str) and v:
                values[k] = str((Path.cwd() / v).resolve()) if not Path(v).is_absolute() else v
        try:
            params[stage] = cls.from_dict(values)
        except (ParamError, TypeError) as e:
            raise RunError(f"run file {path}: {e}") from None
    unused = set(shared) - used_shared
    if unused:
        raise RunError(f"run file {path}: shared parameter(s) {sorted(unused)} belong to no stage in this run")
    return {"run": str(spec["run"]), "run_dir": run_dir, "path": path}, params


def run_stage(name: str, p: StageParams, run: str, log=print) -> Path:
    """Execute one stage notebook with papermill; raise RunError naming notebook, cell and error."""
    import papermill as pm

    src = NOTEBOOKS / f"{name}.ipynb"
    out = OUTPUT / run / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] executing {src.relative_to(REPO)} -> {out.relative_to(REPO)}")
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(src), str(out), parameters=p.to_dict(), cwd=str(NOTEBOOKS),
                            kernel_name="python3", progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as e:
        raise RunError(f"stage {name} failed in notebook {out}, cell {e.cell_index} "
                       f"(execution count {e.exec_count}): {e.ename}: {e.evalue}") from None
    if not is_complete(p):
        raise RunError(f"stage {name}: notebook {out} finished but did not mark the stage complete")
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lnkit.runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_file")
    ap.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    ap.add_argument("--only", metavar="STAGE", help="run only this stage")
    ap.add_argument("--force", action="store_true", help="rerun stages even if complete with these parameters")
    a = ap.parse_args(argv)
    try:
        head, params = load_run(a.run_file)
        names = list(params)
        for flag in (a.start, a.only):
            if flag is not None and flag not in params:
                raise RunError(f"stage {flag!r} is not in run file {a.run_file}; it has: {', '.join(names)}")
        if a.only:
            names = [a.only]
        elif a.start:
            names = names[names.index(a.start):]
        print(f"run {head['run']}: artifacts in {head['run_dir']}, stages {', '.join(names)}")
        order = list(params)
        for name in names:
            if is_complete(params[name]) and not a.force:
                newer = stale_because(head["run_dir"], order[: order.index(name)], name)
                if newer is None:
                    print(f"[{name}] complete with these parameters; skipped (--force reruns it)")
                    continue
                print(f"[{name}] complete, but {newer} finished after it: rerunning")
            run_stage(name, params[name], head["run"])
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def stale_because(run_dir, earlier: list[str], name: str) -> str | None:
    """The first of the ``earlier`` stages that completed after stage ``name`` did (its inputs changed
    since), or None. Compares the completion markers' times.

    >>> import tempfile, pathlib, os
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i, s in enumerate(["a", "b"]):
    ...     (d / s).mkdir(); _ = (d / s / MARKER).write_text("{}"); os.utime(d / s / MARKER, (i, i))
    >>> stale_because(d, ["a"], "b") is None
    True
    >>> os.utime(d / "a" / MARKER, (5, 5)); stale_because(d, ["a"], "b")
    'a'
    """
    mine = Path(run_dir) / name / MARKER
    if not mine.exists():
        return None
    for stage in earlier:
        marker = Path(run_dir) / stage / MARKER
        if marker.exists() and marker.stat().st_mtime > mine.stat().st_mtime:
            return stage
    return None


if __name__ == "__main__":
    sys.exit(main())
