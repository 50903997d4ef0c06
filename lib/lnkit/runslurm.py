"""``--launcher slurm``: a run (or a sweep) submitted to Slurm through submitit, one job per stage.

::

    python -m lnkit.runs papermill_runs/ln_super_from_llama70b.yaml --launcher slurm [--wait]

Each stage is a job that runs ``python -m lnkit.runs <run_dir>/run.yaml --only <stage>`` in the submitting
environment (submitit pickles the call and starts the same Python). Jobs of one run are chained with
``afterok`` and ``--kill-on-invalid-dep=yes``, so a failed stage cancels the ones after it instead of
leaving them pending forever. The points of a sweep are chains side by side; one last job (``afterany``
on every point) collates their table and figure. Logs go to ``<run_dir>/slurm/<stage>/`` (submitit's
``<job id>_0_log.out`` / ``.err``) and the submitted ids to ``<run_dir>/slurm/jobs.json``: a resubmission
while any of them is still queued or running is refused, and one after they ended submits only the
stages the local runner would run (complete ones skipped, unless an earlier stage reruns).

Resources come from the run file's ``slurm:`` section: defaults for every stage, overridden per stage::

    slurm:
      partition: batch
      gpus_per_node: 8
      cpus_per_task: 64
      mem_gb: 1024
      timeout_min: 240
      stages:
        04_distillation: {nodes: 4, timeout_min: 2880}

Unknown keys, stages the run lacks, and values of the wrong type stop the submission before anything is
queued, with the key named.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lnkit.io import ArtifactError, atomic_write_json, read_json

# run-file key -> (submitit AutoExecutor parameter, type)
RESOURCES = {
    "partition": ("slurm_partition", str), "account": ("slurm_account", str), "qos": ("slurm_qos", str),
    "constraint": ("slurm_constraint", str), "nodes": ("nodes", int), "gpus_per_node": ("gpus_per_node", int),
    "cpus_per_task": ("cpus_per_task", int), "mem_gb": ("mem_gb", float), "timeout_min": ("timeout_min", int),
}
DEFAULTS = {"nodes": 1, "timeout_min": 240}
JOBS = "jobs.json"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


class SlurmSpecError(ValueError):
    """A run file's ``slurm:`` section is malformed."""


def _check_mapping(values, where: str) -> dict:
    if not isinstance(values, dict):
        raise SlurmSpecError(f"{where}: expected a mapping of resource -> value, got {values!r}")
    return values


def _check(values, where: str) -> dict:
    _check_mapping(values, where)
    for key, value in values.items():
        if key not in RESOURCES:
            raise SlurmSpecError(f"{where}: unknown resource {key!r}; known: {', '.join(RESOURCES)}, stages, estimate")
        kind = RESOURCES[key][1]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool) or (kind is not str and value <= 0) or (kind is str and not value):
            what = "a non-empty string" if kind is str else f"a positive {kind.__name__}"
            raise SlurmSpecError(f"{where}.{key}={value!r}: expected {what}")
    return values


def resources(section: dict | None, stages: list[str], where: str = "slurm") -> dict[str, dict]:
    """Each stage's resources (run-file keys): the defaults, the section's, the stage's own.

    >>> r = resources({"gpus_per_node": 8, "stages": {"b": {"nodes": 2}}}, ["a", "b"])
    >>> r["a"], r["b"]
    ({'nodes': 1, 'timeout_min': 240, 'gpus_per_node': 8}, {'nodes': 2, 'timeout_min': 240, 'gpus_per_node': 8})
    >>> resources({"gpu": 1}, ["a"])
    Traceback (most recent call last):
    lnkit.runslurm.SlurmSpecError: slurm: unknown resource 'gpu'; known: partition, account, qos, constraint, nodes, gpus_per_node, cpus_per_task, mem_gb, timeout_min, stages, estimate
    """
    section = dict(_check_mapping(section or {}, where))
    per_stage = section.pop("stages", None) or {}
    estimate_settings(section.pop("estimate", None), f"{where}.estimate")
    base = {**DEFAULTS, **_check(section, where)}
    if not isinstance(per_stage, dict):
        raise SlurmSpecError(f"{where}.stages: expected a mapping of stage -> resources, got {per_stage!r}")
    for stage in per_stage:
        if stage not in stages:
            raise SlurmSpecError(f"{where}.stages: {stage!r} is not a stage of this run ({', '.join(stages)})")
    return {s: {**base, **_check(per_stage.get(s) or {}, f"{where}.stages.{s}")} for s in stages}


ESTIMATE = {"gpu": "H100", "parent": "", "child": "", "mfu": 0.4}


def estimate_settings(section, where: str = "slurm.estimate") -> dict:
    """The GPU-hours estimate's settings: the GPU it prices, the parent's and the child's config (a name
    :func:`lnkit.deploy.load_config` knows, or a folder / config.json; '' = from stage 00), the MFU.

    >>> estimate_settings({"gpu": "H200", "child": "LN-Super"})["child"]
    'LN-Super'
    >>> estimate_settings({"mfu": 2})
    Traceback (most recent call last):
    lnkit.runslurm.SlurmSpecError: slurm.estimate.mfu=2: expected a fraction in (0, 1]
    """
    section = _check_mapping(section or {}, where)
    for key, value in section.items():
        if key not in ESTIMATE:
            raise SlurmSpecError(f"{where}: unknown key {key!r}; known: {', '.join(ESTIMATE)}")
        if key == "mfu" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
            raise SlurmSpecError(f"{where}.mfu={value!r}: expected a fraction in (0, 1]")
        if key != "mfu" and not isinstance(value, str):
            raise SlurmSpecError(f"{where}.{key}={value!r}: expected a string")
    if section.get("gpu"):
        from lnkit.deploy import get_gpu

        try:
            get_gpu(section["gpu"])
        except (KeyError, ValueError) as e:
            raise SlurmSpecError(f"{where}.gpu: {e.args[0]}") from None
    return {**ESTIMATE, **section}


