"""Puzzle's search space (paper Section 2, Figure 3 step 1): which block variants each layer may take.

Each layer has two slots, ``"attention"`` and ``"ffn"``, and each slot a short list of variants, every one a
released-format :class:`~lnkit.blocks.AttentionConfig` / :class:`~lnkit.blocks.FFNConfig`:

- attention: the parent's (``attn_parent``), fewer KV heads (``attn_kv2``: ``n_heads_in_group`` times 2,
  i.e. half the KV heads, ``attn_kv4``, ...), a linear replacement (``attn_linear``) and no-op (``attn_noop``);
- FFN: fractions of the parent's width (``ffn_100`` is the parent, ``ffn_50`` half its channels, ...),
  a linear replacement (``ffn_linear``) and no-op (``ffn_noop``).

A *coupled* space (:func:`couple`) pairs them: one ``"block"`` candidate per (attention, FFN) combination of
a layer, named ``"attn_kv2+ffn_50"``, trained and scored as a whole layer (Puzzle's coupled BLD). It grows as
the product of the two lists, so trim them for coupled libraries.

The parent variants (``attn_parent``, ``ffn_100``) are always in the space: the MIP must be able to keep a
layer as it is. Widths are explicit ``intermediate_size`` values (tiny models; see :mod:`lnkit.blocks`), so a
fraction means "that share of the parent's channels", rounded to the nearest channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from lnkit.blocks import AttentionConfig, BlockConfig, FFNConfig
from lnkit.model.config import NemotronNasConfig
from lnkit.model.convert import nas_config_from_llama

SLOTS = ("attention", "ffn")
COUPLED = "block"  # the one slot per layer of a coupled library: an attention variant and an FFN variant together
PARENT_NAMES = {"attention": "attn_parent", "ffn": "ffn_100", COUPLED: "attn_parent+ffn_100"}


class SearchSpaceError(ValueError):
    """The search space names a variant the parent cannot be reduced to; the message says what is allowed."""


@dataclass(frozen=True)
class SearchSpace:
    """Which variants to build for every layer.

    Attention:
        kv_factors: multipliers of the parent's ``n_heads_in_group`` (2 halves the KV heads). ``None`` takes
            every power of two (2, 4, ...) whose group still divides the heads; an explicit factor that does
            not divide them is an error.
        attention_linear, attention_no_op: include ``attn_linear`` / ``attn_noop``.
    FFN:
        ffn_fractions: shares of the parent's FFN width, each in (0, 1]; 1.0 (the parent) is always added.
        ffn_linear, ffn_no_op: include ``ffn_linear`` / ``ffn_noop``.
    """

    kv_factors: tuple[int, ...] | None = None
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.10)
    ffn_linear: bool = True
    ffn_no_op: bool = True

    def __post_init__(self):
        if self.kv_factors is not None:
            for f in self.kv_factors:
                if not isinstance(f, int) or isinstance(f, bool) or f < 2:
                    raise SearchSpaceError(f"kv_factors: {f!r} is not allowed; expected integers >= 2 "
                                           "(1 is the parent, always included)")
        for x in self.ffn_fractions:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
                raise SearchSpaceError(f"ffn_fractions: {x!r} is not allowed; expected fractions in (0, 1] "
                                       "of the parent's FFN width")


@dataclass(frozen=True)
class Candidate:
    """One variant of one slot of one layer; ``config`` is its released-format sub-block config."""

    layer: int
    slot: str  # "attention", "ffn", or "block" (coupled: both)
    name: str
    config: AttentionConfig | FFNConfig | BlockConfig
    is_parent: bool = False
    kv_factor: int = 1  # attention: how many parent KV heads are merged into one
    fraction: float | None = None  # FFN: share of the parent's channels kept
    parts: tuple = ()  # coupled: the (attention, FFN) candidates it combines

    def block(self) -> BlockConfig:
        """A layer holding only this sub-block (the other slot no-op): how a candidate is built and trained.
        A coupled candidate is a whole layer."""
        if self.slot == COUPLED:
            return self.config
        if self.slot == "attention":
            return BlockConfig(self.config, FFNConfig(no_op=True))
        return BlockConfig(AttentionConfig(no_op=True), self.config)


def parent_nas_config(config) -> NemotronNasConfig:
    """The parent as a ``NemotronNasConfig`` (a ``LlamaConfig`` is translated as :func:`from_llama` does)."""
    return config if isinstance(config, NemotronNasConfig) else nas_config_from_llama(config)


def _attention(layer: int, parent: AttentionConfig, num_heads: int, space: SearchSpace) -> list[Candidate]:
    out = [Candidate(layer, "attention", PARENT_NAMES["attention"], parent, is_parent=True)]
    if parent.kind == "no_op":  # nothing is cheaper, and every other block could only learn to output zero
        return out
    if parent.kind == "attention":
        g = parent.n_heads_in_group
        allowed = [f for f in (2 ** k for k in range(1, num_heads.bit_length() + 1)) if num_heads % (g * f) == 0]
        factors = allowed if space.kv_factors is None else list(space.kv_factors)
        for f in factors:
            if num_heads % (g * f):
                raise SearchSpaceError(
                    f"kv_factors: {f} does not fit layer {layer}: n_heads_in_group {g} x {f} = {g * f} does not "
                    f"divide num_attention_heads={num_heads}; allowed factors: {allowed or 'none'}")
            out.append(Candidate(layer, "attention", f"attn_kv{f}", AttentionConfig(n_heads_in_group=g * f),
                                 kv_factor=f))
    if space.attention_linear and parent.kind != "linear":
        out.append(Candidate(layer, "attention", "attn_linear", AttentionConfig(replace_with_linear=True)))
    if space.attention_no_op and parent.kind != "no_op":
        out.append(Candidate(layer, "attention", "attn_noop", AttentionConfig(no_op=True)))
    return out


def _ffn(layer: int, parent: FFNConfig, hidden: int, space: SearchSpace) -> list[Candidate]:
    out = [Candidate(layer, "ffn", PARENT_NAMES["ffn"], parent, is_parent=True, fraction=1.0)]
    if parent.kind == "no_op":  # as for attention: the parent's no-op is the only sensible variant
        return out
    if parent.kind == "ffn":
        width = parent.width(hidden)
        for x in sorted(set(space.ffn_fractions) - {1}, reverse=True):
            w = round(x * width)
            if w < 1:
                raise SearchSpaceError(
                    f"ffn_fractions: {x} of layer {layer}'s FFN width {width} rounds to 0 channels; "
                    f"allowed fractions are >= {0.5 / width:.4g} and <= 1")
            name = f"ffn_{round(x * 100)}"
            if any(c.name == name for c in out):
                raise SearchSpaceError(f"ffn_fractions: {x} gives the name {name!r} twice; use distinct percentages")
            out.append(Candidate(layer, "ffn", name, FFNConfig(ffn_mult=w * 3 / (2 * hidden), intermediate_size=w),
                                 fraction=x))
    if space.ffn_linear and parent.kind != "linear":
        out.append(Candidate(layer, "ffn", "ffn_linear", FFNConfig(replace_with_linear=True)))
    if space.ffn_no_op and parent.kind != "no_op":
        out.append(Candidate(layer, "ffn", "ffn_noop", FFNConfig(no_op=True)))
    return out


def candidates_for(parent_config, space: SearchSpace = SearchSpace(), layers=None) -> list[Candidate]:
    """Every candidate of every (chosen) layer, attention then FFN, parent variants first.

    ``parent_config`` is the parent's ``LlamaConfig`` or all-parent ``NemotronNasConfig``.

    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> [c.name for c in candidates_for(cfg, layers=[1])]  # doctest: +NORMALIZE_WHITESPACE
    ['attn_parent', 'attn_kv2', 'attn_kv4', 'attn_linear', 'attn_noop',
     'ffn_100', 'ffn_75', 'ffn_50', 'ffn_25', 'ffn_10', 'ffn_linear', 'ffn_noop']
    >>> candidates_for(cfg, SearchSpace(kv_factors=(3,)))
    Traceback (most recent call last):
    ...
    lnkit.puzzle.space.SearchSpaceError: kv_factors: 3 does not fit layer 0: n_heads_in_group 1 x 3 = 3 does not divide num_attention_heads=4; allowed factors: [2, 4]
    """
    cfg = parent_nas_config(parent_config)
    layers = check_layers(layers, cfg.num_hidden_layers)
    out = []
    for i in layers:
        block = cfg.block_configs[i]
        out += _attention(i, block.attention, cfg.num_attention_heads, space)
        out += _ffn(i, block.ffn, cfg.hidden_size, space)
    return out


def couple(candidates: list[Candidate]) -> list[Candidate]:
    """Coupled candidates: per layer, every (attention, FFN) pair of ``candidates`` as one ``"block"``
    candidate, the parent pair first.

    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    >>> pairs = couple(candidates_for(cfg, SearchSpace(ffn_fractions=(1.0, 0.5), attention_linear=False, ffn_linear=False)))
    >>> len(pairs), pairs[0].name, pairs[0].is_parent, pairs[-1].name, pairs[-1].kv_factor
    (12, 'attn_parent+ffn_100', True, 'attn_noop+ffn_noop', 1)
    """
    out = []
    for layer in sorted({c.layer for c in candidates}):
        att = [c for c in candidates if c.layer == layer and c.slot == "attention"]
        ffn = [c for c in candidates if c.layer == layer and c.slot == "ffn"]
        if not att or not ffn:
            raise SearchSpaceError(f"layer {layer}: coupling needs attention and FFN candidates")
        for a in att:
            for f in ffn:
                out.append(Candidate(layer, COUPLED, f"{a.name}+{f.name}", BlockConfig(a.config, f.config),
                                     is_parent=a.is_parent and f.is_parent, kv_factor=a.kv_factor,
                                     fraction=f.fraction, parts=(a, f)))
    return out


def split_name(slot: str, name: str) -> dict:
    """``{"attention": ..., "ffn": ...}`` names of a choice: a coupled name is split at ``+``.

    >>> split_name("block", "attn_kv2+ffn_50"), split_name("ffn", "ffn_50")
    ({'attention': 'attn_kv2', 'ffn': 'ffn_50'}, {'ffn': 'ffn_50'})
    """
    if slot == COUPLED:
        a, f = name.split("+")
        return {"attention": a, "ffn": f}
    return {slot: name}


def check_layers(layers, num_layers: int) -> list[int]:
    """``layers`` as a sorted list (``None``: all), each checked to be a layer of the parent."""
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise SearchSpaceError(f"layers: {bad} are not layers of the parent; allowed 0..{num_layers - 1}")
    return sorted(set(layers))
