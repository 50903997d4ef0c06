"""FFN Fusion (paper Section 2, "Vertical Compression with FFN Fusion"; Bercovich et al., arXiv 2503.18908).

Once Puzzle has removed attention from some layers, a child holds stretches of FFNs with nothing else
between them. FFN Fusion runs such a stretch in parallel: every FFN of a group reads the group's input
and their outputs are summed, which is exactly one wider FFN (weights concatenated), so the group costs
one sequential step and, under tensor parallelism, one all-reduce instead of one per FFN. The result is
an approximation of the sequential model; how good it is depends on how much each FFN's output depends
on the FFNs before it, which :func:`measure_dependencies` measures and :func:`greedy_groups` acts on.

**Runs** (:func:`attention_free_runs`). Read a model as its sequence of sub-blocks, attention_0, FFN_0,
attention_1, FFN_1, ..., and drop the no-op ones (they are the identity). A run is a maximal stretch of
consecutive SwiGLU FFNs in that sequence: the FFN of some layer (whose attention may be real) followed by
the FFNs of later layers whose attention is no-op. Consequences, each deliberate:

- a layer whose attention and FFN are both no-op is skipped: the run continues through it;
- a ``replace_with_linear`` attention ends a run, like real attention. It mixes nothing across tokens,
  so in principle it could be moved, but it is still a sequential operation on the residual stream (and
  one all-reduce under tensor parallelism), and it is not a SwiGLU, so it cannot join the concatenation;
- a ``replace_with_linear`` FFN ends a run too (a normed linear map is not a SwiGLU and cannot be
  concatenated with one); the next run may start right after it. A no-op FFN is the identity and is
  skipped (it can only sit in a run's stretch when its layer's attention is no-op as well).

**Dependency** (:func:`measure_dependencies`). On calibration tokens, for a run ``f_1 .. f_n`` with input
``x`` (the residual stream entering ``f_1``), the sequential inputs are ``x_1 = x``, ``x_{k+1} = x_k +
f_k(x_k)``. ``D[i, j]`` (``i < j``) is the mean over tokens of the cosine distance between ``f_j(x_j)`` and
``f_j`` of its input recomputed with ``f_i`` removed from the run (the FFN Fusion paper's pairwise
dependency matrix); ``parallel[j]`` is the distance between ``f_j(x_j)`` and ``f_j(x)``, what fusing the
whole run does to ``f_j``. Cosine distance is ``1 - cos`` clipped to ``[0, 1]`` (an orthogonal or
anti-correlated output counts as fully dependent), so a threshold in ``[0, 1]`` covers every case.

**Grouping** (:func:`greedy_groups`). Walk a run in order; FFN ``j`` joins the current group when its
dependency on every member is at most ``threshold``, else it starts a new group. ``threshold = 0`` fuses
(almost) nothing, ``1`` fuses every run whole.

**Fusion** (:func:`fuse_ffns`, :func:`fuse_model`). ``f_k(x) = down_k(silu(gate_k n_k(x)) * up_k n_k(x))``
with ``n_k(x) = w_k * x / rms(x)``. Every group member's RMSNorm uses the model's one ``rms_norm_eps``, so
``n_k(x) = diag(w_k) r(x)`` with ``r`` shared: folding ``w_k`` into the columns of ``gate_k`` and ``up_k``
and concatenating the intermediate dimensions gives one FFN behind one RMSNorm of weight ones whose output
is ``sum_k f_k(x)``, exactly (up to float rounding). In the released format (as LN-Ultra) the fused FFN
is an ordinary wider ``ffn`` block in the group's first layer and the other members' FFNs become no-op;
their attention was no-op already, so those layers are empty.

**Widths** (``width_rule``). vLLM takes an FFN's width from ``ffn_mult`` by the released rule (a multiple
of 256); an explicit ``intermediate_size`` it cannot reproduce is refused (:mod:`lnkit.model.export`).
``"released"`` zero-pads the concatenated width up to the next width the rule produces (zero rows of
gate/up and zero columns of down add ``silu(0) * 0 = 0``: exact) and writes ``ffn_mult`` only;
``"exact"`` keeps the concatenated width (an explicit ``intermediate_size`` when the rule cannot make it,
as tiny models do); ``"auto"`` is ``"released"`` when the input passes
:func:`lnkit.model.export.check_vllm_compatible` and ``"exact"`` otherwise. Widths of a vLLM-servable
child are rule widths, multiples of 256, so their sum already is one and no padding happens in practice;
the padding is there for children whose widths are explicit.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from lnkit.blocks import BlockConfig, ffn_width, parse_block_configs
from lnkit.model.config import NemotronNasConfig
from lnkit.model.export import vllm_compatibility
from lnkit.model.modeling import NemotronNasForCausalLM
from lnkit.progress import progress_bar
from lnkit.puzzle.library import as_nas, residual_stream

WIDTH_RULES = ("auto", "released", "exact")


class FusionError(ValueError):
    """A group cannot be fused; the message names the layer and the reason."""


# ----------------------------------------------------------------------------------------------- runs


def _blocks(config) -> tuple[list[BlockConfig], dict]:
    """Parsed block configs and the raw dict of a model, a ``NemotronNasConfig`` or a config dict."""
    c = getattr(config, "config", config)
    raw = c if isinstance(c, dict) else c.to_dict()
    if raw.get("block_configs") is None:
        raise FusionError("config has no block_configs: a homogeneous Llama has no attention-free layers to fuse")
    blocks = parse_block_configs(raw["block_configs"], raw["num_hidden_layers"], raw["num_attention_heads"])
    return blocks, raw


def attention_free_runs(config, min_len: int = 2) -> list[list[int]]:
    """Maximal runs of consecutive SwiGLU FFNs (layer indices), of at least ``min_len`` FFNs.

    >>> def b(att, ffn):
    ...     a = {"no_op": att == "N", "replace_with_linear": att == "L", "n_heads_in_group": 1 if att == "A" else None}
    ...     f = {"no_op": ffn == "N", "replace_with_linear": ffn == "L", "ffn_mult": 1.0}
    ...     return {"attention": a, "ffn": f}
    >>> layers = ["AF", "NF", "NN", "NF", "LF", "NF", "NL", "NF", "NF", "AF"]
    >>> cfg = {"num_hidden_layers": 10, "num_attention_heads": 4, "block_configs": [b(*s) for s in layers]}
    >>> attention_free_runs(cfg)  # 2 is empty; 4's linear attention and 6's linear FFN end runs
    [[0, 1, 3], [4, 5], [7, 8]]
    >>> attention_free_runs(cfg, min_len=1)
    [[0, 1, 3], [4, 5], [7, 8], [9]]
    """
    blocks, _ = _blocks(config)
    runs, cur = [], []
    for i, b in enumerate(blocks):
        if b.attention.kind != "no_op":  # real or linear attention: a sequential step
            runs.append(cur)
            cur = []
        if b.ffn.kind == "ffn":
            cur.append(i)
        elif b.ffn.kind == "linear":  # not a SwiGLU: ends the run
            runs.append(cur)
            cur = []
    runs.append(cur)
    return [r for r in runs if len(r) >= max(1, min_len)]


def check_group(config, group: list[int]) -> None:
    """Raise :class:`FusionError` unless ``group`` (layer indices, ascending) is part of one run."""
    blocks, _ = _blocks(config)
    n = len(blocks)
    if not group or any(not isinstance(i, int) or isinstance(i, bool) for i in group):
        raise FusionError(f"group {group!r}: expected a non-empty list of layer indices")
    if list(group) != sorted(set(group)):
        raise FusionError(f"group {group}: layer indices must be ascending and distinct")
    if group[0] < 0 or group[-1] >= n:
        raise FusionError(f"group {group}: layer indices must be in 0..{n - 1}")
    for i in group:
        if blocks[i].ffn.kind != "ffn":
            raise FusionError(f"group {group}: layer {i}'s FFN is {blocks[i].ffn.kind}, not a SwiGLU FFN; "
                              "only SwiGLU FFNs can be fused")
    for a, b in zip(group, group[1:]):
        if blocks[b].attention.kind != "no_op":
            raise FusionError(f"group {group}: layer {b} has {blocks[b].attention.kind} attention between the FFNs "
                              f"of layers {a} and {b}; fusing across it would reorder the model")
        for k in range(a + 1, b):
            if blocks[k].attention.kind != "no_op" or blocks[k].ffn.kind != "no_op":
                raise FusionError(f"group {group}: layer {k} (attention {blocks[k].attention.kind}, FFN "
                                  f"{blocks[k].ffn.kind}) sits between the FFNs of layers {a} and {b}; "
                                  "a group must be consecutive FFNs of one run")


def _check_groups(config, groups) -> list[list[int]]:
    groups = [list(g) for g in groups]
    for g in groups:
        check_group(config, g)
    seen: set = set()
    for g in groups:
        if seen & set(g):
            raise FusionError(f"group {g} overlaps another group at layer(s) {sorted(seen & set(g))}")
        seen |= set(g)
    return groups


# ------------------------------------------------------------------------------------------ dependency


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``1 - cos(a, b)`` over the last dimension, clipped to ``[0, 1]`` (0 for identical rows).

    >>> cosine_distance(torch.tensor([[1., 0], [1, 0], [1, 0], [0, 0]]), torch.tensor([[2., 0], [0, 1], [-1, 0], [0, 0]]))
    tensor([0., 1., 1., 0.])
    """
    a, b = a.float(), b.float()
    d = (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).clamp(0, 1)
    return torch.where((a == b).all(-1), torch.zeros_like(d), d)


