"""Generation through vLLM (the ``gpu`` extra): the real-scale backend of :func:`lnkit.generate.generate`.

vLLM loads a checkpoint folder, not a live module, so ``model`` is a folder path or a transformers model
whose ``name_or_path`` is one (as after ``from_pretrained``). Engines are cached per folder: building
one costs tens of seconds. Only imported when ``backend="vllm"``; never on the CPU path.

vLLM serves ``nemotron-nas`` folders with its own ``DeciLMForCausalLM``; it reads the config through
transformers, which knows ``model_type: nemotron-nas`` once :mod:`lnkit.model` is imported (it is, below), or
through the code and ``auto_map`` every lnkit folder carries (``trust_remote_code=True``, for engines that run
the model in a process of their own). :func:`check_servable` refuses, before loading, what vLLM's loader
cannot serve (:func:`lnkit.model.export.check_vllm_compatible`).
"""

from __future__ import annotations

from functools import lru_cache


def check_servable(path, tensor_parallel_size: int = 1) -> None:
    """Refuse, before vLLM loads anything, a ``nemotron-nas`` folder its loader cannot serve
    (:func:`lnkit.model.export.check_vllm_compatible` names every reason); other model types pass."""
    import json
    from pathlib import Path

    from lnkit.model.config import NemotronNasConfig
    from lnkit.model.export import check_vllm_compatible

    if json.loads((Path(path) / "config.json").read_text()).get("model_type") == "nemotron-nas":
        check_vllm_compatible(NemotronNasConfig.from_pretrained(path), tensor_parallel_size)


@lru_cache(maxsize=2)
def _engine(path: str, dtype: str, gpu_memory_utilization: float):
    from vllm import LLM

    return LLM(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)


def generate_vllm(model, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int = 0, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85) -> list[dict]:
    """Same contract as :func:`lnkit.generate.generate`: ``{"text", "tokens", "finished"}`` per prompt."""
    try:
        from vllm import SamplingParams
    except ImportError as e:
        raise RuntimeError("backend='vllm' needs the gpu extra: pip install -e '.[gpu]' (CUDA machines only)") from e
    import lnkit.model  # noqa: F401  (registers nemotron-nas with transformers' Auto classes)

    path = model if isinstance(model, str) else getattr(model, "name_or_path", "")
    if not path:
        raise ValueError("backend='vllm' needs a checkpoint folder (or a model loaded from one)")
    check_servable(path)
    llm = _engine(str(path), dtype, gpu_memory_utilization)
    tok = llm.get_tokenizer()
    stop = [t for t in (tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>"))
            if isinstance(t, int) and t >= 0]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=stop, skip_special_tokens=False)
    # The prompts are rendered already (they start with <|begin_of_text|>): pass token ids, add nothing.
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    return [{"text": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids),
             "finished": o.outputs[0].finish_reason == "stop"} for o in outs]
