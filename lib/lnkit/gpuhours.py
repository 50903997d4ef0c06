"""GPU-hours of a stage on a named GPU, from what it computes: tokens trained, tokens only read, tokens decoded.

Each stage module says what it computes for its parameters (``work(p, run) -> Work``: token counts, not
times); this turns a :class:`Work` into GPU-hours for a model config on a GPU of :mod:`lnkit.deploy`:

- training: ``6 N`` FLOPs per token (forward and backward through ``N`` parameters), forward-only tokens
  (a teacher, calibration, scoring) ``2 N``, both at ``mfu`` of the GPU's dense BF16 peak (default 0.4, a
  typical model-FLOPs utilisation of Megatron / FSDP training in BF16 on H100);
- generation: tokens over the roofline decode throughput per GPU of :func:`lnkit.deploy.best_throughput`
  (FP8 weights and KV cache, the tensor-parallel size up to 8 that gives the most per GPU, a 1024-token
  prompt and the stage's output length, the largest batch whose KV cache fits).

Left out, so these are lower bounds where they matter: attention FLOPs (``12 L d s`` per token, 10-20% more
at 8k-16k sequences), recomputation, evaluation between steps, start-up and checkpoint time. Stages after
the search are priced on the child's config when one is given, else on the parent's (an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from lnkit import deploy


@dataclass(frozen=True)
class Work:
    """What a stage computes, in tokens through the model named by ``model`` ("parent" or "child")."""

    train: float = 0.0  # tokens trained (forward and backward)
    forward: float = 0.0  # tokens through a forward pass only
    generate: float = 0.0  # tokens decoded
    gen_len: int = 1024  # output length of a generated sequence (sets the batch the KV cache allows)
    model: str = "parent"
    forward_model: str = ""  # whose forward ``forward`` is when not ``model``'s (distillation: the teacher)


def decode_tok_s_per_gpu(config, gpu: str, gen_len: int) -> float:
    """Roofline decode tokens/s per GPU with FP8 weights and KV cache, at the tensor-parallel size (1 to 8)
    that gives the most per GPU (few GPUs leave little room for the KV cache, so small batches).

    >>> round(decode_tok_s_per_gpu("Llama-3.3-70B", "H100", 1024)) > 500
    True
    """
    best = 0.0
    for tp in (1, 2, 4, 8):
        if tp >= deploy.gpus_needed(config, gpu, "fp8"):
            best = max(best, deploy.best_throughput(config, gpu, tp, prompt_len=1024, output_len=gen_len)["per_gpu_tok_s"])
    if best <= 0:
        raise ValueError(f"no tensor-parallel size up to 8 holds the model and one {1024 + gen_len}-token request")
    return best


def hours(work: Work, config, gpu: str = "H100", mfu: float = 0.4, forward_config=None) -> dict:
    """``{"train", "forward", "generate", "total"}`` GPU-hours of ``work`` for ``config`` on ``gpu``
    (``forward`` through ``forward_config`` when given: a teacher of another size).

    >>> h = hours(Work(train=40e9), "LN-Super", "H100")  # 40B tokens of distillation, 49.9B parameters
    >>> round(h["total"])  # 6 x 49.9e9 x 40e9 / (0.4 x 989e12) / 3600
    8404
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
    n = deploy.count_parameters(config)
    n_fwd = n if forward_config is None else deploy.count_parameters(forward_config)
    peak = deploy.get_gpu(gpu).peak_flops("bf16") * mfu
    out = {"train": 6 * n * work.train / peak / 3600, "forward": 2 * n_fwd * work.forward / peak / 3600,
           "generate": work.generate / decode_tok_s_per_gpu(config, gpu, work.gen_len) / 3600 if work.generate else 0.0}
    out["total"] = sum(out.values())
    return out
