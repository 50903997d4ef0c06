"""Stage 03: FFN Fusion of a Puzzle child (``notebooks/03_ffn_fusion.ipynb``; paper Section 2).

Reads ``<run_dir>/00_parent`` (tokenizer, validation and test items) and one child of
``<run_dir>/02_architecture_search/children/``; writes ``<run_dir>/03_ffn_fusion``:

- ``model/``: the fused child, a ``nemotron-nas`` checkpoint in the released format (the fused FFN an
  ordinary wider ``ffn`` block in its group's first layer, the emptied layers fully no-op);
- ``source.json``: which child was fused (``{"child": label, "child_dir": path relative to run_dir}``);
- ``dependency.csv``: per run, the pairwise dependency ``D[i, j]`` (``kind = pairwise``) and each FFN's
  sequential-vs-parallel distance (``kind = parallel``, ``layer_i == layer_j``), see :mod:`lnkit.fusion`;
- ``groups.json``: the runs, the greedy groups under ``threshold`` and the width rule used;
- ``eval_before.csv`` / ``eval_after.csv``: test accuracy of the child and the fused child (thinking off);
- ``deploy.csv``: the roofline's (:mod:`lnkit.deploy`) predicted latency, unfused and fused, at ``tp``.

The child is ``child``: ``"auto"`` takes stage 02's ``best_2x`` (the most accurate child priced at >= 2x the
parent's decode speed by the cost table), or, when there is none, the Puzzle child with the highest priced
speed-up: a pick that is the same on every rerun, which a measured speed-up on a noisy CPU is not.

What the figures mean, honestly: the tiny child's CPU decode time is dominated by per-op overhead, so
removing a norm and merging two small matmuls shows as a few percent at most (and timings on a shared
2-core machine are noisy: fused and unfused are timed interleaved, best of ``timing_repeats``). FFN
Fusion's point is multi-GPU latency: one all-reduce and one sequential step per group instead of one per
FFN; :func:`deploy_predictions` prices that with the roofline at ``tp`` GPUs for (1) the tiny child as it
is, (2) the tiny child's layer pattern at Llama-3.1-405B's widths, and (3) a released model (``reference``,
default LN-Super) with every attention-free run fused whole, from its block configs alone (no weights,
so no accuracy: an upper bound on the depth saved).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lnkit import stage
from lnkit.checkpoints import load_model, require, save_model, stage_dir
from lnkit.data.splits import first_per_domain, load_split
from lnkit.deploy import BUILTIN_CONFIGS, GPUS, estimate, load_config
from lnkit.eval import evaluate, summarize
from lnkit.fusion import (
    attention_free_runs,
    fuse_config,
    fuse_model,
    greedy_groups,
    measure_dependencies,
    parallel,
    released_width,
    resolve_width_rule,
)
from lnkit.generate import decode_throughput
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json
from lnkit.params import ParamError, RunParams, param
from lnkit.puzzle.calibration import token_batches

NAME = STAGE = "03_ffn_fusion"


@dataclass
class Params(RunParams):
    """Stage 03 parameters (fields match ``notebooks/03_ffn_fusion.ipynb``'s parameters cell)."""

    STAGE = STAGE
    threads: int = param(1, "torch CPU threads; 1 is the least noisy for timing on 2 cores", lo=0, hi=256)
    child: str = param("auto", "stage-02 child to fuse: 'auto' (best_2x, else fastest) or a label like 'budget 0.40'")
    threshold: float = param(0.1, "an FFN joins its group while its dependency on every member is at most this",
                             lo=0.0, hi=1.0)
    calib_rows: int = param(32, "validation rows for the dependency measurement", lo=1)
    calib_len: int = param(128, "tokens per row", lo=8)
    width_rule: str = param("auto", "fused FFN width: padded to the released ffn_mult rule, exact, or "
                            "released iff the child is vLLM-servable", choices=["auto", "released", "exact"])
    eval_n: int = param(60, "test items per domain for accuracy before and after", lo=1)
    eval_max_new_tokens: int = param(48, "generation limit per answer", lo=1)
    batch_size: int = param(16, "decode batch for the CPU latency measurement", lo=1)
    prompt_len: int = param(64, "prompt tokens before decoding", lo=1)
    decode_len: int = param(32, "decoded tokens", lo=1)
    timing_repeats: int = param(5, "interleaved timing rounds (best of)", lo=1)
    gpu: str = param("H100", "GPU for the roofline prediction (lnkit.deploy.GPUS)")
    tp: int = param(8, "tensor-parallel GPUs for the roofline prediction (LN-Ultra's one 8-GPU node)", lo=1, hi=64)
    deploy_batch_size: int = param(1, "requests per replica in the roofline prediction (1: latency)", lo=1)
    reference: str = param("LN-Super", "released config whose attention-free runs are fused analytically; '' skips",
                           choices=["LN-Super", "LN-Ultra", ""])

    def check(self):
        if self.gpu not in GPUS:
            raise ParamError(f"stage {self.STAGE}: parameter gpu={self.gpu!r} is not in the catalogue; "
                             f"allowed: one of {sorted(GPUS)}")
        if not self.child.strip():
            raise ParamError(f"stage {self.STAGE}: parameter child='' is empty; allowed: 'auto' or a child label")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): the child's forward over the calibration rows and
    an evaluation before and after fusing."""
    return Work(forward=p.calib_rows * p.calib_len, generate=2 * p.eval_n * 5 * p.eval_max_new_tokens,
                gen_len=p.eval_max_new_tokens, model="child")


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads."""
    return ["00_parent", "02_architecture_search"]


