"""lnkit.deploy: parameter counts of the released and parent configs, KV bytes by hand, capacity, the
roofline's accounting (no-op layers free, all-reduces per sub-block) and the paper-claim rows as computed."""

from __future__ import annotations

import json

import pytest

from lnkit import deploy, plots
from lnkit.params import ParamError


def tiny_nas(layers):
    """A nemotron-nas config: hidden 64, 4 heads of 16, one (attention, ffn) spec per layer."""
    blocks = []
    for att, ffn in layers:
        a = {"no_op": att == "no_op", "replace_with_linear": att == "linear"}
        if isinstance(att, int):
            a["n_heads_in_group"] = att
        f = {"no_op": ffn == "no_op", "replace_with_linear": ffn == "linear"}
        if isinstance(ffn, int):
            f["intermediate_size"] = ffn
        blocks.append({"attention": a, "ffn": f})
    return {"model_type": "nemotron-nas", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": len(layers),
            "vocab_size": 100, "tie_word_embeddings": False, "block_configs": blocks}


@pytest.mark.parametrize("name, billions", [("LN-Super", 49.87), ("LN-Ultra", 253.4),
                                            ("Llama-3.3-70B", 70.6), ("Llama-3.1-405B", 405.8)])
def test_parameter_counts_match_the_published_sizes(name, billions):
    assert deploy.count_parameters(name) / 1e9 == pytest.approx(billions, rel=0.01)


def test_reference_configs_have_the_known_attention_layers():
    sup, ult = deploy.model_shape("LN-Super"), deploy.model_shape("LN-Ultra")
    assert len(sup.layers) == 80 and sum(L.attention == "attention" for L in sup.layers) == 49
    assert len(ult.layers) == 162 and sum(L.attention == "attention" for L in ult.layers) == 64
    assert {L.kv_heads for L in sup.layers if L.attention == "attention"} == {8}
    assert [L.index for L in ult.layers if L.ffn_width > 100_000] == [125, 134, 143, 149]  # the fused FFNs
    assert deploy.kv_bytes_per_token("LN-Super", "fp8") == 49 * 2 * 8 * 128
    assert deploy.kv_bytes_per_token("Llama-3.3-70B", "bf16") == 80 * 2 * 8 * 128 * 2


def test_kv_bytes_and_parameters_by_hand_for_a_small_config():
    # Layers: 2 KV heads (group 2), linear attention, no-op attention, 1 KV head (group 4); head_dim 16.
    cfg = tiny_nas([(2, 32), ("linear", "linear"), ("no_op", 48), (4, "no_op")])
    assert deploy.kv_bytes_per_token(cfg, "bf16") == (2 * 2 * 16 + 2 * 1 * 16) * 2
    assert deploy.kv_bytes_per_token(cfg, "fp8") == 2 * 2 * 16 + 2 * 1 * 16
    # tensor parallelism past a layer's KV heads: every rank keeps one of its own (max(kv, tp) heads cached)
    assert deploy.kv_bytes_per_token(cfg, "fp8", tp=2) == 2 * 2 * 16 + 2 * 2 * 16
    assert deploy.kv_bytes_per_token(cfg, "fp8", tp=4) == 2 * 4 * 16 + 2 * 4 * 16
    plan = deploy.memory_plan(cfg, "H100", 4, "fp8", "fp8", 0.1)
    assert plan["kv_bytes_per_token"] == deploy.kv_bytes_per_token(cfg, "fp8", tp=4)
    h = 64
    attn = lambda kv: 2 * h * 64 + 2 * h * kv * 16 + h  # noqa: E731  q,o + k,v + norm
    expected = (2 * 100 * h + h  # embeddings, lm_head, final norm
                + attn(2) + 3 * h * 32 + h  # layer 0
                + 2 * (h * h + h)  # layer 1: two linear replacements with their norms
                + 3 * h * 48 + h  # layer 2: no attention, not even its norm
                + attn(1))  # layer 3: no FFN
    assert deploy.count_parameters(cfg) == expected


