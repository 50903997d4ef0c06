"""Puzzle stage 01, the block library: search space, parent-derived initialisation, BLD, save/load, assemble.

A tiny random Llama (hidden 64, 3 layers, 4 heads, 4 KV heads, FFN 128) and random token batches, made here.
"""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

import helpers
from lnkit.io import CheckpointError
from lnkit.model import from_llama
from lnkit.puzzle.library import (
    assemble,
    build_library,
    calibrate,
    ffn_channel_importance,
    load_library,
    merge_kv_heads,
    prune_ffn,
    save_library,
)
from lnkit.puzzle.space import SearchSpace, SearchSpaceError, candidates_for

STEPS = 40


one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)


@pytest.fixture(scope="module")
def parent():
    return helpers.tiny_llama()


@pytest.fixture(scope="module")
def library(parent):
    return build_library(parent, helpers.batches(), steps=STEPS, progress=False)


# ------------------------------------------------------------------------------------------ search space


@pytest.mark.parametrize("kw, needle", [
    ({"ffn_fractions": (0.5, 0.0)}, "ffn_fractions: 0.0 is not allowed"),
    ({"ffn_fractions": (1.5,)}, "ffn_fractions: 1.5 is not allowed"),
    ({"ffn_fractions": (-0.25,)}, "ffn_fractions: -0.25 is not allowed"),
    ({"kv_factors": (1,)}, "kv_factors: 1 is not allowed"),
])
def test_search_space_rejects_bad_values(kw, needle):
    with pytest.raises(SearchSpaceError, match=needle):
        SearchSpace(**kw)


@pytest.mark.parametrize("space, needle", [
    (SearchSpace(ffn_fractions=(0.001,)), r"0.001 of layer 0's FFN width 128 rounds to 0 channels"),
    (SearchSpace(kv_factors=(3,)), r"kv_factors: 3 does not fit layer 0.*allowed factors: \[2, 4\]"),
    (SearchSpace(kv_factors=(8,)), r"kv_factors: 8 does not fit.*allowed factors: \[2, 4\]"),
])
def test_search_space_rejects_what_the_parent_cannot_become(parent, space, needle):
    with pytest.raises(SearchSpaceError, match=needle):
        candidates_for(parent.config, space)


def test_candidates_cover_the_space(parent):
    cands = candidates_for(parent.config, SearchSpace(kv_factors=(2,), ffn_fractions=(0.5,), attention_linear=False))
    names = [(c.layer, c.slot, c.name) for c in cands if c.layer == 2]
    assert names == [(2, "attention", "attn_parent"), (2, "attention", "attn_kv2"), (2, "attention", "attn_noop"),
                     (2, "ffn", "ffn_100"), (2, "ffn", "ffn_50"), (2, "ffn", "ffn_linear"), (2, "ffn", "ffn_noop")]
    kv2 = next(c for c in cands if c.name == "attn_kv2")
    assert kv2.config.num_kv_heads(4) == 2
    assert next(c for c in cands if c.name == "ffn_50").config.width(64) == 64
    with pytest.raises(SearchSpaceError, match=r"layers: \[3\]"):
        candidates_for(parent.config, layers=[3])


# ------------------------------------------------------------------------------------------ initialisation


def test_ffn_pruned_to_full_width_is_the_parent_exactly(parent):
    nas = from_llama(parent)
    cal = calibrate(nas, helpers.batches(2), layers=[1])
    src = nas.model.layers[1]
    imp = ffn_channel_importance(src, cal.inputs[(1, "ffn")])
    assert imp.shape == (128,) and (imp > 0).all()
    pruned = prune_ffn(src.mlp, imp, 128)
    for k, v in src.mlp.state_dict().items():
        assert torch.equal(pruned[k], v), k
    # a narrower one keeps the most important channels
    top = set(torch.topk(imp, 32).indices.tolist())
    kept = prune_ffn(src.mlp, imp, 32)["down_proj.weight"]
    assert kept.shape == (64, 32)
    assert torch.equal(kept, src.mlp.down_proj.weight[:, sorted(top)])


