"""GPU check: lnkit's nemotron-nas checkpoints and its GRPO loop on vLLM, in one command, on one H100/H200-class GPU.

Run: ``benchmarks/gpu_check.sh [options]`` (checks ``nvidia-smi`` and vLLM, then runs this script under a
10-minute timeout), or ``.venv/bin/python benchmarks/gpu_check.py --dry-run`` on a CPU: the same sections
at tiny sizes with lnkit's torch engine in place of vLLM (about 20 s on a 2-core CPU). Writes a JSON summary
(``--out``, default ``runs/gpu_check.json``, rewritten atomically after every job, so a killed run leaves what
it finished); exit status 1 if a section failed, 2 at once without CUDA (or without vLLM) unless ``--dry-run``.
The GPU runtime is an estimate (about 6 of the 10 minutes: six processes, five vLLM engine start-ups): this
script has not yet run on a GPU.

Sections (each prints PASS, FAIL or SKIPPED and its figures):

1. ``models``: the two checkpoints, saved with :func:`lnkit.checkpoints.save_model` and checked with
   :func:`lnkit.vllm_backend.check_servable`. The *child*: ``--model`` (default the tiny run's
   ``06_reasoning_sft/model``) when vLLM can serve it, else one built here: a random 4-layer Llama (width 256,
   4 heads, 2 KV heads, FFN 512, llama3 RoPE, untied) over the tiny world's tokenizer, converted with
   :func:`lnkit.model.from_llama`, then made a Puzzle-like child (layer 1's attention a no-op, layer 2's FFN
   pruned to 256 with :func:`lnkit.puzzle.library.prune_ffn`, layer 3's KV heads merged to one with
   ``merge_kv_heads``); no linear blocks and no no-op first attention, which vLLM cannot serve. The *super
   slice*: the released LN-Super-49B config cut to ``--super-layers`` (default 0, 1, 6, 62: both FFN widths
   of the attention layers, two no-op attention layers), at full width (8192, 64 heads, 8 KV heads), random
   bf16 weights, 1.8B parameters; its vocabulary is the tokenizer's (600, not Llama-3's 128,256, whose 2.1B
   embedding parameters add nothing to check and whose ids the tokenizer could not decode).
2. ``consistency``: greedy tokens of vLLM against lnkit's torch rollout engine
   (:class:`lnkit.rl.rollout.TorchEngine`), ``--new-tokens`` on ``--prompts`` tiny-world prompts, for the
   child (through :class:`lnkit.rl.vllm_engine.VLLMEngine`) and the super slice (through ``vllm.LLM``).
   Tolerance: in ``float32`` (the default ``--dtype``) every prompt must give the same tokens; in ``bfloat16``
   the two round differently, so every prompt's first token must agree and the prompts must share at least
   half their tokens before diverging (a heuristic, not calibrated). Reported: prompts identical, the mean share
   of tokens before the first divergence, the first divergence (prompt, position, both tokens).
3. ``fp8_throughput``: tokens per second of greedy decoding in vLLM on the super slice, ``--tput-batch``
   prompts x ``--tput-tokens`` new tokens (``ignore_eos``), BF16 then ``quantization="fp8"``, median of
   ``--tput-repeats`` after a warm-up; printed as the FP8/BF16 ratio (the paper: about 1.8x on whole models;
   a 4-layer slice spends a larger share of each step outside the quantised layers, so expect less), with the
   agreement of the two greedy outputs. Dry run: lnkit's FP8 emulation (:func:`lnkit.rl.rollout.fp8_qdq`)
   against full precision, on a CPU, where the emulation is slower (the ratio then says nothing of FP8).
4. ``grpo_refit``: ``--grpo-steps`` steps of stage 07's own GRPO (:class:`lnkit.stages.grpo.GRPOTrainer` on
   :func:`lnkit.train.loop.train_loop`: its rollouts, rewards, advantages, loss and optimizer) on tiny-world
   math and science prompts, one rollout batch per step, the trainer pushing its weights into the engine
   before each batch. Twice: (a) ``exact``: vLLM in ``--dtype`` with the in-place weight push; after each push
   vLLM's greedy tokens must equal the torch engine's on the updated weights (the tolerance of section 2);
   (b) ``fp8``: the stage's own FP8 engine (``make_engine(..., fp8=True)``: re-quantised from the saved
   weights at each push); greedy agreement with lnkit's FP8 emulation is reported, not gated (vLLM's FP8
   kernels and the emulation round differently), and the push is checked on log-probabilities instead: the
   engine's log-probabilities of each batch's sampled tokens must be closer (mean absolute difference per
   token) to the policy's now than to the policy's at the start, which an engine that missed the pushes would
   still be sampling from. Both also check that the steps ran with finite losses and moved the weights.
   Settings for a visible update: learning rate ``--grpo-lr`` 2e-3 (the stage's default is 1e-4), no warmup,
   every prompt asked with thinking off, so a random policy earns the format reward unless it samples a think
   tag (the built child's think-tag output rows are enlarged so that a third to a half of its completions hold
   one: groups differ and the loss has a gradient), pass rates not estimated (batches drawn at random). The
   policy trains on ``--grpo-device`` (default: cuda on a GPU, cpu with ``--dry-run``; stage 07 builds its
   rollout batches on the policy's device, a path only a GPU exercises).

Each job runs in a process of its own (one vLLM engine per process, run in-process with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), its output in ``<workdir>/logs/``, so a crash or an out-of-memory in one
cannot take the others with it and every engine starts on an empty GPU. The model folders are deleted at the
end unless ``--keep-models``. vLLM calls are those lnkit already makes (``LLM(...)``, ``generate`` on token
ids, ``SamplingParams``), plus ``ignore_eos`` for the throughput runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SUPER_CONFIG = ROOT / "lib" / "lnkit" / "reference_configs" / "llama-3_3-nemotron-super-49b-v1.config.json"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}
SECTIONS = {"models": ["models"], "consistency": ["child", "super"], "fp8_throughput": ["decode_bf16", "decode_fp8"],
            "grpo_refit": ["child", "grpo_fp8"]}
PAPER_FP8_SPEEDUP = 1.8  # Section 5.2.3: FP8 rollouts in vLLM against BF16
BF16_MIN_PREFIX = 0.5  # bfloat16 tolerance: mean share of tokens before the first divergence
MAX_MODEL_LEN = 4096  # every vLLM engine here (VLLMEngine's default)
GPU_MEMORY = 0.5  # share of the GPU each engine may take (one engine per process)
MIN_JOB_S = 30  # a job is not started with less time than this left

# sizes on a GPU, and in --dry-run on a CPU; an option given on the command line wins over both
SIZES = {
    "gpu": dict(prompts=8, new_tokens=32, super_hidden=0, super_heads=0, tput_batch=128, tput_tokens=256,
                tput_repeats=3, grpo_prompts=4, grpo_group=8, grpo_new_tokens=32),
    "dry": dict(prompts=2, new_tokens=16, super_hidden=512, super_heads=8, tput_batch=8, tput_tokens=16,
                tput_repeats=1, grpo_prompts=4, grpo_group=4, grpo_new_tokens=16),
}


@dataclass
class Config:
    """One check's settings (the command line's options, see ``--help``); ``super_hidden``/``super_heads`` 0:
    the released width."""

    dry_run: bool = False
    out: str = "runs/gpu_check.json"
    workdir: str = "runs/gpu_check"
    model: str = "runs/tiny/06_reasoning_sft/model"
    dtype: str = "float32"
    prompts: int = 8
    new_tokens: int = 32
    super_layers: list[int] = field(default_factory=lambda: [0, 1, 6, 62])
    super_hidden: int = 0
    super_heads: int = 0
    tput_batch: int = 128
    tput_tokens: int = 256
    tput_repeats: int = 3
    grpo_steps: int = 5
    grpo_prompts: int = 4
    grpo_group: int = 8
    grpo_new_tokens: int = 32
    grpo_lr: float = 2e-3
    grpo_device: str = "cuda"  # the policy's device (--dry-run: cpu)
    budget_s: float = 570.0
    only: list[str] = field(default_factory=list)
    keep_models: bool = False
    threads: int = 0
    seed: int = 0

    @property
    def backend(self) -> str:
        return "torch" if self.dry_run else "vllm"


# ---------------------------------------------------------------------------------------------- judging


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """How far greedy outputs ``got`` follow ``want`` (token ids, one list per prompt): prompts identical, first
    tokens equal, the mean share of tokens before the first divergence, and the first divergence.

    >>> agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])["first_divergence"]
    {'prompt': 0, 'position': 2, 'got': 3, 'want': 9}
    >>> agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])["prefix_share"]
    0.8333
    """
    shares, first = [], None
    for i, (g, w) in enumerate(zip(got, want)):
        n = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        shares.append(n / max(len(g), len(w), 1))
        if first is None and g != w:
            first = {"prompt": i, "position": n, "got": g[n] if n < len(g) else None,
                     "want": w[n] if n < len(w) else None}
    return {"prompts": len(want), "identical": sum(g == w for g, w in zip(got, want)),
            "first_tokens_equal": sum(g[:1] == w[:1] for g, w in zip(got, want)),
            "prefix_share": round(statistics.mean(shares), 4) if shares else 1.0, "first_divergence": first}


def judge(a: dict, dtype: str) -> bool:
    """The tolerance of a greedy comparison: identical in float32; in bfloat16 every first token equal and at
    least :data:`BF16_MIN_PREFIX` of the tokens before the first divergence.

    >>> judge({"prompts": 2, "identical": 1, "first_tokens_equal": 2, "prefix_share": 0.8}, "float32")
    False
    >>> judge({"prompts": 2, "identical": 1, "first_tokens_equal": 2, "prefix_share": 0.8}, "bfloat16")
    True
    """
    if dtype == "float32":
        return a["identical"] == a["prompts"]
    return a["first_tokens_equal"] == a["prompts"] and a["prefix_share"] >= BF16_MIN_PREFIX


def status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def combine(*parts: dict) -> str:
    """A section's status from its parts': FAIL if any failed, SKIPPED if all were skipped, else PASS."""
    got = [p.get("status", "FAIL") for p in parts]
    return "FAIL" if "FAIL" in got else "SKIPPED" if all(s == "SKIPPED" for s in got) else "PASS"


def skipped(reason: str) -> dict:
    return {"status": "SKIPPED", "reason": reason}


def failed(error: str) -> dict:
    return {"status": "FAIL", "error": error}


# ---------------------------------------------------------------------------------------------- inputs


def world_items(n_per_domain: int, seed: int, domains=("math", "science")) -> list:
    """Tiny-world training items of the verifiable domains GRPO trains on (code left out: no sandbox runs)."""
    from lnkit.data.splits import make_split
    from lnkit.data.world import make_world

    return make_split(make_world(0), "train", {d: n_per_domain for d in domains}, seed=seed)


def prompt_ids(tok, n: int, seed: int) -> list[list[int]]:
    """``n`` rendered tiny-world prompts as token ids, thinking off and on in turn."""
    from lnkit.data.chat import render_prompt

    items = world_items((n + 1) // 2, seed)[:n]
    return [tok(render_prompt(it.prompt, "off" if i % 2 == 0 else "on"), add_special_tokens=False)["input_ids"]
            for i, it in enumerate(items)]


def world_tokenizer():
    """The project's tokenizer, trained on the tiny world as ``tests/conftest.py`` trains it (600 tokens)."""
    from lnkit.data.chat import THINK_OFF, THINK_ON, format_response, render_prompt
    from lnkit.data.splits import make_split
    from lnkit.data.tasks import DOMAINS, arithmetic_corpus
    from lnkit.data.tokenizer import train_tokenizer
    from lnkit.data.world import knowledge_corpus, make_world

    world = make_world(0)
    texts = knowledge_corpus(world) + arithmetic_corpus() + [THINK_ON, THINK_OFF]
    for it in make_split(world, "train", {d: 40 for d in DOMAINS}):
        texts += [render_prompt(it.prompt, "on"), format_response(it.reasoning, it.direct, "on")]
    return train_tokenizer(texts, vocab_size=600)