def run(p: Params) -> dict:
    """The whole stage; returns what :func:`run_fusion` measured plus ``"metrics"``, and writes ``result.json``."""
    stage.check_inputs(p, needs(p))
    out = stage.start(p)
    result = run_fusion(p)
    atomic_write_json(out / "result.json", result)
    metrics = {k: result[k] for k in ("child", "runs", "groups", "fused_groups", "width_rule", "layers_emptied",
                                      "depth_before", "depth_after", "max_logit_err_vs_parallel", "kl_child_to_fused",
                                      "accuracy_before", "accuracy_after", "tokens_per_s_unfused",
                                      "tokens_per_s_fused", "cpu_latency_ratio")}
    metrics["threshold"] = p.threshold
    metrics["deploy"] = [{k: r[k] for k in ("setting", "gpu", "tp", "latency_ratio", "unfused_allreduces",
                                            "fused_allreduces")} for r in result["deploy"]]
    result["metrics"] = metrics
    return result


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"fused_groups": [[4, 5]], "depth_before": 11, "depth_after": 10, "accuracy_before": 0.4,
    ...           "accuracy_after": 0.384})
    '1 group(s) fused, depth 11 -> 10, accuracy 0.400 -> 0.384'
    """
    return (f"{len(metrics['fused_groups'])} group(s) fused, depth {metrics['depth_before']} -> "
            f"{metrics['depth_after']}, accuracy {metrics['accuracy_before']:.3f} -> {metrics['accuracy_after']:.3f}")


def resolve_child(p: Params) -> tuple[str, Path]:
    """``(label, folder)`` of the child to fuse; errors name the file that is missing or lacks it."""
    search = require(p.run_dir, "02_architecture_search")
    children = search / "children"
    label = p.child
    if label == "auto":
        mf = search / "best_2x.json"
        try:
            best = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FileNotFoundError(f"cannot read {mf} to pick the child (child='auto'): {e}") from None
        if best:
            label = best["label"]
        else:
            fr = search / "frontier.csv"
            try:
                rows = list(csv.DictReader(fr.open()))
            except OSError as e:
                raise FileNotFoundError(f"cannot read {fr} to pick the child (child='auto'): {e}") from None
            key = "priced_speedup" if rows and "priced_speedup" in rows[0] else "speedup"  # older runs: measured
            ok = [r for r in rows if r.get("kind") == "puzzle" and _finite(r.get(key))
                  and (children / r["label"].replace(" ", "_")).is_dir()]
            if not ok:
                raise FileNotFoundError(f"{mf} names no child and {fr} lists no saved Puzzle child with a priced "
                                        "speed-up; nothing to fuse")
            label = max(ok, key=lambda r: float(r[key]))["label"]
    folder = children / label.replace(" ", "_")
    if not folder.is_dir():
        have = sorted(d.name.replace("_", " ") for d in children.iterdir() if d.is_dir()) if children.is_dir() else []
        raise FileNotFoundError(f"child {label!r}: no folder {folder}; saved children: {have or 'none'}")
    return label, folder


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- measures


def sequential_depth(config) -> int:
    """Sub-blocks that run one after another (no-op ones excluded): what FFN Fusion shortens."""
    c = getattr(config, "config", config)
    return sum((b.attention.kind != "no_op") + (b.ffn.kind != "no_op") for b in c.block_configs)


@torch.no_grad()
def mean_kl(reference, model, batches) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions on ``batches``."""
    total, n = 0.0, 0
    for ids in batches:
        lp = reference(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        lq = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        total += (lp.exp() * (lp - lq)).sum(-1).sum().item()
        n += ids.numel()
    return total / n


def interleaved_throughput(models: dict, p: Params) -> dict:
    """Decode tokens/s per model, timed in turns (one warm-up + one timed pass each, ``timing_repeats``
    rounds) so both see the same background load; the best round per model, as ``timeit`` advises:
    on a shared machine the slower rounds measure the neighbours, not the model."""
    times = {k: [] for k in models}
    for _ in range(p.timing_repeats):
        for k, m in models.items():
            times[k].append(decode_throughput(m, p.batch_size, p.prompt_len, p.decode_len, repeats=1))
    return {k: max(v) for k, v in times.items()}


def architecture(config, parent_kv: int, parent_width: int) -> list[dict]:
    """Per-layer rows in :func:`lnkit.plots.architecture`'s names (FFN width as a
    percentage of the parent's, so a fused FFN can exceed 100)."""
    c = getattr(config, "config", config)
    rows = []
    for i, b in enumerate(c.block_configs):
        a, f = b.attention, b.ffn
        if a.kind == "attention":
            kv = a.num_kv_heads(c.num_attention_heads)
            att = "attn_parent" if kv == parent_kv else f"attn_kv{max(1, parent_kv // kv)}"
        else:
            att = "attn_noop" if a.kind == "no_op" else "attn_linear"
        ffn = "ffn_noop" if f.kind == "no_op" else "ffn_linear" if f.kind == "linear" else \
            f"ffn_{round(100 * f.width(c.hidden_size) / parent_width)}"
        rows.append({"layer": i, "attention": att, "ffn": ffn})
    return rows


def scale_architecture(config, parent_width: int, target: str = "Llama-3.1-405B") -> dict:
    """The child's layer pattern at a real model's sizes: real attention becomes the target's GQA,
    FFN widths keep their fraction of the parent's width (rounded up to the released rule), linear and
    no-op blocks stay. Same number of layers as the child. For the roofline only."""
    t = BUILTIN_CONFIGS[target]
    c = getattr(config, "config", config)
    h, heads = t["hidden_size"], t["num_attention_heads"]
    blocks = []
    for b in c.block_configs:
        a, f = b.attention, b.ffn
        att = {"no_op": a.kind == "no_op", "replace_with_linear": a.kind == "linear",
               "n_heads_in_group": heads // t["num_key_value_heads"] if a.kind == "attention" else None}
        if f.kind == "ffn":
            w = released_width(round(f.width(c.hidden_size) / parent_width * t["intermediate_size"]))
            ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": w * 3 / (2 * h)}
        else:
            ffn = {"no_op": f.kind == "no_op", "replace_with_linear": f.kind == "linear", "ffn_mult": None}
        blocks.append({"attention": att, "ffn": ffn})
    return {"model_type": "nemotron-nas", "hidden_size": h, "num_hidden_layers": len(blocks),
            "num_attention_heads": heads, "vocab_size": t["vocab_size"], "tie_word_embeddings": False,
            "block_configs": blocks}


def deploy_predictions(child_cfg, fused_cfg, groups, parent_width: int, p: Params) -> list[dict]:
    """The roofline's latency (prefill 1024 + 1024 decode steps, bf16) unfused vs fused at ``p.tp`` GPUs."""
    def row(setting, before, after, note):
        e0 = estimate(before, p.gpu, p.tp, batch_size=p.deploy_batch_size)
        e1 = estimate(after, p.gpu, p.tp, batch_size=p.deploy_batch_size)
        return {"setting": setting, "gpu": p.gpu, "tp": p.tp, "unfused_latency_s": e0["latency_s"],
                "fused_latency_s": e1["latency_s"], "latency_ratio": e1["latency_s"] / e0["latency_s"],
                "unfused_allreduces": e0["allreduces"], "fused_allreduces": e1["allreduces"], "note": note}

    fused_groups = [g for g in groups if len(g) > 1]
    rows = [row("tiny child", child_cfg.to_dict(), fused_cfg.to_dict(),
                "the tiny child's own sizes: all-reduce latency dominates; absolute times meaningless")]
    scaled = scale_architecture(child_cfg, parent_width)
    rows.append(row("tiny pattern at 405B widths", scaled, fuse_config(scaled, fused_groups, "released"),
                    f"the child's {len(scaled['block_configs'])}-layer pattern and groups at Llama-3.1-405B's "
                    "hidden size, GQA and FFN widths"))
    if p.reference:
        ref = load_config(p.reference)
        runs = attention_free_runs(ref)
        rows.append(row(f"{p.reference}, every run fused", ref, fuse_config(ref, runs, "released"),
                        f"{len(runs)} attention-free runs of {sum(map(len, runs))} FFNs fused whole from the "
                        "block configs alone: no weights, accuracy unmeasured (an upper bound on depth saved)"))
    return rows


# ----------------------------------------------------------------------------------------------- stage


def run_fusion(p: Params) -> dict:
    """Measure, group, fuse, evaluate and price; writes the files listed in the module docstring and
    returns what it measured."""
    parent_dir = require(p.run_dir, "00_parent")
    label, child_dir = resolve_child(p)
    out = stage_dir(p.run_dir, NAME)
    device = p.setup_torch()
    parent_cfg = json.loads((parent_dir / "model" / "config.json").read_text())
    parent_width = parent_cfg["intermediate_size"]
    parent_kv = parent_cfg.get("num_key_value_heads") or parent_cfg["num_attention_heads"]
    child, tok = load_model(child_dir, device)
    if getattr(child.config, "model_type", "") != "nemotron-nas":
        raise ValueError(f"{child_dir} holds a {child.config.model_type!r} model, not a nemotron-nas child")

    runs = attention_free_runs(child.config)
    batches = [b.to(device) for b in token_batches(tok, load_split(p.run_dir, "val"), rows=p.calib_rows,
                                                   row_len=p.calib_len, batch_size=8, seed=p.seed + 2)]
    deps = measure_dependencies(child, batches, runs, progress=p.progress)
    groups = [g for d in deps for g in greedy_groups(d["layers"], d["dependency"], p.threshold)]
    rule = resolve_width_rule(child.config, p.width_rule)
    fused = fuse_model(child, groups, rule)
    fused_groups = [g for g in groups if len(g) > 1]

    with torch.no_grad():
        with parallel(child, groups):  # fusion must equal the parallel model it stands for
            parallel_logits = child(input_ids=batches[0], use_cache=False).logits
        fused_logits = fused(input_ids=batches[0], use_cache=False).logits
    exact_err = (parallel_logits - fused_logits).abs().max().item()
    kl = mean_kl(child, fused, batches)

    save_model(fused, tok, out / "model")
    atomic_write_json(out / "source.json", {"child": label, "child_dir": str(child_dir.relative_to(p.run_dir))})
    dep_rows = []
    for n, d in enumerate(deps):
        L = d["layers"]
        for j in range(len(L)):
            dep_rows.append({"run": n, "layer_i": L[j], "layer_j": L[j], "kind": "parallel",
                             "cosine_distance": d["parallel"][j]})
            dep_rows += [{"run": n, "layer_i": L[i], "layer_j": L[j], "kind": "pairwise",
                          "cosine_distance": d["dependency"][i][j]} for i in range(j)]
    pd.DataFrame(dep_rows, columns=["run", "layer_i", "layer_j", "kind", "cosine_distance"]).to_csv(
        out / "dependency.csv", index=False)
    atomic_write_json(out / "groups.json", {"threshold": p.threshold, "width_rule": rule, "runs": runs,
                                            "groups": groups, "fused": fused_groups})

    test = first_per_domain(load_split(p.run_dir, "test"), p.eval_n)
    evals = {}
    for name, m in (("before", child), ("after", fused)):
        if name == "after" and not fused_groups:
            evals[name] = evals["before"]  # nothing fused: the same model
            continue
        rows = evaluate(m, tok, test, modes=("off",), max_new_tokens=p.eval_max_new_tokens, progress=p.progress)
        evals[name] = summarize(rows, by=("mode", "domain"))
        pd.DataFrame(evals[name]).to_csv(out / f"eval_{name}.csv", index=False)
    if not fused_groups:
        pd.DataFrame(evals["after"]).to_csv(out / "eval_after.csv", index=False)
    tps = interleaved_throughput({"unfused": child, "fused": fused}, p)
    deploy = deploy_predictions(child.config, fused.config, groups, parent_width, p)
    pd.DataFrame(deploy).to_csv(out / "deploy.csv", index=False)

    def acc(summary):
        return next(s["accuracy"] for s in summary if s["domain"] == "all")

    return {
        "child": label, "child_dir": str(child_dir), "runs": runs, "dependencies": deps, "groups": groups,
        "fused_groups": fused_groups, "width_rule": rule,
        "layers_emptied": sum(len(g) - 1 for g in fused_groups),
        "depth_before": sequential_depth(child.config), "depth_after": sequential_depth(fused.config),
        "max_logit_err_vs_parallel": exact_err, "kl_child_to_fused": kl,
        "accuracy_before": acc(evals["before"]), "accuracy_after": acc(evals["after"]),
        "eval_before": evals["before"], "eval_after": evals["after"],
        "tokens_per_s_unfused": tps["unfused"], "tokens_per_s_fused": tps["fused"],
        "cpu_latency_ratio": tps["unfused"] / tps["fused"],
        "deploy": deploy,
        "architecture_before": architecture(child.config, parent_kv, parent_width),
        "architecture_after": architecture(fused.config, parent_kv, parent_width),
    }
