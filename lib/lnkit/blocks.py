"""Per-layer block configs of the released ``nemotron-nas`` format (Puzzle's output), parsed and checked.

Each layer has an ``attention`` and an ``ffn`` sub-block. Attention is the parent's (grouped-query, with
``n_heads_in_group`` query heads per KV head), a ``replace_with_linear`` block (RMSNorm then a bias-free
hidden x hidden Linear), or ``no_op`` (no weights, no norm: the residual passes through). The FFN is a
SwiGLU of width :func:`ffn_width` (``ffn_mult``), a linear block, or no-op. Released configs carry extra
keys (``sparsify``, ``window_length``, sink-attention fields); they are kept as they are and ignored here.

An explicit ``intermediate_size`` in an FFN block overrides ``ffn_mult``: the released rounding to a
multiple of 256 makes every width of a tiny model (hidden 128) the same 256, so tiny models state widths
directly. Released checkpoints never use it; vLLM, whose width rule is ``ffn_mult`` only, refuses it, and
the Megatron export writes the width itself (``ffn_hidden_size``), so it keeps it (see ``lnkit.model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class BlockConfigError(ValueError):
    """A block config is malformed; the message names the layer and the field."""


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The released rule: ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256.

    >>> ffn_width(5.25, 8192), ffn_width(1.0, 8192), ffn_width(4.875, 16384)
    (28672, 5632, 53248)
    """
    return int(math.ceil(int(2 * ffn_mult * hidden_size / 3) / 256) * 256)


@dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        return "no_op" if self.no_op else "linear" if self.replace_with_linear else "attention"

    def num_kv_heads(self, num_heads: int) -> int:
        return 0 if self.kind != "attention" else num_heads // self.n_heads_in_group

    def to_dict(self) -> dict:
        return {**self.extra, "no_op": self.no_op, "replace_with_linear": self.replace_with_linear,
                "n_heads_in_group": self.n_heads_in_group}


@dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    intermediate_size: int | None = None  # explicit width (tiny models); overrides ffn_mult
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        return "no_op" if self.no_op else "linear" if self.replace_with_linear else "ffn"

    def width(self, hidden_size: int) -> int:
        if self.kind != "ffn":
            return 0
        return self.intermediate_size if self.intermediate_size is not None else ffn_width(self.ffn_mult, hidden_size)

    def to_dict(self) -> dict:
        d = {**self.extra, "no_op": self.no_op, "replace_with_linear": self.replace_with_linear,
             "ffn_mult": self.ffn_mult}
        if self.intermediate_size is not None:
            d["intermediate_size"] = self.intermediate_size
        return d


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


def _flag(raw: dict, key: str, where: str) -> bool:
    v = raw.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BlockConfigError(f"{where}.{key}={v!r}: expected true or false")
    return v


def parse_block(raw, layer: int, num_heads: int) -> BlockConfig:
    """One layer's block config from its released JSON form (or a BlockConfig, returned as is)."""
    if isinstance(raw, BlockConfig):
        raw = raw.to_dict()
    if not isinstance(raw, dict) or not isinstance(raw.get("attention"), dict) or not isinstance(raw.get("ffn"), dict):
        raise BlockConfigError(f"block_configs[{layer}]: expected a mapping with 'attention' and 'ffn' mappings")
    a, f = raw["attention"], raw["ffn"]
    wa, wf = f"block_configs[{layer}].attention", f"block_configs[{layer}].ffn"
    a_noop, a_lin = _flag(a, "no_op", wa), _flag(a, "replace_with_linear", wa)
    if a_noop and a_lin:
        raise BlockConfigError(f"{wa}: no_op and replace_with_linear are both true; choose one")
    g = a.get("n_heads_in_group")
    if not (a_noop or a_lin):
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise BlockConfigError(f"{wa}.n_heads_in_group={g!r}: expected a positive integer")
        if num_heads % g:
            raise BlockConfigError(f"{wa}.n_heads_in_group={g}: num_attention_heads={num_heads} is not divisible by it")
    f_noop, f_lin = _flag(f, "no_op", wf), _flag(f, "replace_with_linear", wf)
    if f_noop and f_lin:
        raise BlockConfigError(f"{wf}: no_op and replace_with_linear are both true; choose one")
    mult, width = f.get("ffn_mult"), f.get("intermediate_size")
    if not (f_noop or f_lin):
        if width is not None:
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise BlockConfigError(f"{wf}.intermediate_size={width!r}: expected a positive integer")
        elif not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise BlockConfigError(f"{wf}.ffn_mult={mult!r}: expected a positive number")
    known_a, known_f = {"no_op", "replace_with_linear", "n_heads_in_group"}, {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size"}
    return BlockConfig(
        AttentionConfig(a_noop, a_lin, None if (a_noop or a_lin) else g, {k: v for k, v in a.items() if k not in known_a}),
        FFNConfig(f_noop, f_lin, None if (f_noop or f_lin) else (float(mult) if mult is not None else None),
                  None if (f_noop or f_lin) else width, {k: v for k, v in f.items() if k not in known_f}),
    )


def parse_block_configs(raw: list, num_layers: int, num_heads: int) -> list[BlockConfig]:
    """All layers; the count must equal ``num_hidden_layers``.

    >>> bc = parse_block_configs([{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}], 1, 4)
    >>> bc[0].attention.num_kv_heads(4), bc[0].ffn.width(128)
    (2, 256)
    >>> parse_block_configs([{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}], 1, 4)
    Traceback (most recent call last):
    ...
    lnkit.blocks.BlockConfigError: block_configs[0].attention.n_heads_in_group=3: num_attention_heads=4 is not divisible by it
    """
    if not isinstance(raw, list):
        raise BlockConfigError(f"block_configs must be a list, got {type(raw).__name__}")
    if len(raw) != num_layers:
        raise BlockConfigError(f"block_configs has {len(raw)} entries but num_hidden_layers={num_layers}")
    return [parse_block(b, i, num_heads) for i, b in enumerate(raw)]