def perturb_norms(model, seed: int) -> None:
    """Norms moved off 1, so a norm vLLM dropped or swapped would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def puzzle_child(tok, seed: int):
    """A random Llama converted to nemotron-nas, then a Puzzle-like child of it (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lnkit.data.chat import THINK_CLOSE, THINK_OPEN
    from lnkit.model import NemotronNasConfig, NemotronNasForCausalLM, from_llama
    from lnkit.puzzle.library import merge_kv_heads, prune_ffn

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN, rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    perturb_norms(llama, seed)
    parent = from_llama(llama)  # ffn_mult 3.0: width 512 by the released rule, so vLLM reads it right
    blocks = [b.to_dict() for b in parent.config.block_configs]
    blocks[1]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    blocks[2]["ffn"]["ffn_mult"] = 1.5  # width 256 by the released rule
    blocks[3]["attention"]["n_heads_in_group"] = 4  # one KV head (divides layer 0's two: vLLM's KV pages unify)
    child = NemotronNasForCausalLM(NemotronNasConfig.from_dict({**parent.config.to_dict(), "block_configs": blocks}))
    state = {k: v for k, v in parent.state_dict().items()
             if not k.startswith(("model.layers.1.self_attn.", "model.layers.1.input_layernorm."))}
    mlp = parent.model.layers[2].mlp
    state.update({f"model.layers.2.mlp.{k}": v for k, v in prune_ffn(mlp, mlp.down_proj.weight.norm(dim=0), 256).items()})
    state.update({f"model.layers.3.self_attn.{k}": v
                  for k, v in merge_kv_heads(parent.model.layers[3].self_attn, 2).items()})
    child.load_state_dict(state, strict=True)
    # A random policy samples a think tag about once in 300 tokens, so completions asked with thinking off nearly
    # all earn the format reward and GRPO gets no gradient: the tags' output rows get norm 2 (their logits
    # ~ N(0, 4) where the others' are ~ N(0, 0.1)), so a third (16 tokens) to a half (32) of completions carry one.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tok.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE]):
            row = torch.randn(child.config.hidden_size, generator=g)
            child.lm_head.weight[t] = 2.0 * row / row.norm()
    return child.eval()


def super_slice(cfg: Config, tok, device: str):
    """The released LN-Super config cut to ``cfg.super_layers``, random weights, the tokenizer's vocabulary."""
    from lnkit.model import NemotronNasConfig, NemotronNasForCausalLM

    raw = json.loads(SUPER_CONFIG.read_text())
    over = dict(num_hidden_layers=len(cfg.super_layers), block_configs=[raw["block_configs"][i] for i in cfg.super_layers],
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if cfg.super_hidden:  # the dry run's narrow copy: same blocks and head grouping, small width
        over.update(hidden_size=cfg.super_hidden, num_attention_heads=cfg.super_heads)
    config = NemotronNasConfig.from_dict({**raw, **over})
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = NemotronNasForCausalLM(config).eval()
    perturb_norms(model, cfg.seed)
    return model.to(torch.bfloat16)


def servable(folder: Path) -> list[str]:
    """What keeps vLLM from serving ``folder`` (:func:`lnkit.vllm_backend.check_servable`); [] if nothing."""
    from lnkit.vllm_backend import check_servable

    try:
        check_servable(folder)
    except ValueError as e:
        return str(e).splitlines()[1:] or [str(e)]
    return []


def describe_model(model) -> dict:
    c = model.config
    blocks = [f"{b.attention.kind}:{b.attention.num_kv_heads(c.num_attention_heads)}kv/"
              f"{b.ffn.kind}:{b.ffn.width(c.hidden_size)}" for b in c.block_configs] if hasattr(c, "block_configs") else []
    return {"params": sum(p.numel() for p in model.parameters()), "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads, "vocab_size": c.vocab_size, "layers": blocks}


# ---------------------------------------------------------------------------------------------- engines


def greedy(engine, ids: list[list[int]], n: int) -> list[list[int]]:
    """Greedy completions (token ids, stop token included) from a rollout engine."""
    return [r.completion_ids for r in engine.sample(ids, max_new_tokens=n, temperature=0.0)]


def stop_ids(tok) -> list[int]:
    from lnkit.data.chat import EOS_TEXT, EOT

    return [i for i in (tok.convert_tokens_to_ids(t) for t in (EOT, EOS_TEXT)) if isinstance(i, int) and i >= 0]


def vllm_llm(folder: Path, dtype: str, fp8: bool, seed: int):
    """A vLLM engine on a saved folder, built as :mod:`lnkit.vllm_backend` builds one."""
    from vllm import LLM

    import lnkit.model  # noqa: F401  (registers nemotron-nas with transformers' Auto classes)

    return LLM(model=str(folder), dtype=dtype, quantization="fp8" if fp8 else None, seed=seed,
               gpu_memory_utilization=GPU_MEMORY, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False)


def vllm_generate(llm, ids: list[list[int]], n: int, stop: list[int] | None) -> list[list[int]]:
    """Greedy token ids from a ``vllm.LLM``; ``stop=None``: exactly ``n`` tokens each (``ignore_eos``)."""
    from vllm import SamplingParams

    params = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) if stop is None else
              SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=stop, skip_special_tokens=False))
    outs = llm.generate([{"prompt_token_ids": list(x)} for x in ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def release_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- jobs


def child_checkpoint(cfg: Config, ws: Path) -> tuple[Path, str]:
    """The run's model when vLLM can serve it, else a Puzzle-like child built and saved here; and which it is."""
    from lnkit.checkpoints import save_model

    run_model = Path(cfg.model)
    if (run_model / "config.json").is_file():
        problems = servable(run_model)
        if not problems:
            return run_model, f"{run_model} (vLLM can serve it)"
        why = f"{run_model} is not servable by vLLM ({len(problems)} problem(s); first: {problems[0].strip(' -')})"
    else:
        why = f"no model at {run_model}"
    tok = world_tokenizer()
    save_model(puzzle_child(tok, cfg.seed), tok, ws / "child")
    return ws / "child", f"built here: {why}"


def job_models(cfg: Config, ws: Path) -> dict:
    """Section 1: the child and the super slice, saved, described and checked for vLLM."""
    from lnkit.checkpoints import load_model, save_model
    from lnkit.io import atomic_write_json

    child_dir, source = child_checkpoint(cfg, ws)
    child, tok = load_model(child_dir)
    big = super_slice(cfg, tok, "cpu" if cfg.dry_run else "cuda")  # random init of 1.8B parameters: the GPU's job
    save_model(big, tok, ws / "super")
    out = {"child": {"folder": str(child_dir), "source": source, **describe_model(child),
                     "vllm_problems": servable(child_dir)},
           "super": {"folder": str(ws / "super"), "source": f"{SUPER_CONFIG.name}, layers {cfg.super_layers}",
                     **describe_model(big), "vllm_problems": servable(ws / "super")}}
    del big
    release_cuda()
    atomic_write_json(ws / "models.json", {"child": out["child"]["folder"], "super": out["super"]["folder"]})
    out["device"] = "cpu" if cfg.dry_run else torch.cuda.get_device_name(0)  # here: the parent never touches CUDA
    out["status"] = status(not out["child"]["vllm_problems"] and not out["super"]["vllm_problems"])
    return out


def folders(ws: Path) -> dict:
    from lnkit.io import read_json

    return read_json(ws / "models.json")


def job_child(cfg: Config, ws: Path) -> dict:
    """Section 2 for the child, then section 4 (a): GRPO with the in-place weight push, exact greedy checks."""
    from lnkit.checkpoints import load_model
    from lnkit.rl.rollout import TorchEngine

    policy, tok = load_model(folders(ws)["child"], cfg.grpo_device)
    if cfg.dry_run:
        engine, consistency = TorchEngine(policy, tok), skipped("no vLLM in --dry-run")
    else:
        from lnkit.rl.vllm_engine import VLLMEngine

        engine = VLLMEngine(policy, tok, dtype=cfg.dtype, workdir=ws / "vllm_child", gpu_memory_utilization=GPU_MEMORY,
                            max_model_len=MAX_MODEL_LEN, seed=cfg.seed)
        ids = prompt_ids(tok, cfg.prompts, cfg.seed)
        a = agreement(greedy(engine, ids, cfg.new_tokens), greedy(TorchEngine(policy, tok), ids, cfg.new_tokens))
        consistency = {"status": status(judge(a, cfg.dtype)), "dtype": cfg.dtype, "new_tokens": cfg.new_tokens, **a}
        print(f"child consistency: {consistency['status']} {a}", flush=True)
    grpo = run_job(lambda *_: run_grpo(cfg, ws, policy, tok, engine, fp8=False), cfg, ws)  # keeps the above if it fails
    return {"status": combine(consistency, grpo), "consistency": consistency, "grpo": grpo}


def job_super(cfg: Config, ws: Path) -> dict:
    """Section 2 for the super slice: lnkit's torch engine on the GPU first, then vLLM on an emptied GPU."""
    if cfg.dry_run:
        return skipped("no vLLM in --dry-run")
    from lnkit.checkpoints import load_model
    from lnkit.rl.rollout import TorchEngine

    folder = folders(ws)["super"]
    model, tok = load_model(folder, "cuda")
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = prompt_ids(tok, cfg.prompts, cfg.seed)
    want = greedy(TorchEngine(model, tok), ids, cfg.new_tokens)
    del model
    release_cuda()
    got = vllm_generate(vllm_llm(Path(folder), cfg.dtype, fp8=False, seed=cfg.seed), ids, cfg.new_tokens, stop_ids(tok))
    a = agreement(got, want)
    return {"status": status(judge(a, cfg.dtype)), "dtype": cfg.dtype, "new_tokens": cfg.new_tokens, **a}


def job_decode(cfg: Config, ws: Path, fp8: bool) -> dict:
    """Section 3, one precision: greedy decoding tokens per second on the super slice (median of the repeats)."""
    from transformers import AutoTokenizer

    folder = Path(folders(ws)["super"])
    tok = AutoTokenizer.from_pretrained(folder)
    ids = prompt_ids(tok, cfg.tput_batch, cfg.seed)
    if cfg.dry_run:
        from lnkit.checkpoints import load_model
        from lnkit.rl.rollout import TorchEngine

        engine = TorchEngine(load_model(folder)[0], tok, max_batch=len(ids), fp8=fp8)
    else:
        llm = vllm_llm(folder, "bfloat16", fp8=fp8, seed=cfg.seed)
    rates, outs = [], None
    for _ in range(cfg.tput_repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        outs = (greedy(engine, ids, cfg.tput_tokens) if cfg.dry_run else
                vllm_generate(llm, ids, cfg.tput_tokens, stop=None))
        rates.append(sum(map(len, outs)) / (time.perf_counter() - t))
    return {"status": "PASS", "precision": ("fp8" if fp8 else "bf16" if not cfg.dry_run else "fp32"),
            "tokens_per_s": round(statistics.median(rates[1:]), 1), "runs": [round(r, 1) for r in rates[1:]],
            "batch": len(ids), "new_tokens": cfg.tput_tokens, "sample": [o[:32] for o in outs[: cfg.prompts]]}


def job_grpo_fp8(cfg: Config, ws: Path) -> dict:
    """Section 4 (b): GRPO with stage 07's own FP8 rollout engine."""
    from lnkit.checkpoints import load_model
    from lnkit.rl.engines import make_engine

    policy, tok = load_model(folders(ws)["child"], cfg.grpo_device)
    engine = make_engine(cfg.backend, policy, tok, fp8=True)
    return run_grpo(cfg, ws, policy, tok, engine, fp8=True)


JOBS = {"models": job_models, "child": job_child, "super": job_super,
        "decode_bf16": lambda cfg, ws: job_decode(cfg, ws, fp8=False),
        "decode_fp8": lambda cfg, ws: job_decode(cfg, ws, fp8=True), "grpo_fp8": job_grpo_fp8}


# ---------------------------------------------------------------------------------------------- GRPO


class RefitProbe:
    """Stage 07's rollout engine with a check at each rollout batch, after the trainer's weight push: greedy tokens
    on fixed prompts from the engine and from lnkit's torch engine on the policy's weights now; then the batch's
    sampled tokens' log-probabilities, from the engine, against the policy's now and at the start (an engine
    that missed the pushes samples from the start's)."""

    def __init__(self, engine, policy, tok, probes: list[list[int]], *, fp8: bool, new_tokens: int):
        self.engine, self.policy, self.tok, self.probes = engine, policy, tok, probes
        self.fp8, self.new_tokens = fp8, new_tokens
        self.start = copy.deepcopy(policy)
        self.rows: list[dict] = []
        self.refit_s = 0.0

    def load_weights(self, model) -> None:
        t = time.perf_counter()
        self.engine.load_weights(model)
        self.refit_s = time.perf_counter() - t

    def sample(self, prompts, **kw):
        from lnkit.rl.rollout import TorchEngine

        ref = TorchEngine(self.policy, self.tok, fp8=self.fp8)
        a = agreement(greedy(self.engine, self.probes, self.new_tokens), greedy(ref, self.probes, self.new_tokens))
        rollouts = self.engine.sample(prompts, **kw)
        now, start = self.gaps(rollouts, kw.get("temperature", 1.0))
        with torch.no_grad():
            moved = max(float((p - q).abs().max()) for p, q in zip(self.policy.parameters(), self.start.parameters()))
        self.rows.append({"batch": len(self.rows), "refit_s": round(self.refit_s, 3), "greedy": a,
                          "logprob_gap_now": round(now, 6), "logprob_gap_start": round(start, 6), "moved": moved,
                          "follows_refit": (now < start) if moved > 0 else None})
        return rollouts

    @torch.no_grad()
    def gaps(self, rollouts, temperature: float) -> tuple[float, float]:
        """Mean absolute difference, per sampled token, of the engine's log-probabilities from the policy's now
        and at the start."""
        from lnkit.rl.batch import rollout_batch
        from lnkit.rl.grpo import token_logprobs

        b = rollout_batch(rollouts, self.tok.pad_token_id)
        mask = b["completion_mask"].float()
        dev = next(self.policy.parameters()).device
        out = []
        for m in (self.policy, self.start):
            lp = token_logprobs(m, b["input_ids"].to(dev), b["attention_mask"].to(dev), mask.shape[1], temperature)
            out.append(float(((lp.cpu() - b["sampling_logps"]).abs() * mask).sum() / mask.sum().clamp(min=1)))
        return out[0], out[1]


def run_grpo(cfg: Config, ws: Path, policy, tok, engine, *, fp8: bool) -> dict:
    """``cfg.grpo_steps`` steps of stage 07's GRPO with ``engine`` for rollouts, checked at each weight push."""
    from lnkit.stages import grpo

    name = "fp8" if fp8 else "exact"
    out = ws / f"grpo_{name}"
    shutil.rmtree(out, ignore_errors=True)  # no resume from an earlier check's checkpoint
    items = world_items(cfg.grpo_prompts * 2, cfg.seed + 1)
    p = grpo.Params(run_dir=str(ws), init=str(Path(folders(ws)["child"]).resolve()), seed=cfg.seed, progress=False,
                    threads=cfg.threads, device=cfg.grpo_device, prompts={"math": cfg.grpo_prompts * 2,
                                                                            "science": cfg.grpo_prompts * 2},
                    steps=cfg.grpo_steps, num_iterations=1, prompts_per_batch=cfg.grpo_prompts,
                    group_size=cfg.grpo_group, max_new_tokens=cfg.grpo_new_tokens, off_fraction=1.0, order="random",
                    lr=cfg.grpo_lr, warmup=0, fp8_rollouts=fp8, rollout_backend=cfg.backend,
                    ckpt_every=cfg.grpo_steps, eval_every=10**6)
    # The stage's trainer builds its engine with make_engine, which takes no dtype: built with the torch backend
    # (a cheap engine, dropped), it is then given the engine under test and the parameters that push weights to it.
    trainer = grpo.GRPOTrainer(replace(p, rollout_backend="torch"), policy, tok, {it.id: it for it in items},
                               {it.id: 0.5 for it in items}, None, out, [])
    trainer.p = p
    probe = RefitProbe(engine, policy, tok, prompt_ids(tok, cfg.prompts, cfg.seed), fp8=fp8, new_tokens=cfg.new_tokens)
    trainer.engine = probe
    log = trainer.train()
    rows = probe.rows
    greedy_ok = [judge(r["greedy"], cfg.dtype) for r in rows]
    checks = {"steps_ran": len(log) == cfg.grpo_steps and all(math.isfinite(float(r["loss"])) for r in log),
              "weights_moved": any(r["moved"] > 0 for r in rows),
              "refit_followed": all(r["follows_refit"] is not False for r in rows)}
    if not fp8:
        checks["greedy_equal_after_each_refit"] = all(greedy_ok)
    return {"status": status(all(checks.values())), "engine": f"{cfg.backend}{' fp8' if fp8 else ' ' + cfg.dtype}",
            "policy_device": cfg.grpo_device, "checks": checks, "refits": rows,
            "steps": [{k: r.get(k) for k in ("step", "loss", "reward_mean", "flat_groups", "fp8_logprob_gap")}
                      for r in log]}


# ---------------------------------------------------------------------------------------------- the run


def run_job(job, cfg: Config, ws: Path) -> dict:
    """One job (a name in :data:`JOBS`, or a function of ``cfg, ws``), its failure caught and recorded."""
    t = time.perf_counter()
    try:
        result = (JOBS[job] if isinstance(job, str) else job)(cfg, ws)
    except Exception as e:  # a section's failure is a result, not the end of the check
        result = failed(f"{type(e).__name__}: {e}")
        result["traceback"] = traceback.format_exc(limit=-6)
    result["seconds"] = round(time.perf_counter() - t, 1)
    return result


def isolated(name: str, cfg: Config, ws: Path, deadline: float) -> dict:
    """One job in a process of its own (this file with ``--job``), its output in ``<workdir>/logs/<job>.log``."""
    part, log = ws / "parts" / f"{name}.json", ws / "logs" / f"{name}.log"
    part.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", name, "--config", json.dumps(asdict(cfg)),
           "--workdir", str(ws)]
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=deadline - time.time()).returncode
        except subprocess.TimeoutExpired:
            return {**failed(f"killed at the time budget (--budget-s {cfg.budget_s:.0f}); see {log}"), "log": str(log),
                    "seconds": round(time.perf_counter() - t, 1)}
    if part.is_file():
        from lnkit.io import read_json

        return {**read_json(part), "log": str(log)}
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
    return {**failed(f"its process exited with status {rc} and wrote no result; end of {log}:\n{tail}"),
            "log": str(log), "seconds": round(time.perf_counter() - t, 1)}


def jobs_for(cfg: Config) -> list[str]:
    sections = cfg.only or list(SECTIONS)
    return list(dict.fromkeys(["models"] + [j for s in sections for j in SECTIONS[s]]))


def assemble(cfg: Config, results: dict, elapsed: float) -> dict:
    """The summary: each section from its jobs' results; ``ok`` when none failed."""
    selected = jobs_for(cfg)

    def get(job):
        if job in results:
            return results[job]
        return failed("not run (the check stopped before it)") if job in selected else skipped("not selected (--only)")

    child = get("child")
    child_consistency = child.get("consistency", child)
    child_grpo = child.get("grpo", child)
    bf16, fp8 = get("decode_bf16"), get("decode_fp8")
    tput = {"status": combine(bf16, fp8), "baseline": bf16, "fp8": fp8, "paper_ratio": PAPER_FP8_SPEEDUP}
    if bf16.get("tokens_per_s") and fp8.get("tokens_per_s"):
        tput["ratio"] = round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3)
        tput["greedy_agreement"] = agreement(fp8["sample"], bf16["sample"])
    sections = {
        "models": get("models"),
        "consistency": {"status": combine(child_consistency, get("super")), "child": child_consistency,
                        "super": get("super")},
        "fp8_throughput": tput,
        "grpo_refit": {"status": combine(child_grpo, get("grpo_fp8")), "exact": child_grpo, "fp8": get("grpo_fp8")},
    }
    if cfg.only:
        sections = {k: v for k, v in sections.items() if k == "models" or k in cfg.only}
    return {"backend": cfg.backend, "device": results.get("models", {}).get("device", "?"),
            "elapsed_s": round(elapsed, 1), "config": asdict(cfg),
            "sections": sections, "ok": all(s["status"] != "FAIL" for s in sections.values())}