def test_kv_merge_factor_one_is_the_parent_and_factor_two_pools(parent):
    attn = from_llama(parent).model.layers[0].self_attn
    same = merge_kv_heads(attn, 1)
    assert torch.equal(same["k_proj.weight"], attn.k_proj.weight)
    assert torch.equal(same["v_proj.weight"], attn.v_proj.weight)
    half = merge_kv_heads(attn, 2)["k_proj.weight"]  # heads of 16 rows: head 0 of the new = mean of old 0, 1
    assert half.shape == (32, 64)
    torch.testing.assert_close(half[:16], (attn.k_proj.weight[:16] + attn.k_proj.weight[16:32]) / 2)


# ----------------------------------------------------------------------------------------------- BLD


def test_library_losses(library):
    rows = {(r["layer"], r["slot"], r["name"]): r for r in library.rows}
    assert len(rows) == 3 * (5 + 7)
    for r in rows.values():
        assert r["loss_bld"] <= r["loss_init"] + 1e-9, r
    for layer in range(3):
        assert rows[(layer, "attention", "attn_parent")]["loss_init"] < 1e-10
        assert rows[(layer, "ffn", "ffn_100")]["loss_init"] < 1e-10
        assert rows[(layer, "attention", "attn_noop")]["loss_init"] == 1.0
        assert rows[(layer, "attention", "attn_linear")]["loss_init"] < 0.95  # least squares beats "add nothing"
        assert rows[(layer, "ffn", "ffn_linear")]["loss_init"] < 0.95
    pruned = [r for r in rows.values() if r["name"] in ("attn_kv2", "attn_kv4", "ffn_75", "ffn_50", "ffn_25", "ffn_10")]
    lowered = [r for r in pruned if r["loss_bld"] < r["loss_init"] - 1e-6]
    assert len(lowered) >= 0.75 * len(pruned), pruned
    # a parent-initialised candidate starts well below a no-op
    assert all(r["loss_init"] < 1.0 for r in pruned)


def test_build_is_deterministic_and_layers_restrict(parent):
    a = build_library(parent, helpers.batches(3), SearchSpace(kv_factors=(2,), ffn_fractions=(0.5,)), layers=[1],
                      steps=5, seed=3, progress=False)
    b = build_library(parent, helpers.batches(3), SearchSpace(kv_factors=(2,), ffn_fractions=(0.5,)), layers=[1],
                      steps=5, seed=3, progress=False)
    assert {k[0] for k in a.entries} == {1}
    assert a.rows == b.rows
    for k, e in a.entries.items():
        for n, t in (e.weights or {}).items():
            assert n.startswith("model.layers.1.")
            assert torch.equal(t, b.entries[k].weights[n])
    assert set(calibrate(parent, helpers.batches(1), layers=[2]).inputs) == {(2, "attention"), (2, "ffn")}


# ---------------------------------------------------------------------------------------------- assemble


def test_assemble_all_parent_reproduces_parent_logits(parent, library):
    ids = helpers.batches(1, seed=7)[0]
    explicit = {(i, s): n for i in range(3) for s, n in (("attention", "attn_parent"), ("ffn", "ffn_100"))}
    for choice in ({}, explicit):
        child = assemble(parent, choice, library)
        with torch.no_grad():
            assert (child(ids).logits - parent(ids).logits).abs().max() <= 1e-5


MIXED = {(0, "attention"): "attn_kv2", (0, "ffn"): "ffn_50", (1, "attention"): "attn_noop",
         (1, "ffn"): "ffn_linear", (2, "attention"): "attn_linear", (2, "ffn"): "ffn_noop"}


