"""Run the stage notebooks headlessly with papermill, from one YAML run file.

    python -m lnkit.runs papermill_runs/tiny.yaml [--from STAGE] [--until STAGE] [--only STAGE] [--force]

A run file names the run, its artifact folder, parameters shared by every stage and parameters per
stage::

    run: tiny                 # executed notebooks go to papermill_runs/output/tiny/
    run_dir: ../runs/tiny     # artifacts go to <run_dir>/<stage>/
    shared: {seed: 0}         # given to every stage that has the field
    stages:
      00_parent: {steps: 1500}

Relative paths in a run file (``run_dir`` and every ``*_dir`` / ``*_checkpoint`` parameter) are relative
to the folder the run file is in, so a run means the same folders from the command line, a notebook or a
cluster job. All stages' parameters are validated before anything runs. A stage whose completion marker
matches its parameters is skipped, unless an earlier stage of the run completed after it did: then its
inputs changed and it reruns. ``--force`` reruns it from scratch: its folder is set aside first, so no
training checkpoint or cached evaluation of the earlier attempt is resumed, and put back if the rerun
fails (a crashed stage rerun without ``--force`` resumes from its last checkpoint). A failing stage stops the run with exit code 1 and
names the notebook, the cell and the error; earlier stages' artifacts are left as they are. The run file,
resolved, is kept as ``<run_dir>/run.yaml``, so a notebook can be pointed at the run folder itself.

A run file with a ``sweep:`` section (a grid or a list over any stage's parameters, seeds included) runs
each point as a run of its own in ``<run_dir>/<point>/`` and collates their metrics into one table and
figure (:mod:`lnkit.runsweep`).

``--launcher slurm`` submits the same stages as Slurm jobs through submitit, one per stage, chained, with
resources from the run file's ``slurm:`` section (:mod:`lnkit.runslurm`); ``--wait`` waits for them.

In a notebook, :func:`notebook_params` reads the same run file from the one parameter ``run``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from lnkit import gpuhours, runslurm, runsweep, runview
from lnkit.checkpoints import StageNotComplete
from lnkit.io import atomic_write_text
from lnkit.params import ParamError, StageParams
from lnkit.stage import MARKER, check_inputs, is_complete
from lnkit.stages import PIPELINE

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
OUTPUT = REPO / "papermill_runs" / "output"
RUN_FILES = REPO / "papermill_runs"
RUN_COPY = "run.yaml"  # the resolved run file, kept in the run folder
COPY_HEADER = "# Written by python -m lnkit.runs from "  # its first line names the run file it came from
# Stage name -> its module (lnkit.stages.*). The notebook is notebooks/<stage>.ipynb. Order is run order.
STAGES = {m.NAME: m for m in PIPELINE}
RUN_KEYS = {"run", "run_dir", "shared", "stages", "sweep", "slurm"}


class RunError(RuntimeError):
    """A run file is invalid or a stage failed."""


def params_class(stage: str) -> type[StageParams]:
    if stage not in STAGES:
        raise RunError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    return STAGES[stage].Params


def _is_path_key(key: str) -> bool:
    return key.endswith(("_dir", "_checkpoint"))


def _resolve(value, base: Path):
    """A run file's relative path made absolute against ``base`` (the run file's folder); '' stays ''."""
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def read_spec(path: str | Path) -> dict:
    """Parse a run file and check its top level; return the mapping."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"run file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RunError(f"run file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
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
    if not isinstance(spec.get("shared") or {}, dict):
        raise RunError(f"run file {path}: 'shared' must map parameter names to values, not {spec['shared']!r}")
    check_run_name(spec["run"], path)
    if not isinstance(spec["run_dir"], str) or not spec["run_dir"].strip():
        # '' would resolve to the run file's folder and write the run into the checkout
        raise RunError(f"run file {path}: run_dir={spec['run_dir']!r} must be a folder path (a non-empty string)")
    _check_names(spec.get("shared") or {}, f"run file {path}: shared")
    if "sweep" in spec:
        try:
            for pt in runsweep.points(spec["sweep"], f"run file {path}: sweep"):
                runsweep.point_spec(spec, pt, spec)  # a stage.param naming a stage the run lacks
        except runsweep.SweepSpecError as e:
            raise RunError(str(e)) from None
    for stage in spec["stages"]:
        params_class(stage)  # unknown stage -> RunError naming the known ones
        if not isinstance(spec["stages"][stage] or {}, dict):
            raise RunError(f"run file {path}: parameters of stage {stage} must be a mapping")
        _check_names(spec["stages"][stage] or {}, f"run file {path}: stage {stage}")
    try:
        runslurm.resources(spec.get("slurm"), list(spec["stages"]), f"run file {path}: slurm")
    except runslurm.SlurmSpecError as e:
        raise RunError(str(e)) from None
    return spec


def _check_names(values: dict, where: str) -> None:
    bad = [k for k in values if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise RunError(f"{where}: {bad[0]!r} is not a parameter name")


def check_run_name(run, path) -> None:
    """A run's name becomes a folder under ``papermill_runs/output/``: a plain name, never a path.

    >>> check_run_name("tiny-2", "f.yaml")
    >>> check_run_name("../x", "f.yaml")
    Traceback (most recent call last):
    lnkit.runs.RunError: run file f.yaml: run='../x' must be a plain name (letters, digits, '.', '_', '-'), not a path
    """
    if not isinstance(run, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run) or ".." in run:
        raise RunError(f"run file {path}: run={run!r} must be a plain name (letters, digits, '.', '_', '-'), not a path")


def stage_values(spec: dict, stage: str, base: Path) -> dict:
    """The values a run file gives one stage: the shared ones it has a field for, then its own; paths
    resolved against ``base``; ``run_dir`` set."""
    names = {f.name for f in fields(params_class(stage))}
    values = {k: v for k, v in (spec.get("shared") or {}).items() if k in names}
    values.update(spec["stages"].get(stage) or {})
    values["run_dir"] = _resolve(str(spec["run_dir"]), base)
    return {k: _resolve(v, base) if _is_path_key(k) else v for k, v in values.items()}


def load_run(path: str | Path) -> tuple[dict, dict[str, StageParams]]:
    """Parse and validate a run file; return its header and every stage's parameters, in run order."""
    path = Path(path)
    spec = read_spec(path)
    base = path.resolve().parent
    shared = spec.get("shared") or {}
    used_shared = set()
    params: dict[str, StageParams] = {}
    for stage in STAGES:
        if stage not in spec["stages"]:
            continue
        values = stage_values(spec, stage, base)
        used_shared |= {k for k in shared if k in {f.name for f in fields(params_class(stage))}}
        try:
            params[stage] = params_class(stage).from_dict(values)
        except (ParamError, TypeError) as e:
            raise RunError(f"run file {path}: {e}") from None
    unused = set(shared) - used_shared
    if unused:
        raise RunError(f"run file {path}: shared parameter(s) {sorted(unused)} belong to no stage in this run")
    run_dir = Path(_resolve(str(spec["run_dir"]), base))
    head = {"run": str(spec["run"]), "run_dir": run_dir, "path": path}
    if spec.get("slurm"):
        head["slurm"] = spec["slurm"]
    return head, params


def keep_run_file(head: dict, params: dict[str, StageParams]) -> Path:
    """Write the run, resolved (absolute paths, every stage's full parameters), to ``<run_dir>/run.yaml``."""
    spec = {"run": head["run"], "run_dir": str(head["run_dir"]),
            "stages": {name: {k: v for k, v in p.to_dict().items() if k != "run_dir"} for name, p in params.items()}}
    if "slurm" in head:
        spec["slurm"] = head["slurm"]
    out = Path(head["run_dir"]) / RUN_COPY
    atomic_write_text(out, f"{COPY_HEADER}{source_file(Path(head['path']))}, resolved.\n"
                      + yaml.safe_dump(spec, sort_keys=False))
    return out


def source_file(run_file: Path) -> Path:
    """The run file a run came from: itself, or the one a kept ``run.yaml`` names on its first line (a Slurm
    job runs the kept copy)."""
    first = run_file.read_text().split("\n", 1)[0] if run_file.is_file() else ""
    if first.startswith(COPY_HEADER):
        return Path(first[len(COPY_HEADER):].rsplit(", resolved.", 1)[0])
    return run_file.resolve()


def find_run_file(run: str | Path, cwd: Path | None = None) -> Path:
    """The run file ``run`` names: a run name in ``papermill_runs/`` (``"tiny"``), a run file, or a run
    folder holding the ``run.yaml`` the runner keeps. Relative paths are taken from ``cwd``."""
    cwd = Path.cwd() if cwd is None else cwd
    cands = [RUN_FILES / f"{run}.yaml"] if run and "/" not in str(run) and not str(run).endswith((".yaml", ".yml")) else []
    p = Path(run) if Path(run).is_absolute() else cwd / run
    cands += [p, p / RUN_COPY]
    for c in cands:
        if c.is_file():
            return c.resolve()
    raise RunError(f"run={str(run)!r} names no run: not a run in {RUN_FILES} ({', '.join(sorted(x.stem for x in RUN_FILES.glob('*.yaml')))}), "
                   f"not a run file, not a run folder holding {RUN_COPY} (a run folder has one once "
                   "python -m lnkit.runs has started it)")



def _command(run_file: Path, stage: str) -> str:
    """The command that runs the run up to ``stage`` (a kept ``run.yaml`` names the run file it came from)."""
    run_file = source_file(run_file)
    shown = run_file.relative_to(REPO) if run_file.is_relative_to(REPO) else run_file
    return f"python -m lnkit.runs {shown} --until {stage}"


class NotebookInputMissing(StageNotComplete):
    """Raised in a notebook's first code cell; shown as its message alone, without a traceback."""

    def _render_traceback_(self):  # IPython shows these lines instead of the traceback
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]


def notebook_params(module, ns: dict) -> StageParams:
    """A stage notebook's parameters: those the run named by ``ns["run"]`` gives the stage, with every
    value of the parameters cell that differs from the stage's default on top; validated, and the
    earlier stages it reads checked complete. Writes nothing: a notebook opened before its inputs exist
    stops here with the command that makes them."""
    cls = module.Params
    try:
        run_file = find_run_file(ns.get("run", "tiny"))
    except RunError as e:
        raise ParamError(f"stage {cls.STAGE}: {e}") from None
    spec = read_spec(run_file)
    values = stage_values(spec, cls.STAGE, run_file.parent)  # shared values and defaults if the run lacks it
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in ns and ns[f.name] != default:  # changed in the cell (or injected by papermill)
            values[f.name] = ns[f.name]
    p = cls.from_dict(values)
    try:
        check_inputs(p, module.needs(p), lambda stage: _command(run_file, stage))
    except StageNotComplete as e:
        raise NotebookInputMissing(str(e)) from None
    return p


def headline(stage: str, metrics: dict) -> str:
    """The runner table's line for a stage: its module's ``headline(metrics)``."""
    return STAGES[stage].headline(metrics) if stage in STAGES else ""


def notebook_parameters(p: StageParams, run_file: str | Path = "") -> dict:
    """What papermill injects: ``run`` (the run file) and the stage's values, less the two the run file
    carries and the parameters cell does not have (``run_dir``, ``figures_dir``)."""
    values = {k: v for k, v in p.to_dict().items() if k not in ("run_dir", "figures_dir")}
    return {"run": str(run_file), **values} if run_file else p.to_dict()


def run_stage(name: str, p: StageParams, run: str, log=print, run_file: str | Path = "") -> Path:
    """Execute one stage notebook with papermill, showing its cells and progress bars as it runs
    (:class:`lnkit.runview.StageView`) and recording its outcome in ``runview.LEDGER``; raise RunError
    naming notebook, cell and error."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    src = NOTEBOOKS / f"{name}.ipynb"
    out = OUTPUT / run / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] executing {src.relative_to(REPO)} -> {out.relative_to(REPO)}")
    t0, status = time.perf_counter(), "failed"
    view = runview.StageView(name).open()  # the kernel's environment and config, until view.close()
    try:
        pm.execute_notebook(str(src), str(out), parameters=notebook_parameters(p, run_file), cwd=str(NOTEBOOKS),
                            kernel_name="python3", progress_bar=False, log_output=False, **view.papermill_kwargs())
        if not is_complete(p):
            raise RunError(f"stage {name}: notebook {out} finished but did not mark the stage complete")
        status = "done"
    except pm.PapermillExecutionError as e:
        raise RunError(f"stage {name} failed in notebook {out}, cell {e.cell_index} "
                       f"(execution count {e.exec_count}): {e.ename}: {e.evalue}") from None
    except DeadKernelError as e:
        raise RunError(f"stage {name}: the kernel died running notebook {out} ({str(e).splitlines()[0] if str(e) else e!r}); "
                       "likely killed for lack of memory. Rerun the same command: the stage resumes from its "
                       "last checkpoint") from None
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        view.close(keep=status != "done")
        runview.LEDGER.record(name, status, time.perf_counter() - t0)
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lnkit.runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_file")
    ap.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    ap.add_argument("--until", metavar="STAGE", help="stop after this stage (with --from: a range)")
    ap.add_argument("--only", metavar="STAGE", help="run only this stage")
    ap.add_argument("--force", action="store_true",
                    help="rerun stages from scratch (their folders cleared) even if complete with these parameters")
    ap.add_argument("--launcher", choices=("local", "slurm"), default="local",
                    help="local: run the notebooks here, one after the other (default); slurm: submit one job per "
                         "stage through submitit, chained, resources from the run file's slurm: section")
    ap.add_argument("--wait", action="store_true", help="with --launcher slurm: wait for the jobs and report them")
    ap.add_argument("--estimate", action="store_true",
                    help="print each stage's GPU-hours on the GPU of the run file's slurm.estimate and stop")
    a = ap.parse_args(argv)
    names: list[str] = []
    try:
        if "sweep" in (spec := read_spec(Path(a.run_file))):
            return run_sweep(Path(a.run_file), spec, a)
        head, params = load_run(a.run_file)
        names = selected(params, a, a.run_file)
        if a.estimate:
            print_estimate(head, params, names)
            return 0
        if a.launcher == "slurm":
            return submit_run(head, params, names, a)
        print(f"run {head['run']}: artifacts in {head['run_dir']}, stages {', '.join(names)}")
        keep_run_file(head, params)
        order = list(params)
        for name in names:
            if is_complete(params[name]) and not a.force:
                newer = stale_because(head["run_dir"], order[: order.index(name)], name)
                if newer is None:
                    print(f"[{name}] complete with these parameters; skipped (--force reruns it)")
                    continue
                print(f"[{name}] complete, but {newer} finished after it: rerunning")
            aside = set_aside(Path(head["run_dir"]), name) if a.force else None
            try:
                run_stage(name, params[name], head["run"], run_file=Path(head["run_dir"]) / RUN_COPY)
            except BaseException:
                if aside is not None:
                    put_back(Path(head["run_dir"]), name, aside)
                raise
            if aside is not None:
                shutil.rmtree(aside)
        runview.print_summary(names, head["run_dir"], headline)
    except BaseException as e:  # a failed stage, Ctrl-C, or a bug
        if runview.LEDGER:  # a stage ran, so the run file loaded: show how far the run got
            runview.print_summary(names, head["run_dir"], headline)
        if isinstance(e, RunError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        raise
    return 0


def selected(params: dict[str, StageParams], a, run_file) -> list[str]:
    """The stages ``--only`` / ``--from`` / ``--until`` pick, in run order; a flag naming a stage the run lacks,
    or an empty range, is a RunError."""
    names = list(params)
    for flag in (a.start, a.until, a.only):
        if flag is not None and flag not in params:
            raise RunError(f"stage {flag!r} is not in run file {run_file}; it has: {', '.join(names)}")
    if a.only:
        return [a.only]
    names = names[names.index(a.start) if a.start else 0: names.index(a.until) + 1 if a.until else None]
    if not names:
        raise RunError(f"--from {a.start} comes after --until {a.until}: no stage to run")
    return names


def pending(head: dict, params: dict[str, StageParams], names: list[str], force: bool, log=print) -> list[str]:
    """The stages of ``names`` the local runner would run now: all with ``force``; else from the first one
    that is incomplete or stale on (a stage after a rerun one is stale once it reruns)."""
    order = list(params)
    for i, name in enumerate(names):
        if force or not is_complete(params[name]) or stale_because(head["run_dir"], order[: order.index(name)], name):
            return names[i:]
        log(f"[{name}] complete with these parameters; not submitted (--force reruns it)")
    return []


def _estimate_config(value: str, head: dict, params: dict[str, StageParams]) -> dict:
    """A config for the estimate: ``value`` (a name or a folder), else stage 00's parent checkpoint, else the
    shape stage 00 trains from scratch."""
    from lnkit import deploy

    p = params.get("00_parent")
    if value:
        return deploy.load_config(_resolve(value, Path(head["path"]).resolve().parent)
                                  if value not in deploy.CONFIG_NAMES else value)
    if p is not None and p.parent_checkpoint:
        return deploy.load_config(p.parent_checkpoint)
    if p is None:
        raise FileNotFoundError("the run has no stage 00_parent; name the parent in slurm.estimate.parent")
    return {"hidden_size": p.hidden_size, "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads,
            "num_key_value_heads": p.num_kv_heads, "intermediate_size": p.intermediate_size,
            "vocab_size": p.vocab_size, "tie_word_embeddings": False}


def estimate(head: dict, params: dict[str, StageParams], names: list[str]) -> tuple[dict, list[dict]]:
    """Each stage's GPU-hours (:mod:`lnkit.gpuhours`) on the run file's ``slurm.estimate`` GPU; the
    settings and one row per stage (``total`` None with a ``note`` where a config cannot be read)."""
    est = runslurm.estimate_settings((head.get("slurm") or {}).get("estimate"))
    configs, rows = {}, []
    for which in ("parent", "child"):
        try:
            configs[which] = _estimate_config(est[which] or (est["parent"] if which == "child" else ""), head, params)
        except (FileNotFoundError, OSError, ValueError) as e:
            configs[which] = e
    for name in names:
        w = STAGES[name].work(params[name], params, configs["parent"] if isinstance(configs["parent"], dict) else {})
        cfg, fwd = configs[w.model], configs[w.forward_model or w.model]
        bad = next((x for x in (cfg, fwd) if isinstance(x, Exception)), None)
        if bad is not None:
            rows.append({"stage": name, "total": None, "note": f"no config to price it: {bad}"})
            continue
        rows.append({"stage": name, **gpuhours.hours(w, cfg, est["gpu"], est["mfu"], fwd), "work": w})
    return est, rows


def print_estimate(head: dict, params: dict[str, StageParams], names: list[str], log=print) -> None:
    """The estimate as a table, with each stage's wall-clock time on its Slurm resources when it has GPUs."""
    est, rows = estimate(head, params, names)
    res = runslurm.resources(head.get("slurm"), list(params))
    log(f"GPU-hours on {est['gpu']} (MFU {est['mfu']:.0%} for training; roofline decode with FP8 for generation; "
        "lnkit.gpuhours lists what is left out):")
    log(f"  {'stage':24s} {'train':>9s} {'forward':>9s} {'generate':>9s} {'total':>9s}  wall clock on its resources")
    for r in rows:
        if r["total"] is None:
            log(f"  {r['stage']:24s} {'?':>9s}  {r['note']}")
            continue
        gpus = res[r["stage"]].get("gpus_per_node", 0) * res[r["stage"]]["nodes"]
        wall = ""
        if gpus:
            hours = r["total"] / gpus
            limit = res[r["stage"]]["timeout_min"] / 60
            wall = f"{hours:.1f} h on {gpus} GPUs" + (f" > its time limit {limit:g} h" if hours > limit else "")
        log(f"  {r['stage']:24s} " + " ".join(f"{_hours(r[k]):>9s}" for k in ("train", "forward", "generate", "total"))
            + f"  {wall}")
    known = [r["total"] for r in rows if r["total"] is not None]
    log(f"  {'all':24s} {'':>9s} {'':>9s} {'':>9s} {_hours(sum(known)):>9s}")


def _hours(h: float) -> str:
    """
    >>> _hours(1234.56), _hours(3.14159), _hours(0.000123), _hours(0.0)
    ('1235', '3.1', '0.00012', '0')
    """
    return f"{h:.0f}" if h >= 10 or h == 0 else f"{h:.1f}" if h >= 0.1 else f"{h:.2g}"


def _chain(head: dict, params: dict[str, StageParams], names: list[str], force: bool) -> runslurm.Chain:
    try:
        res = runslurm.resources(head.get("slurm"), list(params))
        runslurm.check_not_queued(head["run_dir"])
    except runslurm.SlurmSpecError as e:
        raise RunError(str(e)) from None
    todo = pending(head, params, names, force)
    keep_run_file(head, params)
    return runslurm.Chain(head["run"], Path(head["run_dir"]), Path(head["run_dir"]) / RUN_COPY, todo,
                          {s: res[s] for s in todo})


def stage_job(run_file: str, stage: str, force: bool) -> str:
    """What one Slurm job runs: one stage of a run, as ``python -m lnkit.runs <run.yaml> --only <stage>``.
    A stage runs as one process, so in a job of several nodes only the first task runs it."""
    rank = runslurm.task_rank()
    if rank:
        return f"{stage}: task {rank} idle (the stage runs in task 0)"
    rc = main([run_file, "--only", stage, *(["--force"] if force else [])])
    if rc:
        raise RunError(f"stage {stage} of {run_file} failed (exit code {rc}); its error is printed above")
    return stage


def _report(chains: list[runslurm.Chain], a, collate_job=None) -> int:
    jobs = [j for c in chains for j in c.jobs]
    for c in chains:
        for stage, job in zip(c.stages, c.jobs):
            res = ", ".join(f"{k}={v}" for k, v in c.resources[stage].items())
            print(f"[slurm] {c.run}:{stage}: job {job.job_id} ({res}); log {job.paths.stdout}")
    if not a.wait or not jobs:
        return 0
    labels = [f"{c.run}:{s}" for c in chains for s in c.stages]
    if collate_job is not None:
        jobs, labels = jobs + [collate_job], labels + ["collate"]
    states = runslurm.wait(jobs, labels)
    failed = [k for k, v in states.items() if v != "COMPLETED"]
    if failed:
        print(f"error: Slurm jobs did not complete: {', '.join(f'{k} ({states[k]})' for k in failed)}", file=sys.stderr)
        return 1
    return 0


def submit_run(head: dict, params: dict[str, StageParams], names: list[str], a) -> int:
    """``--launcher slurm``: one job per stage still to run, chained (``afterok``); ``--wait`` waits."""
    chain = _chain(head, params, names, a.force)
    if not chain.stages:
        print(f"run {head['run']}: nothing to submit, every stage is complete")
        return 0
    print_estimate(head, params, chain.stages)
    for stage in chain.stages:
        if chain.resources[stage]["nodes"] > 1:
            print(f"[slurm] note: {stage} asks for {chain.resources[stage]['nodes']} nodes, but a stage runs on one "
                  "node (stage 06 trains across that node's GPUs with its processes parameter): the first node "
                  "runs it, the others wait")
    print(f"run {head['run']}: submitting {', '.join(chain.stages)} to Slurm; artifacts in {head['run_dir']}")
    _submitted(lambda: runslurm.submit([chain], stage_job, a.force))
    return _report([chain], a)


def _submitted(submit):
    """Run ``submit()``; a scheduler that refuses a job (or is not there) becomes a RunError saying so."""
    try:
        return submit()
    except Exception as e:  # submitit raises its own errors and CalledProcessError for sbatch
        if isinstance(e, RunError):
            raise
        raise RunError(f"Slurm refused the submission: {type(e).__name__}: {str(e).strip()[-800:]} "
                       "(is SLURM_CONF set and sbatch on PATH? the run file's slurm: section asks for the resources)") from None


def collate_sweep(path: str, spec: dict, run_dir: str) -> str:
    """A sweep's table and figure from whatever its points completed (also the last job of a Slurm sweep)."""
    pts = runsweep.points(spec["sweep"])
    stages = [s for s in STAGES if s in spec["stages"]]
    rows = runsweep.collate(Path(run_dir), pts, stages)
    last = [k for k in rows[0] if k.startswith(stages[-1] + ".")] if rows else []
    runsweep.figure(rows, last, Path(run_dir) / "sweep.png")
    return str(Path(run_dir) / "sweep.csv")


def run_sweep(path: Path, spec: dict, a) -> int:
    """Every point of the run file's ``sweep:`` as a run of its own, then one table and figure
    (:mod:`lnkit.runsweep`). Each point's run file is validated before any point runs."""
    base = path.resolve().parent
    resolved = {"run_dir": _resolve(str(spec["run_dir"]), base),
                "shared": {k: _resolve(v, base) if _is_path_key(k) else v for k, v in (spec.get("shared") or {}).items()},
                "stages": {s: {k: _resolve(v, base) if _is_path_key(k) else v for k, v in (vals or {}).items()}
                           for s, vals in spec["stages"].items()}}
    pts = runsweep.points(spec["sweep"])
    run_dir = Path(resolved["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for pt in pts:
        f = run_dir / f"{runsweep.point_name(pt)}.yaml"
        atomic_write_text(f, yaml.safe_dump(runsweep.point_spec(spec, pt, resolved), sort_keys=False))
        load_run(f)  # a bad value at any point stops the sweep before anything runs
        files.append(f)
    if a.estimate or a.launcher == "slurm":
        head, params = load_run(files[0])
        print(f"sweep {spec['run']}: {len(pts)} points; each point's estimate (the first's):")
        print_estimate(head, params, selected(params, a, files[0]))
        if a.estimate:
            return 0
    if a.launcher == "slurm":
        return submit_sweep(path, spec, run_dir, pts, files, a)
    flags = [x for flag, v in (("--from", a.start), ("--until", a.until), ("--only", a.only)) if v for x in (flag, v)]
    flags += ["--force"] if a.force else []
    failed = []
    for pt, f in zip(pts, files):
        print(f"=== sweep {spec['run']}: point {runsweep.point_name(pt)} ({len(failed)} failed so far)")
        rc = main([str(f), *flags])
        if rc == 130:  # Ctrl-C: stop the sweep, not just this point
            return rc
        if rc:
            failed.append(runsweep.point_name(pt))
    collate_sweep(str(path), spec, str(run_dir))
    print(f"sweep {spec['run']}: {len(pts) - len(failed)} of {len(pts)} points done; table {run_dir / 'sweep.csv'}, "
          f"figure {run_dir / 'sweep.png'}")
    if failed:
        print(f"error: sweep points failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def submit_sweep(path: Path, spec: dict, run_dir: Path, pts: list[dict], files: list[Path], a) -> int:
    """Every point of a sweep as a chain of Slurm jobs, side by side, and one job after all of them
    (``afterany``) that collates the table and figure."""
    import functools

    chains = []
    for f in files:
        head, params = load_run(f)
        chains.append(_chain(head, params, selected(params, a, f), a.force))
    todo = [c for c in chains if c.stages]
    if not todo:
        print(f"sweep {spec['run']}: nothing to submit, every point is complete")
        collate_sweep(str(path), spec, str(run_dir))
        return 0
    print(f"sweep {spec['run']}: submitting {len(todo)} of {len(pts)} points to Slurm; table {run_dir / 'sweep.csv'}")
    jobs = _submitted(lambda: runslurm.submit(todo, stage_job, a.force,
                                              functools.partial(collate_sweep, str(path), spec, str(run_dir)), run_dir))
    print(f"[slurm] collate: job {jobs[-1].job_id}, after every point")
    return _report(todo, a, jobs[-1])


def set_aside(run_dir: Path, name: str) -> Path | None:
    """Before a forced rerun, move the stage's folder to ``<run_dir>/.<stage>.before-force``: the rerun
    starts from scratch (no training checkpoint of the earlier attempt is resumed), and a failure can put
    the earlier artifacts back. A link (a sweep's shared stage) is refused."""
    d = run_dir / name
    if d.is_symlink():
        raise RunError(f"stage {name}: {d} is a link to another run's stage; --force would rerun that run's stage")
    if not d.exists():
        return None
    aside = run_dir / f".{name}.before-force"
    if aside.exists():
        shutil.rmtree(aside)
    d.rename(aside)
    print(f"[{name}] --force: the earlier attempt set aside in {aside} until this one completes")
    return aside


def put_back(run_dir: Path, name: str, aside: Path) -> None:
    """A forced rerun failed: drop what it wrote and restore the earlier attempt's artifacts, without its
    completion marker (the next plain run redoes the stage)."""
    d = run_dir / name
    shutil.rmtree(d, ignore_errors=True)
    aside.rename(d)
    (d / MARKER).unlink(missing_ok=True)
    print(f"[{name}] the forced rerun failed: the earlier artifacts are back in {d}", file=sys.stderr)


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