def run_check(cfg: Config) -> dict:
    """Every job in order (isolated on a GPU, in this process in a dry run); the summary written after each."""
    from transformers.utils import logging

    from lnkit.io import atomic_write_json

    logging.disable_progress_bar()  # a bar per checkpoint written or read
    ws = Path(cfg.workdir).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + cfg.budget_s
    results: dict[str, dict] = {}
    for name in jobs_for(cfg):
        if name != "models" and results["models"]["status"] != "PASS":
            results[name] = failed("not run: the models section failed")
        elif deadline - time.time() < MIN_JOB_S:
            results[name] = failed(f"not run: under {MIN_JOB_S} s of the time budget (--budget-s) left")
        else:
            print(f"gpu_check: {name} ...", flush=True)
            results[name] = run_job(name, cfg, ws) if cfg.dry_run else isolated(name, cfg, ws, deadline)
            print(f"gpu_check: {name}: {results[name]['status']} ({results[name].get('seconds', '?')} s)"
                  + (f": {results[name]['error']}" if "error" in results[name] else ""), flush=True)
        summary = assemble(cfg, results, time.time() - t0)
        atomic_write_json(cfg.out, summary)
    if not cfg.keep_models:
        for sub in ("child", "super", "vllm_child", "grpo_exact", "grpo_fp8"):
            shutil.rmtree(ws / sub, ignore_errors=True)
    return summary