def test_a_plain_llama_config_is_identical_layers_and_accepts_to_dict_objects():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
           "vocab_size": 100, "tie_word_embeddings": True}  # no num_key_value_heads: full multi-head
    s = deploy.model_shape(cfg)
    assert [(L.attention, L.kv_heads, L.ffn, L.ffn_width) for L in s.layers] == [("attention", 4, "ffn", 96)] * 2
    assert deploy.count_parameters(cfg) == 100 * 64 + 64 + 2 * (4 * 64 * 64 + 64 + 3 * 64 * 96 + 64)

    class Cfg:
        def to_dict(self):
            return {**cfg, "head_dim": 8}

    assert deploy.model_shape(Cfg()).head_dim == 8


def test_config_from_a_path_or_a_run_folder(tmp_path):
    cfg = tiny_nas([(2, 32)])
    model = tmp_path / "run" / "10_stage" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(cfg))
    assert deploy.load_config(model / "config.json") == cfg
    assert deploy.load_config(tmp_path / "run") == cfg
    with pytest.raises(FileNotFoundError, match="LN-Super"):
        deploy.load_config(tmp_path / "nowhere.json")


def test_capacity_falls_with_reserve_and_grows_with_gpus():
    caps = [deploy.kv_cache_capacity("LN-Ultra", "H100", 8, "fp8", "fp8", r) for r in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert caps == sorted(caps, reverse=True) and caps[-1] < caps[0]
    by_gpus = [deploy.kv_cache_capacity("LN-Ultra", "H100", n, "fp8", "fp8", 0.1) for n in (1, 2, 4, 8, 16)]
    assert by_gpus == sorted(by_gpus) and by_gpus[0] == 0 and by_gpus[-1] > by_gpus[-2]
    assert deploy.kv_cache_capacity("Llama-3.1-405B", "H100", 8, "bf16", "bf16", 0.0) == 0  # 812 GB > 640 GB
    plan = deploy.memory_plan("LN-Super", "H200", 1, "bf16", "bf16", 0.1)
    assert plan["kv_tokens"] == int((141e9 * 0.9 - plan["weight_bytes"]) // plan["kv_bytes_per_token"])
    with pytest.raises(ValueError, match="reserve_fraction"):
        deploy.kv_cache_capacity("LN-Super", reserve_fraction=1.0)


def test_no_op_layers_cost_nothing():
    base = tiny_nas([(2, 32), (4, 48)])
    padded = tiny_nas([(2, 32), ("no_op", "no_op"), (4, 48)])
    assert deploy.count_parameters(padded) == deploy.count_parameters(base)
    assert deploy.kv_bytes_per_token(padded) == deploy.kv_bytes_per_token(base)
    kw = dict(gpu="H100", tp=2, batch_size=4, prompt_len=64, output_len=32)
    a, b = deploy.estimate(base, **kw), deploy.estimate(padded, **kw)
    assert b["prefill_s"] == pytest.approx(a["prefill_s"]) and b["decode_step_s"] == pytest.approx(a["decode_step_s"])
    empty = b["layers"][1]
    assert empty["allreduces"] == 0 and empty["prefill_s"] == 0 and empty["decode_s"] == 0


def test_allreduces_counted_per_existing_sub_block_under_tp():
    cfg = tiny_nas([(2, 32), (2, "no_op"), ("no_op", 32), ("linear", "no_op"), ("no_op", "no_op")])
    assert [r["allreduces"] for r in deploy.layer_costs(cfg, tp=4)[:-1]] == [2, 1, 1, 1, 0]
    assert all(r["allreduces"] == 0 for r in deploy.layer_costs(cfg, tp=1))
    assert deploy.estimate("Llama-3.3-70B", tp=4)["allreduces"] == 160
    ult = deploy.model_shape("LN-Ultra")
    by_hand = sum((L.attention != "no_op") + (L.ffn != "no_op") for L in ult.layers)
    assert deploy.estimate("LN-Ultra", tp=8)["allreduces"] == by_hand < 2 * 126  # fewer hops than the 405B
    t1 = deploy.layer_costs(cfg, tp=1)[0]
    t4 = deploy.layer_costs(cfg, tp=4)[0]
    assert t1["decode_attention_comm_s"] == 0 < t4["decode_attention_comm_s"]


def test_decode_at_batch_one_is_weight_streaming():
    a = deploy.Assumptions()
    est = deploy.estimate("Llama-3.3-70B", "H100", 1, 1, 16, 16, "bf16", "bf16", assumptions=a)
    streamed = deploy.count_parameters("Llama-3.3-70B") - 128256 * 8192  # all but the embedding table (a lookup)
    stream = streamed * 2 / (3.35e12 * a.bandwidth_efficiency)
    assert est["decode_step_s"] == pytest.approx(stream, rel=0.01)
    est4 = deploy.estimate("Llama-3.3-70B", "H100", 4, 1, 16, 16, "bf16", "bf16", assumptions=a)
    assert stream / 4 < est4["decode_step_s"] < stream / 4 + 160 * 20e-6  # a quarter, plus 160 all-reduces


def test_unknown_gpu_lists_the_catalogue_and_a100_has_no_fp8():
    with pytest.raises(KeyError) as e:
        deploy.get_gpu("TPU-v5")
    assert all(k in str(e.value) for k in deploy.GPUS)
    a100 = deploy.get_gpu("A100")
    assert a100.fp8_tflops is None
    with pytest.raises(ValueError, match="no FP8"):
        deploy.estimate("LN-Super", "A100", compute_dtype="fp8", weight_dtype="fp8")
    # The stated fall-back: FP8 weights on A100 are weight-only FP8, computed in BF16.
    kw = dict(gpu="A100", batch_size=8, prompt_len=128, output_len=8, weight_dtype="fp8", kv_dtype="fp8")
    assert deploy.estimate("LN-Super", **kw)["latency_s"] == deploy.estimate("LN-Super", compute_dtype="bf16", **kw)["latency_s"]
    assert deploy.kv_cache_capacity("LN-Super", "A100", 1, "fp8", "fp8", 0.0) > 0  # FP8 storage still fits


def test_paper_claims_as_computed():
    rows = {r["claim"].split(":")[0] + r["claim"][-30:]: r for r in deploy.paper_claims()}
    by = lambda text: next(r for r in rows.values() if text in r["claim"])  # noqa: E731
    sup = by("~300k")
    assert sup["within_tolerance"] and sup["reproduced_figure"] == pytest.approx(300_000, rel=0.01)
    assert "FP8 weights and FP8 KV" in sup["assumptions"] and "reserve 0%" in sup["assumptions"]
    assert "220,552" in sup["assumptions"]  # with a 10% reserve it does not reproduce: stated in the row
    ult8 = by("3M")
    assert ult8["within_tolerance"] and ult8["reproduced_figure"] == pytest.approx(2.95e6, rel=0.01)
    ult16 = by("600k")  # not reproduced: BF16 weights (507 GB) leave 133 GB, 508k tokens at 256 kB each
    assert ult16["within_tolerance"] is False and ult16["reproduced_figure"] == 508_108
    assert "688,141" in ult16["assumptions"]  # the 80 GiB reading overshoots: stated, not chosen
    tput = by("2.17x")
    assert tput["within_tolerance"] is False and tput["reproduced_figure"] == pytest.approx(1.45, abs=0.01)
    lat = by("1.71x")
    assert lat["within_tolerance"] and lat["reproduced_figure"] == pytest.approx(1.62, abs=0.01)
    parents = [r for r in rows.values() if r["claim"].startswith("(parent)")]
    assert len(parents) == 3 and all(r["paper_figure"] is None and r["within_tolerance"] is None for r in parents)
    assert by("405B: cached tokens in BF16")["reproduced_figure"] == 0
    assert by("70B: cached tokens")["reproduced_figure"] < sup["reproduced_figure"] / 5


def test_throughput_ratio_depends_on_the_scenario():
    rows = deploy.throughput_ratios()
    ratios = [r["ratio per GPU"] for r in rows]
    assert max(ratios) < 2.17 and min(ratios) < 1  # the roofline never reaches the paper's figure here


def test_planner_params_validate_and_match_the_notebook():
    import nbformat

    with pytest.raises(ParamError, match="tp=3"):
        deploy.PlannerParams(num_gpus=8, tp=3)
    with pytest.raises(ParamError, match="gpu"):
        deploy.PlannerParams(gpu="B300")
    nb = nbformat.read(deploy.REFERENCE_DIR.parents[2] / "notebooks" / "deployment_planner.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(cell.source, ns)
    p = deploy.PlannerParams.from_namespace(ns)
    assert {k for k in ns if not k.startswith("__")} == set(p.to_dict())


def test_plot_layer_costs_stacks_every_layer():
    import matplotlib

    matplotlib.use("Agg")
    rows = deploy.layer_costs("LN-Super", batch_size=8, prompt_len=256, output_len=64)
    fig = plots.layer_costs(rows, "decode")
    bars = fig.axes[0].containers
    assert len(bars) == 3 and all(len(b) == 80 for b in bars)


def test_planner_notebook_runs_headless_where_the_weights_do_not_fit(tmp_path):
    """papermill, as the header says, with an override whose weights exceed one GPU (about 3 s)."""
    import nbformat
    import papermill

    nb_dir = deploy.REFERENCE_DIR.parents[2] / "notebooks"
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(nb_dir / "deployment_planner.ipynb"), str(out), cwd=str(nb_dir), progress_bar=False,
                               parameters={"config_source": "LN-Ultra", "gpu": "H200", "figures_dir": str(tmp_path / "f")})
    text = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
    assert "The weights do not fit on one replica's 1 x H200: at least 2 GPUs per replica are needed" in text
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "deployment_claims.csv", "deployment_decode_layers.png", "deployment_prefill_layers.png"]


def test_explore_says_plainly_what_does_not_fit():
    """The planner widget's text: no times for a deployment that cannot run."""
    text = deploy.explore("LN-Ultra", "H100", num_gpus=1, tp=1, weight_dtype="bf16")
    assert text.startswith("LN-Ultra's 253B weights need 507 GB in BF16: they do not fit on 1 x H100 (80 GB")
    assert text.endswith("at least 8 are needed.") and "latency" not in text
    assert "at least 4 are needed: raise TP to 4 or more" in deploy.explore("LN-Ultra", "H100", num_gpus=8, tp=1)
    text = deploy.explore("LN-Super", num_gpus=6, tp=4)
    assert text.startswith("TP4 does not divide 6 GPUs") and "(here 1, 2, 3 or 6)" in text
    fits = deploy.memory_plan("LN-Super", "H100", 1, "fp8", "fp8", 0.1)["kv_tokens"] // 2048
    est = deploy.estimate("LN-Super", "H100", 1, fits, 1024, 1024, "fp8", "fp8", 0.1)
    text = deploy.explore("LN-Super", "H100", 1, 1, batch_size=512)
    assert "Batch 512 does not fit" in text and f"enough for {fits} requests of 2,048 tokens" in text
    assert f"At the largest batch that fits, {fits} per replica" in text and f"latency {est['latency_s']:.1f} s" in text
    text = deploy.explore("LN-Super", "H100", 1, 1, batch_size=1, prompt_len=200_000, output_len=100_000)
    assert "not enough for one request of 300,000 tokens" in text and "latency" not in text


def test_explore_counts_every_replica():
    plan = deploy.memory_plan("LN-Ultra", "H200", 8, "fp8", "fp8", 0.1)
    est = deploy.estimate("LN-Ultra", "H200", 8, 32, 1024, 1024, "fp8", "fp8", 0.1)
    text = deploy.explore("LN-Ultra", "H200", num_gpus=16, tp=8, batch_size=32)
    assert "16 x H200 at TP8: 2 replicas of 8 GPUs" in text and f"{2 * plan['kv_tokens']:,} in all" in text
    assert f"{est['per_gpu_tok_s']:,.0f} tok/s per GPU, {2 * est['throughput_tok_s']:,.0f} tok/s in all" in text


def test_the_roofline_reads_replicated_kv_heads_past_the_tp_degree():
    """Decode at a long context is KV-bound. At TP 2 a model with 2 KV heads reads a quarter of the KV bytes
    of one with 8 and decodes faster; at TP 8 each rank keeps a replica of one of its 2 heads, 8 in all, so
    it reads as much as the 8-head model and only its smaller K/V weights remain (under 1%)."""
    def step(kv, tp):
        config = {**deploy.BUILTIN_CONFIGS["Llama-3.3-70B"], "num_key_value_heads": kv}
        return deploy.estimate(config, "H100", tp=tp, batch_size=64, prompt_len=8192, output_len=256,
                               weight_dtype="fp8", kv_dtype="fp8")["decode_step_s"]

    assert step(2, 2) / step(8, 2) < 0.7
    assert 0.99 < step(2, 8) / step(8, 8) < 1.0
