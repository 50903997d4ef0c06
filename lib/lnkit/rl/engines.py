"""The rollout backends by name: what a stage's ``rollout_backend`` parameter picks."""

from __future__ import annotations

from lnkit.rl.rollout import RolloutEngine, TorchEngine

BACKENDS = ("torch", "vllm")


def make_engine(backend: str, model, tok, *, max_batch: int = 64, fp8: bool = False) -> RolloutEngine:
    """A rollout engine by name: ``torch`` (anywhere) or ``vllm`` (CUDA and the gpu extra)."""
    if backend == "torch":
        return TorchEngine(model, tok, max_batch=max_batch, fp8=fp8)
    if backend == "vllm":
        from lnkit.rl.vllm_engine import VLLMEngine  # vllm is imported only here, on demand

        return VLLMEngine(model, tok, fp8=fp8)
    raise ValueError(f"rollout backend {backend!r}: expected one of {BACKENDS}")
