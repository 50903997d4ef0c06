"""Where a ``nemotron-nas`` model goes next: Megatron-core for training, vLLM for serving, NVIDIA's own code.

**Megatron-core** (``megatron/core/transformer/heterogeneous/heterogeneous_config.py``,
``HeterogeneousTransformerConfig``) reads a JSON with a ``block_configs`` list, given as
``heterogeneous_layers_config_path`` or ``heterogeneous_layers_config_encoded_json``. Each entry has an
``attention`` dict (``no_op``, ``replace_with_linear``, ``num_query_groups``; HF's ``n_heads_in_group`` is
accepted and converted) and an ``ffn`` or ``mlp`` dict (``no_op``, ``replace_with_linear``,
``ffn_hidden_size``; HF's ``ffn_mult`` is accepted and converted by the same 256-rounding rule).
:func:`megatron_block_configs` writes the explicit Megatron names, so widths are exact whatever produced
them (an explicit tiny-model ``intermediate_size`` included); the global ``TransformerConfig`` fields
(``num_layers``, ``hidden_size``, ``num_attention_heads``, ``kv_channels`` = head size, RMSNorm, SwiGLU,
no linear bias) are the caller's, as in Megatron's own Llama-Nemotron recipes. Megatron builds a linear block
as a (fused-)norm + ``ColumnParallelLinearGathered`` and a no-op block as ``IdentityOp`` with no norm: the
same tensors as this format.

**vLLM** (``vllm/model_executor/models/nemotron_nas.py``, ``DeciLMForCausalLM``), read for this module:

- each layer builds ``DeciLMAttention`` (vLLM's ``LlamaAttention``) with ``num_kv_heads =
  num_attention_heads // n_heads_in_group`` unless ``attention.no_op``, and ``LlamaMLP`` of width
  ``_ffn_mult_to_intermediate_size(ffn_mult, hidden)`` unless ``ffn.no_op``. ``replace_with_linear`` is never
  read: a linear block would be built as a full attention with ``n_heads_in_group=None`` (a crash) or an MLP
  from ``ffn_mult=None``; so linear blocks are refused here.
- the width comes from ``ffn_mult`` whenever the block has that attribute (ours always does), so an explicit
  ``intermediate_size`` the rule does not reproduce would load with the wrong shape: refused.
- tensor parallelism: vLLM's ``ModelConfig`` requires ``num_attention_heads`` divisible by the TP size.
- per-layer KV-head counts: every layer gets its own ``num_kv_heads``. vLLM's ``LlamaAttention`` asserts
  ``kv % tp == 0`` (``kv >= tp``) or ``tp % kv == 0`` (replicated KV heads) for tensor-parallel size ``tp``.
  The KV cache manager (``vllm/v1/core/kv_cache_utils.py``) serves full-attention layers of different sizes
  through ``UniformTypeKVCacheSpecs`` in recent releases, but releases without it unify page sizes by
  scaling block sizes (``unify_kv_cache_spec_page_size``), which raises unless every layer's page, i.e. its
  KV-head count at equal head size, divides the largest. ``ModelConfig.get_total_num_kv_heads`` also reports
  the *first* attention layer's count for the whole model. We therefore require each layer's count to divide
  the largest (the released LN-Super/Ultra configs use 8 KV heads everywhere and pass).
- no attention layer at all: ``get_total_num_kv_heads`` raises "Couldn't determine number of kv heads".
- a first layer whose attention is a no-op: ``DeciLMDecoderLayer.forward`` skips the attention and its
  input norm, then calls the post-attention norm as a fused residual norm with ``residual=None`` on the
  first layer, which the fused kernel does not accept: refused.
- released sink/window/sparsify fields are ignored by vLLM (and by :mod:`lnkit.model.modeling`): refused
  when set, since the served model would silently differ.

vLLM reads the config through transformers: a folder saved by lnkit carries its own code and an ``auto_map``
(:mod:`lnkit.model.standalone`), so a serving process reads it with ``trust_remote_code=True``, or after
``import lnkit.model`` (which registers ``nemotron-nas``) without it.

**NVIDIA's remote code** (``modeling_decilm.py`` shipped with the released checkpoints, ``DeciLMForCausalLM``),
read for :func:`deci_compatibility`: ``DeciLMAttention`` sets ``head_dim = hidden_size // num_attention_heads``
(raising unless it divides exactly) and never reads a ``head_dim`` key; ``DeciLMMLP`` takes its width from
``_ffn_mult_to_intermediate_size(ffn_mult, hidden_size)`` (:func:`lnkit.blocks.ffn_width`) and never reads an
explicit ``intermediate_size``. lnkit honours both (tiny models need them), so such a config means one thing here
and another there (a shape error when NVIDIA's code loads the weights). Linear and no-op blocks it builds as
lnkit does. :func:`lnkit.model.stream_convert.convert_llama_folder` refuses such a source
unless told ``allow_lnkit_only=True``; Llama-3 8B/70B/405B shapes have neither.
"""