def report(summary: dict) -> str:
    """The summary's lines, one per section with its figures."""
    s = summary["sections"]
    lines = [f"gpu_check ({summary['backend']}, {summary['device']}, {summary['elapsed_s']:.0f} s):"]

    def line(name, text):
        lines.append(f"  {s[name]['status']:7s} {name:15s} {text}")

    def greedy_text(a):
        if "identical" not in a:
            return a.get("reason") or a.get("error", "")
        return (f"{a['identical']}/{a['prompts']} identical over {a['new_tokens']} greedy tokens ({a['dtype']}), "
                f"mean share before divergence {a['prefix_share']:.0%}"
                + (f", first divergence {a['first_divergence']}" if a["first_divergence"] else ""))

    if "models" in s:
        m = s["models"]
        line("models", f"child {m['child']['params']:,} params ({m['child']['source']}); super slice "
                       f"{m['super']['params']:,} params" if "child" in m else m.get("error", ""))
    if "consistency" in s:
        line("consistency", f"child: {greedy_text(s['consistency']['child'])}; super: "
                            f"{greedy_text(s['consistency']['super'])}")
    if "fp8_throughput" in s:
        t = s["fp8_throughput"]
        line("fp8_throughput", f"{t['baseline'].get('precision', 'baseline')} {t['baseline'].get('tokens_per_s')} "
                               f"tokens/s, fp8 {t['fp8'].get('tokens_per_s')} tokens/s: {t.get('ratio', '?')}x "
                               f"(paper ~{PAPER_FP8_SPEEDUP}x)" if "ratio" in t else
             t["baseline"].get("error") or t["fp8"].get("error") or t["fp8"].get("reason", ""))
    if "grpo_refit" in s:
        parts = []
        for key in ("exact", "fp8"):
            g = s["grpo_refit"][key]
            if "checks" in g:
                gaps = ", ".join(f"{r['logprob_gap_now']:.4f}/{r['logprob_gap_start']:.4f}" for r in g["refits"])
                parts.append(f"{key} ({g['engine']}): {sum(c for c in g['checks'].values())}/{len(g['checks'])} checks "
                             f"{g['checks']}, log-prob gap to the policy now/at the start per refit {gaps}")
            else:
                parts.append(f"{key}: {g.get('error') or g.get('reason', '')}")
        line("grpo_refit", "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: torch engine for vLLM, tiny sizes, vLLM parts SKIPPED")
    ap.add_argument("--out", default=Config.out, help="the JSON summary")
    ap.add_argument("--workdir", default=Config.workdir, help="models, logs and GRPO folders")
    ap.add_argument("--model", default=Config.model, help="the child checkpoint, used when vLLM can serve it")
    ap.add_argument("--dtype", default=Config.dtype, choices=["float32", "bfloat16"], help="greedy comparisons' dtype")
    ap.add_argument("--super-layers", default=None, help="LN-Super layers of the super slice, e.g. 0,1,6,62")
    for name, n in SIZES["gpu"].items():
        if name not in ("super_hidden", "super_heads"):
            ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {n} ({SIZES['dry'][name]} with --dry-run)")
    ap.add_argument("--grpo-steps", type=int, default=Config.grpo_steps)
    ap.add_argument("--grpo-lr", type=float, default=Config.grpo_lr)
    ap.add_argument("--grpo-device", default=None, choices=["cpu", "cuda"], help="default cuda (cpu with --dry-run)")
    ap.add_argument("--budget-s", type=float, default=Config.budget_s, help="stop starting jobs past this")
    ap.add_argument("--only", nargs="+", default=[], choices=[s for s in SECTIONS if s != "models"])
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job (see isolated())
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    given = {k: getattr(args, k) for k in sizes if getattr(args, k, None) is not None}
    layers = [int(x) for x in args.super_layers.split(",")] if args.super_layers else Config().super_layers
    return Config(dry_run=args.dry_run, out=args.out, workdir=args.workdir, model=args.model, dtype=args.dtype,
                  super_layers=layers, grpo_steps=args.grpo_steps, grpo_lr=args.grpo_lr,
                  grpo_device=args.grpo_device or ("cpu" if args.dry_run else "cuda"),
                  budget_s=args.budget_s, only=args.only, keep_models=args.keep_models, threads=args.threads,
                  seed=args.seed, **{**sizes, **given})


def job_main(args: argparse.Namespace) -> int:
    """Inside an isolated job's process: run it, write its result beside the logs."""
    from lnkit.io import atomic_write_json

    cfg = Config(**json.loads(args.config))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: nothing left over
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = run_job(args.job, cfg, Path(args.workdir))
    print(json.dumps(result, indent=1, default=str), flush=True)
    atomic_write_json(Path(args.workdir) / "parts" / f"{args.job}.json", result)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        return job_main(args)
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("gpu_check: needs CUDA (torch.cuda.is_available() is False); on a CPU run it with --dry-run",
                  file=sys.stderr)
            return 2
        if importlib.util.find_spec("vllm") is None:
            print("gpu_check: needs vLLM: pip install -e '.[gpu]' (vLLM pins its own torch and transformers)",
                  file=sys.stderr)
            return 2
    cfg = config_from(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    summary = run_check(cfg)
    print(report(summary))
    print(f"summary: {cfg.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
