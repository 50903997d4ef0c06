"""Stage 00: the tiny world and the parent model.

The paper starts from Llama Instruct models: good instruction followers that answer directly, without
long reasoning. The tiny default builds that from scratch: it draws the world's splits, trains a BPE
tokenizer on them, and trains a small ``LlamaForCausalLM`` (fp32) on a mix of "pretraining" documents
(every fact of the world and every arithmetic step, see :mod:`lnkit.data.world`) and instruction
examples answered directly, with the system prompt absent, "on" or "off" at random so that the parent,
like Llama Instruct, ignores the toggle it has never been taught. Alternatively ``parent_checkpoint``
names a local Hugging Face Llama folder to use as the parent instead.

Notebook: ``notebooks/00_parent.ipynb``. Reads nothing; writes ``<run_dir>/00_parent/``: ``data/`` (the
splits, the world, the decontamination report), ``tokenizer/``, ``model/``, ``train_log.csv`` and the
evaluation (``eval_rows.jsonl``, ``eval_summary.{csv,json}``), which later stages read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lnkit import stage
from lnkit.checkpoints import load_model, save_model, stage_dir
from lnkit.data.chat import THINK_OFF, THINK_ON, render_prompt
from lnkit.data.splits import decontamination_report, load_split, make_split, save_items
from lnkit.data.tasks import DOMAINS, arithmetic_corpus
from lnkit.data.tokenizer import save_tokenizer, train_tokenizer
from lnkit.data.world import knowledge_corpus, make_world
from lnkit.eval import evaluate, save_results
from lnkit.gpuhours import Work
from lnkit.io import atomic_write_json
from lnkit.params import ParamError, RunParams, param
from lnkit.train.batches import PackedBatcher
from lnkit.train.loop import LoopConfig, train_loop
from lnkit.train.mix import parent_mix

NAME = "00_parent"


@dataclass
class Params(RunParams):
    """Stage 00 parameters (fields match ``notebooks/00_parent.ipynb``'s parameters cell)."""

    STAGE = NAME
    # --- the world
    world_seed: int = param(0, "seed of the fact base (creature and kind names)", lo=0)
    n_train: int = param(2000, "training items per domain for science, code, instruct and chat", lo=10)
    n_train_math: int = param(6000, "training math items (math is two thirds of the paper's SFT blend)", lo=10)
    math_level_weights: list[float] = param([6.0, 2.0, 1.0, 1.0, 1.0], "relative number of training math items per level 1..5", lo=0.0)
    n_val: int = param(60, "validation items per domain", lo=1)
    n_test: int = param(200, "test items per domain (fewer where a domain has fewer problems)", lo=1)
    vocab_size: int = param(1024, "BPE vocabulary size", lo=300, hi=200_000)
    # --- the parent
    parent_checkpoint: str = param("", "local Hugging Face Llama folder to use as the parent; '' trains the tiny one")
    hidden_size: int = param(128, "model width", lo=16)
    num_layers: int = param(6, "decoder layers", lo=1)
    num_heads: int = param(4, "attention heads", lo=1)
    num_kv_heads: int = param(4, "KV heads (Puzzle later tries fewer)", lo=1)
    intermediate_size: int = param(384, "FFN width", lo=8)
    steps: int = param(2400, "optimizer steps", lo=1)
    rows: int = param(8, "packed rows per step", lo=1)
    row_len: int = param(256, "tokens per packed row (several examples each, no cross-attention)", lo=32)
    lr: float = param(3e-3, "peak learning rate (warmup then cosine)", lo=1e-6, hi=1.0)
    warmup: int = param(50, "warmup steps", lo=0)
    doc_fraction: float = param(0.2, "share of training sequences that are pretraining documents", lo=0.0, hi=0.9)
    # --- evaluation
    eval_modes: list[str] = param(["off", "on"], "modes to evaluate", choices=["off", "on"], min_items=1)
    eval_k: int = param(1, "samples per prompt with thinking on (pass@1 averaged over them)", lo=1, hi=64)
    eval_max_new_tokens: int = param(64, "generation limit per answer", lo=1)

    def check(self):
        if self.parent_checkpoint and not Path(self.parent_checkpoint).is_dir():
            raise ParamError(f"stage {self.STAGE}: parent_checkpoint={self.parent_checkpoint!r} is not a folder; "
                             "give a local Hugging Face Llama checkpoint folder, or '' to train the tiny parent")
        if self.hidden_size % self.num_heads:
            raise ParamError(f"stage {self.STAGE}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if len(self.math_level_weights) != 5 or not any(self.math_level_weights):
            raise ParamError(f"stage {self.STAGE}: math_level_weights={self.math_level_weights} must be 5 "
                             "non-negative numbers (levels 1..5), not all zero")
        if self.num_heads % self.num_kv_heads:
            raise ParamError(f"stage {self.STAGE}: num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): training the parent from scratch, or none for a
    checkpoint; then its evaluation (every domain, each mode, ``eval_k`` samples)."""
    train = 0 if p.parent_checkpoint else p.steps * p.rows * p.row_len
    gen = p.n_test * 5 * len(p.eval_modes) * p.eval_k * p.eval_max_new_tokens
    return Work(train=train, generate=gen, gen_len=p.eval_max_new_tokens)


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads: none, it starts the pipeline."""
    return []


def run(p: Params) -> dict:
    """The whole stage: the world, the parent, its evaluation. Returns ``{"metrics", "log", "summary"}``."""
    stage.check_inputs(p, needs(p))
    out = stage.start(p)
    sizes = build_world(p)
    model, tok, log = train_parent(p)
    rows = evaluate(model, tok, load_split(p.run_dir, "test"), modes=tuple(p.eval_modes), k=p.eval_k,
                    max_new_tokens=p.eval_max_new_tokens, seed=p.seed, progress=p.progress)
    summary = save_results(rows, out, "eval")
    metrics = {
        "parameters": sum(q.numel() for q in model.parameters()),
        "final_loss": (sum(r["loss"] for r in log[-50:]) / len(log[-50:])) if log else None,
        "train_seconds": float(log[-1]["elapsed_s"]) if log else 0.0,
        "accuracy": {f"{s['mode']}/{s['domain']}/{s['difficulty']}": s["accuracy"] for s in summary},
        "splits": sizes,
    }
    return {"metrics": metrics, "log": log, "summary": summary, "rows": rows}


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"parameters": 1_410_000, "accuracy": {"off/all/all": 0.5}})
    '1.41M parameters, accuracy 0.500 (thinking off)'
    """
    return f"{metrics['parameters'] / 1e6:.2f}M parameters, accuracy {metrics['accuracy']['off/all/all']:.3f} (thinking off)"


def build_world(p: Params) -> dict:
    """Draw the splits, check decontamination, train the tokenizer; write them under ``data/``, ``tokenizer/``."""
    out = stage_dir(p.run_dir, NAME)
    world = make_world(p.world_seed)
    splits = {
        "train": make_split(world, "train", {d: p.n_train_math if d == "math" else p.n_train for d in DOMAINS},
                            seed=p.seed, level_weights={"math": p.math_level_weights}),
        "val": make_split(world, "val", {d: p.n_val for d in DOMAINS}, seed=p.seed),
        "test": make_split(world, "test", {d: p.n_test for d in DOMAINS}, seed=p.seed),
    }
    report = {s: decontamination_report(splits["train"], splits[s]) for s in ("val", "test")}
    bad = {s: r["flagged_ids"][:5] for s, r in report.items() if r["flagged"]}
    if bad:
        raise RuntimeError(f"decontamination failed: evaluation items overlap training: {bad}")
    for name, items in splits.items():
        save_items(items, out / "data" / f"{name}.jsonl")
    atomic_write_json(out / "data" / "world.json", {"kinds": world.kinds, "creatures": world.creatures})
    atomic_write_json(out / "data" / "decontamination.json", report)
    if not p.parent_checkpoint:
        texts = knowledge_corpus(world) + arithmetic_corpus() + [THINK_ON, THINK_OFF]
        for it in splits["train"]:
            texts += [render_prompt(it.prompt, "on"), it.direct, f"<think>\n{it.reasoning}\n</think>\n{it.direct}"]
        save_tokenizer(train_tokenizer(texts, p.vocab_size), out / "tokenizer")
    return {s: len(v) for s, v in splits.items()}


def training_examples(p: Params, tok) -> list[tuple[list[int], list[int]]]:
    """The parent's training mix (:func:`lnkit.train.mix.parent_mix`) for this stage's parameters."""
    return parent_mix(p.run_dir, tok, p.seed, p.doc_fraction)


def make_model(p: Params, tok) -> LlamaForCausalLM:
    torch.manual_seed(p.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.float()


def train_parent(p: Params):
    """Train the tiny parent (resuming from the stage's last checkpoint if there is one) and save it to
    ``model/``; or load ``parent_checkpoint``. Returns (model, tokenizer, per-step log)."""
    out = stage_dir(p.run_dir, NAME)
    device = p.setup_torch()
    if p.parent_checkpoint:
        model, tok = load_model(p.parent_checkpoint, device)
        if not isinstance(model, LlamaForCausalLM):
            raise ParamError(f"stage 00_parent: parent_checkpoint {p.parent_checkpoint} holds a "
                             f"{type(model).__name__}, not a LlamaForCausalLM")
        save_model(model, tok, out / "model")
        return model, tok, []
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    batches = PackedBatcher(training_examples(p, tok), p.rows, p.row_len, tok.pad_token_id, seed=p.seed)
    model = make_model(p, tok).to(device)
    cfg = LoopConfig(steps=p.steps, lr=p.lr, warmup=p.warmup, ckpt_every=max(50, p.steps // 10))
    rows = train_loop(model, batches, cfg, out, desc="parent", progress=p.progress, fingerprint=p.digest())
    save_model(model, tok, out / "model")
    return model, tok, rows