from __future__ import annotations

import torch

from lnkit.blocks import ffn_width
from lnkit.model.config import unsupported_extras


class VllmCompatibilityError(ValueError):
    """vLLM's ``DeciLMForCausalLM`` cannot serve this config; the message lists every reason."""


class DeciCompatibilityError(ValueError):
    """NVIDIA's ``DeciLMForCausalLM`` code would read this config differently; the message lists every field
    (:func:`deci_compatibility`)."""


def _config(config_or_model):
    return getattr(config_or_model, "config", config_or_model)


def megatron_block_configs(config) -> dict:
    """``{"block_configs": [...]}`` in the names Megatron-core's ``HeterogeneousTransformerConfig`` reads.

    Pass ``json.dumps`` of it as ``heterogeneous_layers_config_encoded_json`` (or write it to a file for
    ``heterogeneous_layers_config_path``), with ``num_layers = num_hidden_layers`` and
    ``kv_channels = head size``.
    """
    c = _config(config)
    if problems := unsupported_extras(c):
        raise ValueError("cannot export to Megatron-core: " + "; ".join(problems))
    blocks = []
    for b in c.block_configs:
        a, f = b.attention, b.ffn
        blocks.append({
            "attention": {"no_op": a.no_op, "replace_with_linear": a.replace_with_linear,
                          "num_query_groups": a.num_kv_heads(c.num_attention_heads) or None},
            "mlp": {"no_op": f.no_op, "replace_with_linear": f.replace_with_linear,
                    "ffn_hidden_size": f.width(c.hidden_size) or None},
        })
    return {"block_configs": blocks}