def executor_parameters(res: dict, name: str) -> dict:
    """The submitit ``AutoExecutor.update_parameters`` keywords for one job's resources.

    >>> executor_parameters({"partition": "batch", "mem_gb": 64, "nodes": 1}, "tiny:00_parent")
    {'name': 'tiny:00_parent', 'slurm_partition': 'batch', 'mem_gb': 64, 'nodes': 1}
    """
    return {"name": name, **{RESOURCES[k][0]: v for k, v in res.items()}}


@dataclass
class Chain:
    """One run's stages to submit, in order, each after the one before."""

    run: str
    run_dir: Path
    run_file: Path  # the kept <run_dir>/run.yaml the jobs read
    stages: list[str]
    resources: dict[str, dict]
    jobs: list = field(default_factory=list)  # submitit jobs, once submitted


def _queued(ids: list[str]) -> list[str]:
    """Those of ``ids`` still known to the scheduler (pending or running)."""
    if not ids:
        return []
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmSpecError("squeue is not on PATH: --launcher slurm needs Slurm's commands on this machine") from None
    return [line.strip() for line in out.stdout.splitlines() if line.strip() in ids]


def check_not_queued(run_dir: Path) -> None:
    """Refuse to submit a run while jobs of its last submission are still queued or running."""
    record = Path(run_dir) / "slurm" / JOBS
    if not record.is_file():
        return
    try:
        ids = [str(j["job_id"]) for j in read_json(record)]
    except (ArtifactError, TypeError, KeyError):
        raise SlurmSpecError(f"{record} is not the job list this runner writes; remove it if no job of this run "
                             "is queued, then submit again") from None
    live = _queued(ids)
    if live:
        raise SlurmSpecError(f"run folder {run_dir} has jobs of an earlier submission still queued or running "
                             f"({', '.join(live)}): wait for them, or cancel them with scancel {' '.join(live)}")


def _executor(folder: Path, res: dict, name: str, after: list, kind: str = "afterok"):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    deps = {"slurm_additional_parameters": {"dependency": f"{kind}:" + ":".join(j.job_id for j in after),
                                            "kill-on-invalid-dep": "yes"}} if after else {}
    ex.update_parameters(**executor_parameters(res, name), **deps)
    return ex


def submit(chains: list[Chain], stage_job, force: bool = False, collate=None, collate_dir: Path | None = None) -> list:
    """Submit every chain (``stage_job(run_file, stage, force)`` per stage), then ``collate()`` after all of
    them if given; record the ids in each run folder; return every job in submission order."""
    submitted = []
    for c in chains:
        prev = []
        for stage in c.stages:
            ex = _executor(c.run_dir / "slurm" / stage, c.resources[stage], f"{c.run}:{stage}", prev)
            job = ex.submit(stage_job, str(c.run_file), stage, force)
            c.jobs.append(job)
            prev = [job]
        record(c)
        submitted += c.jobs
    if collate is not None:
        lasts = [c.jobs[-1] for c in chains if c.jobs]
        ex = _executor(Path(collate_dir) / "slurm" / "collate", {**DEFAULTS, "timeout_min": 30}, "collate", lasts,
                       kind="afterany")
        submitted.append(ex.submit(collate))
    return submitted


def record(c: Chain) -> None:
    atomic_write_json(c.run_dir / "slurm" / JOBS, [
        {"stage": s, "job_id": j.job_id, "log": str(j.paths.stdout), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for s, j in zip(c.stages, c.jobs)])


def task_rank() -> int:
    """This task's rank in its submitit job (0 outside a job)."""
    import submitit

    try:
        return submitit.JobEnvironment().global_rank
    except RuntimeError:  # not inside a submitit job
        return 0


def outcome(job) -> str:
    """COMPLETED, FAILED, CANCELLED, ... for a finished job, or its pending/running state."""
    if job.paths.result_pickle.exists():
        return "COMPLETED" if job.exception() is None else "FAILED"
    return job.watcher.get_state(job.job_id, mode="force").split()[0].upper()


def wait(jobs: list, labels: list[str], poll_s: float = 3.0, log=print) -> dict[str, str]:
    """Wait for every job to finish; print each as it does; return label -> final state."""
    left = dict(zip(labels, jobs))
    states: dict[str, str] = {}
    while left:
        jobs[0].watcher.update()  # one sacct call for every job of this process
        for label, job in list(left.items()):
            state = outcome(job) if job.done() else ""
            if state in FINISHED:
                states[label] = state
                log(f"[slurm] {label}: {state} (job {job.job_id}; log {job.paths.stdout})")
                del left[label]
        if left:
            time.sleep(poll_s)
    return states
