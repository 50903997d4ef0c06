"""Instruction following in IFEval's terms: our checkers give lm-eval's IFEval checkers' verdicts on the same
responses (strict and loose), every reference answer follows its instructions, test prompts are disjoint
from training prompts, and an unknown instruction id is named."""

from __future__ import annotations

import random
import sys

import pytest

from lnkit.data import ifeval
from lnkit.data.world import make_world

WORLD = make_world(0)
# IFEval's change_case checkers also ask langdetect whether the text is English (unseeded, a coin toss on
# invented words): ours read the case alone, so those two ids are compared on case only, below.
LANGDETECT = {"change_case:english_capital", "change_case:english_lowercase"}


@pytest.fixture(scope="module")
def lm_ifeval(tmp_path_factory):
    """lm-eval's IFEval scoring functions, imported without a network call: its module downloads nltk's
    punkt_tab on import unless it finds it; the checkers compared here never use it."""
    pytest.importorskip("lm_eval")
    data = tmp_path_factory.mktemp("nltk_data")
    (data / "tokenizers" / "punkt_tab").mkdir(parents=True)
    import nltk

    nltk.data.path.insert(0, str(data))
    sys.modules.pop("lm_eval.tasks.ifeval.instructions_util", None)
    from lm_eval.tasks.ifeval import utils

    return utils


def perturbations(p: ifeval.IFPrompt, rng: random.Random) -> list[str]:
    """Responses that follow some instructions and break others, as a model's would."""
    ref, plain = p.reference, p.meta["answer"]
    out = [ref, plain, plain.upper(), plain.lower(), f'"{plain}"', f"- {plain}", f"* {plain}\n* {plain}",
           f"<<Facts>>\n{plain}", f"{plain}\nP.S. more", f"{plain}\np.s. more", plain.replace(".", ", okay."),
           plain + " indeed truly known", f"**{ref}**", f"Sure.\n{ref}", f"{ref}\nBye", f"Hi\n{ref}\nBye",
           ref.replace(",", ""), ref[:-1], ref + " " + plain, " ".join(rng.sample(plain.split(), len(plain.split()))),
           f"<< >>\n{plain}", f'"{plain}" done.', f'"{ref}"', "", "   ", "- a\n- b\n-c", f"{plain} done", f"{plain}, DONE."]
    return out


def test_our_verdicts_equal_lm_evals_on_the_same_responses(lm_ifeval):
    rng = random.Random(0)
    prompts = ifeval.make_prompts(WORLD, 200, seed=3)
    compared = {}
    for p in prompts:
        ids = [i for i in p.instruction_id_list if i not in LANGDETECT]
        kw = [k for i, k in zip(p.instruction_id_list, p.kwargs) if i not in LANGDETECT]
        if not ids:
            continue
        inp = lm_ifeval.InputExample(key=0, instruction_id_list=ids, prompt=p.prompt, kwargs=kw)
        for response in perturbations(p, rng):
            ours = ifeval.follow(response, ids, kw)
            strict = lm_ifeval.test_instruction_following_strict(inp, response).follow_instruction_list
            loose = lm_ifeval.test_instruction_following_loose(inp, response).follow_instruction_list
            assert ours["strict"] == strict, (response, ids, kw)
            assert ours["loose"] == loose, (response, ids, kw)
            for i, s in zip(ids, strict):
                compared.setdefault(i, set()).add(s)
    # every compared type was seen both followed and broken
    assert set(compared) == set(ifeval.INSTRUCTIONS) - LANGDETECT
    assert all(v == {True, False} for v in compared.values()), compared


def test_case_instructions_read_the_case():
    assert ifeval.check("A KEZ LIVES IN CAVES.", "change_case:english_capital", {})
    assert not ifeval.check("A Kez lives in caves.", "change_case:english_capital", {})
    assert ifeval.check("a kez lives in caves.", "change_case:english_lowercase", {})
    assert not ifeval.check("   ", "change_case:english_lowercase", {})


def test_references_follow_their_instructions_and_test_is_disjoint():
    train = ifeval.make_prompts(WORLD, 300, seed=0)
    test = ifeval.make_prompts(WORLD, 100, seed=1, exclude={p.key for p in train})
    assert not {p.key for p in train} & {p.key for p in test}
    counts = {len(p.instruction_id_list) for p in train}
    assert counts == {1, 2, 3}
    for p in train + test:
        verdicts = ifeval.follow(p.reference, p.instruction_id_list, p.kwargs)
        assert all(verdicts["strict"]), (p.prompt, p.reference)
        assert not any(c <= set(p.instruction_id_list) for c in ifeval.CONFLICTS)
    assert ifeval.score([ifeval.follow(p.reference, p.instruction_id_list, p.kwargs) for p in test]) == {
        "prompt_level_strict_acc": 1.0, "inst_level_strict_acc": 1.0, "prompt_level_loose_acc": 1.0,
        "inst_level_loose_acc": 1.0}


def test_an_unknown_instruction_id_is_named():
    with pytest.raises(ifeval.UnknownInstruction, match="'detectable_format:haiku'"):
        ifeval.check("x", "detectable_format:haiku", {})
    with pytest.raises(ifeval.UnknownInstruction, match="'language:klingon'"):
        ifeval.make_prompts(WORLD, 3, seed=0, ids=["punctuation:no_comma", "language:klingon"])
