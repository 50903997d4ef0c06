"""Speed of lnkit.model on this CPU, each figure a ratio against a baseline measured in the same run.

1. Overhead of the heterogeneous code path: an all-parent ``nemotron-nas`` model (``from_llama``) against
   the same weights in transformers' ``LlamaForCausalLM``, forward and greedy ``generate`` wall time
   (goal: within 3%). Runs alternate between the two models and the median of several repeats is reported.
2. What Puzzle-style blocks buy: a child with half its attention layers no-op and some FFNs narrowed,
   against its all-parent model: measured decode-step time (KV cache filled by a prompt, then one token
   per step), beside what a cost model predicts: ``lnkit.deploy``'s roofline when that module exists,
   and always the analytic ratio of per-token FLOPs and bytes (weights + KV cache read per decode step).

Weights are random (speed does not depend on them); fp32; threads as torch sets them.

    .venv/bin/python benchmarks/bench_model.py [--repeats 9] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lnkit.model import NemotronNasConfig, NemotronNasForCausalLM, from_llama

PARENT = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, the functions interleaved so that machine drift hits all alike."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def child_blocks(parent: NemotronNasConfig) -> list[dict]:
    """Half the attention layers no-op (every other one), and the FFNs of three layers at half, quarter
    and three-quarter width."""
    blocks = [b.to_dict() for b in parent.block_configs]
    for i in range(1, parent.num_hidden_layers, 2):
        blocks[i]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    width = parent.block_configs[0].ffn.width(parent.hidden_size)
    for i, frac in ((2, 0.5), (5, 0.25), (6, 0.75)):
        blocks[i]["ffn"] = {"no_op": False, "replace_with_linear": False, "ffn_mult": None,
                            "intermediate_size": int(width * frac)}
    return blocks


@torch.no_grad()
def decode_time(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` single-token decode steps after a prefill of ``prompt`` (prefill not timed)."""
    cache = DynamicCache()
    logits = model(prompt, use_cache=True, cache=cache).logits[:, -1]
    nxt = logits.argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, use_cache=True, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t


def per_token_cost(config: NemotronNasConfig, context: int, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step for ``batch`` sequences at ``context`` cached tokens, fp32.

    FLOPs: 2 per weight per token (embedding lookup excluded, ``lm_head`` included) plus QK^T and AV;
    bytes: every weight read once per step, plus each attention layer's cached K and V.
    """
    h, heads, hd = config.hidden_size, config.num_attention_heads, config.head_size
    weights, flops, kv = config.vocab_size * h, 0.0, 0
    for b in config.block_configs:
        a, f = b.attention, b.ffn
        if a.kind == "attention":
            kvh = a.num_kv_heads(heads)
            weights += 2 * h * heads * hd + 2 * h * kvh * hd
            flops += batch * 2 * 2 * heads * hd * context
            kv += batch * 2 * kvh * hd * context
        elif a.kind == "linear":
            weights += h * h
        weights += 3 * h * f.width(h) if f.kind == "ffn" else h * h if f.kind == "linear" else 0
    return flops + 2 * weights * batch, 4.0 * (weights + kv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a smoke run)")
    a = ap.parse_args()
    repeats = 3 if a.quick else a.repeats
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**PARENT)).eval()
    nas = from_llama(llama)
    n_params = sum(p.numel() for p in llama.parameters())
    print(f"parent: hidden {PARENT['hidden_size']}, {PARENT['num_hidden_layers']} layers, {n_params / 1e6:.1f}M "
          f"parameters, fp32, {torch.get_num_threads()} threads, median of {repeats} interleaved runs")

    # --- 1. overhead of the heterogeneous code path
    ids = torch.randint(3, PARENT["vocab_size"], (4, 256))
    with torch.no_grad():
        assert (llama(ids).logits - nas(ids).logits).abs().max() <= 1e-4
    with torch.no_grad():
        fwd = medians({"llama": lambda: llama(ids), "nas": lambda: nas(ids)}, repeats)
    prompt = ids[:, :32]
    new = 16 if a.quick else 64
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    gen = medians({"llama": lambda: llama.generate(prompt, **kw), "nas": lambda: nas.generate(prompt, **kw)}, repeats)
    print("\n1. all-parent nemotron-nas vs LlamaForCausalLM, same weights")
    print(f"   forward  4x256 tokens: llama {fwd['llama'] * 1e3:7.1f} ms   nas {fwd['nas'] * 1e3:7.1f} ms   "
          f"ratio nas/llama {fwd['nas'] / fwd['llama']:.3f}")
    print(f"   generate 4x32 + {new} greedy: llama {gen['llama'] * 1e3:7.1f} ms   nas {gen['nas'] * 1e3:7.1f} ms   "
          f"ratio nas/llama {gen['nas'] / gen['llama']:.3f}")

    # --- 2. decode speed-up of a Puzzle-style child
    child_cfg = NemotronNasConfig.from_dict({**nas.config.to_dict(), "block_configs": child_blocks(nas.config)})
    child = NemotronNasForCausalLM(child_cfg).eval()
    n_attn = len(child_cfg.attention_layers())
    ctx, steps = (256, 16) if a.quick else (512, 48)
    batch = 4
    prompt = torch.randint(3, PARENT["vocab_size"], (batch, ctx))
    dec = medians({"parent": lambda: decode_time(nas, prompt, steps),
                   "child": lambda: decode_time(child, prompt, steps)}, repeats)
    measured = dec["parent"] / dec["child"]
    print(f"\n2. child: {n_attn}/{PARENT['num_hidden_layers']} attention layers, FFN widths "
          f"{[b.ffn.width(256) for b in child_cfg.block_configs]}; {sum(p.numel() for p in child.parameters()) / 1e6:.1f}M "
          "parameters")
    print(f"   decode step, batch {batch}, context {ctx}..{ctx + steps}: parent {dec['parent'] / steps * 1e3:.2f} ms  "
          f"child {dec['child'] / steps * 1e3:.2f} ms")
    print(f"   measured CPU decode speed-up parent/child: {measured:.2f}x")
    mid = ctx + steps // 2
    (fp, bp), (fc, bc) = per_token_cost(nas.config, mid, batch), per_token_cost(child_cfg, mid, batch)
    print(f"   analytic per decode step (fp32, context {mid}): FLOPs ratio {fp / fc:.2f}x, "
          f"bytes ratio (weights + KV read) {bp / bc:.2f}x")
    try:
        from lnkit import deploy
    except ImportError:
        print("   lnkit.deploy not available: no roofline prediction (the analytic ratios above stand in)")
        return
    try:
        kw = dict(batch_size=batch, prompt_len=ctx, output_len=steps, weight_dtype="fp32", kv_dtype="fp32")
        ep, ec = deploy.estimate(nas.config.to_dict(), "H100", **kw), deploy.estimate(child_cfg.to_dict(), "H100", **kw)
        print(f"   lnkit.deploy roofline (H100, fp32 weights/KV) predicts decode-step speed-up "
              f"{ep['decode_step_s'] / ec['decode_step_s']:.2f}x (a GPU model: memory-bound, no per-op overhead)")
    except Exception as e:  # deploy is another module's, still changing: report, do not fail the benchmark
        print(f"   lnkit.deploy.estimate failed ({type(e).__name__}: {e}); analytic ratios above stand in")


if __name__ == "__main__":
    main()
