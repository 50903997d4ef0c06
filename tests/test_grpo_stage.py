"""Stage 07 end to end at smoke size (the smoke parent as the starting policy): bad input stops before
anything is written, a SIGKILL mid-stage resumes to the same weights and metrics as an unbroken run, TRL's
reward functions plug in, the rewards score hostile code and guessed letters 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import helpers
from lnkit import stage
from lnkit.data.chat import render_prompt
from lnkit.params import ParamError
from lnkit.rl.curriculum import EmptyPromptSet
from lnkit.rl.rewards import accuracy_reward, format_reward, get_rewards
from lnkit.stages import grpo

SMALL = dict(init="00_parent", progress=False, threads=1, prompts={"math": 6, "science": 6, "code": 2}, pass_k=2,
             max_pass_rate=1.0, steps=6, num_iterations=2, prompts_per_batch=3, group_size=2, max_new_tokens=8,
             rollout_slots=8, ckpt_every=2, eval_every=2, curve_n=1, eval_k=1, eval_max_new_tokens=8)


@pytest.fixture(scope="module")
def smoke_parent(tmp_path_factory):
    """A run folder with the smoke run's stage 00 (the world, its splits and a tiny parent)."""
    return helpers.smoke_stage00(tmp_path_factory.mktemp("grpo_run"))


def fresh(smoke_parent, tmp_path) -> Path:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_parent, run_dir)
    return run_dir


def params(run_dir, **kw) -> grpo.Params:
    return grpo.Params(run_dir=str(run_dir), **{**SMALL, **kw})


@pytest.mark.parametrize("field, value, match", [
    ("rewards", ["accuracy", "length"], "unknown reward 'length'"),
    ("rewards", ["trl:no_such_reward"], "unknown reward 'trl:no_such_reward'"),
    ("reward_weights", [1.0], "reward_weights has 1 weight"),
    ("pass_k", 1, "pass_k"),
    ("group_size", 1, "group_size"),
    ("prompts", {"chat": 10}, "verifiable domains"),
    ("ckpt_every", 3, "ckpt_every=3 must be a multiple of num_iterations=2"),
    ("tis_cap", 0.5, "tis_cap"),
])
def test_bad_parameters_are_named(tmp_path, field, value, match):
    with pytest.raises(ParamError, match=match):
        params(tmp_path, **{field: value})


def test_an_empty_prompt_set_names_the_filter_and_writes_nothing(smoke_parent, tmp_path):
    run_dir = fresh(smoke_parent, tmp_path)
    with pytest.raises(EmptyPromptSet, match=r"pass rate >= max_pass_rate=0.0"):
        grpo.run(params(run_dir, max_pass_rate=0.0))
    assert not (run_dir / grpo.NAME).exists()


def test_a_pass_rate_model_of_another_vocabulary_is_refused(smoke_parent, tmp_path):
    import helpers

    run_dir = fresh(smoke_parent, tmp_path)
    other = helpers.tiny_llama(0, vocab_size=50)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<pad>": 1}, unk_token="a")),
                                  pad_token="<pad>")
    other.save_pretrained(run_dir / "other")
    tok.save_pretrained(run_dir / "other")
    with pytest.raises(ParamError, match="pass_rate_model='other' has another vocabulary"):
        grpo.run(params(run_dir, pass_rate_model="other"))
    assert not (run_dir / grpo.NAME).exists()


def test_a_missing_starting_stage_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="00_parent"):
        grpo.run(params(tmp_path))


def run_stage(run_dir, **kw) -> dict:
    p = params(run_dir, **kw)
    result = grpo.run(p)
    stage.finish(p, result["metrics"])
    return result


def comparable(run_dir: Path) -> dict:
    d = run_dir / grpo.NAME
    metrics = json.loads((d / "metrics.json").read_text())
    metrics.pop("train_seconds")
    weights = load_file(d / "model" / "model.safetensors")
    log = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in
           __import__("csv").DictReader((d / "train_log.csv").open())]
    return {"metrics": metrics, "weights": weights, "log": log, "curve": (d / "eval_curve.csv").read_text(),
            "batches": (d / "batches.jsonl").read_text()}


