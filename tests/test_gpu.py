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
