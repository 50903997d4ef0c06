"""lnkit.model.stream_convert (a Llama folder to a nemotron-nas folder, tensor by tensor) and
lnkit.model.export.deci_compatibility (what NVIDIA's own DeciLM code would read differently).

Tiny random Llamas made on the spot, saved in several shards; one ~0.5 GB bf16 Llama written shard by shard
for the peak-memory check (about 30 s here, most of it the child process's imports and the control).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import helpers
from lnkit.checkpoints import load_model, save_model
from lnkit.model import (
    CheckpointMismatchError,
    DeciCompatibilityError,
    NemotronNasConfig,
    NemotronNasForCausalLM,
    convert_llama_folder,
    deci_compatibility,
    from_llama,
    vllm_compatibility,
)
from lnkit.model.convert import nas_config_from_llama
from lnkit.model.standalone import CONFIG_FILE, MODELING_FILE
from lnkit.model.stream_convert import INDEX, main

REF = Path(__file__).resolve().parents[1] / "lib" / "lnkit" / "reference_configs"
# FFN 256 wide at hidden 64: a width the released ffn_mult rule reproduces, so NVIDIA's code reads it the same.
SHAPE = dict(intermediate_size=256, num_key_value_heads=2)


def llama_folder(path: Path, seed=0, shard="40KB", **config) -> tuple[LlamaForCausalLM, Path]:
    """A tiny random Llama (helpers.TINY with ``config`` on top) saved to ``path`` in shards of ``shard``."""
    model = helpers.tiny_llama(seed, **{**SHAPE, **config})
    model.save_pretrained(path, max_shard_size=shard)
    return model, path


def logits(model, seed=3):
    ids = torch.randint(3, 101, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


def reference(src: Path, **kw) -> NemotronNasForCausalLM:
    """What the streaming converter must equal: the in-memory conversion of the loaded source."""
    return from_llama(LlamaForCausalLM.from_pretrained(src, **kw))


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_folder_has_from_llamas_logits_in_several_shards(tmp_path, tied):
    _, src = llama_folder(tmp_path / "llama", tie_word_embeddings=tied)
    assert len(json.loads((src / INDEX).read_text())["weight_map"]) > 1 and len(list(src.glob("*.safetensors"))) > 3
    dst = convert_llama_folder(src, tmp_path / "nas", max_shard_bytes=300_000)

    index = json.loads((dst / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in dst.glob("*.safetensors"))
    sizes = {}
    for file in shards:
        with safe_open(dst / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes[file] = {n: f.get_tensor(n).numel() * 4 for n in f.keys()}
            assert all(index["weight_map"][n] == file for n in f.keys())
    assert all(sum(s.values()) <= 300_000 for s in sizes.values())  # every tensor here is far smaller
    assert index["metadata"]["total_size"] == sum(sum(s.values()) for s in sizes.values())
    for layer in range(3):  # a layer fits in a shard, so it is never split
        assert len({index["weight_map"][n] for n in index["weight_map"] if n.startswith(f"model.layers.{layer}.")}) == 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)

    ref = reference(src)
    assert set(index["weight_map"]) == set(ref.state_dict()) - ({"lm_head.weight"} if tied else set())
    nas = NemotronNasForCausalLM.from_pretrained(dst)  # strict: a missing or extra tensor would raise
    assert (nas.lm_head.weight is nas.model.embed_tokens.weight) == tied
    assert torch.equal(logits(nas), logits(ref))


def test_folder_is_what_save_model_writes_and_load_model_reads(tmp_path, tok):
    """config.json, remote code and tokenizer as save_model(from_llama(...)) writes them; a manifest load_model checks.

    A single source file (no index) in, a single output file out."""
    model = helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **SHAPE)
    model.generation_config.max_new_tokens = 7  # carried by generation_config.json
    src = tmp_path / "llama"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    dst = convert_llama_folder(src, tmp_path / "nas")
    save_model(reference(src), tok, tmp_path / "saved")

    assert not (dst / INDEX).exists() and (dst / "model.safetensors").is_file()
    assert json.loads((dst / "config.json").read_text()) == json.loads((tmp_path / "saved" / "config.json").read_text())
    for name in (CONFIG_FILE, MODELING_FILE, "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name if name.startswith("tok") else tmp_path / "saved" / name).read_bytes()
    nas, nas_tok = load_model(dst)  # verifies the manifest first
    assert nas_tok("two plus two").input_ids == tok("two plus two").input_ids
    assert nas.generation_config.max_new_tokens == 7
    assert torch.equal(logits(nas), logits(reference(src)))
    (dst / "model.safetensors").write_bytes((dst / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(Exception, match="model.safetensors is truncated"):
        load_model(dst)


def test_dtype_cast_and_source_dtype_kept(tmp_path):
    _, src = llama_folder(tmp_path / "llama")
    kept = convert_llama_folder(src, tmp_path / "kept", max_shard_bytes=300_000)
    cast = convert_llama_folder(src, tmp_path / "bf16", max_shard_bytes=300_000, dtype="bfloat16")
    assert json.loads((kept / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((cast / "config.json").read_text())["dtype"] == "bfloat16"
    for file in cast.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    nas = NemotronNasForCausalLM.from_pretrained(cast, dtype=torch.bfloat16)
    ref = reference(src).to(torch.bfloat16).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in nas.state_dict().items())
    # Logits against the Llama loaded in bf16, not from_llama of it: from_llama's .to(bf16) also rounds the RoPE
    # inv_freq buffer to bf16, which from_pretrained keeps in fp32 (for Llama and nemotron-nas alike).
    assert torch.equal(logits(nas), logits(LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert_llama_folder(src, tmp_path / "int8", dtype="int8")


def test_lnkit_only_shapes_are_refused_unless_allowed(tmp_path):
    """head_dim 32 at hidden 64 / 4 heads (NVIDIA's code derives 16) and an FFN of 128 (its rule gives 256)."""
    _, src = llama_folder(tmp_path / "llama", head_dim=32, intermediate_size=128)
    with pytest.raises(DeciCompatibilityError) as e:
        convert_llama_folder(src, tmp_path / "nas")
    msg = str(e.value)
    assert str(src / "config.json") in msg and "allow_lnkit_only=True" in msg
    assert "head_dim=32" in msg and "= 16" in msg
    assert all(f"block_configs[{i}].ffn.intermediate_size=128" in msg for i in range(3)) and "builds 256" in msg
    assert not (tmp_path / "nas").exists()
    dst = convert_llama_folder(src, tmp_path / "nas", max_shard_bytes=300_000, allow_lnkit_only=True)
    assert torch.equal(logits(NemotronNasForCausalLM.from_pretrained(dst)), logits(reference(src)))


def test_command_line(tmp_path, capsys):
    _, src = llama_folder(tmp_path / "llama")
    main([str(src), str(tmp_path / "nas"), "--max-shard-bytes", "300000", "--dtype", "float16"])
    assert f"wrote {tmp_path / 'nas'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(SystemExit, match="error: .* already exists; pass overwrite=True"):
        main([str(src), str(tmp_path / "nas")])
    main([str(src), str(tmp_path / "nas"), "--overwrite"])
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["dtype"] == "float32"


# ------------------------------------------------------------------------------------------ bad input


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _move_tensor(index: dict) -> None:  # the index claims a tensor lives in another shard than it does
    name = "model.layers.1.mlp.up_proj.weight"
    index["weight_map"][name] = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])


