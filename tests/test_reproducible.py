"""Reruns that reproduce: stages 00-04 of the smoke run, run twice from scratch into two folders, give the
same artifacts, byte for byte, except the files that hold wall times or their own folder's path (each listed
with its reason, and compared with those fields removed). Block prices come from a cost table, so the MIP's
pick is no longer a timing lottery; measured tables are kept in the run folder and reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lnkit import stage
from lnkit.io import ArtifactError
from lnkit.puzzle import cost_table
from lnkit.runs import load_run
from lnkit.stages import PIPELINE, search

ROOT = Path(__file__).resolve().parents[1]
FIRST_FIVE = PIPELINE[:5]  # 00_parent .. 04_distillation

# Files that differ between two identical runs, and why. Everything else must be byte-identical.
TIMED_OR_PLACED = {
    "_COMPLETE.json": "completion time and input fingerprints with the run folder's path",
    "params.json": "the run folder's path",
    "metrics.json": "measured throughput and wall times",
    "train_log.csv": "elapsed seconds per step",
    "manifest.json": "digest of state.pt, which holds the fingerprint (with the run folder's path)",
    "state.pt": "the fingerprint (with the run folder's path); weights and optimizer state compared below",
    "frontier.csv": "measured throughput (frontier.json is compared without it)",
    "frontier.json": "measured throughput; compared below without the timed fields",
    "result.json": "measured latency and the child's path; compared below without them",
    "student_source.json": "the student's path",
    "table.csv": "measured speed-up (table.json is compared without it)",
    "table.json": "measured speed-up; compared below without it",
}
TIMED_FIELDS = {"tokens_per_s", "tokens_per_s_spread", "tokens_per_s_rounds", "speedup", "speedup_spread",
                "solve_time_s", "cpu_latency_ratio", "tokens_per_s_fused", "tokens_per_s_unfused", "child_dir",
                "parent_tokens_per_s", "fused_tokens_per_s", "unfused_tokens_per_s"}


def run_first_five(run_dir: Path, **changes) -> None:
    _, params = load_run(ROOT / "papermill_runs" / "smoke.yaml")
    for module in FIRST_FIVE:
        p = dataclasses.replace(params[module.NAME], run_dir=str(run_dir), **changes.get(module.NAME, {}))
        stage.finish(p, module.run(p)["metrics"])


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMED_FIELDS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    run_first_five(a)
    run_first_five(b)
    return a, b


def test_two_runs_of_stages_00_to_04_give_the_same_artifacts(two_runs):
    a, b = two_runs
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    weights = [f for f in files_a if f.suffix == ".safetensors"]
    assert len(weights) >= 5  # parent, library blocks, children, fused child, students
    differing = [f for f in files_a if (a / f).read_bytes() != (b / f).read_bytes()]
    unexplained = [f for f in differing if f.name not in TIMED_OR_PLACED]
    assert unexplained == [], unexplained  # weights, scores, costs, library, fusion groups: identical bytes
    for name in ("frontier.json", "result.json", "table.json"):
        for f in [f for f in files_a if f.name == name]:
            got_a, got_b = (json.loads((d / f).read_text()) for d in (a, b))
            assert without_timing(got_a) == without_timing(got_b), f


def test_the_pick_is_priced_by_the_packaged_table(two_runs):
    a, _ = two_runs
    out = a / search.NAME
    used = json.loads((out / "cost_table.json").read_text())
    assert used == json.loads((cost_table.PACKAGED / "smoke.json").read_text())
    frontier = json.loads((out / "frontier.json").read_text())
    child = next(r for r in frontier if r["kind"] == "puzzle" and "priced_speedup" in r)
    assert child["priced_decode_fraction"] <= 0.7 + 1e-9 and child["priced_speedup"] > 1.0
    assert len(child["speedup_spread"]) == 2 and child["speedup_spread"][0] <= child["speedup_spread"][1]


@pytest.fixture()
def smoke_inputs(two_runs, tmp_path):
    """A run folder holding a copy of the smoke run's stages 00 and 01: what stage 02 prices."""
    import shutil

    a, _ = two_runs
    for name in ("00_parent", "01_block_library"):
        shutil.copytree(a / name, tmp_path / name)
    for split in a.glob("*.jsonl"):
        shutil.copy(split, tmp_path / split.name)
    return tmp_path


def search_params(run_dir: Path, **changes) -> search.Params:
    _, params = load_run(ROOT / "papermill_runs" / "smoke.yaml")
    return dataclasses.replace(params[search.NAME], run_dir=str(run_dir), **changes)


def library_and_parent(run_dir: Path):
    from lnkit.checkpoints import load_model
    from lnkit.puzzle.library import load_library

    parent, _ = load_model(run_dir / "00_parent" / "model")
    return load_library(run_dir / "01_block_library" / "library"), parent.config


def test_measured_costs_are_kept_in_the_run_folder_and_reused(smoke_inputs):
    library, config = library_and_parent(smoke_inputs)
    p = search_params(smoke_inputs, cost_source="measured", cost_rounds=1)
    first, _ = search.price_blocks(p, library, config)
    tables = list((smoke_inputs / "cost_tables").glob("*.json"))
    assert len(tables) == 1
    stored = tables[0].read_bytes()
    again, _ = search.price_blocks(p, library, config)
    assert again == first and tables[0].read_bytes() == stored  # reused, not re-timed
    p = dataclasses.replace(p, remeasure_costs=True)
    search.price_blocks(p, library, config)
    assert json.loads(tables[0].read_text())["machine"]["measured_at"] >= json.loads(stored)["machine"]["measured_at"]
    assert json.loads(tables[0].read_text())["blocks"].keys() == json.loads(stored)["blocks"].keys()


def test_a_setup_without_a_packaged_table_is_measured_once(smoke_inputs, capsys):
    library, config = library_and_parent(smoke_inputs)
    p = search_params(smoke_inputs, batch_size=3, cost_rounds=1)  # no packaged table has batch 3
    search.price_blocks(p, library, config)
    assert "no packaged cost table for this setup" in capsys.readouterr().out
    (table,) = (smoke_inputs / "cost_tables").glob("*.json")
    assert json.loads(table.read_text())["setup"]["batch_size"] == 3


def test_a_corrupt_cost_table_is_named(smoke_inputs):
    library, config = library_and_parent(smoke_inputs)
    p = search_params(smoke_inputs, cost_source="measured", cost_rounds=1)
    search.price_blocks(p, library, config)
    (table,) = (smoke_inputs / "cost_tables").glob("*.json")
    table.write_text('{"format": 1, "setup": {}')
    with pytest.raises(ArtifactError, match=str(table)):
        search.price_blocks(p, library, config)
    table.write_text(json.dumps({"format": 1, "setup": {}, "blocks": {"x": {"prefill_s": -1, "decode_s": 0}},
                                 "rest_decode_s": 0, "machine": {}}))
    with pytest.raises(ArtifactError, match="non-negative"):
        search.price_blocks(p, library, config)


def test_packaged_tables_are_valid_and_name_their_machine():
    paths = sorted(cost_table.PACKAGED.glob("*.json"))
    assert {p.stem for p in paths} >= {"tiny", "smoke"}
    for path in paths:
        table = cost_table.load(path)
        assert table["machine"]["cpu"] and table["machine"]["cores"] >= 1
        for entry in table["blocks"].values():
            assert len(entry["decode_s_rounds"]) == table["rounds"]
            assert min(entry["decode_s_rounds"]) <= entry["decode_s"] <= max(entry["decode_s_rounds"])
