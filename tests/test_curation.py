"""Stage 05: the reference teacher's mistakes, each curation filter, the blend, the released schema and
its loader, and the stage function on a tiny run folder."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lnkit.curation import (
    CORRUPTIONS,
    CurationError,
    Sample,
    blend,
    blend_targets,
    check_code_parses,
    corrupt,
    curate,
    decontaminate,
    extract_answers,
    leaked_prompts,
    majority_vote,
    reference_teacher,
)
from lnkit.data.chat import split_response
from lnkit.data.released import SchemaError, item_row, load_rows, write_rows
from lnkit.train.batches import IGNORE, encode_item, encode_row
from lnkit.verify import check

FIXTURE = Path(__file__).parent / "fixtures" / "released_sample.jsonl"


def _by_domain(items, n):
    out = {}
    for it in items:
        out.setdefault(it.domain, [])
        if len(out[it.domain]) < n:
            out[it.domain].append(it)
    return [it for v in out.values() for it in v]


# ---------------------------------------------------------------- the teacher
def test_clean_reference_traces_verify_and_every_mistake_is_wrong(small_splits):
    items = _by_domain(small_splits["train"], 12)
    for s in reference_teacher(items, k=1, error_rate=0.0):
        assert check(split_response(s.output)[1], s.item), s.output
    rng = random.Random(0)
    for it in items:
        for kind in CORRUPTIONS[it.domain]:
            out = corrupt(it, kind, rng)
            thought, answer = split_response(out)
            assert not check(answer, it) or kind == "bug", (kind, out)  # a bug may pass by luck; see below
            if kind == "truncated":
                assert "</think>" not in out and out.startswith("<think>")


def test_math_mistake_is_one_wrong_step_that_propagates(small_splits):
    items = [it for it in small_splits["train"] if it.domain == "math" and it.difficulty >= 3][:20]
    rng = random.Random(1)
    for it in items:
        out = corrupt(it, "arithmetic", rng)
        thought, answer = split_response(out)
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", thought)
        wrong = [i for i, (a, op, b, c) in enumerate(steps) if (int(a) + int(b) if op == "+" else int(a) - int(b)) != int(c)]
        assert len(wrong) == 1  # exactly one step is miscalculated
        chained = all(steps[i + 1][0] == steps[i][3] for i in range(len(steps) - 1))
        assert chained and answer == f"The answer is {steps[-1][3]}." and not check(answer, it)


def test_bug_corruptions_are_mostly_caught_by_the_tests(small_splits):
    items = [it for it in small_splits["train"] if it.domain == "code"][:15]
    rng = random.Random(2)
    caught = sum(not check(split_response(corrupt(it, "bug", rng))[1], it) for it in items)
    assert caught >= 13


# ---------------------------------------------------------------- the filters
def _math_item(small_splits):
    return next(it for it in small_splits["train"] if it.domain == "math" and it.difficulty == 2)


def test_extraction_needs_the_mode_format_and_an_answer(small_splits):
    it = _math_item(small_splits)
    good_on = Sample(it, "on", f"<think>\n{it.reasoning}\n</think>\n{it.direct}", "t")
    samples = [good_on, Sample(it, "off", it.direct, "t"),
               Sample(it, "on", it.direct, "t"),  # thinking on without a think block
               Sample(it, "off", good_on.output, "t"),  # thinking off with one
               Sample(it, "on", f"<think>\n{it.reasoning}", "t"),  # cut off
               Sample(it, "off", "I am not sure.", "t")]  # no number
    kept, removed = extract_answers(samples)
    assert kept == samples[:2] and len(removed) == 4 and kept[0].answer == it.gold


def test_code_that_does_not_parse_is_removed(small_splits):
    it = next(i for i in small_splits["train"] if i.domain == "code")
    rng = random.Random(0)
    s = [Sample(it, "on", corrupt(it, "syntax", rng), "t"), Sample(it, "off", it.direct, "t")]
    kept, _ = extract_answers(s)
    kept, removed = check_code_parses(kept)
    assert kept == [s[1]] and removed == [s[0]]


def test_decontamination_removes_every_leak_and_no_clean_prompt(small_splits):
    evals = small_splits["test"]
    leaks = leaked_prompts(evals, 60, seed=3)
    clean = _by_domain(small_splits["train"], 40)
    samples = [Sample(it, "on", "", "t") for it in leaks + clean]
    kept, removed = decontaminate(samples, evals)
    assert {s.item.id for s in removed} == {it.id for it in leaks}
    assert len(kept) == len(clean)


def test_majority_vote_keeps_the_winner_in_both_modes_and_drops_ties(small_splits):
    chat = [it for it in small_splits["train"] if it.domain == "chat"][:2]
    a, b = chat
    samples = [Sample(a, "on", "", "t", answer=x) for x in ("pim", "pim", "dax")]
    samples += [Sample(a, "off", "", "t", answer="pim"), Sample(a, "off", "", "t", answer="dax")]
    samples += [Sample(b, "on", "", "t", answer=x) for x in ("pim", "dax")]  # a tie: no winner
    kept, removed = majority_vote(samples, ("chat",))
    assert [(s.mode, s.answer) for s in kept] == [("on", "pim"), ("on", "pim"), ("off", "pim")]
    assert len(removed) == 4


def test_curate_keeps_only_right_answers_and_counts_each_filter(small_splits):
    items = _by_domain(small_splits["train"], 25)
    leaks = leaked_prompts(small_splits["test"], 6, seed=0)
    samples = reference_teacher(items + leaks, k=4, error_rate=0.3, seed=0)
    samples += [Sample(it, "off", it.direct, "reference-solver", "") for it in items + leaks]
    kept, report = curate(samples, eval_items=small_splits["test"], goldless=("chat",), workers=2)
    assert [r["filter"] for r in report][0] == "generated"
    for prev, row in zip(report, report[1:]):
        assert row["before"] == prev["after"] and row["after"] == row["before"] - row["removed"]
    removed = {r["filter"]: r for r in report}
    assert removed["answer extraction"]["removed_by_mistake"].get("truncated", 0) > 0
    assert removed["code parses"]["removed_by_mistake"] == {"syntax": removed["code parses"]["removed"]}
    assert removed["decontamination"]["removed"] == 5 * len(leaks) - sum(  # 4 on + 1 off per leaked prompt,
        1 for s in samples if s.item.id.startswith("leak-") and s.corruption in ("truncated", "syntax"))  # less earlier removals
    assert removed["verification against gold"]["removed_by_mistake"].get("arithmetic", 0) > 0
    assert not any(s.item.id.startswith("leak-") for s in kept)
    wrong = [s for s in kept if not check(split_response(s.output)[1], s.item)]
    assert len(wrong) <= 2  # a bug that passes its tests by luck, a chat majority of wrong samples
    assert {s.item.domain for s in kept} == {"math", "science", "code", "instruct", "chat"}


def test_a_filter_that_empties_the_data_is_named(small_splits):
    it = _math_item(small_splits)
    samples = [Sample(it, "off", "<think>\nx\n</think>\nThe answer is 3.", "t")] * 3
    with pytest.raises(CurationError, match="'answer extraction' removed every remaining response"):
        curate(samples, eval_items=small_splits["test"])


def test_blend_meets_targets_spreads_prompts_and_reports_shortfalls(small_splits):
    items = _by_domain(small_splits["train"], 60)
    samples = [Sample(it, "on", f"<think>{it.reasoning}</think>{it.direct}", "t", "") for it in items]
    samples += [Sample(it, "off", it.direct, "t", "") for it in items if it.domain == "math"][:10]
    targets = blend_targets(100, {"math": 3, "code": 1}, off_fraction=0.2)
    chosen, table = blend(samples, targets, level_weights={"math": [1, 1, 1, 1, 1]}, seed=0)
    t = {(r["domain"], r["mode"]): r for r in table}
    assert t[("math", "on")]["chosen"] == 60 and t[("math", "on")]["prompts"] == 60
    assert t[("code", "on")]["chosen"] == 20 and t[("code", "off")]["short"] == 5
    levels = [s.item.difficulty for s in chosen if s.item.domain == "math" and s.mode == "on"]
    assert all(levels.count(lvl) == 12 for lvl in range(1, 6))
    # Thinking-off answers of levels 1-2 only (the parent's): the empty levels are made up from the others.
    easy = [Sample(it, "off", it.direct, "t", "") for it in items if it.domain == "math" and it.difficulty <= 2]
    chosen, table = blend(easy, {("math", "off"): 8}, level_weights={"math": [1, 1, 1, 1, 1]}, seed=0)
    assert len(chosen) == 8 and table[0]["short"] == 0 and len({s.item.id for s in chosen}) == 8
    assert not {s.item.domain for s in chosen} - {"math", "code"}


# ---------------------------------------------------------------- the released schema
def test_released_rows_give_the_same_examples_as_the_items(tmp_path, small_splits, tok):
    items = _by_domain(small_splits["train"], 3)
    path = tmp_path / "blend.jsonl"
    write_rows([item_row(it, mode) for it in items for mode in ("on", "off")], path)
    rows, skipped = load_rows(path)
    assert not skipped and len(rows) == 2 * len(items)
    for row, (it, mode) in zip(rows, [(it, m) for it in items for m in ("on", "off")]):
        assert encode_row(tok, row) == encode_item(tok, it, mode)


def test_fixture_file_loads_skipping_and_counting_bad_rows(small_splits, tok):
    rows, skipped = load_rows(FIXTURE)
    assert len(rows) == 7 and sum(skipped.values()) == 6
    assert skipped["not valid JSON"] == 1 and skipped["missing field(s) output"] == 1
    assert skipped["reasoning disagrees with system_prompt"] == 1
    assert skipped["reasoning is 'maybe', not 'on' or 'off'"] == 1
    assert skipped["output does not match its mode (think block)"] == 1
    assert skipped["input is not a non-empty list of messages"] == 1
    by_prompt = {it.prompt: it for it in small_splits["train"]}
    for row in rows[:6]:  # made from the first training item of each domain (tests/fixtures/make_released_sample.py)
        it = by_prompt[row["input"][-1]["content"]]
        assert encode_row(tok, row) == encode_item(tok, it, row["reasoning"])
    multi = rows[6]
    ids, labels = encode_row(tok, multi)
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(trained) == multi["output"] + "<|eot_id|>"
    assert "Hello! Ask me anything." in tok.decode(ids)  # the earlier turns are context


def test_unknown_system_prompt_is_an_error_naming_the_line(tmp_path, small_splits):
    it = small_splits["train"][0]
    rows = [item_row(it, "on"), {**item_row(it, "off"), "system_prompt": "detailed thinking of"}]
    path = tmp_path / "typo.jsonl"
    write_rows(rows, path)
    with pytest.raises(SchemaError, match=r"typo\.jsonl line 2: system_prompt 'detailed thinking of'"):
        load_rows(path)


def test_the_first_releases_templated_input_loads_like_messages(tok):
    """tests/fixtures/released_v1_sample.jsonl, written by hand after the public description of the v1
    release: ``input`` one Llama-3-templated string ending with the assistant header, ``output`` ending
    with <|eot_id|>; three good rows (system turn in the text or only in the field, one multi-turn) and two
    damaged ones, skipped and counted by reason."""
    rows, skipped = load_rows(FIXTURE.with_name("released_v1_sample.jsonl"))
    assert skipped == {"input is a string but not the Llama-3 chat template (v1)": 1,
                       "v1 system turn disagrees with system_prompt": 1}
    assert [r["input"][-1]["content"] for r in rows] == ["What is 3 + 4?", "What is 5 - 2?", "What is 2 + 2?"]
    assert [r["reasoning"] for r in rows] == ["on", "off", "off"] and not any("<|eot_id|>" in r["output"] for r in rows)
    assert [m["role"] for m in rows[2]["input"]] == ["user", "assistant", "user"]
    # the same example in the messages shape encodes to the same tokens
    same = {**rows[0], "input": [{"role": "user", "content": "What is 3 + 4?"}]}
    assert encode_row(tok, rows[0]) == encode_row(tok, same)


def test_a_row_that_is_not_utf8_is_skipped_counted_and_named(tmp_path, small_splits):
    it = small_splits["train"][0]
    path = tmp_path / "mixed.jsonl"
    write_rows([item_row(it, "on"), item_row(it, "off")], path)
    good = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(good[0] + b'{"input": "caf\xe9"}\n' + good[1])
    with pytest.warns(UserWarning, match=r"mixed\.jsonl line 2: not UTF-8 text \(byte \d+\); row skipped"):
        rows, skipped = load_rows(path)
    assert len(rows) == 2 and skipped == {"not UTF-8 text": 1}


# ---------------------------------------------------------------- the stage
def _tiny_run(tmp_path, world, small_splits, tok, tiny_llama):
    from lnkit.checkpoints import save_model
    from lnkit.data.splits import save_items
    from lnkit.io import atomic_write_json

    run = tmp_path / "run"
    data = run / "00_parent" / "data"
    save_items(small_splits["test"][:60], data / "val.jsonl")
    save_items(small_splits["test"], data / "test.jsonl")
    atomic_write_json(data / "world.json", {"kinds": world.kinds, "creatures": world.creatures})
    save_model(tiny_llama, tok, run / "00_parent" / "model")
    (run / "00_parent" / "_COMPLETE.json").write_text("{}")  # stage 00 done
    return run


def test_stage_writes_a_loadable_blend_and_its_report(tmp_path, world, small_splits, tok, tiny_llama):
    from lnkit import stage
    from lnkit.plots import curation_report as plot_report
    from lnkit.stages.curation import Params as CurationParams
    from lnkit.stages.curation import run_curation

    run = _tiny_run(tmp_path, world, small_splits, tok, tiny_llama)
    P = CurationParams(run_dir=str(run), figures_dir="", progress=False, blend_size=150, leak_fraction=0.05, min_examples=5,
                       domain_ratios={"math": 60, "code": 20, "science": 10, "instruct": 5, "chat": 5})
    stage.start(P)
    report = run_curation(P)
    out = run / "05_reasoning_data"
    rows, skipped = load_rows(out / "sft.jsonl")
    assert not skipped and len(rows) == report["audit"]["blend_examples"] > 50
    assert report["audit"]["leaked_prompts_kept"] == 0 and report["prompts"]["leaked"] > 0
    assert {r["category"] for r in rows} == {"math", "code", "science", "instruct", "chat"}
    gens = {(r["reasoning"], r["generator"]) for r in rows}
    assert ("on", "reference-solver") in gens and all(g == "00_parent" for m, g in gens if m == "off")
    # The untrained parent answers (almost) nothing right: curation removes its off-mode answers.
    n_prompts = report["prompts"]["drawn"] + report["prompts"]["leaked"]
    assert report["responses"]["on"] == P.k * n_prompts and report["responses"]["off"] < n_prompts
    assert sum(r["removed_off"] for r in report["funnel"]) >= 0.95 * report["responses"]["off"]
    assert sum(r["short"] for r in report["blend"] if r["mode"] == "off") > 0
    assert (out / "report.csv").read_text().startswith("filter,before,removed,after")
    assert json.loads((out / "report.json").read_text())["funnel"] == report["funnel"]
    plot_report(report)


def test_stage_with_a_model_teacher_names_the_filter_that_emptied_the_data(tmp_path, world, small_splits, tok,
                                                                           tiny_llama):
    from lnkit.stages.curation import Params as CurationParams
    from lnkit.stages.curation import run_curation

    run = _tiny_run(tmp_path, world, small_splits, tok, tiny_llama)
    P = CurationParams(run_dir=str(run), figures_dir="", progress=False, blend_size=20, k=2, teacher="00_parent",
                       teacher_max_new_tokens=8, off_max_new_tokens=8, leak_fraction=0.0,
                       domain_ratios={"math": 1})
    with pytest.raises(CurationError, match=r"curation filter '.*' removed every remaining response"):
        run_curation(P)  # an untrained model writes no think block and no right answer


def test_params_are_checked_before_anything_runs():
    from lnkit.params import ParamError
    from lnkit.stages.curation import Params as CurationParams

    with pytest.raises(ParamError, match="domain_ratios names unknown domain"):
        CurationParams(domain_ratios={"safety": 1.0})
    with pytest.raises(ParamError, match="parameter k=0 is out of range"):
        CurationParams(k=0)
    with pytest.raises(ParamError, match="goldless_domains"):
        CurationParams(goldless_domains=["poetry"])