@pytest.mark.parametrize("break_it, error, words", [
    (lambda s: (s / "config.json").unlink(), FileNotFoundError, ["config.json does not exist"]),
    (lambda s: _edit_json(s / "config.json", lambda c: c.update(model_type="mistral")), ValueError,
     ["config.json", "model_type='mistral'"]),
    (lambda s: _edit_json(s / INDEX, _move_tensor), CheckpointMismatchError,
     ["model.layers.1.mlp.up_proj.weight", INDEX, "which does not hold it"]),
    (lambda s: _edit_json(s / INDEX, lambda i: i["weight_map"].update({"model.norm.weight": "gone.safetensors"})),
     FileNotFoundError, ["gone.safetensors", "does not exist"]),
    (lambda s: _edit_json(s / INDEX, lambda i: i["weight_map"].pop("model.layers.2.self_attn.k_proj.weight")),
     CheckpointMismatchError, ["model.layers.2.self_attn.k_proj.weight is missing from", INDEX, "config.json"]),
    (lambda s: _edit_json(s / "config.json", lambda c: c.update(intermediate_size=512)), CheckpointMismatchError,
     ["model.layers.0.mlp.gate_proj.weight in", "has shape [256, 64], the config needs [512, 64]", "config.json"]),
    (lambda s: _edit_json(s / "config.json", lambda c: c.update(num_hidden_layers=2)), CheckpointMismatchError,
     ["model.layers.2.input_layernorm.weight in", "is not a tensor of this config"]),
    (lambda s: [p.unlink() for p in s.glob("model*")], FileNotFoundError, ["neither model.safetensors nor"]),
], ids=["no-config", "not-llama", "index-names-tensor-its-file-lacks", "index-names-missing-file", "tensor-missing",
        "wrong-shape", "extra-tensor", "no-weights"])
