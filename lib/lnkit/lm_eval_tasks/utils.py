"""Hooks of the tiny world's lm-eval tasks (``lnkit_<domain>``): the test split of a run folder as a data
set, the prompt as lnkit renders it (the chat template with ``detailed thinking off``), and lnkit's own
verifier as the metric, so lm-eval's accuracy and lnkit's agree item by item.

The run folder comes from lm-eval's ``--metadata '{"run_dir": "runs/tiny"}'`` (default: ``runs/tiny``
relative to the working directory)."""

from __future__ import annotations

import json

import datasets

from lnkit.data.chat import render_prompt, split_response
from lnkit.data.splits import load_split
from lnkit.data.tasks import Item
from lnkit.verify import check


def load(domain: str, run_dir: str = "runs/tiny", **_) -> datasets.DatasetDict:
    """The run's test items of ``domain`` (``meta`` as JSON text: Arrow wants one type per column)."""
    items = [it for it in load_split(run_dir, "test") if it.domain == domain]
    if not items:
        raise ValueError(f"lnkit task: no test items of domain {domain!r} in {run_dir}")
    rows = [{**it.to_dict(), "meta": json.dumps(it.meta)} for it in items]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    return render_prompt(doc["prompt"], "off")


def item_of(doc: dict) -> Item:
    return Item.from_dict({**doc, "meta": json.loads(doc["meta"])})


def process_results(doc: dict, results: list[str]) -> dict:
    """lnkit's verdict on the final answer (the text after any think block)."""
    answer = split_response(results[0])[1]
    return {"acc": float(check(answer, item_of(doc)))}
