"""Run files and stage parameters: every mistake stops the run before anything runs, naming the stage,
the field and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from lnkit.params import ParamError
from lnkit.runs import RunError, find_run_file, load_run, main, notebook_params
from lnkit.stages.parent import Params as ParentParams


def write(tmp_path, spec) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


BASE = {"run": "t", "run_dir": "runs/t", "stages": {"00_parent": {}}}


@pytest.mark.parametrize("stage_params, message", [
    ({"stpes": 10}, "unknown parameter(s) stpes; known:"),
    ({"steps": "ten"}, "parameter steps='ten' has type str, expected int"),
    ({"steps": 0}, "parameter steps=0 is out of range; allowed: >= 1"),
    ({"lr": 5.0}, "parameter lr=5.0 is out of range; allowed: >= 1e-06 and <= 1.0"),
    ({"device": "tpu"}, "parameter device='tpu' is out of range; allowed: one of ['cpu', 'cuda', 'auto']"),
    ({"eval_modes": ["off", "maybe"]}, "parameter eval_modes=['off', 'maybe'] is out of range"),
    ({"progress": "yes"}, "parameter progress='yes' has type str, expected bool"),
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30 is not divisible by num_heads=4"),
    ({"parent_checkpoint": "/no/such/llama"}, "parent_checkpoint='/no/such/llama' is not a folder"),
    ({"lr": float("nan")}, "parameter lr=nan is not a finite number"),
    ({"doc_fraction": float("inf")}, "parameter doc_fraction=inf is not a finite number"),
    ({"eval_modes": []}, "parameter eval_modes=[] is empty; allowed: one of ['off', 'on']"),
    ({"math_level_weights": [1.0, "2", 1.0, 1.0, 1.0]}, "holds '2' (item 1) of type str, expected float"),
])
def test_bad_parameters_name_stage_field_and_allowed_values(tmp_path, stage_params, message):
    path = write(tmp_path, {**BASE, "stages": {"00_parent": stage_params}})
    with pytest.raises(RunError) as e:
        load_run(path)
    assert "stage 00_parent" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ({**BASE, "stages": {"07_magic": {}}}, "unknown stage '07_magic'; known stages: 00_parent"),
    ({**BASE, "shared": {"sead": 1}}, "shared parameter(s) ['sead'] belong to no stage"),
    ({k: v for k, v in BASE.items() if k != "run_dir"}, "missing required key 'run_dir'"),
    ({**BASE, "extra": 1}, "unknown top-level key(s) ['extra']"),
    ({**BASE, "stages": {}}, "'stages' must map stage names"),
    ({**BASE, "run_dir": 5}, "run_dir=5 must be a folder path"),
    ({**BASE, "run_dir": None}, "run_dir=None must be a folder path"),
    ({**BASE, "run_dir": ""}, "run_dir='' must be a folder path"),
    ({**BASE, "shared": [1, 2]}, "'shared' must map parameter names to values, not [1, 2]"),
    ({**BASE, "shared": {5: 1}}, "shared: 5 is not a parameter name"),
    ({**BASE, "stages": {"00_parent": {7: 1}}}, "stage 00_parent: 7 is not a parameter name"),
    ({**BASE, "run": "/abs/run"}, "run='/abs/run' must be a plain name"),
    ({**BASE, "run": "a/../../b"}, "run='a/../../b' must be a plain name"),
    ({**BASE, "run": ".."}, "run='..' must be a plain name"),
    ({**BASE, "stages": {"02_architecture_search": {"budgets": []}}}, "budgets=[] is empty"),
    ({**BASE, "stages": {"02_architecture_search": {"budgets": [1.0]}}}, "holds no budget below 1.0"),
    ({**BASE, "sweep": {"grid": {"seed": []}}}, "sweep.grid: expected a mapping of parameter -> non-empty list"),
    ({**BASE, "sweep": {"grid": {"seed": [1]}, "list": []}}, "sweep: expected exactly one of ['grid', 'list']"),
    ({**BASE, "sweep": {"list": [{"seed": 1}, {"seed": 1}]}}, "two points are the same"),
    ({**BASE, "sweep": {"grid": {"07_grpo.lr": [0.1]}}}, "names stage 07_grpo, which is not in the run's stages"),
    ({**BASE, "stages": {"06_reasoning_sft": {"processes": 4, "rows": 2}}}, "rows=2 is fewer than processes=4"),
    ({**BASE, "stages": {"06_reasoning_sft": {"processes": 0}}}, "processes=0 is out of range"),
    ({**BASE, "slurm": {"gpus": 8}}, "slurm: unknown resource 'gpus'; known: partition"),
    ({**BASE, "slurm": {"gpus_per_node": 0}}, "slurm.gpus_per_node=0: expected a positive int"),
    ({**BASE, "slurm": {"timeout_min": "4h"}}, "slurm.timeout_min='4h': expected a positive int"),
    ({**BASE, "slurm": {"partition": ""}}, "slurm.partition='': expected a non-empty string"),
    ({**BASE, "slurm": {"stages": {"07_grpo": {"nodes": 2}}}}, "slurm.stages: '07_grpo' is not a stage of this run"),
    ({**BASE, "slurm": {"stages": {"00_parent": {"nodes": True}}}}, "slurm.stages.00_parent.nodes=True: expected a positive int"),
    ({**BASE, "slurm": [1]}, "slurm: expected a mapping of resource -> value"),
])
def test_bad_run_files(tmp_path, spec, message):
    with pytest.raises(RunError, match=None) as e:
        load_run(write(tmp_path, spec))
    assert message in str(e.value)


def test_a_run_file_that_is_not_text_is_one_line_and_nothing_is_written(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"run: t\nrun_dir: runs/t\n\xff\xfe\x00stages: {}\n")
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: run file {path} is not UTF-8 text (byte 23") and err.count("\n") == 1
    assert sorted(q.name for q in tmp_path.iterdir()) == ["binary.yaml"]


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed")
    with pytest.raises(RunError, match="not valid YAML"):
        load_run(tmp_path / "bad.yaml")


def test_cli_reports_errors_and_exits_nonzero(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "stages": {"00_parent": {"steps": -1}}})
    assert main([path]) == 1
    assert "steps=-1 is out of range" in capsys.readouterr().err
    assert main([write(tmp_path, BASE), "--only", "01_block_library"]) == 1
    assert "not in run file" in capsys.readouterr().err


def test_shared_values_and_paths_are_resolved_against_the_run_files_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the run is started does not matter
    head, params = load_run(write(tmp_path / "conf", {**BASE, "shared": {"seed": 7, "figures_dir": "../figs"}}))
    p = params["00_parent"]
    assert p.seed == 7 and p.run_dir == str(tmp_path / "conf" / "runs" / "t")
    assert p.figures_dir == str(tmp_path / "figs") and head["run"] == "t"
    assert head["run_dir"] == tmp_path / "conf" / "runs" / "t"


def test_run_files_in_repo_are_valid():
    for name in ("tiny", "smoke"):
        _, params = load_run(f"papermill_runs/{name}.yaml")
        assert "00_parent" in params
    # the real-scale template is valid except for the checkpoint folder the user must supply
    with pytest.raises(RunError, match="parent_checkpoint='/data/llama-3.2-1b-instruct' is not a folder"):
        load_run("papermill_runs/real_llama.yaml")


def test_params_digest_describe_and_namespace():
    a, b = ParentParams(), ParentParams(steps=3)
    assert a.digest() == ParentParams().digest() != b.digest()
    assert "steps = 2400" in ParentParams.describe()
    p = ParentParams.from_namespace({"steps": 5, "seed": 2, "In": [], "torch": object()})
    assert (p.steps, p.seed, p.lr) == (5, 2, ParentParams().lr)
    with pytest.raises(ParamError, match="steps"):
        ParentParams.from_namespace({"steps": 1.5})


def test_parameters_cells_match_their_dataclasses_one_to_one():
    import ast
    from dataclasses import fields

    import nbformat

    from lnkit.runs import NOTEBOOKS, STAGES, params_class

    for stage in STAGES:
        nb = nbformat.read(NOTEBOOKS / f"{stage}.ipynb", as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{stage}: exactly one cell tagged 'parameters'"
        tree = ast.parse(cells[0].source)
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
        cls = params_class(stage)
        # `run` names the run; its run file gives run_dir and figures_dir, which the cell does not have
        assert names == {f.name for f in fields(cls)} - {"run_dir", "figures_dir"} | {"run"}, stage
        values = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets}
        assert values.pop("run") == "tiny", stage
        # the cell's literals are the dataclass defaults: a value that differs is read as the user's change
        defaults = cls()
        assert {k: v for k, v in values.items() if getattr(defaults, k) != v} == {}, stage


def test_only_the_tiny_run_writes_the_readmes_figures():
    from lnkit.runs import REPO

    for name in ("smoke", "real_llama"):
        spec = yaml.safe_load((REPO / "papermill_runs" / f"{name}.yaml").read_text())
        assert not (spec.get("shared") or {}).get("figures_dir"), name
        assert all(not (v or {}).get("figures_dir") for v in spec["stages"].values()), name
    _, params = load_run(REPO / "papermill_runs" / "tiny.yaml")
    assert {p.figures_dir for p in params.values()} == {str(REPO / "figures")}
    assert ParentParams().figures_dir == ""  # a notebook pointed at any other run keeps figures in its folder


def test_a_notebook_is_pointed_at_a_run_by_one_parameter(tmp_path):
    from lnkit.stages import library, parent

    path = write(tmp_path, {**BASE, "shared": {"seed": 3}, "stages": {"00_parent": {"steps": 7}}})
    p = notebook_params(parent, {"run": path})
    assert (p.steps, p.seed, p.run_dir) == (7, 3, str(tmp_path / "runs" / "t"))
    # a value changed in the parameters cell wins over the run file; values left at the default do not
    p = notebook_params(parent, {"run": path, "steps": 11, "lr": ParentParams().lr, "seed": 0})
    assert (p.steps, p.seed) == (11, 3)
    # a stage the run file does not list gets the shared values and its defaults
    (tmp_path / "runs" / "t" / "00_parent").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "00_parent" / "_COMPLETE.json").write_text("{}")
    assert notebook_params(library, {"run": path}).seed == 3
    # the run folder itself, through the run.yaml the runner keeps there
    (tmp_path / "runs" / "t" / "run.yaml").write_text(yaml.safe_dump(
        {"run": "t", "run_dir": str(tmp_path / "runs" / "t"), "stages": {"00_parent": {"steps": 9}}}))
    assert find_run_file(tmp_path / "runs" / "t") == tmp_path / "runs" / "t" / "run.yaml"
    assert notebook_params(parent, {"run": str(tmp_path / "runs" / "t")}).steps == 9
    with pytest.raises(ParamError, match="run='nowhere' names no run"):
        notebook_params(parent, {"run": "nowhere"})


def test_a_notebook_opened_before_its_inputs_exist_names_the_command_and_writes_nothing(tmp_path):
    from lnkit.runs import NotebookInputMissing
    from lnkit.stages import sft

    path = write(tmp_path, BASE)
    with pytest.raises(NotebookInputMissing) as e:
        notebook_params(sft, {"run": path})
    assert "stage 06_reasoning_sft reads stage 00_parent, which has not completed" in str(e.value)
    assert f"python -m lnkit.runs {path} --until 00_parent" in str(e.value)
    assert e.value._render_traceback_() and not (tmp_path / "runs").exists()
    # with the world there, the next missing input is the student's stage, named before anything is written
    (tmp_path / "runs" / "t" / "00_parent").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "00_parent" / "_COMPLETE.json").write_text("{}")
    with pytest.raises(NotebookInputMissing, match=r"reads stage 04_distillation, .* --until 04_distillation"):
        notebook_params(sft, {"run": path})
    assert not (tmp_path / "runs" / "t" / "06_reasoning_sft").exists()


def test_until_and_from_pick_a_range_and_the_run_file_is_kept(tmp_path, capsys):
    spec = {**BASE, "stages": {"00_parent": {}, "01_block_library": {}, "02_architecture_search": {}}}
    path = write(tmp_path, spec)
    assert main([path, "--from", "02_architecture_search", "--until", "01_block_library"]) == 1
    assert "no stage to run" in capsys.readouterr().err
    assert main([path, "--until", "07_magic"]) == 1
    assert "stage '07_magic' is not in run file" in capsys.readouterr().err


def test_a_sweep_runs_each_point_as_a_run_of_its_own_and_collates_them(tmp_path, capsys):
    """A 2-point grid over stage 00 at smoke size: each point a run folder of its own (resumable like any run:
    a second call skips both), one row per point in sweep.csv with the point's value and the stage's metrics,
    and a figure; a bad value at any point stops the sweep before anything runs."""
    import csv

    from lnkit.runs import REPO

    smoke = yaml.safe_load((REPO / "papermill_runs" / "smoke.yaml").read_text())
    spec = {"run": f"test-sweep-{tmp_path.name}", "run_dir": str(tmp_path / "sweep"), "shared": {"progress": False},
            "stages": {"00_parent": {**smoke["stages"]["00_parent"], "steps": 4}},
            "sweep": {"grid": {"00_parent.lr": [0.003, 0.03]}}}
    bad = write(tmp_path, {**spec, "sweep": {"list": [{"00_parent.lr": 0.003}, {"00_parent.lr": -1.0}]}})
    assert main([str(bad)]) == 1
    assert "lr=-1.0" in capsys.readouterr().err and not any((tmp_path / "sweep").glob("*/00_parent"))
    path = write(tmp_path, spec)
    try:
        assert main([str(path)]) == 0
        rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
        assert [r["point"] for r in rows] == ["00_parent.lr0.003", "00_parent.lr0.03"]
        assert [float(r["00_parent.lr"]) for r in rows] == [0.003, 0.03]
        assert all(r["00_parent.parameters"] and r["00_parent.accuracy.off/all/all"] for r in rows)
        assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
        for r in rows:
            params = yaml.safe_load((tmp_path / "sweep" / r["point"] / "run.yaml").read_text())
            assert params["stages"]["00_parent"]["lr"] == float(r["00_parent.lr"])
        capsys.readouterr()
        assert main([str(path)]) == 0
        assert capsys.readouterr().out.count("complete with these parameters; skipped") == 2
    finally:
        import shutil

        from lnkit.runs import OUTPUT
        for name in ("00_parent.lr0.003", "00_parent.lr0.03"):
            shutil.rmtree(OUTPUT / f"{spec['run']}-{name}", ignore_errors=True)


@pytest.mark.parametrize("name", ["ln_super_from_llama70b", "ln_ultra_from_llama405b"])
def test_the_real_scale_templates_are_valid_once_their_paths_exist(tmp_path, name):
    """Valid except for the folders and files a user supplies; with those present every stage's parameters
    validate, and the paper's settings are what the stages get."""
    from lnkit.runs import REPO

    spec = yaml.safe_load((REPO / "papermill_runs" / f"{name}.yaml").read_text())
    with pytest.raises(RunError, match="parent_checkpoint='/data/llama-3"):
        load_run(REPO / "papermill_runs" / f"{name}.yaml")
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"]["00_parent"]["parent_checkpoint"] = str(tmp_path)
    (tmp_path / "sft.jsonl").write_text("")
    spec["stages"]["06_reasoning_sft"]["data"] = str(tmp_path / "sft.jsonl")
    if "07_grpo" in spec["stages"]:
        spec["stages"]["07_grpo"]["pass_rate_model"] = str(tmp_path)
    _, params = load_run(write(tmp_path, spec))
    sft = params["06_reasoning_sft"]
    assert sft.rows * sft.accum == 256  # Sec. 4.2: global batch 256
    if name == "ln_super_from_llama70b":
        assert params["04_distillation"].tokens == 40_000_000_000 and "03_ffn_fusion" not in params
    else:
        g = params["07_grpo"]
        assert g.prompts_per_batch * g.group_size == 576 and g.num_iterations == 2 and g.fp8_rollouts
        kd = params["04_distillation"]
        assert kd.tokens * (1 - kd.cpt_fraction) == pytest.approx(65e9, rel=0.01)



