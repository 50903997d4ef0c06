"""``NemotronNasForCausalLM``: the heterogeneous Llama of the released checkpoints, built from Llama's own parts.

Each layer is Llama's decoder layer with either sub-block swapped by its block config:

- attention: transformers' ``LlamaAttention`` (any ``n_heads_in_group``, so per-layer GQA widths), a linear
  block (``input_layernorm`` then ``self_attn.linear_attn``, hidden x hidden, no bias) or no-op (no weights,
  no norm: the residual passes through);
- FFN: ``LlamaMLP`` of the layer's own width, a linear block (``post_attention_layernorm`` then
  ``mlp.linear_mlp``) or no-op.

The Llama parts get a per-layer view of the model config (:class:`LayerConfig`) holding that layer's KV-head
count and FFN width; everything else, the attention implementation included, is read live from the model
config, so ``set_attn_implementation`` and sdpa/eager/flash dispatch work as for Llama. RoPE (llama3 scaling
included) is ``LlamaRotaryEmbedding`` over a plain ``LlamaConfig`` with the same RoPE settings.

KV cache: only real attention layers hold cache entries. Attention layer ``i`` writes to the compact cache
index ``config.attention_layers().index(i)``, so after a forward the cache has exactly as many layers as the
model has attention layers. transformers' ``generate`` would build ``DynamicCache(config=...)`` with one
entry per hidden layer; :meth:`NemotronNasForCausalLM._prepare_cache_for_generation` swaps that for a lazily
grown ``DynamicCache()``. Pass ``DynamicCache()`` (no config) when calling the model yourself.

Loading is strict: a checkpoint whose tensors do not match its block configs (a tensor missing, an extra one
such as a norm of a no-op block, a wrong shape) raises :class:`CheckpointMismatchError` listing them, where
transformers by default only warns and leaves random weights in place.

Works with transformers 5.x (``cache=`` keyword) and 4.5x (``past_key_values=``, as vLLM pins); the few
differences are resolved once, at import, by looking at transformers' own signatures.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from lnkit.blocks import BlockConfig
from lnkit.io import CheckpointError
from lnkit.model.config import NemotronNasConfig, rope_settings, unsupported_extras

_TF5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers >= 5.21 names the KV cache argument `cache`; older releases `past_key_values` (4.x also wants
# `cache_position`). Each call site below asks transformers' own signatures which spelling this release uses.
_ATTN_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
# The output field holding the cache (our forward accepts both `cache=` and `past_key_values=` as input).
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_PARAMS = inspect.signature(create_causal_mask).parameters


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not match its block configs; the message lists the offending names."""


class LayerConfig:
    """One layer's view of the model config: its own overrides, everything else read live from the model.

    Llama's attention and MLP read a handful of config fields (sizes, biases, ``_attn_implementation``); a view
    rather than a copy keeps the attention implementation in step with the model config.
    """

    def __init__(self, base, **overrides):
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name):  # only called for names not overridden here
        base = self.__dict__.get("_base")
        if base is None:  # half-built (copy/pickle probing for __setstate__ and the like)
            raise AttributeError(name)
        return getattr(base, name)


def rope_config(config) -> LlamaConfig:
    """A ``LlamaConfig`` carrying only what ``LlamaRotaryEmbedding`` reads (RoPE settings, head size)."""
    theta, scaling = rope_settings(config)
    return LlamaConfig(vocab_size=1, hidden_size=config.hidden_size, intermediate_size=1, num_hidden_layers=1,
                       num_attention_heads=config.num_attention_heads, head_dim=config.head_size,
                       max_position_embeddings=config.max_position_embeddings, rope_theta=theta,
                       rope_scaling=dict(scaling) if scaling else None, bos_token_id=None, eos_token_id=None)


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position=None):
    """transformers' ``create_causal_mask`` under whichever argument names this release gives it."""
    kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
          "inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds": inputs_embeds,
          "cache" if "cache" in _MASK_PARAMS else "past_key_values": cache}
    if "cache_position" in _MASK_PARAMS:
        kw["cache_position"] = cache_position
    return create_causal_mask(**kw)


