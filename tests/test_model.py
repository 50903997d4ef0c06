"""lnkit.model: the nemotron-nas config and model, from_llama, and the Megatron / vLLM exports.

Tiny random models made on the spot (fp32); the released 49B/253B configs are parsed and, where a model
object helps, built on the meta device only.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaForCausalLM

import helpers
from lnkit.blocks import BlockConfigError
from lnkit.model import (
    CheckpointMismatchError,
    NemotronNasConfig,
    NemotronNasForCausalLM,
    VllmCompatibilityError,
    check_vllm_compatible,
    from_llama,
    megatron_block_configs,
    megatron_state_dict,
    vllm_compatibility,
)
from lnkit.model.modeling import OUTPUT_CACHE_FIELD

REF = Path(__file__).resolve().parents[1] / "lib" / "lnkit" / "reference_configs"
SUPER = REF / "llama-3_3-nemotron-super-49b-v1.config.json"
ULTRA = REF / "llama-3_1-nemotron-ultra-253b-v1.config.json"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def att(group=None, no_op=False, linear=False):
    return {"no_op": no_op, "replace_with_linear": linear, "n_heads_in_group": group}


def ffn(width=None, no_op=False, linear=False, mult=None):
    d = {"no_op": no_op, "replace_with_linear": linear, "ffn_mult": mult}
    if width is not None:
        d["intermediate_size"] = width
    return d


# layer 0 parent (4 KV heads), 1 no-op attention + linear FFN, 2 linear attention + no-op FFN,
# 3 GQA with 1 KV head + narrow FFN, 4 no-op attention + no-op FFN, 5 GQA with 2 KV heads
HETERO_BLOCKS = [
    {"attention": att(1), "ffn": ffn(96)},
    {"attention": att(no_op=True), "ffn": ffn(linear=True)},
    {"attention": att(linear=True), "ffn": ffn(no_op=True)},
    {"attention": att(4), "ffn": ffn(40)},
    {"attention": att(no_op=True), "ffn": ffn(no_op=True)},
    {"attention": att(2), "ffn": ffn(64)},
]


def hetero_config(**kw) -> NemotronNasConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                block_configs=copy.deepcopy(HETERO_BLOCKS), max_position_embeddings=128, rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_ROPE), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return NemotronNasConfig(**{**base, **kw})


def hetero_model(seed=0, **kw) -> NemotronNasForCausalLM:
    torch.manual_seed(seed)
    m = NemotronNasForCausalLM(hetero_config(**kw)).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a swapped or missing norm would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def tiny_llama(seed=0, **kw) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, **{**dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             max_position_embeddings=128), **kw})


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("layer1, where", [
    ({"attention": att(3), "ffn": ffn(64)}, "block_configs[1].attention.n_heads_in_group=3"),
    ({"attention": att(None), "ffn": ffn(64)}, "block_configs[1].attention.n_heads_in_group"),
    ({"attention": att(2, no_op=True, linear=True), "ffn": ffn(64)}, "block_configs[1].attention: no_op and replace_with_linear"),
    ({"attention": att(2), "ffn": ffn(no_op=True, linear=True)}, "block_configs[1].ffn: no_op and replace_with_linear"),
    ({"attention": att(2), "ffn": ffn(-8)}, "block_configs[1].ffn.intermediate_size=-8"),
    ({"attention": att(2), "ffn": ffn(mult=-1.0)}, "block_configs[1].ffn.ffn_mult=-1.0"),
    ({"attention": att(2), "ffn": ffn()}, "block_configs[1].ffn.ffn_mult=None"),
    ({"attention": {"no_op": "yes", "n_heads_in_group": 2}, "ffn": ffn(64)}, "block_configs[1].attention.no_op='yes'"),
])
def test_bad_block_config_names_layer_and_field(layer1, where):
    blocks = [{"attention": att(2), "ffn": ffn(64)}, layer1]
    with pytest.raises(BlockConfigError) as e:
        NemotronNasConfig(vocab_size=10, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, block_configs=blocks)
    assert where in str(e.value)


def test_layer_count_must_match_num_hidden_layers():
    with pytest.raises(BlockConfigError, match=r"block_configs has 6 entries but num_hidden_layers=7"):
        hetero_config(num_hidden_layers=7)
    raw = json.loads(SUPER.read_text())
    raw["block_configs"] = raw["block_configs"][:-1]
    with pytest.raises(BlockConfigError, match=r"79 entries but num_hidden_layers=80"):
        NemotronNasConfig.from_dict(raw)


@pytest.mark.parametrize("path, layers, attention, kv_heads, params_b", [
    (SUPER, 80, 49, 8, 49.87), (ULTRA, 162, 64, 8, 253.40)])
def test_released_configs_parse_unchanged(tmp_path, path, layers, attention, kv_heads, params_b):
    raw = json.loads(path.read_text())
    before = copy.deepcopy(raw)
    cfg = NemotronNasConfig.from_dict(raw)
    assert raw == before  # the caller's dict is not edited
    assert cfg.num_hidden_layers == layers == len(cfg.block_configs)
    attn = cfg.attention_layers()
    assert len(attn) == attention
    assert {cfg.block_configs[i].attention.num_kv_heads(cfg.num_attention_heads) for i in attn} == {kv_heads}
    assert cfg.rope()[1]["rope_type"] == "llama3" and cfg.rope()[0] == 500000.0
    assert cfg.block_configs[0].attention.extra["window_length"] is None  # released extra keys kept
    assert cfg.pretraining_tp == 1
    # a folder holding the released config.json (whose auto_map names remote code): our class, no remote code
    shutil.copy(path, tmp_path / "config.json")
    auto = AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(auto) is NemotronNasConfig and auto.block_configs == cfg.block_configs
    assert NemotronNasConfig.from_pretrained(tmp_path).block_configs == cfg.block_configs
    # written back: the released keys and block configs, minus auto_map (remote code we do not ship)
    out = json.loads(cfg.to_json_string())
    assert out["block_configs"] == before["block_configs"]
    assert out["architectures"] == ["DeciLMForCausalLM"] and out["model_type"] == "nemotron-nas"
    assert out["rope_scaling"] == before["rope_scaling"] and out["rope_theta"] == before["rope_theta"]
    assert out["num_key_value_heads"] is None and out["intermediate_size"] is None and "auto_map" not in out
    with torch.device("meta"):  # shapes only: never real weights of this size
        model = NemotronNasForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=0.01)
    assert sum(1 for n, _ in model.named_modules() if n.endswith("input_layernorm")) == attention
    assert vllm_compatibility(cfg) == []


def test_unimplemented_released_fields_are_refused_at_build():
    blocks = copy.deepcopy(HETERO_BLOCKS)
    blocks[3]["attention"]["window_length"] = 64
    cfg = hetero_config(block_configs=blocks)  # parsing is fine
    with pytest.raises(NotImplementedError, match=r"block_configs\[3\].attention.window_length=64"):
        NemotronNasForCausalLM(cfg)
    assert any("window_length" in p for p in vllm_compatibility(cfg))


# ---------------------------------------------------------------------------------- save / load


def expected_keys(cfg: NemotronNasConfig) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i, b in enumerate(cfg.block_configs):
        p = f"model.layers.{i}."
        if b.attention.kind != "no_op":
            keys.add(p + "input_layernorm.weight")
        if b.attention.kind == "attention":
            keys |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        elif b.attention.kind == "linear":
            keys.add(p + "self_attn.linear_attn.weight")
        if b.ffn.kind != "no_op":
            keys.add(p + "post_attention_layernorm.weight")
        if b.ffn.kind == "ffn":
            keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        elif b.ffn.kind == "linear":
            keys.add(p + "mlp.linear_mlp.weight")
    return keys


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_with_released_names(tmp_path, tied):
    model = hetero_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.3.self_attn.k_proj.weight").shape == (8, 32)  # 1 KV head of 8
        assert f.get_tensor("model.layers.3.mlp.up_proj.weight").shape == (40, 32)
    assert keys == expected_keys(model.config)
    assert not any(k.startswith(("model.layers.4.", "model.layers.1.input_layernorm")) for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["block_configs"][2]["attention"]["replace_with_linear"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is NemotronNasForCausalLM
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _edit_blocks(folder: Path, layer: int, part: str, new: dict):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_configs"][layer][part] = new
    (folder / "config.json").write_text(json.dumps(cfg))


def test_checkpoint_not_matching_its_block_configs_lists_the_tensors(tmp_path):
    hetero_model().save_pretrained(tmp_path)
    # layer 4 has no attention tensors; its config now says it has some -> missing tensors
    _edit_blocks(tmp_path, 4, "attention", att(2))
    with pytest.raises(CheckpointMismatchError) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing (5)" in msg and "model.layers.4.input_layernorm.weight" in msg
    assert "model.layers.4.self_attn.q_proj.weight" in msg
    # layer 0's attention tensors exist; the config now says no-op -> unexpected tensors
    _edit_blocks(tmp_path, 4, "attention", att(no_op=True))
    _edit_blocks(tmp_path, 0, "attention", att(no_op=True))
    with pytest.raises(CheckpointMismatchError) as e:
        NemotronNasForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "unexpected (5)" in msg and "model.layers.0.self_attn.v_proj.weight" in msg
    assert "model.layers.0.input_layernorm.weight" in msg
    # a different width -> misshapen
    _edit_blocks(tmp_path, 0, "attention", att(1))
    _edit_blocks(tmp_path, 3, "ffn", ffn(48))
    with pytest.raises(CheckpointMismatchError, match=r"misshapen \(3\): model\.layers\.3\.mlp\.down_proj\.weight"):
        NemotronNasForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- from_llama


LLAMA_SHAPES = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "head_dim_override": dict(num_key_value_heads=1, head_dim=16),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "llama3_rope_3_layers": dict(num_key_value_heads=2, num_hidden_layers=3, rope_theta=500000.0,
                                 rope_scaling=dict(LLAMA3_ROPE)),
}


@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_from_llama_logits_match(shape):
    llama = tiny_llama(**LLAMA_SHAPES[shape])
    nas = from_llama(llama)
    assert isinstance(nas, NemotronNasForCausalLM) and not nas.training
    ids = torch.randint(3, 97, (2, 70))  # past original_max_position_embeddings=16: llama3 scaling matters
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            a, b = llama(ids, **kw).logits, nas(ids, **kw).logits
            assert (a - b).abs().max().item() <= 1e-5
    if LLAMA_SHAPES[shape].get("tie_word_embeddings"):
        assert nas.lm_head.weight is nas.model.embed_tokens.weight


def test_from_llama_eager_attention_matches_too():
    llama = tiny_llama(num_key_value_heads=2)
    llama.config._attn_implementation = "eager"
    nas = from_llama(llama)
    assert nas.config._attn_implementation == "eager"
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        assert (llama(ids).logits - nas(ids).logits).abs().max().item() <= 1e-5


def test_generate_matches_llama_greedy_and_sampled():
    llama = tiny_llama(num_key_value_heads=2, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0)
    nas = from_llama(llama)
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert torch.equal(llama.generate(ids, do_sample=False, **kw), nas.generate(ids, do_sample=False, **kw))
    sampled = []
    for m in (llama, nas):
        torch.manual_seed(123)
        sampled.append(m.generate(ids, do_sample=True, temperature=1.5, top_k=0, **kw))
    assert torch.equal(*sampled)


def test_lnkit_generate_same_for_llama_and_from_llama(tok):
    """The pipeline's own batched generator (left padding, explicit positions, its own cache) sees no change."""
    from lnkit.data.chat import render_prompt
    from lnkit.generate import generate

    llama = tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, initializer_range=0.3,
                       num_key_value_heads=2)
    nas = from_llama(llama)
    prompts = [render_prompt("What is 2+3?", "off"), render_prompt("Which creature lives longest?", "on"),
               render_prompt("hi", "off")]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9, "seed": 7}):
        a = generate(llama, tok, prompts, max_new_tokens=10, **kw)
        b = generate(nas, tok, prompts, max_new_tokens=10, **kw)
        assert a == b
    assert len({o["text"] for o in a}) > 1  # not a degenerate model that prints one token forever


