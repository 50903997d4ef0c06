"""What the tests share: the one factory of tiny random Llamas (by default hidden 64, 3 layers, 4 heads,
4 KV heads, FFN 128, with perturbed norms), random token batches, a one-thread fixture body, and a run
folder holding the smoke run's stage 00 (the world, its splits and a tiny parent)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(seed=0, perturb: bool = True, **config) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` of :data:`TINY`'s shape, any field overridden by ``config``; with
    ``perturb``, norms (and biases, if any) moved off their initial values, so a dropped or swapped norm
    changes the output."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**{**TINY, **config})).eval()
    if perturb:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return m


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (4, 32), generator=g) for _ in range(n)]


def one_thread():
    """Tiny matrices: a second thread only adds contention (30x slower on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smoke_stage00(run_dir: Path) -> Path:
    """``run_dir`` with the smoke run's stage 00 done in it (what the RL stages' tests start from)."""
    from lnkit import stage
    from lnkit.runs import load_run
    from lnkit.stages import parent

    _, params = load_run(ROOT / "papermill_runs" / "smoke.yaml")
    p = dataclasses.replace(params[parent.NAME], run_dir=str(run_dir))
    stage.finish(p, parent.run(p)["metrics"])
    return run_dir
