"""``NemotronNasConfig``: the released ``nemotron-nas`` config.json, read unchanged and checked on construction.

It is a Llama config whose per-layer shape lives in ``block_configs`` (one ``{"attention", "ffn"}`` entry per
layer, parsed and validated by :mod:`lnkit.blocks`). The global ``num_key_value_heads`` and
``intermediate_size`` mean nothing in this format (the released files have them ``null``): when no
``block_configs`` are given they build a homogeneous (all-parent) model, and are then kept as ``None``.

Extra keys of the released files (``auto_map``, ``pretraining_tp``, the sink-attention fields of each block)
are kept on read. On write the config looks like the released one: ``architectures`` is
``["DeciLMForCausalLM"]``, RoPE is written as ``rope_theta`` + ``rope_scaling`` (transformers >= 5 holds
them as one ``rope_parameters`` dict; transformers 4.x and tools reading config.json directly know only the pair),
and a released ``auto_map`` is dropped: it points at NVIDIA's remote code (``configuration_decilm.py``), which
an lnkit folder does not ship. lnkit's own (:data:`AUTO_MAP`, the code :mod:`lnkit.model.standalone` writes
into every saved folder) is kept. ``import lnkit.model`` registers this class for
``model_type="nemotron-nas"``, so ``AutoConfig`` uses it without ``trust_remote_code``.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from lnkit.blocks import BlockConfig, parse_block_configs

ARCHITECTURE = "DeciLMForCausalLM"  # the released checkpoints' class name, which vLLM dispatches on
# The self-contained code lnkit writes beside the weights (lnkit.model.standalone), for trust_remote_code readers.
AUTO_MAP = {"AutoConfig": "configuration_lnkit_nas.NemotronNasConfig",
            "AutoModelForCausalLM": "modeling_lnkit_nas.NemotronNasForCausalLM"}
# Released block fields for sink tokens, attention windows and sparsity: kept on read, null in every released
# config, implemented nowhere here (nor in vLLM), so a config that sets one is refused where it would matter.
UNSUPPORTED_EXTRAS = ("window_length", "num_sink_tokens", "sparsify", "unshifted_sink",
                      "use_prefill_window_in_sink_attention")


def _homogeneous_blocks(num_layers: int, num_heads: int, num_kv_heads: int | None,
                        intermediate_size: int | None) -> list[dict]:
    kv = num_kv_heads or num_heads
    group = num_heads // kv if num_heads % kv == 0 else 0  # 0 fails validation with the layer named
    ffn = {"intermediate_size": intermediate_size} if intermediate_size else {"ffn_mult": 1.0}
    return [{"attention": {"n_heads_in_group": group}, "ffn": dict(ffn)} for _ in range(num_layers)]


class NemotronNasConfig(PretrainedConfig):
    """A Llama whose layers differ: ``block_configs[i]`` says what layer ``i``'s attention and FFN are.

    Raises :class:`lnkit.blocks.BlockConfigError` (naming the layer and field) when a block config is
    malformed or their count disagrees with ``num_hidden_layers``.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, block_configs: list | None = None, head_dim: int | None = None,
                 num_key_value_heads: int | None = None, intermediate_size: int | None = None,
                 hidden_act: str = "silu", max_position_embeddings: int = 2048, initializer_range: float = 0.02,
                 rms_norm_eps: float = 1e-6, use_cache: bool = True, tie_word_embeddings: bool = False,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None, attention_bias: bool = False,
                 attention_dropout: float = 0.0, mlp_bias: bool = False, pad_token_id: int | None = None,
                 bos_token_id: int | None = 1, eos_token_id: int | list[int] | None = 2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        if block_configs is None:
            block_configs = _homogeneous_blocks(num_hidden_layers, num_attention_heads, num_key_value_heads,
                                                intermediate_size)
        self.block_configs: list[BlockConfig] = parse_block_configs(block_configs, num_hidden_layers,
                                                                    num_attention_heads)
        self.num_key_value_heads = None  # per layer: block_configs[i].attention.n_heads_in_group
        self.intermediate_size = None  # per layer: block_configs[i].ffn
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        rope_scaling = dict(rope_scaling) if rope_scaling else None  # transformers edits it in place; not the caller's
        if hasattr(PretrainedConfig, "convert_rope_params_to_dict"):
            # transformers >= 5 folds rope_theta and rope_scaling into one `rope_parameters` dict in its post-init
            self.rope_parameters = kwargs.pop("rope_parameters", None)
            kwargs.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
        else:
            self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        kwargs.pop("architectures", None)  # always the released name, see to_dict
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.architectures = [ARCHITECTURE]

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers', on a copy: some transformers releases write keys into the caller's dict."""
        return super().from_dict(copy.deepcopy(config_dict), **kwargs)

    # -- derived values, the same whichever transformers version holds the config
    @property
    def head_size(self) -> int:
        """Per-head width: ``head_dim`` when set, else ``hidden_size // num_attention_heads``."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def rope(self) -> tuple[float, dict | None]:
        """``(rope_theta, rope_scaling)`` as the released files write them (``None`` for plain RoPE)."""
        return rope_settings(self)

    def attention_layers(self) -> list[int]:
        """Indices of the layers with a real (KV-cached) attention block."""
        return [i for i, b in enumerate(self.block_configs) if b.attention.kind == "attention"]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        theta, scaling = rope_settings(self)
        out.pop("rope_parameters", None)
        out["rope_theta"], out["rope_scaling"] = theta, scaling
        out["architectures"] = [ARCHITECTURE]
        if out.get("auto_map") != AUTO_MAP:  # NVIDIA's points at code an lnkit folder does not ship
            out.pop("auto_map", None)
        if out.get("head_dim") is None:
            out.pop("head_dim", None)  # the released files have no head_dim key
        return out


def rope_settings(config) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` of any Llama-like config, from either transformers layout.

    transformers >= 5 keeps one ``rope_parameters`` dict (``rope_type`` and ``rope_theta`` inside); older
    releases keep ``rope_theta`` and a ``rope_scaling`` dict (``None`` for plain RoPE).
    """
    rp = config.__dict__.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
            scaling = None
        return float(rp["rope_theta"]), scaling
    return float(config.__dict__.get("rope_theta", 10000.0)), config.__dict__.get("rope_scaling")


def unsupported_extras(config) -> list[str]:
    """Released block fields set to something this code does not implement, one message per field."""
    c = getattr(config, "config", config)
    out = []
    for i, b in enumerate(c.block_configs):
        for part, extra in (("attention", b.attention.extra), ("ffn", b.ffn.extra)):
            out += [f"block_configs[{i}].{part}.{k}={extra[k]!r}: not implemented (must be null/false)"
                    for k in UNSUPPORTED_EXTRAS if extra.get(k)]
    return out
