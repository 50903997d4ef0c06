"""Every stage notebook executed by papermill with the smoke parameters, and the runner's behaviour
around it: skip when complete, rerun with --force, a failing stage named with its cell, corrupt
checkpoints named, earlier artifacts left intact."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lnkit import runs
from lnkit.io import CheckpointError
from lnkit.parent import load_model


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run, executed once for the module, into a temporary run folder."""
    tmp = tmp_path_factory.mktemp("smoke")
    spec = yaml.safe_load(open(runs.REPO / "papermill_runs" / "smoke.yaml"))
    spec["run"] = f"test-{tmp.name}"
    spec["run_dir"] = str(tmp / "run")
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert runs.main([str(path)]) == 0
    yield {"path": path, "run_dir": tmp / "run", "spec": spec, "out": runs.OUTPUT / spec["run"]}
    shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def test_every_stage_notebook_runs_and_writes_its_artifacts(smoke):
    for stage in smoke["spec"]["stages"]:
        d = smoke["run_dir"] / stage
        assert (d / "_COMPLETE.json").exists() and (d / "metrics.json").exists() and (d / "params.json").exists()
        assert (smoke["out"] / f"{stage}.ipynb").exists()
    d = smoke["run_dir"] / "00_parent"
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["parameters"] > 0 and "off/math/1" in metrics["accuracy"]
    assert (d / "train_log.csv").read_text().count("\n") == 1 + smoke["spec"]["stages"]["00_parent"]["steps"]
    assert (d / "eval_summary.csv").exists() and (d / "loss.png").exists() and (d / "accuracy.png").exists()
    model, tok = load_model(d / "model")
    assert model.config.num_hidden_layers == 2 and tok.chat_template
    lib = smoke["run_dir"] / "01_block_library"
    assert (lib / "losses.csv").read_text().count("\n") > 4 and (lib / "library_losses.png").exists()
    import csv

    search = smoke["run_dir"] / "02_architecture_search"
    rows = list(csv.DictReader(open(search / "frontier.csv")))
    assert {r["kind"] for r in rows} == {"parent", "puzzle", "baseline"}
    puzzle = [r for r in rows if r["kind"] == "puzzle"][0]
    assert float(puzzle["priced_decode_fraction"]) <= 0.7 + 1e-9 and puzzle["status"] == "optimal"
    child, _ = load_model(search / "children" / "budget_0.70")
    assert child.config.model_type == "nemotron-nas"


def test_completed_stage_is_skipped_and_force_reruns(smoke, capsys):
    marker = smoke["run_dir"] / "00_parent" / "_COMPLETE.json"
    before = marker.read_text()
    assert runs.main([str(smoke["path"])]) == 0
    assert "skipped" in capsys.readouterr().out and marker.read_text() == before


def test_corrupt_checkpoint_is_named_and_not_overwritten(smoke):
    weights = smoke["run_dir"] / "00_parent" / "model" / "model.safetensors"
    data = weights.read_bytes()
    try:
        weights.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
            load_model(weights.parent)
        assert weights.stat().st_size == len(data) // 2  # nothing rewrote it
    finally:
        weights.write_bytes(data)


def test_failing_stage_names_notebook_and_cell_and_keeps_earlier_artifacts(smoke, capsys, tmp_path):
    spec = json.loads(json.dumps(smoke["spec"]))
    broken = tmp_path / "broken-llama"  # exists, so validation passes; loading it fails inside a cell
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    spec["stages"]["00_parent"]["parent_checkpoint"] = str(broken)
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    model_dir = smoke["run_dir"] / "00_parent" / "model"
    before = sorted(p.name for p in model_dir.iterdir())
    assert runs.main([str(path), "--force"]) == 1
    err = capsys.readouterr().err
    assert "stage 00_parent failed in notebook" in err and "cell" in err and "broken-llama" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    # the failed attempt removed the completion marker: the next plain run redoes the stage
    assert not (smoke["run_dir"] / "00_parent" / "_COMPLETE.json").exists()


def test_run_killed_mid_stage_resumes_from_its_checkpoint(smoke, tmp_path):
    """Kill the whole runner (papermill and its kernel) during training; the rerun cleans up, resumes
    from the last training checkpoint and completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import nbformat

    spec = json.loads(json.dumps(smoke["spec"]))
    spec["run"] = smoke["spec"]["run"] + "-kill"
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"]["00_parent"].update(steps=1500)
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "lnkit.runs", str(path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "00_parent" / "train_state"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), "training never checkpointed"
    # Kill the job as a scheduler would: the runner and every process under it (the kernel may sit in a
    # session of its own).
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (tmp_path / "run" / "00_parent" / "_COMPLETE.json").exists()
    try:
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        out = nbformat.read(runs.OUTPUT / spec["run"] / "00_parent.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs)
        assert "resuming from the checkpoint at step" in text
        assert not list((tmp_path / "run").rglob("*.tmp-*"))
        log = (tmp_path / "run" / "00_parent" / "train_log.csv").read_text().splitlines()
        assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1500))
    finally:
        shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.parametrize("params", [{}, {"config_source": "LN-Ultra", "gpu": "H200", "num_gpus": 8, "tp": 8}])
def test_deployment_planner_notebook_runs_headless(tmp_path, params):
    import papermill as pm

    pm.execute_notebook(str(runs.NOTEBOOKS / "deployment_planner.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, cwd=str(runs.NOTEBOOKS), kernel_name="python3", progress_bar=False)
