"""Puzzle stage 02 pieces: replace-1-block scores, per-candidate costs (measured and analytic), the join into
MIP candidates.

A tiny random Llama (hidden 64, 3 layers, 4 heads, 4 KV heads, FFN 128) and a 5-step library, made here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import helpers
from lnkit import deploy
from lnkit.puzzle import mip
from lnkit.puzzle.costs import analytic_costs, measure_costs, to_mip_candidates
from lnkit.puzzle.library import as_nas, assemble, build_library
from lnkit.puzzle.scoring import (
    candidate_module,
    parent_pass,
    replaced_hidden,
    score_candidates,
    score_child,
)
from lnkit.puzzle.space import PARENT_NAMES, candidates_for

B, P, D = 2, 16, 8  # measured costs: batch, prompt and decode lengths (tiny: this is about behaviour)


one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)


@pytest.fixture(scope="module")
def parent():
    return helpers.tiny_llama()


@pytest.fixture(scope="module")
def library(parent):
    return build_library(parent, helpers.batches(4, seed=1), steps=5, progress=False)


@pytest.fixture(scope="module")
def held_out():
    return helpers.batches(2, seed=7)  # not the calibration batches


@pytest.fixture(scope="module")
def scores(parent, library, held_out):
    return score_candidates(parent, library, held_out, progress=False)


def by_key(rows):
    return {(r["layer"], r["slot"], r["name"]): r for r in rows}


# ------------------------------------------------------------------------------------------------ scoring


def test_parent_variants_score_zero_and_removing_attention_does_not(scores, library):
    assert [(r["layer"], r["slot"], r["name"]) for r in scores] == list(library.entries)
    for r in scores:
        assert set(r) == {"layer", "slot", "name", "kl", "lm_loss", "lm_loss_delta", "cosine"}
        assert r["lm_loss"] > 0 and r["kl"] > -1e-6 and r["cosine"] > -1e-6
        if r["name"] in PARENT_NAMES.values():
            assert abs(r["kl"]) < 1e-6 and abs(r["cosine"]) < 1e-6 and abs(r["lm_loss_delta"]) < 1e-6, r
    rows = by_key(scores)
    for layer in range(3):
        noop = rows[(layer, "attention", "attn_noop")]
        assert noop["kl"] > 1e-4 and noop["cosine"] > 1e-3
        assert rows[(layer, "ffn", "ffn_noop")]["kl"] > 0


@pytest.mark.parametrize("key", [(0, "attention", "attn_kv2"), (1, "ffn", "ffn_50"), (2, "attention", "attn_noop"),
                                 (0, "ffn", "ffn_linear"), (2, "ffn", "ffn_100")])
def test_fast_path_equals_assembling_the_child(parent, library, held_out, scores, key):
    layer, slot, name = key
    child = assemble(parent, {(layer, slot): name}, library)
    nas = as_nas(parent)
    passed = parent_pass(nas, held_out)
    module = candidate_module(library.entries[key], nas)
    with torch.no_grad():
        for b, ids in enumerate(held_out):
            fast = nas.lm_head(replaced_hidden(nas, passed, b, module, layer, slot))
            torch.testing.assert_close(fast, child(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=0)
    slow = score_child(parent, child, held_out)
    for m, v in slow.items():
        assert by_key(scores)[key][m] == pytest.approx(v, abs=1e-5), m


def test_scores_on_chosen_positions_match_a_direct_computation(parent, library, held_out):
    """Masked scores equal KL / LM loss / cosine computed by hand on exactly the selected positions, and
    differ from the all-position scores; a mask on a row's last position or selecting nothing is refused."""
    key = (1, "attention", "attn_noop")
    positions = [torch.zeros_like(ids, dtype=torch.bool) for ids in held_out]
    for m in positions:
        m[:, 3:9] = True
    small = type(library)({key: library.entries[key]})
    got = score_candidates(parent, small, held_out, positions=positions, progress=False)[0]
    child = assemble(parent, {key[:2]: key[2]}, library)
    nas = as_nas(parent)
    kl = ce = cos = 0.0
    n = 0
    with torch.no_grad():
        for ids, m in zip(held_out, positions):
            p_out = nas(input_ids=ids, output_hidden_states=True)
            c_out = child(input_ids=ids, output_hidden_states=True)
            lp, lc = p_out.logits.log_softmax(-1)[m], c_out.logits.log_softmax(-1)[m]
            kl += (lp.exp() * (lp - lc)).sum().item()
            ce += -lc.gather(-1, ids[:, 1:][m[:, :-1]][:, None]).sum().item()
            cos += torch.nn.functional.cosine_similarity(p_out.hidden_states[-1][m], c_out.hidden_states[-1][m], dim=-1).sum().item()
            n += int(m.sum())
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert got["lm_loss"] == pytest.approx(ce / n, rel=1e-4)
    assert got["cosine"] == pytest.approx(1 - cos / n, abs=1e-5)
    everywhere = score_candidates(parent, small, held_out, progress=False)[0]
    assert got["kl"] != pytest.approx(everywhere["kl"], rel=1e-3)
    last = [m.clone() for m in positions]
    last[0][:, -1] = True
    with pytest.raises(ValueError, match="False at each row's last position"):
        score_candidates(parent, small, held_out, positions=last, progress=False)
    with pytest.raises(ValueError, match="selects no token"):
        score_candidates(parent, small, held_out, positions=[torch.zeros_like(m) for m in positions], progress=False)