def test_assemble_mixed_generates(parent, library):
    child = assemble(parent, MIXED, library)
    kinds = [(b.attention.kind, b.ffn.kind) for b in child.config.block_configs]
    assert kinds == [("attention", "ffn"), ("no_op", "linear"), ("linear", "no_op")]
    assert child.config.block_configs[0].attention.num_kv_heads(4) == 2
    assert child.config.block_configs[0].ffn.width(64) == 64
    assert child.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    torch.testing.assert_close(child.model.layers[0].mlp.down_proj.weight,
                               library.entries[(0, "ffn", "ffn_50")].weights["model.layers.0.mlp.down_proj.weight"])
    out = child.generate(helpers.batches(1)[0][:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    with pytest.raises(KeyError, match=r"\(1, 'ffn'\) = 'ffn_33' is not in the block library; allowed"):
        assemble(parent, {(1, "ffn"): "ffn_33"}, library)


# ----------------------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_and_named_errors(tmp_path, parent, library):
    folder = save_library(library, tmp_path / "lib")
    with open(folder / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(library.rows) and rows[1]["name"] == "attn_kv2"
    loaded = load_library(folder)
    assert loaded.rows == library.rows
    ids = helpers.batches(1, seed=5)[0]
    with torch.no_grad():
        a, b = assemble(parent, MIXED, library)(ids).logits, assemble(parent, MIXED, loaded)(ids).logits
    assert torch.equal(a, b)

    weights = folder / "layer001_ffn_ffn_50" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"candidate layer001_ffn_ffn_50 is missing or corrupt"):
        load_library(folder)
    shutil.rmtree(folder / "layer001_ffn_ffn_50")
    with pytest.raises(CheckpointError, match=r"candidate layer001_ffn_ffn_50 is missing or corrupt"):
        load_library(folder)
    with pytest.raises(CheckpointError, match=r"no layerNNN.json index"):
        load_library(tmp_path / "empty")


def test_jobs_split_by_layers_share_one_folder(tmp_path, parent):
    space = SearchSpace(kv_factors=(2,), ffn_fractions=(0.5,), attention_linear=False, ffn_linear=False)
    for layers in ([0], [2]):
        save_library(build_library(parent, helpers.batches(2), space, layers=layers, steps=2, progress=False), tmp_path)
    loaded = load_library(tmp_path)
    assert {k[0] for k in loaded.entries} == {0, 2}
    with open(tmp_path / "losses.csv") as f:
        assert {r["layer"] for r in csv.DictReader(f)} == {"0", "2"}


def test_library_of_a_parent_with_no_op_and_linear_blocks(parent, library):
    """Iterating Puzzle on a child: its no-op slots offer only themselves, its linear slots can still go."""
    child = assemble(parent, {(1, "attention"): "attn_noop", (2, "ffn"): "ffn_linear"}, library)
    lib2 = build_library(child, helpers.batches(2), steps=2, progress=False)
    names = {(layer, slot): lib2.names(layer, slot) for layer in range(3) for slot in ("attention", "ffn")}
    assert names[(1, "attention")] == ["attn_parent"]
    assert "ffn_noop" in names[(2, "ffn")] and "ffn_linear" not in names[(2, "ffn")]
    x = helpers.batches(1)[0]
    same = assemble(child, {}, lib2)
    torch.testing.assert_close(same(x).logits, child(x).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- coupled BLD


@pytest.fixture(scope="module")
def coupled(parent):
    space = SearchSpace(kv_factors=(2,), ffn_fractions=(1.0, 0.5), attention_linear=False, ffn_linear=False)
    return build_library(parent, helpers.batches(), space, layers=[0, 2], steps=STEPS, coupled=True, progress=False)


def test_coupled_library_has_every_pair_trained_as_a_whole_layer(parent, coupled):
    from lnkit.puzzle.library import nmse
    from lnkit.puzzle.space import COUPLED

    names = coupled.names(0, COUPLED)
    assert len(names) == 3 * 3 and names[0] == "attn_parent+ffn_100" and "attn_kv2+ffn_50" in names
    rows = {(r["layer"], r["name"]): r for r in coupled.rows}
    assert rows[(0, "attn_parent+ffn_100")]["loss_init"] < 1e-10  # the parent pair reproduces the layer
    assert rows[(0, "attn_noop+ffn_noop")]["loss_init"] == pytest.approx(1.0)  # no-op: delta 0, nmse 1
    pair = rows[(2, "attn_kv2+ffn_50")]
    assert pair["loss_bld"] < pair["loss_init"]  # trained jointly, on the whole layer's output
    # the stored weights hold both sub-blocks under the released names of that layer
    w = coupled.entries[(2, COUPLED, "attn_kv2+ffn_50")].weights
    assert any(k.startswith("model.layers.2.self_attn.k_proj") for k in w) and "model.layers.2.mlp.up_proj.weight" in w
    assert w["model.layers.2.self_attn.k_proj.weight"].shape[0] == 64 // 2  # half the KV heads
    # its loss is the whole layer's: recompute on the layer's calibration input and delta
    cal = calibrate(parent, helpers.batches(), layers=[2])
    cal.inputs[(2, COUPLED)] = cal.inputs[(2, "attention")]
    cal.targets[(2, COUPLED)] = [a + f for a, f in zip(cal.targets[(2, "attention")], cal.targets[(2, "ffn")])]
    from lnkit.puzzle.scoring import candidate_module
    module = candidate_module(coupled.entries[(2, COUPLED, "attn_kv2+ffn_50")], parent)
    assert nmse(module, cal, (2, COUPLED)) == pytest.approx(pair["loss_bld"], rel=1e-4)


def test_coupled_library_round_trips_assembles_scores_and_prices(parent, coupled, tmp_path):
    from lnkit.puzzle.costs import measure_costs, to_mip_candidates
    from lnkit.puzzle.mip import solve
    from lnkit.puzzle.scoring import score_candidates, score_child
    from lnkit.puzzle.space import COUPLED

    loaded = load_library(save_library(coupled, tmp_path / "lib"))
    assert list(loaded.entries) == list(coupled.entries)
    key = (2, COUPLED, "attn_kv2+ffn_50")
    assert [p.name for p in loaded.entries[key].candidate.parts] == ["attn_kv2", "ffn_50"]
    child = assemble(parent, {(2, COUPLED): "attn_kv2+ffn_50"}, loaded)
    blocks = child.config.block_configs
    assert blocks[2].attention.n_heads_in_group == 2 and blocks[2].ffn.intermediate_size == 64
    assert blocks[0] == from_llama(parent).config.block_configs[0]  # unchosen layers stay the parent's
    held_out = helpers.batches(2, seed=7)
    scores = score_candidates(parent, loaded, held_out, progress=False)
    fast = {(r["layer"], r["slot"], r["name"]): r for r in scores}[key]
    assert fast["kl"] == pytest.approx(score_child(parent, child, held_out)["kl"], abs=1e-6)
    costs = measure_costs(loaded, parent.config, 2, 8, 4, repeats=1, warmup=0)
    c = {(r["layer"], r["name"]): r for r in costs}
    assert c[(0, "attn_noop+ffn_noop")]["decode_s"] == 0 and c[(0, "attn_noop+ffn_noop")]["is_attention"] == 0
    assert c[(0, "attn_kv2+ffn_100")]["is_attention"] == 1
    assert c[(0, "attn_kv2+ffn_100")]["kv_bytes"] * 2 == c[(0, "attn_parent+ffn_100")]["kv_bytes"]
    first = [r for r in scores if r["layer"] == 0], [r for r in costs if r["layer"] == 0]  # the MIP wants layers 0..n
    sol = solve(to_mip_candidates(*first, cost_keys=("params",)), max_attention_layers=0)
    assert all(c.name.startswith("attn_noop+") for c in sol.choice.values())