def ffn_output(layer, x: torch.Tensor) -> torch.Tensor:
    """What a layer's FFN sub-block adds to the residual stream ``x``."""
    return layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def run_dependency(layers, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one run's FFN layers and its input ``x``: per-token pairwise and parallel distances.

    Returns ``(D, P, n)``: ``D[i, j]`` the summed (over tokens) distance of ``f_j``'s output with ``f_i``
    removed, ``P[j]`` the summed distance of ``f_j(x_j)`` to ``f_j(x)``, and ``n`` the token count.
    """
    m = len(layers)
    xs, outs = [x], []
    for k, layer in enumerate(layers):
        outs.append(ffn_output(layer, xs[k]))
        xs.append(xs[k] + outs[k])
    D = torch.zeros(m, m, dtype=torch.float64)
    P = torch.zeros(m, dtype=torch.float64)
    for j in range(m):
        P[j] = cosine_distance(outs[j], ffn_output(layers[j], x)).sum()
    for i in range(m):
        h = xs[i]  # the stream as if f_i did not exist: f_i's output is never added
        for j in range(i + 1, m):
            o = ffn_output(layers[j], h)
            D[i, j] = cosine_distance(outs[j], o).sum()
            h = h + o
    return D, P, x.shape[:-1].numel()


@torch.no_grad()
def measure_dependencies(model, batches, runs=None, progress: bool = False) -> list[dict]:
    """Per run: ``{"layers", "dependency" (n x n, upper triangle), "parallel" (n), "tokens"}`` averaged
    over every token of ``batches`` (LongTensors ``[B, T]``, no padding). ``runs`` defaults to
    :func:`attention_free_runs`; the run's input is captured by a forward hook on the real model."""
    nas = as_nas(model).eval()
    runs = attention_free_runs(nas.config) if runs is None else [list(r) for r in runs]
    for r in runs:
        check_group(nas.config, r)
    if not runs:
        return []
    acc = [[torch.zeros(len(r), len(r), dtype=torch.float64), torch.zeros(len(r), dtype=torch.float64), 0] for r in runs]
    firsts = sorted({r[0] for r in runs})
    stream = residual_stream(nas, batches, firsts)
    for streams, *_ in progress_bar(stream, total=len(batches), desc="FFN dependency", disable=not progress):
        for r, a in zip(runs, acc):
            D, P, n = run_dependency([nas.model.layers[i] for i in r], streams[r[0]][1])
            a[0] += D
            a[1] += P
            a[2] += n
    return [{"layers": r, "dependency": (D / n).tolist(), "parallel": (P / n).tolist(), "tokens": n}
            for r, (D, P, n) in zip(runs, acc)]


def greedy_groups(layers: list[int], dependency, threshold: float) -> list[list[int]]:
    """Split a run into groups: FFN ``j`` joins the current group while its dependency on every member
    is at most ``threshold``; otherwise it starts the next group.

    >>> D = [[0, .1, .5], [0, 0, .2], [0, 0, 0]]
    >>> greedy_groups([4, 5, 6], D, 0.3), greedy_groups([4, 5, 6], D, 0.5), greedy_groups([4, 5, 6], D, 0.0)
    ([[4, 5], [6]], [[4, 5, 6]], [[4], [5], [6]])
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold}: expected a value in [0, 1]")
    groups: list[list[int]] = []
    members: list[int] = []  # positions in the run of the current group's members
    for j in range(len(layers)):
        if members and max(dependency[i][j] for i in members) <= threshold:
            members.append(j)
        else:
            if members:
                groups.append([layers[i] for i in members])
            members = [j]
    if members:
        groups.append([layers[i] for i in members])
    return groups


# ---------------------------------------------------------------------------------------------- fusion


def released_width(width: int) -> int:
    """The smallest width >= ``width`` that the released ``ffn_mult`` rule produces (a multiple of 256).

    >>> released_width(288), released_width(512), released_width(1)
    (512, 512, 256)
    """
    return max(256, math.ceil(width / 256) * 256)


def ffn_block(width: int, hidden_size: int, released: bool, extra: dict | None = None) -> dict:
    """A released-format FFN block of ``width``: ``ffn_mult = 3 width / (2 hidden)`` (the convention of
    :func:`lnkit.model.convert.parent_block`), plus ``intermediate_size`` when the rule does not give
    ``width``. ``released=True`` requires a rule width and writes ``ffn_mult`` only.

    >>> ffn_block(399360, 16384, True)["ffn_mult"]  # LN-Ultra's fused layer 125
    36.5625
    >>> ffn_block(288, 128, False)["intermediate_size"]
    288
    """
    mult = width * 3 / (2 * hidden_size)
    block = {**(extra or {}), "no_op": False, "replace_with_linear": False, "ffn_mult": mult}
    block.pop("intermediate_size", None)
    if ffn_width(mult, hidden_size) != width:
        if released:
            raise FusionError(f"width {width} is not one the released ffn_mult rule produces (hidden {hidden_size})")
        block["intermediate_size"] = width
    return block


def resolve_width_rule(config, width_rule: str) -> str:
    """``"released"`` or ``"exact"``; ``"auto"`` is ``"released"`` iff vLLM could serve ``config``."""
    if width_rule not in WIDTH_RULES:
        raise ValueError(f"width_rule={width_rule!r}: expected one of {list(WIDTH_RULES)}")
    if width_rule != "auto":
        return width_rule
    return "released" if not vllm_compatibility(getattr(config, "config", config)) else "exact"


def fuse_config(config, groups, width_rule: str = "auto") -> dict:
    """The config dict after fusing ``groups`` (block configs only, no weights): for each group of two or
    more, the first layer's FFN becomes one FFN of the summed (or padded) width and the others no-op.
    Works on released ``config.json`` dicts (extra keys kept), so it can price a fusion of LN-Super."""
    blocks, raw = _blocks(config)
    groups = _check_groups(config, groups)
    c = getattr(config, "config", config)
    rule = resolve_width_rule(NemotronNasConfig.from_dict(raw) if isinstance(c, dict) else c, width_rule)
    out = copy.deepcopy(raw)
    h = raw["hidden_size"]
    for g in groups:
        if len(g) < 2:
            continue
        width = sum(blocks[i].ffn.width(h) for i in g)
        if rule == "released":
            width = released_width(width)
        out["block_configs"][g[0]]["ffn"] = ffn_block(width, h, rule == "released", raw["block_configs"][g[0]]["ffn"])
        for i in g[1:]:
            f = out["block_configs"][i]["ffn"]
            f.update(no_op=True, replace_with_linear=False, ffn_mult=None)
            f.pop("intermediate_size", None)
    return out


@torch.no_grad()
def fuse_ffns(layers, width: int | None = None) -> dict:
    """One FFN computing ``sum_k f_k(x)`` for the FFN sub-blocks of ``layers``: RMSNorm weights folded into
    gate and up, intermediate dimensions concatenated, then zero-padded to ``width`` if given.

    Returns ``{"norm": ones, "gate_proj", "up_proj", "down_proj"}`` (``[width, hidden]``, ``[width, hidden]``,
    ``[hidden, width]``), and ``*_bias`` entries when the MLPs have biases (gate and up biases are
    concatenated, down biases summed). The norms must share ``eps``.
    """
    eps = {layer.post_attention_layernorm.variance_epsilon for layer in layers}
    if len(eps) > 1:
        raise FusionError(f"FFN norms have different eps {sorted(eps)}: they cannot share one RMSNorm")
    gate, up, down, gb, ub, db = [], [], [], [], [], []
    for layer in layers:
        w = layer.post_attention_layernorm.weight.float()
        m = layer.mlp
        gate.append(m.gate_proj.weight.float() * w[None, :])
        up.append(m.up_proj.weight.float() * w[None, :])
        down.append(m.down_proj.weight.float())
        if m.gate_proj.bias is not None:
            gb.append(m.gate_proj.bias.float())
            ub.append(m.up_proj.bias.float())
        if m.down_proj.bias is not None:
            db.append(m.down_proj.bias.float())
    out = {"gate_proj": torch.cat(gate), "up_proj": torch.cat(up), "down_proj": torch.cat(down, dim=1)}
    if gb:
        out["gate_proj_bias"], out["up_proj_bias"] = torch.cat(gb), torch.cat(ub)
    if db:
        out["down_proj_bias"] = torch.stack(db).sum(0)
    total = out["gate_proj"].shape[0]
    width = total if width is None else width
    if width < total:
        raise FusionError(f"width {width} is smaller than the concatenated width {total}")
    pad = width - total
    if pad:
        out["gate_proj"] = F.pad(out["gate_proj"], (0, 0, 0, pad))
        out["up_proj"] = F.pad(out["up_proj"], (0, 0, 0, pad))
        out["down_proj"] = F.pad(out["down_proj"], (0, pad))
        for k in ("gate_proj_bias", "up_proj_bias"):
            if k in out:
                out[k] = F.pad(out[k], (0, pad))
    out["norm"] = torch.ones_like(layers[0].post_attention_layernorm.weight, dtype=torch.float32)
    return out


@torch.no_grad()
def fuse_model(model, groups, width_rule: str = "auto"):
    """A new ``NemotronNasForCausalLM`` with each group's FFNs fused into its first layer (groups of one
    are left as they are). Same device, dtype, generation config; eval mode. The input is not changed."""
    nas = as_nas(model)
    groups = [g for g in _check_groups(nas.config, groups) if len(g) > 1]
    raw = fuse_config(nas.config, groups, width_rule)
    cfg = NemotronNasConfig.from_dict(raw)
    cfg._attn_implementation = nas.config._attn_implementation
    p = next(nas.parameters())
    state = dict(nas.state_dict())
    for g in groups:
        for i in g:
            for k in [k for k in state if k.startswith((f"model.layers.{i}.post_attention_layernorm.",
                                                         f"model.layers.{i}.mlp."))]:
                del state[k]
        width = cfg.block_configs[g[0]].ffn.width(cfg.hidden_size)
        fused = fuse_ffns([nas.model.layers[i] for i in g], width)
        pre = f"model.layers.{g[0]}."
        state[pre + "post_attention_layernorm.weight"] = fused["norm"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[pre + f"mlp.{name}.weight"] = fused[name]
            if name + "_bias" in fused:
                state[pre + f"mlp.{name}.bias"] = fused[name + "_bias"]
    out = NemotronNasForCausalLM(cfg)
    out.load_state_dict({k: v.to(p.dtype) for k, v in state.items()}, strict=True)
    if cfg.tie_word_embeddings:
        out.tie_weights()
    out = out.to(device=p.device, dtype=p.dtype)
    out.generation_config = copy.deepcopy(nas.generation_config)
    return out.eval()


@contextlib.contextmanager
def parallel(model, groups):
    """Run ``model`` with each group's FFNs reading the group's input (the "parallel" model that
    fusion computes), by forward hooks; the weights are untouched. The reference fusion is tested against.
    """
    nas = as_nas(model)
    groups = [g for g in _check_groups(nas.config, groups) if len(g) > 1]
    handles, inputs = [], {}

    def capture(key):
        def hook(module, args):
            inputs[key] = args[0]
        return hook

    def replace(key):
        def hook(module, args):
            return (inputs[key],) + tuple(args[1:])
        return hook

    try:
        for n, g in enumerate(groups):
            handles.append(nas.model.layers[g[0]].post_attention_layernorm.register_forward_pre_hook(capture(n)))
            for i in g[1:]:
                handles.append(nas.model.layers[i].post_attention_layernorm.register_forward_pre_hook(replace(n)))
        yield nas
    finally:
        for h in handles:
            h.remove()
