"""The evaluation harness: accuracy, length, toggle compliance and leakage, reasoning on and off.

For any causal LM and tokenizer. pass@1 is averaged over ``k`` samples per prompt with reasoning on
(temperature 0.6, top-p 0.95, the paper's evaluation setting) and is greedy with reasoning off. Results
are a tidy table, one row per (item, mode, sample), and a summary by mode, domain and difficulty.

- compliance: with thinking on, the response opens and closes a think block and gives an answer after
  it; with thinking off, no think tag appears at all.
- leakage (off mode): working-out shown outside tags despite "detailed thinking off": an arithmetic step
  (``12 + 3 = 15``) or a phrase that only the reasoning traces use. Reported per row, so it can be read
  by domain.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from lnkit.data.chat import THINK_CLOSE, THINK_OPEN, render_prompt, split_response
from lnkit.generate import generate
from lnkit.io import atomic_write_json, atomic_write_text
from lnkit.progress import progress_bar
from lnkit.verify import check_many

MODE_SAMPLING = {"on": {"temperature": 0.6, "top_p": 0.95}, "off": {"temperature": 0.0, "top_p": 1.0}}
LEAK_RE = re.compile(r"\d+\s*[-+*]\s*\d+\s*=|\bstarts with\b|\bCheck:|\bThe rules:|\bThe question asks\b|"
                     r"\bwhich is option\b", re.IGNORECASE)


def compliant(response: str, mode: str) -> bool:
    """Whether a response follows the mode's format.

    >>> compliant("<think>\\nx\\n</think>\\nThe answer is 4.", "on"), compliant("The answer is 4.", "on")
    (True, False)
    >>> compliant("The answer is 4.", "off"), compliant("<think></think>4", "off")
    (True, False)
    """
    if mode == "on":
        thought, answer = split_response(response)
        return (response.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in response
                and thought is not None and bool(answer))
    return THINK_OPEN not in response and THINK_CLOSE not in response


def leaks(response: str) -> bool:
    """Working-out outside any think block.

    >>> leaks("The answer is 4."), leaks("2 + 2 = 4. The answer is 4.")
    (False, True)
    """
    _, answer = split_response(response)
    return bool(LEAK_RE.search(answer))


def evaluate(model, tok, items, *, modes=("off", "on"), k: int = 1, max_new_tokens: int = 160,
             batch_size: int = 64, seed: int = 0, backend: str = "engine", progress: bool = True,
             greedy: bool = False) -> list[dict]:
    """Generate and verify. Returns one row per (item, mode, sample). ``backend``: see
    :func:`lnkit.generate.generate` (``engine``, the RL rollout engine, by default: greedy output equals
    ``hf``'s, several times faster). ``greedy``: one greedy answer per item in every mode."""
    rows = []
    for mode in modes:
        if mode not in MODE_SAMPLING:
            raise ValueError(f"mode {mode!r} not in {tuple(MODE_SAMPLING)}")
        n_samples = k if mode == "on" and not greedy else 1  # greedy decoding gives one answer
        sampling = MODE_SAMPLING["off"] if greedy else MODE_SAMPLING[mode]
        prompts = [render_prompt(it.prompt, mode) for it in items for _ in range(n_samples)]
        with progress_bar(total=len(prompts), desc=f"eval thinking {mode}", disable=not progress) as bar:
            outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                            backend=backend, progress=bar, **sampling)
        owners = [items[j // n_samples] for j in range(len(outs))]
        done = [j for j, o in enumerate(outs) if o["finished"]]  # a cut-off answer is wrong unread
        verdicts = dict(zip(done, check_many([split_response(outs[j]["text"])[1] for j in done],
                                             [owners[j] for j in done])))  # each distinct answer once
        for j, o in enumerate(outs):
            it, s = owners[j], j % n_samples
            rows.append({
                "id": it.id, "domain": it.domain, "difficulty": it.difficulty, "mode": mode, "sample": s,
                "correct": verdicts.get(j, False),
                "tokens": o["tokens"], "finished": o["finished"],
                "compliant": compliant(o["text"], mode), "leak": mode == "off" and leaks(o["text"]),
                "response": o["text"],
            })
    return rows


def summarize(rows: list[dict], by=("mode", "domain", "difficulty")) -> list[dict]:
    """Mean accuracy (pass@1), tokens, compliance and leakage per group, plus an 'all' row per mode."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[b] for b in by)].append(r)
        groups[(r["mode"],) + ("all",) * (len(by) - 1)].append(r)
    out = []
    for key in sorted(groups, key=lambda t: tuple(str(x) for x in t)):
        g = groups[key]
        out.append({**dict(zip(by, key)), "n": len({r["id"] for r in g}), "samples": len(g),
                    "accuracy": round(sum(r["correct"] for r in g) / len(g), 4),
                    "mean_tokens": round(sum(r["tokens"] for r in g) / len(g), 2),
                    "compliance": round(sum(r["compliant"] for r in g) / len(g), 4),
                    "leakage": round(sum(r["leak"] for r in g) / len(g), 4)})
    return out


def save_results(rows: list[dict], out_dir: str | Path, name: str = "eval") -> list[dict]:
    """Write ``<name>_rows.jsonl``, ``<name>_summary.csv`` and ``<name>_summary.json``; return the summary."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    atomic_write_text(out_dir / f"{name}_rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / f"{name}_summary.json", summary)
    cols = list(summary[0]) if summary else []
    atomic_write_text(out_dir / f"{name}_summary.csv",
                      "\n".join([",".join(cols)] + [",".join(str(s[c]) for c in cols) for s in summary]) + "\n")
    return summary


def accuracy(summary: list[dict], mode: str, domain: str = "all", difficulty="all") -> float:
    """Look one figure up in a summary."""
    for s in summary:
        if s["mode"] == mode and s["domain"] == domain and str(s["difficulty"]) == str(difficulty):
            return s["accuracy"]
    raise KeyError(f"no summary row for mode={mode} domain={domain} difficulty={difficulty}")


def bootstrap_interval(values, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per item: a k-sample pass@1 is
    averaged within the item first, so resampling is over items).

    >>> bootstrap_interval([1.0] * 5)
    (1.0, 1.0)
    >>> lo, hi = bootstrap_interval([0, 1] * 50); lo < 0.5 < hi
    True
    """
    import numpy as np

    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n, v.size))
    means = np.sort(v[idx].mean(1))
    a = (1 - level) / 2
    return float(means[int(a * n)]), float(means[min(n - 1, int((1 - a) * n))])
