"""``from_llama``: a transformers Llama as an all-parent ``nemotron-nas`` model with the same logits.

Puzzle starts from the parent: every layer keeps the parent's attention and FFN, and the search then swaps
some of them for cheaper blocks. That starting point is a ``nemotron-nas`` model whose block configs all
say "parent" (``n_heads_in_group = heads / kv_heads``, the parent's FFN width). Weight names are Llama's,
so the conversion is a config translation and a strict ``load_state_dict``.

The FFN width is written as ``ffn_mult`` when the released rule reproduces it (Llama-3 8B/70B: 5.25), else
as ``ffn_mult`` plus an explicit ``intermediate_size`` (tiny models; see :mod:`lnkit.blocks`). ``head_dim``
overrides, tied embeddings, ``attention_bias``/``mlp_bias`` and any RoPE scaling carry over. The model is
built at full size first (random init, then overwritten): fine for the models this runs on, but a 70B parent
would hold its weights twice. For a parent on disk use :func:`lnkit.model.stream_convert.convert_llama_folder`
(``python -m lnkit.model.stream_convert SRC DST``): the same config and tensors, folder to folder, one output
shard in memory at a time.
"""

from __future__ import annotations

import copy

import torch

from lnkit.blocks import ffn_width
from lnkit.model.config import NemotronNasConfig, rope_settings
from lnkit.model.modeling import NemotronNasForCausalLM


def parent_block(num_heads: int, num_kv_heads: int, intermediate_size: int, hidden_size: int) -> dict:
    """The released-format block config of a parent (Llama) layer.

    >>> parent_block(64, 8, 28672, 8192)["ffn"]
    {'no_op': False, 'replace_with_linear': False, 'ffn_mult': 5.25}
    >>> parent_block(4, 2, 384, 128)["ffn"]["intermediate_size"]
    384
    """
    mult = intermediate_size * 3 / (2 * hidden_size)
    ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": mult}
    if ffn_width(mult, hidden_size) != intermediate_size:
        ffn["intermediate_size"] = intermediate_size
    return {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": num_heads // num_kv_heads},
            "ffn": ffn}


def nas_config_from_llama(config) -> NemotronNasConfig:
    """The all-parent ``NemotronNasConfig`` of a ``LlamaConfig``."""
    c = config
    heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None)
    theta, scaling = rope_settings(c)
    return NemotronNasConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        block_configs=[parent_block(heads, kv, c.intermediate_size, c.hidden_size) for _ in range(c.num_hidden_layers)],
        head_dim=head_dim if head_dim and head_dim != c.hidden_size // heads else None,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps, use_cache=c.use_cache,
        tie_word_embeddings=c.tie_word_embeddings, rope_theta=theta, rope_scaling=scaling,
        attention_bias=c.attention_bias, attention_dropout=c.attention_dropout, mlp_bias=c.mlp_bias,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        attn_implementation=c._attn_implementation,
    )


@torch.no_grad()
def from_llama(model) -> NemotronNasForCausalLM:
    """Any transformers ``LlamaForCausalLM`` as an all-parent ``NemotronNasForCausalLM`` (same device,
    dtype, train/eval mode, generation config and logits)."""
    if getattr(model.config, "pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={model.config.pretraining_tp}: only 1 is supported (as in transformers)")
    p = next(model.parameters())
    nas = NemotronNasForCausalLM(nas_config_from_llama(model.config)).to(device=p.device, dtype=p.dtype)
    nas.load_state_dict(model.state_dict(), strict=True)
    if nas.config.tie_word_embeddings:
        nas.tie_weights()
    nas.generation_config = copy.deepcopy(model.generation_config)
    return nas.train(model.training)
