"""Speed of the tiny parent on this machine, each figure a ratio against a baseline run here and now.

- training: useful (non-padding) tokens/s of packed rows against padded batches of the same examples;
- generation: lnkit's batched KV-cache generation against plain ``model.generate`` (transformers'
  own loop, same left-padded batches, same greedy decoding, same stop token) on the same prompts.

Uses the tiny run's parent (runs/tiny/00_parent/model) when it exists, else a fresh model of the same
shape with a fresh world (speed does not depend on the weights, only on lengths).

    .venv/bin/python benchmarks/bench_parent.py [--run-dir runs/tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lnkit.checkpoints import load_model
from lnkit.data.chat import render_prompt
from lnkit.data.splits import load_split
from lnkit.generate import generate
from lnkit.stages.parent import Params as ParentParams
from lnkit.stages.parent import build_world, make_model, training_examples
from lnkit.train.batches import Batcher, PackedBatcher


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--prompts", type=int, default=128)
    a = ap.parse_args()
    torch.manual_seed(0)
    model_dir = Path(a.run_dir) / "00_parent" / "model"
    if model_dir.exists():
        model, tok = load_model(model_dir)
        p = ParentParams(run_dir=a.run_dir)
        print(f"parent: {model_dir}")
    else:
        p = ParentParams(run_dir=tempfile.mkdtemp(), n_train=200, n_train_math=400, n_test=60)
        build_world(p)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(Path(p.run_dir) / "00_parent" / "tokenizer")
        model = make_model(p, tok)
        print("parent: untrained model of the tiny shape (run `make reproduce` first for the trained one)")
    print(f"{sum(x.numel() for x in model.parameters()):,} parameters, {torch.get_num_threads()} threads")

    # --- training throughput: packed rows vs padded batches, same examples, same useful tokens per step
    examples = training_examples(p, tok)[:4000]
    packed = PackedBatcher(examples, p.rows, p.row_len, tok.pad_token_id, seed=0)
    per_step = int(packed(0)["n_tokens"])
    avg_len = sum(len(x) for x, _ in examples) / len(examples)
    padded = Batcher(examples, max(1, round(per_step / avg_len)), tok.pad_token_id, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def steps(batcher, n=12):
        toks = 0
        for s in range(n):
            b = dict(batcher(s))
            b.pop("n_tokens", None)
            toks += int((b["input_ids"] != tok.pad_token_id).sum())
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return toks

    model.train()
    t_pack, n_pack = timed(lambda: steps(packed), 2)
    t_pad, n_pad = timed(lambda: steps(padded), 2)
    model.eval()
    print(f"training, packed rows:   {n_pack / t_pack:8.0f} tokens/s")
    print(f"training, padded batches:{n_pad / t_pad:8.0f} tokens/s")
    print(f"  ratio packed / padded: {(n_pack / t_pack) / (n_pad / t_pad):.2f}x")

    # --- generation: lnkit.generate vs model.generate on the same prompts
    items = load_split(p.run_dir, "test")[: a.prompts]
    prompts = [render_prompt(it.prompt, "off") for it in items]
    t_ours, outs = timed(lambda: generate(model, tok, prompts, max_new_tokens=32, batch_size=64), 3)
    n_ours = sum(o["tokens"] for o in outs)

    def hf():
        tok.padding_side = "left"
        n = 0
        for i in range(0, len(prompts), 64):
            enc = tok(prompts[i : i + 64], add_special_tokens=False, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                n += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        return n

    t_hf, n_hf = timed(hf, 3)
    print(f"generation, lnkit.generate: {n_ours / t_ours:8.0f} new tokens/s ({len(prompts)} prompts, {t_ours:.2f} s)")
    print(f"generation, model.generate: {n_hf / t_hf:8.0f} new tokens/s ({t_hf:.2f} s)")
    print(f"  ratio (same prompts, wall time) model.generate / lnkit.generate: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