def megatron_state_dict(model) -> dict:
    """The model's weights under Megatron-core's names for the heterogeneous GPT of
    :func:`megatron_block_configs`, built with the local (non-Transformer-Engine) layer spec
    (``get_gpt_heterogeneous_layer_spec(config, use_te=False)``).

    Q, K and V go into one ``linear_qkv`` matrix, grouped per KV head: for each group, its query heads, then
    its K head, then its V head; gate and up go into ``linear_fc1`` (gate first). A linear block's matrix is
    the module's own ``weight``. No-op blocks have no entry, as in both formats. Checked against
    megatron-core 0.16.1 on CPU: same tensor names and shapes, logits within 1e-6 (tests/test_model.py).
    """
    c, sd = model.config, model.state_dict()
    if c.attention_bias or c.mlp_bias:
        raise ValueError("megatron_state_dict maps bias-free models only (Megatron's add_bias_linear covers "
                         "attention and MLP together; Llama-Nemotron has no biases)")
    h, heads = c.hidden_size, c.num_attention_heads
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"],
           "output_layer.weight": sd["lm_head.weight"]}
    for i, b in enumerate(c.block_configs):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        if b.attention.kind != "no_op":
            out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        if b.attention.kind == "attention":
            g = b.attention.num_kv_heads(heads)
            parts = [sd[src + f"self_attn.{x}_proj.weight"].reshape(g, -1, h) for x in "qkv"]
            out[dst + "self_attention.linear_qkv.weight"] = torch.cat(parts, 1).reshape(-1, h)
            out[dst + "self_attention.linear_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        elif b.attention.kind == "linear":
            out[dst + "self_attention.weight"] = sd[src + "self_attn.linear_attn.weight"]
        if b.ffn.kind != "no_op":
            out[dst + "pre_mlp_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        if b.ffn.kind == "ffn":
            out[dst + "mlp.linear_fc1.weight"] = torch.cat([sd[src + "mlp.gate_proj.weight"],
                                                            sd[src + "mlp.up_proj.weight"]])
            out[dst + "mlp.linear_fc2.weight"] = sd[src + "mlp.down_proj.weight"]
        elif b.ffn.kind == "linear":
            out[dst + "mlp.weight"] = sd[src + "mlp.linear_mlp.weight"]
    return out


def vllm_compatibility(config, tensor_parallel_size: int = 1) -> list[str]:
    """Every reason vLLM's ``DeciLMForCausalLM`` could not serve ``config`` (a config or a model); [] if none.

    See the module docstring for what vLLM's implementation does and where each rule comes from, and
    :func:`deci_compatibility` for the fields NVIDIA's own remote code reads differently.
    """
    c = _config(config)
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size={tp!r}: expected a positive integer")
    problems = []
    if c.num_attention_heads % tp:
        problems.append(f"num_attention_heads={c.num_attention_heads} is not divisible by tensor_parallel_size={tp}")
    if c.block_configs and c.block_configs[0].attention.no_op:
        problems.append("block_configs[0].attention.no_op: vLLM's decoder layer calls its fused residual norm "
                        "with no residual when the first layer's attention is a no-op")
    kv_counts = {}
    for i, b in enumerate(c.block_configs):
        a, f = b.attention, b.ffn
        if a.replace_with_linear:
            problems.append(f"block_configs[{i}].attention.replace_with_linear: vLLM has no linear attention block")
        if f.replace_with_linear:
            problems.append(f"block_configs[{i}].ffn.replace_with_linear: vLLM has no linear FFN block")
        if f.kind == "ffn" and f.intermediate_size is not None:
            rule = ffn_width(f.ffn_mult, c.hidden_size) if f.ffn_mult is not None else None
            if rule != f.intermediate_size:
                problems.append(f"block_configs[{i}].ffn.intermediate_size={f.intermediate_size}: vLLM takes the "
                                f"width from ffn_mult={f.ffn_mult} ({rule} by the released rule), not from an "
                                "explicit intermediate_size")
        if a.kind == "attention":
            kv = a.num_kv_heads(c.num_attention_heads)
            kv_counts[i] = kv
            if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
                problems.append(f"block_configs[{i}].attention.n_heads_in_group={a.n_heads_in_group}: {kv} KV heads "
                                f"cannot be split over tensor_parallel_size={tp}")
    if not kv_counts:
        problems.append("no layer has attention: vLLM cannot determine the number of KV heads")
    else:
        top = max(kv_counts.values())
        for i, kv in kv_counts.items():
            if top % kv:
                problems.append(f"block_configs[{i}].attention.n_heads_in_group: {kv} KV heads does not divide the "
                                f"largest per-layer count {top}; vLLM's KV cache pages cannot be unified")
    problems += unsupported_extras(c)
    return problems


def check_vllm_compatible(config, tensor_parallel_size: int = 1) -> None:
    """Raise :class:`VllmCompatibilityError` listing every problem :func:`vllm_compatibility` finds."""
    if problems := vllm_compatibility(config, tensor_parallel_size):
        raise VllmCompatibilityError(f"vLLM cannot serve this nemotron-nas config ({len(problems)} problem"
                                     f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems))


def deci_compatibility(config) -> list[str]:
    """Every field NVIDIA's own ``DeciLMForCausalLM`` code (the released checkpoints' ``modeling_decilm.py``)
    reads differently from lnkit, one message per field (per block for the FFN widths) naming both readings;
    [] if none. ``config`` is a ``NemotronNasConfig`` or a model. See the module docstring.

    >>> from lnkit.model.config import NemotronNasConfig
    >>> parent = {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 3.0, "intermediate_size": 128}}
    >>> c = NemotronNasConfig(vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                       head_dim=32, block_configs=[parent])
    >>> for m in deci_compatibility(c): print(m)
    head_dim=32: lnkit gives the 1 attention layer(s) heads of 32; NVIDIA's DeciLM code ignores head_dim and uses hidden_size // num_attention_heads = 16
    block_configs[0].ffn.intermediate_size=128: lnkit builds the FFN 128 wide; NVIDIA's DeciLM code ignores intermediate_size and builds 256 from ffn_mult=3.0 (lnkit.blocks.ffn_width)
    >>> llama_70b = {"attention": {"n_heads_in_group": 8}, "ffn": {"ffn_mult": 5.25}}
    >>> deci_compatibility(NemotronNasConfig(vocab_size=10, hidden_size=8192, num_hidden_layers=1,
    ...                                      num_attention_heads=64, block_configs=[llama_70b]))
    []
    """
    c = _config(config)
    problems = []
    heads, h = c.num_attention_heads, c.hidden_size
    n_attn = len(c.attention_layers())
    if n_attn and (h % heads or c.head_size != h // heads):
        nvidia = (f"uses hidden_size // num_attention_heads = {h // heads}" if not h % heads else
                  f"raises: hidden_size={h} is not divisible by num_attention_heads={heads}")
        field = f"head_dim={c.head_dim}" if c.head_dim else f"hidden_size={h}, num_attention_heads={heads}"
        problems.append(f"{field}: lnkit gives the {n_attn} attention layer(s) heads of {c.head_size}; "
                        f"NVIDIA's DeciLM code ignores head_dim and {nvidia}")
    for i, b in enumerate(c.block_configs):
        f = b.ffn
        if f.kind == "ffn" and f.intermediate_size is not None:
            rule = ffn_width(f.ffn_mult, h) if f.ffn_mult is not None else None
            if rule != f.intermediate_size:
                nvidia = (f"builds {rule} from ffn_mult={f.ffn_mult} (lnkit.blocks.ffn_width)" if rule is not None
                          else "computes the width from ffn_mult=None and fails")
                problems.append(f"block_configs[{i}].ffn.intermediate_size={f.intermediate_size}: lnkit builds the "
                                f"FFN {f.intermediate_size} wide; NVIDIA's DeciLM code ignores intermediate_size and "
                                + nvidia)
    return problems