# --------------------------------------------------------------------------- heterogeneous + cache


def test_kv_cache_holds_only_attention_layers():
    model = hetero_model()
    n_attn = len(model.config.attention_layers())
    assert n_attn == 3
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, OUTPUT_CACHE_FIELD)
        assert len(cache.layers) == n_attn and cache.get_seq_length() == 6
        # per-layer KV widths: layer 0 has 4 KV heads, layer 3 one, layer 5 two (compact indices 0, 1, 2)
        assert [layer.keys.shape[1] for layer in cache.layers] == [4, 1, 2]
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    cache = getattr(gen, OUTPUT_CACHE_FIELD, None) or gen.past_key_values
    assert len(cache.layers) == n_attn and cache.get_seq_length() == 6 + 3 - 1


def test_heterogeneous_cached_generate_equals_uncached_argmax():
    model = hetero_model(seed=1)
    ids = torch.randint(3, 97, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    steps = 10
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, ids.shape[1]:]
        seq, m = ids, mask
        ref = []
        for _ in range(steps):  # no cache: the whole sequence each step
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            nxt = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            ref.append(nxt)
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(got, torch.stack(ref, 1))


def test_manual_cache_decoding_equals_full_forward():
    model = hetero_model(seed=2)
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()  # no config: grows to the attention layers only
        first = model(ids[:, :5], use_cache=True, cache=cache).logits
        rest = [model(ids[:, t:t + 1], use_cache=True, cache=cache).logits for t in range(5, 12)]
    assert (torch.cat([first, *rest], 1) - full).abs().max().item() <= 1e-5
    assert len(cache.layers) == 3


