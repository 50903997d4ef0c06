"""The model Puzzle produces: a Llama whose layers differ, in the released Llama-Nemotron checkpoint format.

Puzzle (Bercovich et al., 2024), the first stage of Llama-Nemotron, replaces the parent's uniform layers by
a choice per layer from a library of cheaper blocks, trained by block-wise local distillation and picked by
a mixed-integer program under a throughput/memory budget. Each layer keeps the parent's pre-norm residual
shape, but its attention may use fewer KV heads (a larger ``n_heads_in_group``), become a single linear
map, or vanish (no-op); its FFN may be narrower (``ffn_mult``), linear, or vanish. LN-Super-49B keeps 49 of
80 attention layers, LN-Ultra-253B 64 of 162 (and 81 of its FFNs are no-op, the result of FFN Fusion).

Format facts (what the released ``config.json`` and safetensors hold, and what this package writes):

- ``model_type: "nemotron-nas"``, ``architectures: ["DeciLMForCausalLM"]``, a ``block_configs`` list with
  one ``{"attention": {no_op, replace_with_linear, n_heads_in_group}, "ffn": {no_op, replace_with_linear,
  ffn_mult}}`` per layer; ``num_key_value_heads`` and ``intermediate_size`` are ``null``;
- FFN width ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256 (:func:`lnkit.blocks.ffn_width`);
- weight names are Llama's; a linear attention is ``model.layers.N.self_attn.linear_attn.weight`` behind
  ``input_layernorm``, a linear FFN ``model.layers.N.mlp.linear_mlp.weight`` behind
  ``post_attention_layernorm``; a no-op block has no tensor at all, not even its norm.

Deviations: tiny models may give an FFN an explicit ``intermediate_size`` (the 256 rounding would make
every width of a hidden-128 model 256); released checkpoints never do, and :mod:`lnkit.model.export`
refuses such configs for vLLM. :func:`~lnkit.model.export.deci_compatibility` lists them, and a ``head_dim`` other
than hidden/heads, as fields NVIDIA's own remote code would read differently. Released configs' sink-attention / window fields are kept but must be
unset: nothing here implements them. Saved configs drop the released ``auto_map`` (remote code this
package does not ship); ``import lnkit.model`` registers the classes with ``AutoConfig`` and
``AutoModelForCausalLM`` instead, so no ``trust_remote_code`` is needed.

Modules: :mod:`~lnkit.model.config` (the config), :mod:`~lnkit.model.modeling` (the model),
:mod:`~lnkit.model.convert` (``from_llama``), :mod:`~lnkit.model.stream_convert` (``convert_llama_folder``: the same
conversion folder to folder, tensor by tensor, for 70B-size parents), :mod:`~lnkit.model.export` (Megatron block
configs and weight names, vLLM compatibility, and ``deci_compatibility``: what NVIDIA's own remote code would read
differently).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from lnkit.model.config import NemotronNasConfig
from lnkit.model.convert import from_llama
from lnkit.model.export import (
    DeciCompatibilityError,
    VllmCompatibilityError,
    check_vllm_compatible,
    deci_compatibility,
    megatron_block_configs,
    megatron_state_dict,
    vllm_compatibility,
)
from lnkit.model.modeling import CheckpointMismatchError, NemotronNasForCausalLM

AutoConfig.register(NemotronNasConfig.model_type, NemotronNasConfig, exist_ok=True)
AutoModelForCausalLM.register(NemotronNasConfig, NemotronNasForCausalLM, exist_ok=True)


def __getattr__(name: str):
    """``convert_llama_folder`` on first use: imported eagerly, ``python -m lnkit.model.stream_convert`` would find
    its module already loaded and warn that it runs twice."""
    if name == "convert_llama_folder":
        from lnkit.model.stream_convert import convert_llama_folder

        return convert_llama_folder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointMismatchError",
    "DeciCompatibilityError",
    "NemotronNasConfig",
    "NemotronNasForCausalLM",
    "VllmCompatibilityError",
    "check_vllm_compatible",
    "convert_llama_folder",
    "deci_compatibility",
    "from_llama",
    "megatron_block_configs",
    "megatron_state_dict",
    "vllm_compatibility",
]