def test_bad_source_is_an_error_naming_the_file_before_anything_is_written(tmp_path, break_it, error, words):
    _, src = llama_folder(tmp_path / "llama")
    break_it(src)
    with pytest.raises(error) as e:
        convert_llama_folder(src, tmp_path / "out" / "nas")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no folder, no temp left


def test_existing_destination_is_not_clobbered(tmp_path):
    _, src = llama_folder(tmp_path / "llama")
    dst = tmp_path / "nas"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{dst} already exists; pass overwrite=True"):
        convert_llama_folder(src, dst)
    assert (dst / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="is the source folder"):
        convert_llama_folder(src, src, overwrite=True)
    convert_llama_folder(src, dst, overwrite=True)
    assert not (dst / "mine.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "nas"]  # no temporary folder left


# -------------------------------------------------------------------------------------------- peak memory

# One process: RSS just before, then the peak during. VmHWM is this process's own high-water mark (reset by
# clear_refs "5"); ru_maxrss is not usable here: a child inherits the parent's peak through exec (measured: the
# child of a 0.75 GB parent starts with ru_maxrss 0.75 GB and VmHWM 10 MB).
CHILD = r"""
import gc, json, sys
from lnkit.model import convert_llama_folder, from_llama
from transformers import LlamaForCausalLM

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def rise(step):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    out = step()
    return status("VmHWM") - before, out

src, dst, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
streamed, _ = rise(lambda: convert_llama_folder(src, dst, max_shard_bytes=shard))
loaded, llama = rise(lambda: LlamaForCausalLM.from_pretrained(src))
in_memory, _ = rise(lambda: from_llama(llama))
print(json.dumps({"streamed": streamed, "loaded": loaded, "from_llama": in_memory}))
"""


def write_random_llama(src: Path, config: LlamaConfig) -> int:
    """A random bf16 Llama folder written one layer per file (never the whole model in memory); its bytes."""
    config.save_pretrained(src)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    groups = [{"model.embed_tokens.weight": (v, h)}]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        groups.append({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)})
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.randn(shape, dtype=torch.bfloat16) for n, shape in group.items()}
        save_file(tensors, src / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, file))
    (src / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_peak_memory_is_a_shard_not_the_model(tmp_path):
    """0.54 GB bf16 Llama (hidden 1024, 16 layers, FFN 2816, vocab 32000) in 64 MiB shards: the conversion's peak
    RSS rise stays under 40% of the model's bytes (measured 0.13x), while from_llama of the loaded model, measured
    the same way in the same process, rises by more than the model's bytes (measured 2.0x), so the check can fail.
    (Loading alone rises by 0.03x: transformers maps the safetensors files and reads them lazily.)"""
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    src, dst = tmp_path / "llama", tmp_path / "nas"
    try:
        src.mkdir()
        total = write_random_llama(src, config)
        run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(64 * 2**20)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        rises = json.loads(run.stdout.strip().splitlines()[-1])
        shards = json.loads((dst / INDEX).read_text())
        assert shards["metadata"]["total_size"] == total and len(set(shards["weight_map"].values())) >= 8
        print({k: f"{v / total:.2f} x model bytes" for k, v in rises.items()}, f"model {total / 1e9:.2f} GB")
        assert rises["streamed"] < 0.4 * total, rises
        assert rises["from_llama"] > total, rises  # the same measurement sees a full-size model being built
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


# ----------------------------------------------------------------------------------- deci_compatibility


@pytest.mark.parametrize("name, hidden, ffn, heads, layers, vocab", [
    ("Llama-3.1-8B", 4096, 14336, 32, 32, 128256),
    ("Llama-3.1-70B", 8192, 28672, 64, 80, 128256),
    ("Llama-3.1-405B", 16384, 53248, 128, 126, 128256),
])
def test_llama3_parents_convert_to_configs_nvidias_code_reads_the_same(name, hidden, ffn, heads, layers, vocab):
    """Configs only: what the streaming converter checks before reading any weight."""
    llama = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=8,
                        num_hidden_layers=layers, vocab_size=vocab, rope_theta=500000.0)
    cfg = nas_config_from_llama(llama)
    assert deci_compatibility(cfg) == [], name
    assert cfg.head_dim is None and cfg.head_size == hidden // heads == 128
    assert all(b.ffn.intermediate_size is None and b.ffn.width(hidden) == ffn for b in cfg.block_configs)
    assert vllm_compatibility(cfg, tensor_parallel_size=8) == []