def test_sdpa_and_eager_agree_on_heterogeneous_model():
    model = hetero_model(seed=3)
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        eager = model(ids, attention_mask=mask).logits
    assert (sdpa - eager)[1].abs().max().item() <= 1e-5
    assert (sdpa - eager)[0, 4:].abs().max().item() <= 1e-5


def test_training_step_reaches_every_weight_with_and_without_checkpointing():
    model = hetero_model().train()
    ids = torch.randint(3, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters())


def test_copies_and_auto_classes():
    model = hetero_model()
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.config._base is twin.config  # the layer views follow the copy
    built = AutoModelForCausalLM.from_config(model.config)
    assert type(built) is NemotronNasForCausalLM
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)


# ----------------------------------------------------------------------------------------- exports


def test_megatron_block_configs_are_explicit_widths():
    cfg = hetero_config()
    blocks = megatron_block_configs(cfg)["block_configs"]
    assert [b["attention"]["num_query_groups"] for b in blocks] == [4, None, None, 1, None, 2]
    assert [b["mlp"]["ffn_hidden_size"] for b in blocks] == [96, None, None, 40, None, 64]
    assert blocks[2]["attention"] == {"no_op": False, "replace_with_linear": True, "num_query_groups": None}
    assert blocks[1]["mlp"]["replace_with_linear"] and blocks[4]["mlp"]["no_op"]
    released = megatron_block_configs(NemotronNasConfig.from_dict(json.loads(SUPER.read_text())))["block_configs"]
    assert released[0]["mlp"]["ffn_hidden_size"] == 14336 and released[0]["attention"]["num_query_groups"] == 8
    sd = megatron_state_dict(hetero_model())
    assert sd["decoder.layers.3.self_attention.linear_qkv.weight"].shape == (48, 32)  # 4 q + 1 k + 1 v heads of 8
    assert sd["decoder.layers.3.mlp.linear_fc1.weight"].shape == (80, 32)  # gate and up, 40 each
    assert not any(k.startswith("decoder.layers.4.") for k in sd)
    assert "decoder.layers.1.input_layernorm.weight" not in sd and "decoder.layers.2.self_attention.weight" in sd


