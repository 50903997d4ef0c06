"""Stage 08 at smoke size: bad input (beta or eta <= 0, an unknown instruction id, a pair file with no usable
row, a reward model of another vocabulary) stops with a message naming it before anything is written; offline
RPO on a pair file trains on its usable rows and reports the skipped ones. (The whole stage runs end to end
in tests/test_notebooks.py through its notebook.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import helpers
from lnkit.data.pairs import Pair, PairFileError, write_pairs
from lnkit.params import ParamError
from lnkit.runs import load_run
from lnkit.stages import alignment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_parent(tmp_path_factory):
    """A run folder with the smoke run's stage 00 (the world, its splits and a tiny parent)."""
    return helpers.smoke_stage00(tmp_path_factory.mktemp("align_run"))


def params(run_dir, **kw) -> alignment.Params:
    _, ps = load_run(ROOT / "papermill_runs" / "smoke.yaml")
    base = dataclasses.replace(ps[alignment.NAME], run_dir=str(run_dir), init="00_parent", baseline="00_parent",
                               progress=False, figures_dir="")
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("field, value, match", [
    ("beta", 0.0, "beta=0.0 must be > 0"), ("beta", -1.0, "beta=-1.0"), ("eta", 0.0, "eta=0.0 must be > 0"),
    ("if_instructions", ["punctuation:no_comma", "detectable_format:haiku"], "'detectable_format:haiku'"),
])
def test_bad_parameters_are_named_and_nothing_is_written(smoke_parent, field, value, match):
    with pytest.raises(ParamError, match=match):
        p = params(smoke_parent, **{field: value})
        p.check()
        alignment.run(p)
    assert not (smoke_parent / alignment.NAME).exists()


def test_a_pair_file_with_no_usable_row_is_named_with_its_line(smoke_parent, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\nnot json\n')
    with pytest.raises(PairFileError, match=r"pairs.jsonl: no usable pair \(2 bad line\(s\); line 1"):
        alignment.run(params(smoke_parent, pair_file=str(bad)))
    assert not (smoke_parent / alignment.NAME).exists()


def test_a_reward_model_of_another_vocabulary_is_refused(smoke_parent, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from lnkit.checkpoints import load_model, model_dir
    from lnkit.rl.reward_model import RewardModel, save_reward_model

    lm, tok = load_model(model_dir(smoke_parent, "00_parent"))
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    other.add_tokens(["<extra>"])
    save_reward_model(RewardModel(lm), other, tmp_path / "rm")
    with pytest.raises(ParamError, match="parameter reward_model: reward model .*rm has another vocabulary"):
        alignment.run(params(smoke_parent, reward_model=str(tmp_path / "rm")))
    assert not (smoke_parent / alignment.NAME).exists()


def test_offline_rpo_trains_on_a_pair_files_usable_rows(smoke_parent, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_parent, run_dir)
    f = tmp_path / "pairs.jsonl"
    good = [Pair("Where do dips live?", "Dips live in grass.", "Dips live in ice.", "off", 1.0, -1.0),
            Pair("What kind of animal is a zog?", "A zog is a dip.", "zog zog", "on")]
    write_pairs(f, good)
    f.write_text(f.read_text() + "{broken\n")
    p = params(run_dir, pair_file=str(f), rloo_steps=0, dpo_baseline=False)
    result = alignment.run(p)
    out = run_dir / alignment.NAME
    report = json.loads((out / "pair_file_report.json").read_text())
    assert report["pairs"] == 2 and report["skipped"][0].startswith("line 3:")
    assert (out / "rpo_1" / "model" / "config.json").exists() and (out / "model" / "config.json").exists()
    assert [r["phase"] for r in result["phases"] if r["mode"] == "on"] == ["start", "rpo_1"]
    assert set(result["metrics"]["win_rate"]) == {"on", "off"}
    from lnkit import rlview

    state = rlview.read_state(run_dir, alignment.NAME)
    assert "rpo_1" in state["logs"] and [r["phase"] for r in state["phases"]][:2] == ["start", "start"]
    assert rlview.png(state)[:4] == b"\x89PNG" and "phases evaluated: start, rpo_1" in rlview.status(state)


def test_a_rerun_resumes_finished_phases_and_other_parameters_start_over(smoke_parent, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_parent, run_dir)
    p = params(run_dir, rpo_iterations=1, dpo_baseline=False)
    alignment.run(p)
    out = run_dir / alignment.NAME
    weights = out / "rloo" / "model" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    alignment.run(p)  # same parameters: the finished RLOO phase is loaded, not trained again
    assert weights.stat().st_mtime_ns == first
    alignment.run(dataclasses.replace(p, rloo_lr=p.rloo_lr * 2))  # another parameter: the stage starts over
    assert weights.stat().st_mtime_ns != first
    assert json.loads((out / "identity.json").read_text())["rloo_lr"] == p.rloo_lr * 2
