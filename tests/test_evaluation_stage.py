"""Stages 09 and 10 at smoke size: stage 09's tidy table (every model x domain x mode, intervals around the
value), its answers kept and reused on a rerun, bad input named before anything is written; stage 10 drawing
what a run folder holds and naming, for each figure it cannot draw, the stage and the command that makes it.
(Both stages also run end to end through their notebooks in tests/test_notebooks.py.)"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import helpers
from lnkit import stage
from lnkit.checkpoints import StageNotComplete
from lnkit.data import ifeval
from lnkit.params import ParamError
from lnkit.runs import load_run
from lnkit.stages import evaluation, figures

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_parent(tmp_path_factory):
    return helpers.smoke_stage00(tmp_path_factory.mktemp("eval_run"))


def params(run_dir, **kw) -> evaluation.Params:
    _, ps = load_run(ROOT / "papermill_runs" / "smoke.yaml")
    base = dataclasses.replace(ps[evaluation.NAME], run_dir=str(run_dir), models=["00_parent"], baseline="00_parent",
                               progress=False, figures_dir="")
    return dataclasses.replace(base, **kw)


def test_an_unknown_domain_is_named():
    with pytest.raises(ParamError, match=r"unknown domain\(s\) \['poetry'\]"):
        evaluation.Params(domains=["math", "poetry"])


def test_an_unknown_checkpoint_is_named_and_nothing_is_written(smoke_parent):
    with pytest.raises(ParamError, match="unknown checkpoint 'no_such_model'"):
        evaluation.run(params(smoke_parent, extra_models=["no_such_model"]))
    assert not (smoke_parent / evaluation.NAME).exists()


def test_the_puzzle_child_needs_stage_03(smoke_parent):
    with pytest.raises(StageNotComplete, match="reads stage 03_ffn_fusion, which has not completed .* --until 03_ffn"):
        evaluation.run(params(smoke_parent, models=["00_parent", "puzzle_child"]))
    assert not (smoke_parent / evaluation.NAME).exists()


def test_ifeval_per_prompt_values_average_to_ifevals_own_metrics():
    follows = [{"strict": [True, False], "loose": [True, True]}, {"strict": [True], "loose": [True]},
               {"strict": [False, False, True], "loose": [False, True, True]}]
    per = evaluation.ifeval_per_prompt(follows)
    want = ifeval.score(follows)
    assert set(per) == set(want)
    for metric, values in per.items():
        assert len(values) == 3 and abs(sum(values) / 3 - want[metric]) < 1e-4


def test_every_model_domain_and_mode_gets_a_row_and_answers_are_reused(smoke_parent, monkeypatch):
    run_dir = smoke_parent
    other = run_dir / "copy_of_parent"  # an extra checkpoint named by folder: the same weights
    shutil.copytree(run_dir / "00_parent" / "model", other)
    p = params(run_dir)
    result = evaluation.run(p)
    stage.finish(p, result["metrics"])
    out = run_dir / evaluation.NAME
    rows = list(csv.DictReader(open(out / "results.csv")))
    test = [json.loads(x) for x in (run_dir / "00_parent" / "data" / "test.jsonl").read_text().splitlines()]
    for dom in evaluation.DOMAINS:
        n = sum(t["domain"] == dom for t in test)
        for mode in ("on", "off"):
            cell = [r for r in rows if (r["domain"], r["mode"], r["metric"]) == (dom, mode, "pass@1")]
            assert len(cell) == 1 and int(cell[0]["n"]) == n
            assert int(cell[0]["samples"]) == n * (p.k if mode == "on" else 1)
            assert float(cell[0]["low"]) <= float(cell[0]["value"]) <= float(cell[0]["high"])
    assert {r["metric"] for r in rows if r["domain"] == "ifeval"} == set(ifeval.score([{"strict": [1], "loose": [1]}]))
    assert {r["mode"] for r in rows if r["domain"] == "chat_arena"} == {"on", "off"}
    assert {r["metric"] for r in rows if r["domain"] == "speed"} >= {"decode_tok_s", "decode_tok_s_vs_parent"}
    table = list(csv.DictReader(open(out / "table.csv")))
    assert [t["model"] for t in table] == ["00_parent"] and table[0]["decode speed-up"] == "1.0"

    # a rerun with a model added samples only the new model's answers
    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda model, *a, **kw: calls.append(kw) or real(model, *a, **kw))
    p2 = params(run_dir, extra_models=[str(other)])
    r2 = evaluation.run(p2)
    assert len(calls) == 2  # the copy's sampled and greedy answers; the parent's were read back
    again = {(r["model"], r["domain"], r["mode"], r["metric"]): r["value"] for r in r2["rows"]}
    first = {(r["model"], r["domain"], r["mode"], r["metric"]): float(r["value"]) for r in rows}
    for key, value in first.items():
        if key[0] == "00_parent" and key[2] != "-":  # the same answers, the same figures
            assert again[key] == pytest.approx(value)
    # the copy has the parent's weights: greedy answers and their figures agree
    for dom in evaluation.DOMAINS:
        assert again[(str(other), dom, "off", "pass@1")] == pytest.approx(again[("00_parent", dom, "off", "pass@1")])


def test_stage_10_draws_what_is_there_and_names_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    ev = run_dir / evaluation.NAME
    ev.mkdir(parents=True)
    for f in ("results.csv", "models.json"):
        shutil.copy(ROOT / "tests" / "fixtures" / "evaluation_tiny" / f, ev / f)
    (ev / "_COMPLETE.json").write_text("{}")
    (run_dir / "run.yaml").write_text("run: mine\n")
    p = figures.Params(run_dir=str(run_dir), sweep="", progress=False, figures_dir=str(tmp_path / "figs"))
    result = figures.run(p)
    m = result["metrics"]
    assert set(m["drawn"]) == {"fig2_4_accuracy_vs_throughput", "table3_5_on_off"}
    assert m["skipped"]["fig3_puzzle_frontier"] == ("stage 02_architecture_search has not completed in run run: "
                                                   "python -m lnkit.runs papermill_runs/mine.yaml --until "
                                                   "02_architecture_search")
    assert "parameter sweep is empty" in m["skipped"]["fig6_curriculum_vs_random"]
    for name in m["drawn"]:
        for folder in (run_dir / figures.NAME, tmp_path / "figs"):
            assert (folder / f"{name}.png").stat().st_size > 0 and (folder / f"{name}.svg").stat().st_size > 0
    report = (tmp_path / "figs" / "REPORT.md").read_text()
    claim_rows = [line for line in report.splitlines() if line.startswith("| ") and "claim |" not in line]
    assert len(claim_rows) == m["claims"] == len(result["claims"])
    by_claim = {c["claim"]: c for c in result["claims"]}
    fig24 = next(c for k, c in by_claim.items() if "Figures 2 and 4" in k)
    assert fig24["holds"] != "-" and "pass@1 (on)" in fig24["measured"]  # measured from the fixture
    table1 = next(c for k, c in by_claim.items() if "Table 1" in k)
    assert table1["measured"].startswith("not measured: stage 04_distillation has not completed")
    assert any(c["source"] == "lnkit.deploy.paper_claims" for c in result["claims"])