def test_token_batches_mark_the_positions_before_each_answer_token(tok, small_splits):
    from lnkit.puzzle.calibration import token_batches
    from lnkit.train.batches import encode_chat

    items = small_splits["test"][:20]
    kw = dict(rows=4, row_len=64, batch_size=2, seed=3)
    batches, masks = token_batches(tok, items, **kw, positions=True)
    assert [b.tolist() for b in batches] == [b.tolist() for b in token_batches(tok, items, **kw)]
    assert [b.shape for b in batches] == [m.shape for m in masks] and all(m.dtype == torch.bool for m in masks)
    assert not any(m[:, -1].any() for m in masks)
    # one item: each row starts with a whole encoding of it, in one of the three system-prompt modes
    one = token_batches(tok, items[:1], rows=1, row_len=200, batch_size=1, seed=3, positions=True)[1][0][0].tolist()
    row = token_batches(tok, items[:1], rows=1, row_len=200, batch_size=1, seed=3)[0][0].tolist()
    ids, labels = next(e for e in (encode_chat(tok, items[0].prompt, items[0].direct, m) for m in (None, "on", "off"))
                       if row[: len(e[0])] == e[0])
    assert one[: len(ids) - 1] == [lab != -100 for lab in labels[1:]]
    assert 0 < sum(one[: len(ids)]) < len(ids) - 1


def test_metrics_can_be_chosen_and_unknown_ones_are_refused(parent, library, held_out):
    small = type(library)({k: e for k, e in library.entries.items() if k[0] == 2 and k[1] == "ffn"})
    rows = score_candidates(parent, small, held_out[:1], metrics=("cosine",), progress=False)
    assert len(rows) == 7 and set(rows[0]) == {"layer", "slot", "name", "cosine"}
    with pytest.raises(ValueError, match=r"\['perplexity'\] not allowed; choose from \('kl', 'lm_loss', 'cosine'\)"):
        score_candidates(parent, small, held_out, metrics=("kl", "perplexity"))


# -------------------------------------------------------------------------------------------------- costs


@pytest.fixture(scope="module")
def measured(library, parent):
    return measure_costs(library, parent.config, B, P, D, repeats=2, warmup=1, device="cpu")


def test_measured_memory_has_kv_only_for_attention(measured):
    rows = by_key(measured)
    assert len(rows) == 3 * 12
    for (layer, slot, name), r in rows.items():
        real_attention = slot == "attention" and name not in ("attn_linear", "attn_noop")
        assert r["is_attention"] == int(real_attention)
        assert (r["kv_bytes"] > 0) == real_attention, (layer, name)
        assert r["memory_bytes"] == r["params"] * 4 + r["kv_bytes"]  # fp32 weights
        if name.endswith("noop"):
            assert r["params"] == r["memory_bytes"] == 0 and r["prefill_s"] == r["decode_s"] == 0.0
        else:
            assert r["prefill_s"] > 0 and r["decode_s"] > 0
    parent_attn = rows[(0, "attention", "attn_parent")]
    assert parent_attn["kv_bytes"] == 2 * 4 * 16 * 4 * B * (P + D)  # K and V x 4 heads x head_dim 16 x fp32
    assert rows[(0, "attention", "attn_kv2")]["kv_bytes"] * 2 == parent_attn["kv_bytes"]
    assert rows[(0, "attention", "attn_kv4")]["kv_bytes"] * 4 == parent_attn["kv_bytes"]
    assert parent_attn["params"] == 4 * 64 * 64 + 64  # q, k, v, o and the norm
    # the layers are identical, so each variant is timed once and shared
    assert rows[(0, "ffn", "ffn_50")]["decode_s"] == rows[(2, "ffn", "ffn_50")]["decode_s"]


