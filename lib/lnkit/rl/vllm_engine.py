"""The ``vllm`` rollout backend (GPU; the ``gpu`` extra): :class:`~lnkit.rl.rollout.RolloutEngine` on vLLM.

One engine lives for the whole RL run (building one costs tens of seconds); the trainer pushes its weights into
it before each rollout batch instead of restarting it, the paper's hot swap (Section 5.2.3):

- **bf16/fp32** rollouts: :meth:`VLLMEngine.load_weights` streams ``(name, tensor)`` pairs into the running
  model's own ``load_weights`` (which maps our checkpoint names onto vLLM's fused q/k/v and gate/up
  parameters), then drops the prefix cache, whose keys and values belong to the old weights. The engine runs
  in this process (``distributed_executor_backend="external_launcher"``), so the model is reachable.
- **FP8** rollouts (``fp8=True``, vLLM's ``quantization="fp8"``: per-tensor weight scales, dynamic per-token
  activation scales, the scheme :func:`lnkit.rl.rollout.fp8_qdq` emulates on CPU): a quantised parameter
  cannot take high-precision weights in place, so the new weights are written to the engine's own model
  folder and vLLM's ``reload_weights`` reads and re-quantises them there.

Log-probabilities are those of the distribution sampled from (``logprobs_mode="processed_logprobs"``: after
temperature and top-p), the same contract as the torch backend, so GRPO's ratio and the FP8 gap mean the same.

Not exercised on the CPU machines this project is tested on: ``tests/test_gpu.py`` checks it where CUDA and
vLLM exist (greedy tokens equal the torch backend's, and a weight push changes what is sampled).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lnkit.data.chat import EOS_TEXT, EOT
from lnkit.rl.rollout import Rollout, RolloutEngine
from lnkit.vllm_backend import check_servable


class VLLMEngine(RolloutEngine):
    """Rollouts from vLLM. ``model``: the policy (a transformers model with its tokenizer ``tok``); its weights
    are saved to ``workdir`` (a temporary folder by default) for vLLM to load, then pushed on each
    :meth:`load_weights`."""

    def __init__(self, model, tok, *, fp8: bool = False, dtype: str = "bfloat16", workdir: str | Path | None = None,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 4096, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("rollout backend 'vllm' needs the gpu extra: pip install -e '.[gpu]' "
                               "(CUDA machines only); backend 'torch' runs anywhere") from e
        import lnkit.model  # noqa: F401  (registers nemotron-nas with transformers' Auto classes)
        from lnkit.model.export import check_vllm_compatible

        check_vllm_compatible(model.config)
        self.tok, self.fp8 = tok, fp8
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="lnkit-vllm-")
        self.folder = Path(workdir or self._tmp.name)
        self._save(model)
        check_servable(self.folder)  # what vLLM's loader cannot serve is named before it loads anything
        # one process, the trainer's: the model inside the engine is reachable for in-place weight pushes
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        self.llm = LLM(model=str(self.folder), dtype=dtype, quantization="fp8" if fp8 else None, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=min(max_model_len, model.config.max_position_embeddings),
                       distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True)
        self.stop = [i for i in (tok.convert_tokens_to_ids(t) for t in (EOT, EOS_TEXT)) if isinstance(i, int) and i >= 0]

    def _save(self, model) -> None:
        model.save_pretrained(self.folder, safe_serialization=True)
        self.tok.save_pretrained(self.folder)

    def _inner(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def load_weights(self, model) -> None:
        """Push the trainer's current weights into the running engine (see the module docstring)."""
        if self.fp8:
            self._save(model)
            self.llm.collective_rpc("reload_weights")
        else:
            inner = self._inner()
            for name, tensor in model.state_dict().items():
                inner.load_weights([(name, tensor.detach())])
        self.llm.reset_prefix_cache()

    def sample(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, progress=None):
        from vllm import SamplingParams

        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n={n}, max_new_tokens={max_new_tokens}: expected >= 1")
        if any(not p for p in prompts):
            raise ValueError("an empty prompt cannot be sampled from")
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                                stop_token_ids=self.stop, logprobs=0, skip_special_tokens=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        rollouts = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            for c in o.outputs:
                ids = list(c.token_ids)
                # each position's dict holds the sampled token (logprobs=0 asks for it alone)
                lps = [d[t].logprob for t, d in zip(ids, c.logprobs or [])]
                rollouts.append(Rollout(index=i, prompt_ids=list(p), completion_ids=ids, logprobs=lps,
                                        finished=bool(ids) and ids[-1] in self.stop))
                if progress is not None:
                    progress.update(1)
        return rollouts