def _megatron_config(cfg: NemotronNasConfig):
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    return HeterogeneousTransformerConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_size, ffn_hidden_size=96, normalization="RMSNorm", gated_linear_unit=True,
        add_bias_linear=False, activation_func=torch.nn.functional.silu, layernorm_epsilon=cfg.rms_norm_eps,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        heterogeneous_layers_config_encoded_json=json.dumps(megatron_block_configs(cfg)))


def test_megatron_core_accepts_the_block_configs():
    cfg = hetero_config()
    mc = _megatron_config(cfg)
    per = mc.per_block_parameters
    assert len(per) == 6
    assert [p.attention.num_query_groups for p in per] == [4, None, None, 1, None, 2]
    assert [p.mlp.ffn_hidden_size for p in per] == [96, None, None, 40, None, 64]
    assert per[2].attention.replace_with_linear and per[1].mlp.replace_with_linear and per[4].attention.no_op
    assert mc.get_config_for_layer(4).num_query_groups == 1 and mc.get_config_for_layer(4).ffn_hidden_size == 40


def test_megatron_core_gpt_matches_our_logits(monkeypatch):
    """Megatron's heterogeneous GPT, built on CPU from our block configs and loaded with our weights (megatron-core
    is in the dev extra, so this runs wherever the tests do)."""
    import contextlib
    import socket

    import megatron.core.tensor_parallel as tp
    import megatron.core.tensor_parallel.random as tp_random
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import (
        get_gpt_heterogeneous_layer_spec,
    )

    class NoCudaRng:  # CPU shim: Megatron forks its CUDA RNG tracker around attention dropout, even at eval
        def fork(self, *a, **k):
            return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # its RoPE moves inv_freq there
    monkeypatch.setattr(tp, "get_cuda_rng_tracker", lambda *a, **k: NoCudaRng())
    monkeypatch.setattr(tp_random, "get_cuda_rng_tracker", lambda *a, **k: NoCudaRng())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        nas = hetero_model(seed=5, rope_scaling=None)  # Megatron's llama3 RoPE scaling hard-codes 8192 context
        mc = _megatron_config(nas.config)
        gpt = GPTModel(config=mc, transformer_layer_spec=get_gpt_heterogeneous_layer_spec(mc, use_te=False),
                       vocab_size=nas.config.vocab_size, max_sequence_length=128, position_embedding_type="rope",
                       rotary_base=int(nas.config.rope()[0]), share_embeddings_and_output_weights=False).eval()
        ours = megatron_state_dict(nas)
        theirs = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
        assert theirs.keys() == ours.keys()
        assert all(theirs[k].shape == ours[k].shape for k in ours)
        gpt.load_state_dict(ours, strict=False)
        ids = torch.randint(3, 97, (2, 12))
        causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)[None, None].expand(2, 1, 12, 12)
        with torch.no_grad():
            got = gpt(ids, torch.arange(12)[None].expand(2, -1), causal)
            assert (got - nas(ids).logits).abs().max().item() <= 1e-5
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_vllm_compatibility_cases():
    ok = NemotronNasConfig.from_dict(json.loads(ULTRA.read_text()))
    assert vllm_compatibility(ok) == [] and check_vllm_compatible(ok) is None
    assert vllm_compatibility(ok, tensor_parallel_size=8) == []
    assert vllm_compatibility(ok, tensor_parallel_size=3) == [
        "num_attention_heads=128 is not divisible by tensor_parallel_size=3"] + [
        f"block_configs[{i}].attention.n_heads_in_group=16: 8 KV heads cannot be split over tensor_parallel_size=3"
        for i in ok.attention_layers()]
    problems = vllm_compatibility(hetero_config())
    assert any("block_configs[2].attention.replace_with_linear" in p for p in problems)
    assert any("block_configs[1].ffn.replace_with_linear" in p for p in problems)
    assert any("block_configs[0].ffn.intermediate_size=96" in p for p in problems)
    assert any("block_configs[3].ffn.intermediate_size=40" in p for p in problems)
    with pytest.raises(VllmCompatibilityError, match=r"problems\):\n  - block_configs\[0\]"):
        check_vllm_compatible(hetero_config())
    # explicit widths the released rule reproduces are fine (hidden 384: ffn_mult 1.0 -> 256)
    fine = NemotronNasConfig(vocab_size=10, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                             block_configs=[{"attention": att(3), "ffn": ffn(256, mult=1.0)}])
    assert vllm_compatibility(fine) == []
    # per-layer KV heads 3 and 2 (6 heads): 2 does not divide 3, pages cannot be unified
    uneven = NemotronNasConfig(vocab_size=10, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                               block_configs=[{"attention": att(2), "ffn": ffn(mult=1.0)},
                                              {"attention": att(3), "ffn": ffn(mult=1.0)}])
    assert [p for p in vllm_compatibility(uneven) if "does not divide" in p] == [
        "block_configs[1].attention.n_heads_in_group: 2 KV heads does not divide the largest per-layer count 3; "
        "vLLM's KV cache pages cannot be unified"]
    no_attention = NemotronNasConfig(vocab_size=10, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                                     block_configs=[{"attention": att(no_op=True), "ffn": ffn(mult=1.0)}])
    assert any("no layer has attention" in p for p in vllm_compatibility(no_attention))


