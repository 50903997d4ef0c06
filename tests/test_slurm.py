"""``--launcher slurm`` against a real single-node Slurm started on this machine (tests/slurm_cluster.py):
the smoke run, a failing stage that cancels the rest, a resubmission, and a 2-point sweep, each through
submitit's Slurm executor. Marked ``slurm``: ``.ci/slurm`` installs the packages and runs
``pytest -m slurm tests/test_slurm.py``; ``make test`` skips it."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest
import yaml

from lnkit import runs
from slurm_cluster import Cluster, missing

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    if missing():
        pytest.fail(f"Slurm test without Slurm: {', '.join(missing())} not installed (.ci/slurm installs them)")
    with Cluster() as c:
        yield c


@pytest.fixture()
def slurm_env(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    return cluster


def smoke_spec(tmp_path, name: str, stages=None) -> dict:
    spec = yaml.safe_load((runs.RUN_FILES / "smoke.yaml").read_text())
    spec["run"] = f"test-slurm-{name}-{tmp_path.name}"
    spec["run_dir"] = str(tmp_path / name)
    if stages is not None:
        spec["stages"] = {s: spec["stages"][s] for s in stages}
    # both cores for one job at a time; stage 00 with a time limit of its own
    spec["slurm"] = {"cpus_per_task": 2, "mem_gb": 8, "timeout_min": 30, "stages": {"00_parent": {"timeout_min": 20}}}
    return spec


def write(tmp_path, spec: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def sacct(cluster, job_id: str) -> str:
    """The job's final state in Slurm's accounting (a job whose result is written may still be ending)."""
    import time

    for _ in range(60):
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], env=cluster.env,
                               capture_output=True, text=True, check=True).stdout.strip()
        if state not in ("", "PENDING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    return state


def test_the_smoke_run_through_slurm_one_job_per_stage_chained(slurm_env, tmp_path, capsys):
    spec = smoke_spec(tmp_path, "smoke")
    path = write(tmp_path, spec, "smoke")
    run_dir = tmp_path / "smoke"
    try:
        assert runs.main([path, "--launcher", "slurm", "--wait"]) == 0
        jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())
        assert [j["stage"] for j in jobs] == list(spec["stages"])
        for stage in spec["stages"]:
            assert (run_dir / stage / "_COMPLETE.json").is_file(), stage
        for prev, job in zip(jobs, jobs[1:]):  # each stage waits for the one before, and dies with it
            script = next((run_dir / "slurm" / job["stage"]).glob(f"{job['job_id']}_submission.sh")).read_text()
            assert f"--dependency=afterok:{prev['job_id']}" in script and "--kill-on-invalid-dep=yes" in script
            assert "--cpus-per-task=2" in script and "--mem=8GB" in script
        first = (run_dir / "slurm" / "00_parent" / f"{jobs[0]['job_id']}_submission.sh").read_text()
        assert "--time=20" in first and "--dependency" not in first
        assert all(sacct(slurm_env, j["job_id"]) == "COMPLETED" for j in jobs)
        assert "[00_parent] done in" in (run_dir / "slurm" / "00_parent" / f"{jobs[0]['job_id']}_0_log.out").read_text()
        capsys.readouterr()
        # a resubmission queues nothing: every stage is complete with these parameters
        assert runs.main([path, "--launcher", "slurm"]) == 0
        out = capsys.readouterr().out
        assert "nothing to submit" in out and out.count("not submitted") == len(spec["stages"])
        assert json.loads((run_dir / "slurm" / "jobs.json").read_text()) == jobs
        # --force from stage 09 submits 09 and 10 only
        assert runs.main([path, "--launcher", "slurm", "--from", "09_evaluation", "--force", "--wait"]) == 0
        again = json.loads((run_dir / "slurm" / "jobs.json").read_text())
        assert [j["stage"] for j in again] == ["09_evaluation", "10_paper_figures"]
    finally:
        shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def test_a_failed_stage_cancels_the_stages_after_it(slurm_env, tmp_path, capsys):
    spec = smoke_spec(tmp_path, "failing", ["00_parent", "01_block_library", "02_architecture_search"])
    broken = tmp_path / "broken-llama"  # exists, so validation passes; loading it fails inside a cell
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    spec["stages"]["00_parent"]["parent_checkpoint"] = str(broken)
    path = write(tmp_path, spec, "failing")
    try:
        assert runs.main([path, "--launcher", "slurm", "--wait"]) == 1
        err = capsys.readouterr().err
        assert re.search(r"00_parent \(FAILED\)", err) and re.search(r"01_block_library \(CANCELLED", err)
        jobs = json.loads((tmp_path / "failing" / "slurm" / "jobs.json").read_text())
        assert [sacct(slurm_env, j["job_id"]).split()[0] for j in jobs] == ["FAILED", "CANCELLED", "CANCELLED"]
        log = (tmp_path / "failing" / "slurm" / "00_parent" / f"{jobs[0]['job_id']}_0_log.err").read_text()
        assert "broken-llama" in log  # the stage's own error, in the run folder
        assert not (tmp_path / "failing" / "01_block_library").exists()
    finally:
        shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def test_a_resubmission_while_jobs_are_queued_is_refused(slurm_env, tmp_path, capsys):
    spec = smoke_spec(tmp_path, "queued", ["00_parent"])
    path = write(tmp_path, spec, "queued")
    busy = subprocess.run(["sbatch", "--parsable", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 300"],
                          env=slurm_env.env, capture_output=True, text=True, check=True).stdout.strip()
    job = None
    try:  # the node is busy, so the stage's job stays pending
        assert runs.main([path, "--launcher", "slurm"]) == 0
        job = json.loads((tmp_path / "queued" / "slurm" / "jobs.json").read_text())[0]["job_id"]
        assert runs.main([path, "--launcher", "slurm"]) == 1
        assert f"still queued or running ({job})" in capsys.readouterr().err
    finally:
        subprocess.run(["scancel", busy, *([job] if job else [])], env=slurm_env.env, check=True)


def test_a_two_point_sweep_through_slurm_and_its_collated_table(slurm_env, tmp_path, capsys):
    spec = smoke_spec(tmp_path, "sweep", ["00_parent", "01_block_library"])
    spec["stages"]["00_parent"]["steps"] = 4
    spec["slurm"]["cpus_per_task"] = 1  # the two points side by side
    spec["sweep"] = {"grid": {"00_parent.lr": [0.003, 0.03]}}
    path = write(tmp_path, spec, "sweep")
    names = ["00_parent.lr0.003", "00_parent.lr0.03"]
    try:
        assert runs.main([path, "--launcher", "slurm", "--wait"]) == 0
        out = capsys.readouterr().out
        assert "collate: COMPLETED" in out
        rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
        assert [r["point"] for r in rows] == names
        assert [float(r["00_parent.lr"]) for r in rows] == [0.003, 0.03]
        assert all(r["00_parent.accuracy.off/all/all"] and r["01_block_library.candidates"] for r in rows)
        assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
        for n in names:
            jobs = json.loads((tmp_path / "sweep" / n / "slurm" / "jobs.json").read_text())
            assert [j["stage"] for j in jobs] == ["00_parent", "01_block_library"]
            assert yaml.safe_load((tmp_path / "sweep" / n / "run.yaml").read_text())["slurm"]["cpus_per_task"] == 1
    finally:
        for n in names:
            shutil.rmtree(runs.OUTPUT / f"{spec['run']}-{n}", ignore_errors=True)
