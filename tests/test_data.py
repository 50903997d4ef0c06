"""The tiny world: determinism, disjoint splits, decontamination, verifiable items, tokenizer, template."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lnkit.data.chat import THINK_CLOSE, THINK_OPEN, format_response, mode_of, render_prompt, split_response
from lnkit.data.splits import decontamination_report, load_items, make_split, save_items, split_of
from lnkit.data.tasks import DOMAINS, MAX_DIFFICULTY, Item
from lnkit.data.world import make_world
from lnkit.verify import check


def test_world_is_deterministic_and_traits_distinct(world):
    assert make_world(0) == world and make_world(1) != world
    for trait in ("habitat", "food", "color"):
        values = [k[trait] for k in world.kinds.values()]
        assert len(set(values)) == len(values)


def test_splits_disjoint_by_key_and_deterministic(world, small_splits):
    keys = {s: {it.key for it in items} for s, items in small_splits.items()}
    assert not keys["train"] & keys["test"]
    assert all(split_of(it.key) == s for s, items in small_splits.items() for it in items)
    again = make_split(world, "test", {d: 30 for d in DOMAINS})
    assert [it.to_dict() for it in again] == [it.to_dict() for it in small_splits["test"]]


def test_every_domain_and_level_present(small_splits):
    test = small_splits["test"]
    for d in DOMAINS:
        levels = {it.difficulty for it in test if it.domain == d}
        assert levels == set(range(1, MAX_DIFFICULTY[d] + 1)), d


def test_decontamination_clean_on_real_splits_and_catches_a_leak(small_splits):
    rep = decontamination_report(small_splits["train"], small_splits["test"])
    assert rep["flagged"] == 0 and rep["max_overlap"] < rep["threshold"]
    src = next(it for it in small_splits["train"] if it.domain == "math" and it.difficulty >= 4)
    exact = dataclasses.replace(src, id="leak-exact")
    edited = dataclasses.replace(src, id="leak-edited", prompt=src.prompt + " Think about it.")
    rep = decontamination_report(small_splits["train"], [exact, edited, small_splits["test"][0]])
    assert rep["flagged_ids"] == ["leak-exact", "leak-edited"]


def test_reference_answers_pass_their_verifiers_and_wrong_ones_fail(small_splits):
    items = [it for it in small_splits["test"] if it.domain != "code"]  # code: see test_sandbox
    for it in items:
        assert check(it.direct, it), (it.id, it.direct)
    wrong = {"math": "The answer is 1000.", "science": "The answer is Z.", "instruct": "no idea",
             "chat": "I do not know."}
    for it in items:
        assert not check(wrong[it.domain], it), it.id


def test_math_reasoning_steps_are_correct(small_splits):
    import re

    for it in (it for it in small_splits["train"] if it.domain == "math"):
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", it.reasoning)
        assert len(steps) == it.difficulty if it.difficulty <= 2 else len(steps) == [0, 1, 2, 3, 4, 5][it.difficulty]
        for a, op, b, c in steps:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert steps[-1][3] == it.gold


def test_item_rows_roundtrip_and_malformed_rows_are_named(tmp_path, small_splits):
    path = tmp_path / "items.jsonl"
    save_items(small_splits["test"][:5], path)
    assert [it.to_dict() for it in load_items(path)] == [it.to_dict() for it in small_splits["test"][:5]]
    good = small_splits["test"][0].to_dict()
    bad_rows = [
        ("not json", "line 2"),
        (json.dumps({k: v for k, v in good.items() if k != "gold"}), "missing field(s) gold"),
        (json.dumps({**good, "domain": "poetry"}), "domain 'poetry'"),
        (json.dumps({**good, "difficulty": 9}), "difficulty 9"),
        (json.dumps({**good, "prompt": 3}), "field prompt must be a string"),
        (json.dumps({**good, "colour": "red"}), "unknown field(s) colour"),
    ]
    for row, msg in bad_rows:
        path.write_text(json.dumps(good) + "\n" + row + "\n")
        with pytest.raises(ValueError, match="line 2") as e:
            load_items(path)
        assert msg in str(e.value)
    with pytest.raises(ValueError, match="must be a mapping"):
        Item.from_dict(["a list"])


def test_tokenizer_roundtrip_specials_and_template(tok, small_splits):
    it = small_splits["train"][0]
    text = render_prompt(it.prompt, "on") + format_response(it.reasoning, it.direct, "on") + "<|eot_id|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text
    for special in (THINK_OPEN, THINK_CLOSE, "<|eot_id|>", "<|start_header_id|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok("1234", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "1234"]
    msgs = [{"role": "user", "content": it.prompt}]
    for mode, flag in (("on", True), ("off", False)):
        via_template = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, reasoning=flag)
        assert via_template == render_prompt(it.prompt, mode)
    sys_msgs = [{"role": "system", "content": "detailed thinking on"}] + msgs
    assert tok.apply_chat_template(sys_msgs, tokenize=False, add_generation_prompt=True) == render_prompt(it.prompt, "on")


def test_toggle_helpers():
    assert mode_of("detailed thinking off") == "off"
    with pytest.raises(ValueError, match="neither"):
        mode_of("detailed thinking maybe")
    assert split_response("<think>\nabc") == ("abc", "")
    assert format_response("r", "d", "off") == "d"
