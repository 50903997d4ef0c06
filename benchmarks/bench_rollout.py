"""Benchmark rollout sampling: lnkit's torch engine against transformers' ``generate()`` on the same model,
prompts and sampling settings, timed interleaved in one run and printed as a ratio (issue 12's target: >= 2x).

Run: ``.venv/bin/python benchmarks/bench_rollout.py [MODEL_DIR]`` (default: the tiny run's stage-06 model,
``runs/tiny/06_reasoning_sft/model``; about a minute on a 2-core CPU). Prompts are the first ``--rows``
math/science/code training prompts with reasoning on; sampling at temperature 1, top-p 1 (GRPO's setting),
``--max-new-tokens`` per completion. Each backend runs ``--repeats`` times, alternating, and the median of
each is compared; one torch thread by default (the least noisy on 2 shared cores; ``--threads`` to change).

It also prints where the engine's time goes (the top operators of a torch profile), the question the issue
asked before any fix was chosen.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from lnkit.checkpoints import load_model
from lnkit.data.chat import render_prompt
from lnkit.data.splits import load_split
from lnkit.rl.rollout import TorchEngine


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="runs/tiny/06_reasoning_sft/model")
    ap.add_argument("--run-dir", default=None, help="where the prompts come from (default: the model's run)")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the engine's top operators")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise SystemExit(f"no model at {model_dir}: run the tiny pipeline first (make reproduce) or name one")
    run_dir = Path(args.run_dir) if args.run_dir else model_dir.parents[1]
    model, tok = load_model(model_dir)
    items = [it for it in load_split(run_dir, "train") if it.domain in ("math", "science", "code")][: args.rows]
    prompts = [render_prompt(it.prompt, "on") for it in items]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = TorchEngine(model, tok, max_batch=len(ids))
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    def ours(seed):
        t = time.perf_counter()
        out = engine.sample(ids, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=seed)
        return sum(len(r.completion_ids) for r in out) / (time.perf_counter() - t)

    def theirs(seed):
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=engine.stop,
                                 pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - t
        new = out[:, enc["input_ids"].shape[1]:]
        return int((new != tok.pad_token_id).sum()) / elapsed

    ours(0)  # warm-up
    rates = {"lnkit torch engine": [], "transformers generate()": []}
    for r in range(args.repeats):
        rates["transformers generate()"].append(theirs(r))
        rates["lnkit torch engine"].append(ours(r))
    print(f"{len(ids)} prompts, up to {args.max_new_tokens} new tokens, temperature 1, top-p 1, "
          f"{args.threads} thread(s), median of {args.repeats}:")
    for name, xs in rates.items():
        print(f"  {name:26s} {statistics.median(xs):8.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in xs)})")
    ratio = statistics.median(rates["lnkit torch engine"]) / statistics.median(rates["transformers generate()"])
    print(f"ratio: {ratio:.2f}x transformers generate() (target >= 2x)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(99)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