def test_analytic_costs_follow_the_roofline(library, parent):
    rows = by_key(analytic_costs(library, parent.config, "H100", 8, 512, 512, "bf16", "fp8"))
    widths = ["ffn_100", "ffn_75", "ffn_50", "ffn_25", "ffn_10"]
    decode = [rows[(1, "ffn", n)]["decode_s"] for n in widths]
    assert all(a > b for a, b in zip(decode, decode[1:])) and decode[-1] > 0
    for slot, name in (("ffn", "ffn_noop"), ("attention", "attn_noop")):
        r = rows[(1, slot, name)]
        assert r["decode_s"] == r["prefill_s"] == r["memory_bytes"] == 0
    kv = rows[(1, "attention", "attn_parent")]["kv_bytes"]
    assert kv == 2 * 4 * 16 * 1 * 8 * 1024 and rows[(1, "attention", "attn_kv2")]["kv_bytes"] * 2 == kv
    assert rows[(1, "attention", "attn_linear")]["kv_bytes"] == 0
    # the parent variants' parameters add up to deploy's count of the whole parent
    blocks = sum(r["params"] for k, r in rows.items() if k[2] in PARENT_NAMES.values())
    embed = 101 * 64 * 2 + 64  # embeddings, untied LM head, final norm
    assert blocks + embed == deploy.count_parameters(parent.config)


def test_analytic_costs_price_a_big_parent_from_a_laptop():
    cfg = deploy.BUILTIN_CONFIGS["Llama-3.3-70B"]
    llama = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    rows = by_key(analytic_costs(candidates_for(llama, layers=[0]), "Llama-3.3-70B", "H100", 64, 1024, 1024, "fp8", "fp8"))
    assert rows[(0, "attention", "attn_kv2")]["decode_s"] < rows[(0, "attention", "attn_parent")]["decode_s"]
    assert rows[(0, "ffn", "ffn_100")]["params"] == 3 * 8192 * 28672 + 8192


def test_unknown_gpu_error_comes_from_deploy(library, parent):
    with pytest.raises(KeyError, match=r"unknown GPU 'B300'; the catalogue has: H100"):
        analytic_costs(library, parent.config, "B300", 1, 8, 8)


# ------------------------------------------------------------------------------------------------ joining


def test_join_feeds_the_mip(scores, library, parent):
    costs = analytic_costs(library, parent.config, "H100", 8, 512, 512)
    cands = to_mip_candidates(scores, costs, score="kl", cost_keys=("memory_bytes", "decode_s"),
                              scale={"decode_s": 1e6})  # microseconds: far above the solver's tolerance
    assert len(cands) == len(library.entries) and all(isinstance(c, mip.Candidate) for c in cands)
    flags = {c.name: c.costs["is_attention"] for c in cands if c.layer == 0 and c.slot == "attention"}
    assert flags == {"attn_parent": 1, "attn_kv2": 1, "attn_kv4": 1, "attn_linear": 0, "attn_noop": 0}
    full = sum(c.costs["decode_s"] for c in cands if c.name in PARENT_NAMES.values())
    sol = mip.solve(cands, budgets={"decode_s": 0.7 * full})
    assert sol.costs["decode_s"] <= 0.7 * full * (1 + 1e-9) and sol.objective > 0
    assert cands[0].costs["decode_s"] == pytest.approx(costs[0]["decode_s"] * 1e6)


def test_join_names_candidates_missing_on_either_side(scores, measured):
    fewer_scores = [r for r in scores if (r["layer"], r["name"]) != (1, "ffn_50")]
    with pytest.raises(ValueError, match=r"only in costs: layer 1 ffn 'ffn_50'"):
        to_mip_candidates(fewer_scores, measured)
    fewer_costs = [r for r in measured if (r["layer"], r["name"]) != (2, "attn_kv4")]
    with pytest.raises(ValueError, match=r"only in scores: layer 2 attention 'attn_kv4'"):
        to_mip_candidates(scores, fewer_costs)
    with pytest.raises(ValueError, match=r"score 'perplexity' is not in the score rows"):
        to_mip_candidates(scores, measured, score="perplexity")
