"""Stage 00 pieces outside the notebook: using a local Llama checkpoint as the parent."""

from __future__ import annotations

import pytest

from lnkit.io import verify_checkpoint
from lnkit.params import ParamError
from lnkit.stages.parent import Params as ParentParams
from lnkit.stages.parent import build_world, train_parent


def _params(tmp_path, **kw):
    return ParentParams(run_dir=str(tmp_path / "run"), figures_dir="", n_train=20, n_train_math=20, n_val=2,
                        n_test=3, progress=False, **kw)


def test_local_llama_checkpoint_becomes_the_parent(tmp_path, tiny_llama, tok):
    src = tmp_path / "my-llama"
    tiny_llama.save_pretrained(src)
    tok.save_pretrained(src)
    p = _params(tmp_path, parent_checkpoint=str(src))
    build_world(p)
    assert not (tmp_path / "run" / "00_parent" / "tokenizer").exists()  # the checkpoint's tokenizer is used
    model, tok2, log = train_parent(p)
    assert log == [] and type(model).__name__ == "LlamaForCausalLM"
    verify_checkpoint(tmp_path / "run" / "00_parent" / "model")
    for k, v in tiny_llama.state_dict().items():
        assert (model.state_dict()[k] == v).all(), k


def test_non_llama_checkpoint_is_refused_by_name(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(src)
    tok.save_pretrained(src)
    p = _params(tmp_path, parent_checkpoint=str(src))
    with pytest.raises(ParamError, match="holds a GPT2LMHeadModel, not a LlamaForCausalLM"):
        train_parent(p)


def test_cross_field_checks():
    with pytest.raises(ParamError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        ParentParams(num_kv_heads=3)
    with pytest.raises(ParamError, match="math_level_weights"):
        ParentParams(math_level_weights=[1.0, 1.0])