class LinearAttention(nn.Module):
    """``replace_with_linear`` attention: one hidden x hidden matrix, no bias (``self_attn.linear_attn``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_attn = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.linear_attn(x)


class LinearMLP(nn.Module):
    """``replace_with_linear`` FFN: one hidden x hidden matrix, no bias (``mlp.linear_mlp``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


try:  # transformers' base for checkpointable layers (4.52+); a plain module is enough elsewhere
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module


class NemotronNasDecoderLayer(_LayerBase):
    """Llama's pre-norm residual layer, each sub-block a parent block, a linear block or nothing."""

    def __init__(self, config: NemotronNasConfig, block: BlockConfig, layer_idx: int, cache_idx: int | None):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.attention_kind, self.ffn_kind = block.attention.kind, block.ffn.kind
        self.layer_idx, self.cache_idx = layer_idx, cache_idx
        if self.attention_kind != "no_op":
            self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        if self.attention_kind == "attention":
            view = LayerConfig(config, head_dim=config.head_size,
                               num_key_value_heads=block.attention.num_kv_heads(config.num_attention_heads))
            self.self_attn = LlamaAttention(view, layer_idx=cache_idx)
        elif self.attention_kind == "linear":
            self.self_attn = LinearAttention(h)
        if self.ffn_kind != "no_op":
            self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)
        if self.ffn_kind == "ffn":
            self.mlp = LlamaMLP(LayerConfig(config, intermediate_size=block.ffn.width(h)))
        elif self.ffn_kind == "linear":
            self.mlp = LinearMLP(h)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        if self.attention_kind == "attention":
            out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **{_ATTN_CACHE_KW: cache}, **kwargs)
            hidden_states = hidden_states + out
        elif self.attention_kind == "linear":
            hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        if self.ffn_kind != "no_op":
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class NemotronNasModel(nn.Module):
    """Embeddings, the heterogeneous layers and the final norm (the ``model.`` prefix of the weight names)."""

    def __init__(self, config: NemotronNasConfig):
        super().__init__()
        if problems := unsupported_extras(config):
            raise NotImplementedError("; ".join(problems))
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        attn = config.attention_layers()
        self.layers = nn.ModuleList([
            NemotronNasDecoderLayer(config, b, i, attn.index(i) if i in attn else None)
            for i, b in enumerate(config.block_configs)
        ])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=rope_config(config))
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=False, output_hidden_states=False, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()  # no config: it grows to the attention layers only (see module docstring)
        past = cache.get_seq_length() if cache is not None else 0
        n = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=inputs_embeds.device)[None]
        if "cache_position" in _MASK_PARAMS:  # transformers 4.x: positions in the cache, passed to every layer
            kwargs.setdefault("cache_position", torch.arange(past, past + n, device=inputs_embeds.device))
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids,
                           kwargs.get("cache_position"))
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        states = []
        for layer in self.layers:
            if output_hidden_states:
                states.append(hidden)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=cache,
                           position_ids=position_ids, **kwargs)
        hidden = self.norm(hidden)
        if output_hidden_states:
            states.append(hidden)
        return hidden, (cache if use_cache else None), (tuple(states) if output_hidden_states else None)


class NemotronNasForCausalLM(PreTrainedModel, GenerationMixin):
    """The causal LM of the released ``nemotron-nas`` / ``DeciLMForCausalLM`` checkpoints."""

    config_class = NemotronNasConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NemotronNasDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # the 4.x spelling
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TF5 else ["lm_head.weight"]

    def __init__(self, config: NemotronNasConfig):
        super().__init__(config)
        self.model = NemotronNasModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, output_hidden_states=None,
                **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        for k in ("output_attentions", "return_dict"):
            kwargs.pop(k, None)
        hidden, cache, states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                                           use_cache=use_cache, output_hidden_states=bool(output_hidden_states),
                                           **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=states, **{OUTPUT_CACHE_FIELD: cache})

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds ``DynamicCache(config=...)``: one entry per hidden layer. Use a compact one instead."""
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if given is None:
            for name in ("cache", "past_key_values"):
                made = model_kwargs.get(name)
                if type(made) is DynamicCache:  # "dynamic" or "offloaded"; static caches are left as built
                    model_kwargs[name] = DynamicCache(offloading=getattr(made, "offloading", False))
        return out

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loading, made strict: tensors missing, unexpected or misshapen raise an error.

        transformers only warns about missing/unexpected tensors (leaving random weights) and raises on a shape
        mismatch without naming it; here all three raise :class:`CheckpointMismatchError` with every name.
        """
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # report misshapen tensors ourselves, by name
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = []
        for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                          ("mismatched_keys", "misshapen")):
            names = sorted(_describe(k) for k in info.get(key) or ())
            if names:
                problems.append(f"{what} ({len(names)}): {', '.join(names)}")
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "?")
            raise CheckpointMismatchError(f"checkpoint {where} does not match its block_configs; tensors "
                                          + "; ".join(problems))
        return (model, info) if want_info else model


def _describe(key) -> str:
    """A loading-info entry: a name, or (name, checkpoint shape, model shape) for a misshapen tensor."""
    if isinstance(key, tuple):
        name, *shapes = key
        return f"{name} (checkpoint {tuple(shapes[0])} vs model {tuple(shapes[1])})" if len(shapes) == 2 else str(name)
    return str(key)
