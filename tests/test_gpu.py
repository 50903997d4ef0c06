"""GPU-only paths. Skipped where CUDA (or vLLM) is absent; run on a GPU box with `pytest -m gpu`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vllm_backend_matches_hf_greedy(tmp_path, tiny_llama, tok):
    pytest.importorskip("vllm")
    from lnkit.data.chat import render_prompt
    from lnkit.generate import generate
    from lnkit.vllm_backend import generate_vllm

    tiny_llama.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = [render_prompt(q, "off") for q in ("What is 2 + 2?", "Where do daxes live?")]
    hf = generate(tiny_llama, tok, prompts, max_new_tokens=8)
    vl = generate_vllm(str(tmp_path), prompts, max_new_tokens=8, temperature=0.0, top_p=1.0, dtype="float32")
    assert [o["text"] for o in vl] == [o["text"] for o in hf]


def _greedy(engine, ids, n_new=8):
    return [r.completion_ids for r in engine.sample(ids, max_new_tokens=n_new, temperature=0.0)]


def test_vllm_rollout_engine_matches_torch_and_takes_pushed_weights(tiny_llama, tok):
    """The vllm backend's greedy rollouts equal the torch backend's, before and after a weight push; the
    push changes what is sampled (the hot swap reaches the running engine)."""
    pytest.importorskip("vllm")
    from lnkit.data.chat import render_prompt
    from lnkit.rl.rollout import TorchEngine
    from lnkit.rl.vllm_engine import VLLMEngine

    model = tiny_llama.cuda().float()
    ids = [tok(render_prompt(q, "off"), add_special_tokens=False)["input_ids"]
           for q in ("What is 2 + 2?", "Where do daxes live?")]
    vl = VLLMEngine(model, tok, dtype="float32")
    assert _greedy(vl, ids) == _greedy(TorchEngine(model, tok), ids)
    before = _greedy(vl, ids)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    vl.load_weights(model)
    after = _greedy(vl, ids)
    assert after == _greedy(TorchEngine(model, tok), ids)
    assert after != before
    r = vl.sample(ids, n=3, max_new_tokens=6, temperature=1.0, seed=1)
    assert len(r) == 6 and all(len(x.logprobs) == len(x.completion_ids) for x in r)