def test_vllm_refuses_a_first_layer_without_attention_before_loading(tmp_path):
    from lnkit.vllm_backend import check_servable

    def config(first_no_op):
        return NemotronNasConfig(vocab_size=10, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                 block_configs=[{"attention": att(no_op=first_no_op) if first_no_op else att(2),
                                                 "ffn": ffn(mult=1.0)},
                                                {"attention": att(2), "ffn": ffn(mult=1.0)}])
    first = config(True)
    assert [p for p in vllm_compatibility(first) if "block_configs[0].attention.no_op" in p] == [
        "block_configs[0].attention.no_op: vLLM's decoder layer calls its fused residual norm with no residual "
        "when the first layer's attention is a no-op"]
    later = NemotronNasConfig(vocab_size=10, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                              block_configs=[{"attention": att(2), "ffn": ffn(mult=1.0)},
                                             {"attention": att(no_op=True), "ffn": ffn(mult=1.0)}])
    assert vllm_compatibility(later) == []
    # the vllm backends check a folder before vLLM is imported (so this runs without vLLM)
    first.save_pretrained(tmp_path / "first")
    with pytest.raises(VllmCompatibilityError, match=r"block_configs\[0\]\.attention\.no_op"):
        check_servable(tmp_path / "first")
    later.save_pretrained(tmp_path / "later")
    check_servable(tmp_path / "later")