def test_the_estimate_prices_each_stage_of_a_template_before_submission(tmp_path, capsys):
    """``--estimate`` (also printed by ``--launcher slurm`` before it submits): LN-Super's 40B tokens of
    distillation priced as 6N per token for the student (the child, 49.9B) and 2N for the teacher's forward
    (the parent, 70.6B); on its 16 nodes of 8 H100s about 4 days, within its 7-day limit, as every stage of the
    template is within its own. Writes nothing."""
    from lnkit import gpuhours
    from lnkit.runs import REPO, estimate, main

    spec = yaml.safe_load((REPO / "papermill_runs" / "ln_super_from_llama70b.yaml").read_text())
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"]["00_parent"]["parent_checkpoint"] = str(tmp_path)
    (tmp_path / "sft.jsonl").write_text("")
    spec["stages"]["06_reasoning_sft"]["data"] = str(tmp_path / "sft.jsonl")
    path = write(tmp_path, spec)
    head, params = load_run(path)
    est, rows = estimate(head, params, list(params))
    kd = next(r for r in rows if r["stage"] == "04_distillation")
    want = gpuhours.hours(gpuhours.Work(train=40e9, forward=40e9), "LN-Super", "H100", forward_config="Llama-3.3-70B")
    assert kd["train"] == pytest.approx(want["train"]) and kd["forward"] == pytest.approx(want["forward"])
    assert kd["forward"] / kd["train"] == pytest.approx(2 / 6 * 70.55 / 49.87, rel=1e-3)
    assert all(r["total"] is not None and r["total"] >= 0 for r in rows)
    assert next(r for r in rows if r["stage"] == "09_evaluation")["generate"] > 0
    assert main([path, "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours on H100" in out and "04_distillation" in out and "96.6 h on 128 GPUs" in out
    assert "time limit" not in out
    assert not (tmp_path / "run").exists()  # an estimate writes nothing
    spec["slurm"]["stages"]["04_distillation"]["timeout_min"] = 60
    assert main([write(tmp_path, spec), "--estimate"]) == 0
    assert "> its time limit 1 h" in capsys.readouterr().out
    sweep = {**spec, "sweep": {"grid": {"06_reasoning_sft.lr": [5e-6, 1e-5]}}}
    assert main([write(tmp_path, sweep), "--estimate"]) == 0  # a sweep's estimate runs nothing either
    out = capsys.readouterr().out
    assert "2 points; each point's estimate" in out and "96.6 h on 128 GPUs" in out
    assert not any((tmp_path / "run").glob("*/0*"))
    spec["slurm"]["estimate"] = {"gpu": "TPU"}
    assert main([write(tmp_path, spec), "--estimate"]) == 1
    assert "slurm.estimate.gpu: unknown GPU 'TPU'" in capsys.readouterr().err


def test_slurm_submits_what_the_local_runner_would_run(tmp_path):
    """Which stages ``--launcher slurm`` submits: none when all are complete; from the first incomplete (or
    stale) stage on, since every stage after a rerun one reruns too; all with --force. The real Slurm runs
    are in tests/test_slurm.py."""
    import json
    import os

    from lnkit.runs import pending
    from lnkit.stage import MARKER

    spec = {**BASE, "run_dir": str(tmp_path / "run"),
            "stages": {"00_parent": {}, "01_block_library": {}, "02_architecture_search": {}}}
    head, params = load_run(write(tmp_path, spec))
    names = list(params)
    assert pending(head, params, names, force=False) == names
    for i, name in enumerate(names):  # mark each complete with its parameters, in order
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        (d / MARKER).write_text(json.dumps({"digest": params[name].digest()}))
        os.utime(d / MARKER, (100 + i, 100 + i))
    log = []
    assert pending(head, params, names, force=False, log=log.append) == [] and len(log) == 3
    assert pending(head, params, names, force=True) == names
    (tmp_path / "run" / "01_block_library" / MARKER).unlink()
    assert pending(head, params, names, force=False) == names[1:]
    (tmp_path / "run" / "01_block_library" / MARKER).write_text(
        json.dumps({"digest": params["01_block_library"].digest()}))  # completed after stage 02
    assert pending(head, params, names, force=False) == names[2:]


def test_a_slurm_resubmission_with_a_damaged_job_list_or_no_slurm_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from lnkit.runs import main

    spec = {**BASE, "run_dir": str(tmp_path / "run")}
    path = write(tmp_path, spec)
    jobs = tmp_path / "run" / "slurm" / "jobs.json"
    jobs.parent.mkdir(parents=True)
    jobs.write_text("[{")
    assert main([path, "--launcher", "slurm"]) == 1
    assert "jobs.json is not the job list this runner writes" in capsys.readouterr().err
    jobs.write_text('[{"stage": "00_parent", "job_id": "7"}]')
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    assert main([path, "--launcher", "slurm"]) == 1
    assert "squeue is not on PATH" in capsys.readouterr().err
