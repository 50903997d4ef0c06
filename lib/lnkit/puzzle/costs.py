"""Puzzle's per-candidate costs (paper Section 2, Figure 3 step 2): what each library block costs to run, the
resource side of the MIP, and :func:`to_mip_candidates`, which joins costs with scores into MIP input.

Two ways to price a candidate, same row shape ``{layer, slot, name, params, kv_bytes, memory_bytes, prefill_s,
decode_s, is_attention}``:

- :func:`costs_from_table`: from a cost table (:mod:`lnkit.puzzle.cost_table`), timed once on some machine and
  stored: each sub-block run alone (as a one-slot decoder layer with random weights: time does not depend on
  the values) on a prefill of ``batch_size x prompt_len`` tokens and on one decode step of ``batch_size``
  tokens against a KV cache holding ``prompt_len + decode_len // 2`` tokens (the mean context over the
  decode, as :func:`lnkit.deploy.layer_costs` averages). Identical sub-blocks at different layers share one
  entry, which both saves time and keeps noise from ranking identical blocks differently.
  :func:`measure_costs` times a table now and prices from it.
- :func:`analytic_costs`: :func:`lnkit.deploy.layer_costs`' roofline for a named GPU, on a one-layer config
  holding just that block, so a search for an H100 can be run from a laptop.

Memory is the block's weights plus, for real attention only, its KV cache for the whole batch at full length:
``2 x kv_heads x head_dim x bytes x batch_size x (prompt_len + decode_len)``. Linear and no-op attention keep
no cache. Analytic memory is for the whole replica (not divided by ``tp``).

``is_attention`` (1 for real attention) goes into the MIP costs: the MIP's name-based fallback knows
``"no_op"`` / ``"linear"``, not the library's ``"attn_noop"`` / ``"attn_linear"``.
"""

from __future__ import annotations

import torch

from lnkit import deploy
from lnkit.model.modeling import NemotronNasDecoderLayer
from lnkit.puzzle import cost_table, mip

COST_KEYS = ("params", "kv_bytes", "memory_bytes", "prefill_s", "decode_s")


def _candidates(library_or_candidates) -> list:
    """Space candidates from a :class:`~lnkit.puzzle.library.Library`, its entries, or candidates as they are."""
    items = library_or_candidates.entries.values() if hasattr(library_or_candidates, "entries") else library_or_candidates
    return [getattr(x, "candidate", x) for x in items]


def _row(c, params, kv_bytes, memory_bytes, prefill_s, decode_s) -> dict:
    return {"layer": c.layer, "slot": c.slot, "name": c.name, "params": int(params), "kv_bytes": int(kv_bytes),
            "memory_bytes": int(memory_bytes), "prefill_s": float(prefill_s), "decode_s": float(decode_s),
            "is_attention": int(c.block().attention.kind == "attention")}