def test_sigkill_mid_stage_resumes_to_the_same_end(smoke_parent, tmp_path):
    whole, broken = fresh(smoke_parent, tmp_path / "a"), fresh(smoke_parent, tmp_path / "b")
    run_stage(whole)
    script = textwrap.dedent(f"""
        import json, sys
        from lnkit import stage
        from lnkit.stages import grpo
        p = grpo.Params(run_dir={str(broken)!r}, **json.loads(sys.argv[1]))
        stage.finish(p, grpo.run(p)["metrics"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(SMALL)], env={**os.environ, "PYTHONHASHSEED": "0"})
    log = broken / grpo.NAME / "train_log.csv"  # written with each checkpoint after step 0
    deadline = time.monotonic() + 240
    try:
        while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.exists(), "the run never wrote a checkpoint"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (broken / grpo.NAME / "_COMPLETE.json").exists()
    done = len(log.read_text().splitlines()) - 1
    assert 0 < done < SMALL["steps"]  # killed mid-training, after a real checkpoint
    run_stage(broken)  # resumes from the checkpoint
    a, b = comparable(whole), comparable(broken)
    assert a["metrics"] == b["metrics"]
    assert a["log"] == b["log"] and a["curve"] == b["curve"] and a["batches"] == b["batches"]
    assert a["weights"].keys() == b["weights"].keys()
    assert all(a["weights"][k].equal(b["weights"][k]) for k in a["weights"])


def test_trl_reward_functions_plug_into_the_stage(smoke_parent, tmp_path):
    run_dir = fresh(smoke_parent, tmp_path)
    result = run_stage(run_dir, rewards=["accuracy", "trl:think_format_reward"], steps=2, ckpt_every=2)
    assert len(result["log"]) == 2 and "format_reward" in result["log"][0]
    assert (run_dir / grpo.NAME / "model" / "model.safetensors").exists()


def test_runs_differing_in_seed_share_pass_rates_and_start_evaluation(smoke_parent, tmp_path, monkeypatch):
    """A sweep's variants: the first estimates pass rates and evaluates the start once, in cache_dir; the
    next (another training seed) reads both, so the same data and baseline, and neither is recomputed."""
    first, second = fresh(smoke_parent, tmp_path / "a"), fresh(smoke_parent, tmp_path / "b")
    cache = tmp_path / "cache"
    run_stage(first, steps=2, ckpt_every=2, seed=0, cache_dir=str(cache))
    assert sorted(f.name.split("-")[0] for f in cache.iterdir()) == ["eval_start", "pass_rates"]

    def refuse(*a, **k):
        raise AssertionError("recomputed what the cache holds")

    monkeypatch.setattr(grpo, "estimate_pass_rates", refuse)
    monkeypatch.setattr(grpo, "run_eval", refuse)
    with pytest.raises(AssertionError, match="recomputed"):  # the final evaluation is the run's own
        run_stage(second, steps=2, ckpt_every=2, seed=1, cache_dir="../../cache")  # relative to run_dir
    a, b = (json.loads((d / grpo.NAME / f).read_text()) for d in (first, second) for f in ("pass_rates.json",))
    assert a == b
    a, b = (json.loads((d / grpo.NAME / "eval_start.json").read_text())["rows"] for d in (first, second))
    assert a == b


# ---------------------------------------------------------------------------------------------- rewards


def test_hostile_and_reward_hacking_code_scores_zero():
    from lnkit.data.tasks import Item

    item = Item(id="c1", domain="code", difficulty=1, prompt="Write f(x) returning x + 3.", gold="", verifier="code",
                reasoning="", direct="", key="c1", meta={"func": "f", "tests": [[[1], 4], [[2], 5]]})
    hostile = [
        "```python\nimport os\nos.system('touch /tmp/pwned')\ndef f(x):\n    return x + 3\n```",
        "```python\nprint('PASS')\n```",
        "```python\nclass A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()\n```",
        "```python\nimport builtins\nclass D(dict):\n    def __repr__(self):\n        return '4'\nbuiltins.dict = D\n"
        "def f(x):\n    return D()\n```",
        "```python\ndef f(x):\n    return open('/proc/self/root/etc/hostname').read()\n```",
        "```python\nwhile True:\n    pass\n```",
    ]
    good = "```python\ndef f(x):\n    return x + 3\n```"
    prompt = render_prompt(item.prompt, "off")
    got = accuracy_reward(prompts=[prompt] * 7, completions=hostile + [good], item=[item] * 7)
    assert got == [0.0] * 6 + [1.0]
    assert not Path("/tmp/pwned").exists()


def test_a_guessed_letter_does_not_pay():
    from lnkit.data.tasks import Item

    item = Item(id="s1", domain="science", difficulty=2, prompt="What colour is a shetan?\nA) red\nB) blue\nC) green",
                gold="B", verifier="choice", reasoning="", direct="The answer is B.", key="s1",
                meta={"options": ["red", "blue", "green"]})
    answers = ["The answer is B.", "Dips live in grass. So a shetan is green, which is option B.",
               "So a shetan is blue, which is option B.", "The answer is C."]
    got = accuracy_reward(prompts=[""] * 4, completions=answers, item=[item] * 4)
    assert got == [1.0, 0.0, 1.0, 0.0]


def test_format_reward_by_mode_and_unfinished_answers():
    on, off = render_prompt("q", "on"), render_prompt("q", "off")
    completions = ["<think>\nwork\n</think>\nThe answer is 4.", "The answer is 4.", "<think>\nwork\n</think>\n4",
                   "<think>a</think><think>b</think>4", "<think>\nno end"]
    assert format_reward(prompts=[on, off, off, on, on], completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    item = {"id": "m", "domain": "math", "difficulty": 1, "prompt": "", "gold": "4", "verifier": "math",
            "reasoning": "", "direct": "", "key": "m"}
    assert accuracy_reward(prompts=[on, on], completions=["The answer is 4."] * 2, item=[item, item],
                           finished=[True, False]) == [1.0, 0.0]
    assert [f.__name__ for f in get_rewards(["format", "accuracy"])] == ["format_reward", "accuracy_reward"]
