"""Run files and stage parameters: every mistake stops the run before anything runs, naming the stage,
the field and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from lnkit.params import ParamError
from lnkit.parent import ParentParams
from lnkit.runs import RunError, load_run, main


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
])
def test_bad_run_files(tmp_path, spec, message):
    with pytest.raises(RunError, match=None) as e:
        load_run(write(tmp_path, spec))
    assert message in str(e.value)


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


def test_shared_values_and_paths_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    head, params = load_run(write(tmp_path, {**BASE, "shared": {"seed": 7, "figures_dir": "figs"}}))
    p = params["00_parent"]
    assert p.seed == 7 and p.run_dir == str(tmp_path / "runs" / "t") and p.figures_dir == str(tmp_path / "figs")
    assert head["run"] == "t"


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
        assert names == {f.name for f in fields(cls)}, stage
        values = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets}
        cls.from_dict(values)  # the notebook's own defaults are valid parameters