@pytest.mark.parametrize("path", sorted(REF.glob("*.config.json")), ids=lambda p: p.name.split(".")[0])
def test_released_configs_have_nothing_nvidias_code_reads_differently(path):
    assert deci_compatibility(NemotronNasConfig.from_dict(json.loads(path.read_text()))) == []


def _tiny(blocks, **kw) -> NemotronNasConfig:
    return NemotronNasConfig(**{**dict(vocab_size=10, hidden_size=64, num_hidden_layers=len(blocks),
                                       num_attention_heads=4, block_configs=blocks), **kw})


ATT, NO_OP, LINEAR = {"n_heads_in_group": 2}, {"no_op": True}, {"replace_with_linear": True}


def test_deci_compatibility_names_each_field_and_both_readings():
    blocks = [{"attention": ATT, "ffn": {"ffn_mult": 3.0, "intermediate_size": 128}},  # rule: 256
              {"attention": NO_OP, "ffn": {"ffn_mult": 6.0, "intermediate_size": 256}},  # rule reproduces it
              {"attention": LINEAR, "ffn": {"intermediate_size": 96}},  # no ffn_mult at all
              {"attention": ATT, "ffn": LINEAR},
              {"attention": ATT, "ffn": NO_OP}]
    problems = deci_compatibility(_tiny(blocks, head_dim=32))
    assert len(problems) == 3, problems
    assert problems[0].startswith("head_dim=32: lnkit gives the 3 attention layer(s) heads of 32")
    assert "hidden_size // num_attention_heads = 16" in problems[0]
    assert problems[1].startswith("block_configs[0].ffn.intermediate_size=128: lnkit builds the FFN 128 wide")
    assert "builds 256 from ffn_mult=3.0" in problems[1]
    assert problems[2].startswith("block_configs[2].ffn.intermediate_size=96") and "ffn_mult=None and fails" in problems[2]


def test_deci_compatibility_head_cases():
    plain = {"attention": ATT, "ffn": {"ffn_mult": 6.0}}
    assert deci_compatibility(_tiny([plain], head_dim=16)) == []  # the derived value, written explicitly
    assert deci_compatibility(_tiny([{"attention": LINEAR, "ffn": LINEAR}], head_dim=32)) == []  # no attention layer
    odd = deci_compatibility(_tiny([{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 6.0}}],
                                   num_attention_heads=6))
    assert len(odd) == 1 and "raises: hidden_size=64 is not divisible by num_attention_heads=6" in odd[0]
    model = NemotronNasForCausalLM(_tiny([plain], head_dim=32))  # a model is accepted as well as a config
    assert deci_compatibility(model) == deci_compatibility(model.config) != []