def test_a_saved_folder_loads_where_lnkit_cannot_be_imported(tmp_path, tok):
    """save_model writes the model's own code and an auto_map: in a process where `import lnkit` fails,
    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the same heterogeneous model
    (attention kinds, GQA widths, FFN widths, llama3 RoPE) and gives the same logits, greedy generation
    included."""
    import subprocess
    import sys

    from lnkit.checkpoints import save_model
    from lnkit.model.standalone import CONFIG_FILE, MODELING_FILE

    model = hetero_model(vocab_size=len(tok))
    folder = tmp_path / "child"
    save_model(model, tok, folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_lnkit_nas.NemotronNasConfig",
                               "AutoModelForCausalLM": "modeling_lnkit_nas.NemotronNasForCausalLM"}
    assert (folder / CONFIG_FILE).is_file() and (folder / MODELING_FILE).is_file()
    ids = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    script = f"""
import sys
sys.modules["lnkit"] = None  # as on a machine without lnkit: any `import lnkit...` raises ImportError
import torch
from transformers import AutoModelForCausalLM
try:
    import lnkit  # noqa: F401
    raise SystemExit("lnkit is importable")
except ImportError:
    pass
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.load({str(tmp_path / "ids.pt")!r})
with torch.no_grad():
    torch.save({{"logits": m(ids).logits, "gen": m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)}},
               {str(tmp_path / "out.pt")!r})
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert (got["logits"] - want).abs().max().item() <= 1e-5
    assert torch.equal(got["gen"], want_gen)