def _check_lengths(batch_size, prompt_len, decode_len):
    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("decode_len", decode_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive integer")


# ---------------------------------------------------------------------------------------------- measured


def measure_costs(library_or_candidates, parent_config, batch_size: int, prompt_len: int, decode_len: int,
                  repeats: int = 5, warmup: int = 2, device=None, dtype=torch.float32, rounds: int = 1) -> list[dict]:
    """Costs of every candidate measured now on ``device`` (default: CUDA if available, else CPU), in
    ``dtype``: :func:`lnkit.puzzle.cost_table.measure` then :func:`costs_from_table`.

    ``parent_config`` is the parent's ``LlamaConfig`` or ``NemotronNasConfig``. Times are seconds for the
    sub-block alone (norm included, embeddings and LM head not); see the module docstring for what is timed.
    """
    _check_lengths(batch_size, prompt_len, decode_len)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: expected repeats >= 1 and warmup >= 0")
    cands = _candidates(library_or_candidates)
    table = cost_table.measure(cands, parent_config, batch_size, prompt_len, decode_len, rounds=rounds,
                               repeats=repeats, warmup=warmup, device=device, dtype=dtype)
    return costs_from_table(cands, parent_config, table, dtype)


def costs_from_table(library_or_candidates, parent_config, table: dict, dtype=torch.float32) -> list[dict]:
    """Cost rows of every candidate priced from a cost table (:mod:`lnkit.puzzle.cost_table`), whose setup
    gives the batch and lengths; parameters and memory are computed from the configs. A candidate whose
    sub-block the table lacks is a ``KeyError`` listing every missing one."""
    cands = _candidates(library_or_candidates)
    lacking = cost_table.missing(table, cands)
    if lacking:
        raise KeyError(f"the cost table has no entry for {len(lacking)} sub-block(s): {lacking[:4]}")
    setup = table["setup"]
    batch_size, full_len = setup["batch_size"], setup["prompt_len"] + setup["decode_len"]
    cfg = cost_table.timing_config(parent_config)
    nbytes = torch.empty((), dtype=dtype).element_size()
    rows = []
    for c in cands:
        entries = [table["blocks"][cost_table.block_key(p.slot, p.config)] for p in (c.parts or (c,))]
        params = sum(p.numel() for p in NemotronNasDecoderLayer(cfg, c.block(), c.layer, 0).parameters())
        kv_heads = c.block().attention.num_kv_heads(cfg.num_attention_heads)
        kv = 2 * kv_heads * cfg.head_size * nbytes * batch_size * full_len
        rows.append(_row(c, params, kv, params * nbytes + kv, sum(e["prefill_s"] for e in entries),
                         sum(e["decode_s"] for e in entries)))  # a coupled block costs what its parts cost
    return rows


# ---------------------------------------------------------------------------------------------- analytic


def one_block_config(parent_config, candidate) -> dict:
    """A one-layer config dict (as :mod:`lnkit.deploy` reads) whose only layer is this candidate's block."""
    c = dict(deploy.load_config(parent_config))
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    c["num_hidden_layers"] = 1
    c["block_configs"] = [candidate.block().to_dict()]
    return c


def analytic_costs(candidates, parent_config, gpu, batch_size: int, prompt_len: int, decode_len: int,
                   weight_dtype: str = "bf16", kv_dtype: str = "bf16", tp: int = 1,
                   assumptions: deploy.Assumptions | None = None) -> list[dict]:
    """Costs of every candidate on ``gpu`` (a :data:`lnkit.deploy.GPUS` name) by deploy's roofline.

    ``parent_config`` is anything :func:`lnkit.deploy.load_config` reads (a config object, a dict, a name such
    as ``"Llama-3.3-70B"``). ``prefill_s`` / ``decode_s`` are the layer's prefill and mean decode-step seconds,
    all-reduces included when ``tp > 1``. An unknown GPU raises deploy's ``KeyError`` listing the catalogue.
    """
    _check_lengths(batch_size, prompt_len, decode_len)
    deploy.get_gpu(gpu)  # fail before any work, with deploy's own message
    rows = []
    for c in _candidates(candidates):
        one = one_block_config(parent_config, c)
        shape = deploy.model_shape(one)
        layer = shape.layers[0]
        params = deploy.attention_params(shape, layer) + deploy.ffn_params(shape, layer)
        kv = deploy.kv_bytes_per_token(one, kv_dtype) * batch_size * (prompt_len + decode_len)
        r = deploy.layer_costs(one, gpu, tp, batch_size, prompt_len, decode_len, weight_dtype, kv_dtype,
                               assumptions=assumptions)[0]
        rows.append(_row(c, params, kv, params * deploy.dtype_bytes(weight_dtype) + kv, r["prefill_s"], r["decode_s"]))
    return rows


# ------------------------------------------------------------------------------------------------ joining


def _keyed(rows, what) -> dict:
    out = {}
    for r in rows:
        k = (r["layer"], r["slot"], r["name"])
        if k in out:
            raise ValueError(f"{what} list layer {k[0]} {k[1]} {k[2]!r} twice")
        out[k] = r
    return out


def to_mip_candidates(score_rows, cost_rows, score: str = "kl",
                      cost_keys=("memory_bytes", "prefill_s", "decode_s"), scale=None) -> list[mip.Candidate]:
    """One :class:`lnkit.puzzle.mip.Candidate` per candidate: ``score_rows[score]`` as its score, the
    ``cost_keys`` of its cost row as its costs (plus ``is_attention`` when the cost rows carry it).

    ``scale`` multiplies chosen costs, e.g. ``{"decode_s": 1e6}`` for microseconds: MIP solvers judge
    feasibility to an absolute tolerance (HiGHS: 1e-7), so a budget of a few microseconds given in seconds is
    met only approximately; give budgets in the same scaled units.

    Scores and costs must describe the same candidates: any candidate in one and not the other is an error
    naming it, since a silently dropped block would quietly shrink the search.

    >>> s = [{"layer": 0, "slot": "ffn", "name": "ffn_100", "kl": 0.0}]
    >>> c = [{"layer": 0, "slot": "ffn", "name": "ffn_100", "memory_bytes": 10, "prefill_s": 1e-3, "decode_s": 1e-4},
    ...      {"layer": 0, "slot": "ffn", "name": "ffn_noop", "memory_bytes": 0, "prefill_s": 0.0, "decode_s": 0.0}]
    >>> to_mip_candidates(s, c)
    Traceback (most recent call last):
    ...
    ValueError: scores and costs disagree on the candidate set: only in costs: layer 0 ffn 'ffn_noop'
    """
    scale = dict(scale or {})
    if set(scale) - set(cost_keys):
        raise ValueError(f"scale names {sorted(set(scale) - set(cost_keys))}, which are not in cost_keys {list(cost_keys)}")
    scores, costs = _keyed(score_rows, "scores"), _keyed(cost_rows, "costs")
    only_s, only_c = sorted(scores.keys() - costs.keys()), sorted(costs.keys() - scores.keys())
    if only_s or only_c:
        def names(keys):
            return ", ".join(f"layer {i} {s} {n!r}" for i, s, n in keys)
        parts = ([f"only in scores: {names(only_s)}"] if only_s else []) + ([f"only in costs: {names(only_c)}"] if only_c else [])
        raise ValueError("scores and costs disagree on the candidate set: " + "; ".join(parts))
    out = []
    for k, s in scores.items():
        c = costs[k]
        if score not in s:
            raise ValueError(f"score {score!r} is not in the score rows; they have {sorted(set(s) - {'layer', 'slot', 'name'})}")
        missing = [key for key in cost_keys if key not in c]
        if missing:
            raise ValueError(f"cost_keys {missing} are not in the cost rows; they have {sorted(set(c) - {'layer', 'slot', 'name'})}")
        price = {key: float(c[key]) * scale.get(key, 1.0) for key in cost_keys}
        if "is_attention" in c:
            price["is_attention"] = int(c["is_attention"])
        out.append(mip.Candidate(k[0], k[1], k[2], float(s[score]), price))
    return out
