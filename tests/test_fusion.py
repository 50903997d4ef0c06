"""FFN Fusion (lnkit.fusion) and its stage (lnkit.stages.fusion): runs, dependency, grouping, exact fusion,
the released format and vLLM widths, bad input. Tiny random nemotron-nas models made on the spot (fp32).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import helpers
import lnkit.model  # noqa: F401  (registers nemotron-nas)
from lnkit.fusion import (
    FusionError,
    attention_free_runs,
    check_group,
    fuse_config,
    fuse_ffns,
    fuse_model,
    greedy_groups,
    measure_dependencies,
    parallel,
)
from lnkit.model import NemotronNasConfig, NemotronNasForCausalLM, check_vllm_compatible, vllm_compatibility
from lnkit.params import ParamError

one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)
SUPER = Path(__file__).resolve().parents[1] / "lib" / "lnkit" / "reference_configs" / \
    "llama-3_3-nemotron-super-49b-v1.config.json"


def att(kind="A", group=1):
    return {"no_op": kind == "N", "replace_with_linear": kind == "L", "n_heads_in_group": group if kind == "A" else None}


def ffn(kind="F", width=None, mult=None):
    d = {"no_op": kind == "N", "replace_with_linear": kind == "L", "ffn_mult": mult}
    if kind == "F":
        if width is not None:
            d["intermediate_size"] = width
            d["ffn_mult"] = d["ffn_mult"] or width * 3 / (2 * 64)
    return d


def make(blocks, seed=0, scale=None, hidden=64, tied=False, mlp_bias=False) -> NemotronNasForCausalLM:
    """A random nemotron-nas model (hidden 64, 4 heads) with perturbed norms; ``scale`` re-draws every
    weight with that std so FFN outputs are O(1) (the default init makes them tiny)."""
    torch.manual_seed(seed)
    cfg = NemotronNasConfig(vocab_size=101, hidden_size=hidden, num_hidden_layers=len(blocks), num_attention_heads=4,
                            block_configs=blocks, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0,
                            tie_word_embeddings=tied, mlp_bias=mlp_bias)
    m = NemotronNasForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif scale is not None and "embed" not in name:
                p.copy_(scale * torch.randn_like(p))
    return m


# layer 0 real attention + FFN, 1-2 attention-free FFNs, 3 empty, 4 attention-free FFN, 5 linear attention,
# 6 attention-free linear FFN, 7-8 attention-free FFNs, 9 real attention.
BLOCKS = [
    {"attention": att(), "ffn": ffn(width=96)},
    {"attention": att("N"), "ffn": ffn(width=64)},
    {"attention": att("N"), "ffn": ffn(width=40)},
    {"attention": att("N"), "ffn": ffn("N")},
    {"attention": att("N"), "ffn": ffn(width=32)},
    {"attention": att("L"), "ffn": ffn(width=48)},
    {"attention": att("N"), "ffn": ffn("L")},
    {"attention": att("N"), "ffn": ffn(width=24)},
    {"attention": att("N"), "ffn": ffn(width=80)},
    {"attention": att(group=2), "ffn": ffn(width=64)},
]


@pytest.fixture(scope="module")
def hetero():
    return make(BLOCKS)


def test_runs_follow_the_documented_definition(hetero):
    # an empty layer is skipped, linear attention and a linear FFN end a run, real attention too
    assert attention_free_runs(hetero.config) == [[0, 1, 2, 4], [7, 8]]
    assert attention_free_runs(hetero.config, min_len=1) == [[0, 1, 2, 4], [5], [7, 8], [9]]
    assert attention_free_runs(NemotronNasConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=32)) == []


@torch.no_grad()
def test_fused_ffn_is_the_parallel_sum_in_fp32():
    m = make(BLOCKS, seed=1, scale=0.1, mlp_bias=True)
    layers = [m.model.layers[i] for i in (0, 1, 2, 4)]
    x = 3 * torch.randn(5, 7, 64)  # the norm makes the scale of x irrelevant
    want = sum(layer.mlp(layer.post_attention_layernorm(x)) for layer in layers)
    assert 0.1 < want.abs().mean() < 10  # O(1) outputs, so 1e-5 is a real test
    for width in (None, 300):  # concatenated (232) and zero-padded
        f = fuse_ffns(layers, width)
        assert f["gate_proj"].shape == (width or 232, 64) and f["down_proj"].shape == (64, width or 232)
        r = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        h = torch.nn.functional.silu(r @ f["gate_proj"].T + f["gate_proj_bias"]) * (r @ f["up_proj"].T + f["up_proj_bias"])
        got = h @ f["down_proj"].T + f["down_proj_bias"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(f["norm"], torch.ones(64))


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_fused_model_equals_the_parallel_model_and_keeps_the_format(tmp_path, tied):
    m = make(BLOCKS, seed=2, scale=0.15, tied=tied)
    groups = [[0, 1, 2, 4], [7, 8]]
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    fused = fuse_model(m, groups)
    with parallel(m, groups):
        want = m(input_ids=ids, use_cache=False).logits
    plain = m(input_ids=ids, use_cache=False).logits
    got = fused(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # fusion is an approximation of the sequential model
    # incremental decoding through the fused model (emptied layers hold no cache) gives the same logits
    cache = DynamicCache()
    step = [fused(input_ids=ids[:, :8], cache=cache, use_cache=True).logits[:, -1]]
    for t in range(8, 12):
        step.append(fused(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(step[1:], 1), got[:, 8:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(step[0], got[:, 7], atol=1e-4, rtol=1e-5)
    # released format: the fused FFN is an ordinary wider ffn block in the group's first layer, the rest no-op
    bc = fused.config.block_configs
    assert bc[0].ffn.width(64) == 96 + 64 + 40 + 32 and bc[0].attention == m.config.block_configs[0].attention
    assert bc[7].ffn.width(64) == 24 + 80
    for i in (1, 2, 4, 8):
        assert bc[i].attention.kind == "no_op" and bc[i].ffn.kind == "no_op"
        assert not any(k.startswith(f"model.layers.{i}.") for k in fused.state_dict())
    for i in (3, 5, 6, 9):
        assert bc[i] == m.config.block_configs[i]
    assert fused.config.attention_layers() == m.config.attention_layers()
    assert m.config.block_configs[1].ffn.kind == "ffn"  # the input model is untouched
    fused.save_pretrained(tmp_path)  # strict loading: the tensors match the block configs
    again = NemotronNasForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(input_ids=ids).logits, got)


@torch.no_grad()
def test_dependency_matches_removing_the_ffn_from_the_model():
    """D[i, j] is what FFN j's output does when FFN i is removed from the real model (its down-projection
    zeroed), and parallel[j] what it does in the parallel model: both read off with hooks."""
    m = make(BLOCKS, seed=3, scale=0.1)
    batches = helpers.batches(n=2)
    run = [0, 1, 2, 4]
    (dep,) = measure_dependencies(m, batches, [run])
    assert dep["tokens"] == 2 * 4 * 32 and dep["layers"] == run

    def ffn_outputs(model):
        outs = {i: [] for i in run}
        hs = [model.model.layers[i].mlp.register_forward_hook(lambda mod, a, o, i=i: outs[i].append(o)) for i in run]
        for b in batches:
            model(input_ids=b, use_cache=False)
        for h in hs:
            h.remove()
        return {i: torch.cat(v) for i, v in outs.items()}

    def dist(a, b):
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).clamp(0, 1).mean().item()

    base = ffn_outputs(m)
    for a, i in enumerate(run):
        w = m.model.layers[i].mlp.down_proj.weight
        saved = w.clone()
        w.zero_()
        removed = ffn_outputs(m)
        w.copy_(saved)
        for b, j in enumerate(run):
            want = dist(base[j], removed[j]) if b > a else 0.0
            assert dep["dependency"][a][b] == pytest.approx(want, abs=1e-5)
    with parallel(m, [run]):
        par = ffn_outputs(m)
    for b, j in enumerate(run):
        assert dep["parallel"][b] == pytest.approx(dist(base[j], par[j]), abs=1e-5)
    assert dep["parallel"][0] == 0 and max(dep["parallel"]) > 1e-3


def test_greedy_groups_follow_the_threshold():
    D = [[0, .05, .4, .1], [0, 0, .05, .1], [0, 0, 0, .02], [0, 0, 0, 0]]
    assert greedy_groups([1, 2, 3, 4], D, 1.0) == [[1, 2, 3, 4]]
    assert greedy_groups([1, 2, 3, 4], D, 0.1) == [[1, 2], [3, 4]]  # 3 depends on 1 by 0.4
    assert greedy_groups([1, 2, 3, 4], D, 0.0) == [[1], [2], [3], [4]]
    with pytest.raises(ValueError, match="threshold"):
        greedy_groups([1], [[0]], 1.5)


@torch.no_grad()
def test_vllm_servable_child_stays_servable():
    blocks = [{"attention": att(group=2), "ffn": ffn(mult=6.0)},  # width 256 at hidden 64
              {"attention": att("N"), "ffn": ffn(mult=12.0)},  # 512
              {"attention": att("N"), "ffn": ffn(mult=6.0)},
              {"attention": att(group=2), "ffn": ffn(mult=6.0)}]
    m = make(blocks, seed=4)
    check_vllm_compatible(m.config)
    fused = fuse_model(m, [[0, 1, 2]])  # width_rule "auto" -> the released rule
    check_vllm_compatible(fused.config)
    f0 = fused.config.block_configs[0].ffn
    assert f0.intermediate_size is None and f0.width(64) == 1024
    assert fused.config.to_dict()["block_configs"][0]["ffn"] == {"no_op": False, "replace_with_linear": False,
                                                                 "ffn_mult": 24.0}


@torch.no_grad()
def test_unrepresentable_width_is_zero_padded_exactly():
    blocks = [{"attention": att(group=2), "ffn": ffn(width=64)},
              {"attention": att("N"), "ffn": ffn(width=96)}]
    m = make(blocks, seed=5, scale=0.15)
    assert vllm_compatibility(m.config)  # explicit widths: not servable as it is
    ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(1))
    with parallel(m, [[0, 1]]):
        want = m(input_ids=ids).logits
    exact = fuse_model(m, [[0, 1]], "exact")
    assert exact.config.block_configs[0].ffn.intermediate_size == 160  # auto would keep this too
    assert fuse_model(m, [[0, 1]]).config.block_configs[0].ffn.intermediate_size == 160
    padded = fuse_model(m, [[0, 1]], "released")
    f0 = padded.config.block_configs[0].ffn
    assert f0.intermediate_size is None and f0.width(64) == 256
    check_vllm_compatible(padded.config)  # every FFN left is the padded one
    assert padded.model.layers[0].mlp.gate_proj.weight[160:].abs().sum() == 0
    for model in (exact, padded):
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-5)


def test_bad_groups_are_refused_naming_the_layer(hetero):
    cases = {
        "layer 9 has attention attention between the FFNs of layers 8 and 9": [8, 9],
        "layer 5 has linear attention": [4, 5],
        "layer 6's FFN is linear": [6, 7],
        "layer 3's FFN is no_op": [2, 3],
        "layer 1 .* sits between the FFNs of layers 0 and 2": [0, 2],  # a group is consecutive FFNs
        "ascending": [2, 1],
        "in 0..9": [8, 10],
    }
    for msg, g in cases.items():
        with pytest.raises(FusionError, match=msg):
            check_group(hetero.config, g)
    check_group(hetero.config, [2, 4])  # layer 3 is empty: the run goes through it
    with pytest.raises(FusionError, match="overlaps another group at layer"):
        fuse_model(hetero, [[0, 1], [1, 2]])
    with pytest.raises(FusionError, match="layer 9 has attention"):
        fuse_config(hetero.config, [[7, 8, 9]])


def test_params_are_checked_before_any_compute():
    from lnkit.stages.fusion import Params as FusionParams

    for bad in ({"threshold": 1.5}, {"threshold": -0.1}):
        with pytest.raises(ParamError, match="threshold"):
            FusionParams(**bad)
    with pytest.raises(ParamError, match="width_rule"):
        FusionParams(width_rule="wide")
    with pytest.raises(ParamError, match="gpu"):
        FusionParams(gpu="B300")
    with pytest.raises(ParamError, match="child"):
        FusionParams(child=" ")


def _fake_search(tmp_path, best, rows, children):
    d = tmp_path / "02_architecture_search"
    (d / "children").mkdir(parents=True)
    (d / "_COMPLETE.json").write_text("{}")
    (d / "best_2x.json").write_text(json.dumps(best))  # stage 02's run(p) writes it: no notebook cell needed
    with open(d / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["kind", "label", "priced_speedup", "speedup"])
        w.writeheader()
        w.writerows(rows)
    for c in children:
        (d / "children" / c).mkdir()
    return d


def test_child_resolution_and_its_errors_name_files(tmp_path):
    from lnkit.stages.fusion import Params as FusionParams
    from lnkit.stages.fusion import resolve_child

    rows = [{"kind": "parent", "label": "parent", "priced_speedup": 1.0, "speedup": 1.0},
            {"kind": "puzzle", "label": "budget 0.50", "priced_speedup": 1.6, "speedup": 3.1},  # a noisy fast round
            {"kind": "puzzle", "label": "budget 0.30", "priced_speedup": 2.8, "speedup": 2.5},
            {"kind": "baseline", "label": "uniform", "priced_speedup": 9, "speedup": 9}]
    d = _fake_search(tmp_path, {"label": "budget 0.50"}, rows, ["budget_0.50", "budget_0.30"])
    assert resolve_child(FusionParams(run_dir=str(tmp_path))) == ("budget 0.50", d / "children" / "budget_0.50")
    (d / "best_2x.json").write_text(json.dumps(None))  # no 2x child: the fastest puzzle child, as priced
    assert resolve_child(FusionParams(run_dir=str(tmp_path)))[0] == "budget 0.30"
    assert resolve_child(FusionParams(run_dir=str(tmp_path), child="budget 0.50"))[0] == "budget 0.50"
    with pytest.raises(FileNotFoundError, match=r"budget_0\.99.*saved children: \['budget 0.30', 'budget 0.50'\]"):
        resolve_child(FusionParams(run_dir=str(tmp_path), child="budget 0.99"))
    (d / "frontier.csv").unlink()
    with pytest.raises(FileNotFoundError, match="frontier.csv"):
        resolve_child(FusionParams(run_dir=str(tmp_path)))
    (d / "best_2x.json").write_text("{broken")
    with pytest.raises(FileNotFoundError, match="best_2x.json"):
        resolve_child(FusionParams(run_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="02_architecture_search has not completed"):
        resolve_child(FusionParams(run_dir=str(tmp_path / "elsewhere")))


def test_released_config_fused_analytically_prices_fewer_allreduces():
    from lnkit.deploy import estimate

    ref = json.loads(SUPER.read_text())
    runs = attention_free_runs(ref)
    assert [41] + list(range(42, 52)) in runs  # LN-Super's long attention-free stretch after layer 41
    fused = fuse_config(ref, runs, "released")
    cfg = NemotronNasConfig.from_dict(fused)
    check_vllm_compatible(cfg, 8)  # LN-Super is servable at TP8, and stays so
    emptied = sum(len(r) - 1 for r in runs)
    before = sum(b["ffn"]["no_op"] for b in ref["block_configs"])
    assert sum(b.ffn.no_op for b in cfg.block_configs) == before + emptied
    for r in runs:
        assert cfg.block_configs[r[0]].ffn.width(8192) == sum(
            NemotronNasConfig.from_dict(ref).block_configs[i].ffn.width(8192) for i in r)
    assert fused["block_configs"][5]["ffn"].keys() == ref["block_configs"][5]["ffn"].keys()  # extra keys kept
    e0, e1 = estimate(ref, "H100", 8), estimate(fused, "H100", 8)
    assert e1["allreduces"] == e0["allreduces"] - emptied and e1["latency_s"] < e0["latency_s"]
