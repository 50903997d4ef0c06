"""lm-eval-harness on our checkpoints and tasks: lm-eval's `hf` model type loads a Puzzle child (registered
by importing lnkit, no hub access), the tiny world's test sets run as lm-eval tasks from the YAML shipped in
the package, and lm-eval's greedy answers and accuracy equal lnkit's own on the same items."""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers
from lnkit.checkpoints import load_model
from lnkit.data.chat import SPECIAL_TOKENS
from lnkit.data.splits import load_split
from lnkit.eval import evaluate

lm_eval = pytest.importorskip("lm_eval")

from lnkit import lm_eval as lnkit_lm_eval  # noqa: E402

TASKS_DIR = Path(lnkit_lm_eval.TASKS_DIR)


def plain(text: str) -> str:
    """The text without special tokens (lm-eval decodes without them; lnkit keeps them)."""
    for t in SPECIAL_TOKENS:
        text = text.replace(t, "")
    return text.strip()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return helpers.smoke_stage00(tmp_path_factory.mktemp("lm_eval_run"))


def test_the_task_metric_is_lnkits_verifier_on_reference_answers(run_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lnkit_task_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for domain in ("math", "science", "code", "instruct", "chat"):
        docs = utils.load(domain, run_dir=str(run_dir))["test"]
        assert len(docs) > 0
        for doc in docs:
            assert utils.doc_to_text(doc).endswith("assistant<|end_header_id|>\n\n")
            assert utils.process_results(doc, [doc["direct"]]) == {"acc": 1.0}, doc["id"]
            assert utils.process_results(doc, ["The answer is nothing at all."]) == {"acc": 0.0}


@pytest.fixture(scope="module")
def answering_model(run_dir):
    """The smoke parent answers "." to everything, which would make equal answers prove little: it is taught
    the test items' short answers for 300 steps (one thread: the same model on any machine), so its answers
    differ from item to item and some are right."""
    import torch

    from lnkit.data.chat import EOT, render_prompt

    model, tok = load_model(run_dir / "00_parent" / "model")
    items = load_split(run_dir, "test")
    texts = [render_prompt(it.prompt, "off") + it.direct + EOT for it in items]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same model whatever the machine's (or the test session's) thread count
    try:
        for _ in range(300):
            opt.zero_grad()
            model(**enc, labels=labels).loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.config.max_position_embeddings = 1024  # lm-eval caps prompt + answer at it (the smoke model's is short)
    return model.eval(), tok


@pytest.mark.parametrize("kind", ["llama", "nemotron-nas"])
def test_lm_eval_accuracy_equals_ours_item_by_item(run_dir, answering_model, tmp_path, kind):
    """Greedy answers, verdicts and accuracy per task, through lm-eval's `hf` model on a Llama folder and on
    its nemotron-nas copy (the Puzzle children's type, known to transformers once lnkit is imported)."""
    from lnkit.checkpoints import save_model
    from lnkit.model import from_llama

    model, tok = answering_model
    folder = tmp_path / kind
    save_model(from_llama(model) if kind == "nemotron-nas" else model, tok, folder)
    out = lnkit_lm_eval.evaluate(folder, run_dir, batch_size=8)
    ours_model, _ = load_model(folder)
    items = load_split(run_dir, "test")
    rows = evaluate(ours_model, tok, items, modes=("off",), max_new_tokens=128, backend="hf", progress=False)
    ours = {r["id"]: r for r in rows}
    texts = set()
    for task in lnkit_lm_eval.TASKS:
        samples = out["samples"][task]
        assert len(samples) == sum(it.domain == task.removeprefix("lnkit_") for it in items), task
        for s in samples:
            r = ours[s["doc"]["id"]]
            text = s["filtered_resps"][0]
            assert plain(text) == plain(r["response"]), s["doc"]["id"]
            texts.add(plain(text))
            assert s["acc"] == float(r["correct"])
        acc = out["results"][task]["acc,none"]
        mine = sum(float(ours[s["doc"]["id"]]["correct"]) for s in samples) / len(samples)
        assert acc == pytest.approx(mine)
    assert len(texts) >= 0.6 * len(items)  # completions that differ from prompt to prompt (19 of 25 here)
    accuracy = [out["results"][t]["acc,none"] for t in lnkit_lm_eval.TASKS]
    assert 0 < sum(accuracy) < len(accuracy)  # some right, some wrong
