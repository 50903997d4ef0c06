"""The rollout engine's torch backend: the same greedy tokens as transformers' ``generate()`` (a Llama and a
heterogeneous nemotron-nas model: GQA, linear and no-op blocks), log-probabilities equal to a full forward's,
refill and compaction changing nothing, seeded sampling, FP8 emulation, bad input."""

from __future__ import annotations

import pytest
import torch

import helpers
from lnkit.data.chat import EOT
from lnkit.rl.grpo import token_logprobs
from lnkit.rl.rollout import TorchEngine, fp8_qdq
from test_model import hetero_model


@pytest.fixture(autouse=True)
def _one_thread():
    yield from helpers.one_thread()


def with_likely_stop(model, tok, scale=2.0):
    """Make the stop token likely enough that completions end at different lengths."""
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids(EOT)] *= scale
    return model


@pytest.fixture(params=["llama", "nemotron-nas"])
def model(request, tok):
    if request.param == "llama":
        m = helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256)
    else:
        m = hetero_model(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    return with_likely_stop(m, tok)


def prompts(tok, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    return [[bos] + torch.randint(10, len(tok), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(model, tok, ids, max_new):
    """transformers' own generate(), one prompt at a time (no padding to reason about)."""
    stop = [tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids("<|end_of_text|>")]
    out = []
    for p in ids:
        x = torch.tensor([p])
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                           eos_token_id=stop, pad_token_id=tok.pad_token_id)
        out.append(y[0, len(p):].tolist())
    return out


def test_greedy_tokens_equal_transformers_generate(model, tok):
    ids = prompts(tok)
    ref = hf_greedy(model, tok, ids, 24)
    engine = TorchEngine(model, tok, max_batch=3)  # 7 prompts through 3 slots: refills, then compacts
    got = engine.sample(ids, max_new_tokens=24, temperature=0.0)
    assert [r.completion_ids for r in got] == ref
    assert [r.index for r in got] == list(range(len(ids)))
    assert any(r.finished for r in got) and any(not r.finished for r in got)  # both endings exercised
    for r in got:
        assert r.finished == (r.completion_ids[-1] in engine.stop)
        assert len(r.completion_ids) == len(r.logprobs) <= 24


def test_the_engine_samples_from_the_weights_the_model_has_now(model, tok):
    """A trainer updates the model in place between rollouts: the next rollout must use every new weight
    (the fused q/k/v and gate/up copies included), not the ones the engine saw first."""
    ids = prompts(tok, n=4, seed=6)
    engine = TorchEngine(model, tok, max_batch=4)
    before = engine.sample(ids, max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                p.add_(0.5 * torch.randn_like(p))
    after = engine.sample(ids, max_new_tokens=12, temperature=0.0)
    assert [r.completion_ids for r in after] == hf_greedy(model, tok, ids, 12)
    assert [r.completion_ids for r in after] != [r.completion_ids for r in before]


def test_logprobs_are_the_sampling_distributions(model, tok):
    ids = prompts(tok, n=4, seed=1)
    got = TorchEngine(model, tok, max_batch=2).sample(ids, n=2, max_new_tokens=16, temperature=0.7, seed=3)
    assert len(got) == 8 and [r.index for r in got] == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in got:
        full = torch.tensor([r.prompt_ids + r.completion_ids])
        expect = token_logprobs(model, full, torch.ones_like(full), len(r.completion_ids), temperature=0.7)[0]
        assert torch.allclose(torch.tensor(r.logprobs), expect, atol=1e-5), (r.logprobs, expect)


def test_batch_size_refill_and_seed(model, tok):
    ids = prompts(tok, n=9, seed=2)
    one = TorchEngine(model, tok, max_batch=9).sample(ids, max_new_tokens=12, temperature=0.0)
    few = TorchEngine(model, tok, max_batch=2, admit_every=1).sample(ids, max_new_tokens=12, temperature=0.0)
    assert [r.completion_ids for r in one] == [r.completion_ids for r in few]
    engine = TorchEngine(model, tok, max_batch=4)
    a = engine.sample(ids, n=2, max_new_tokens=12, temperature=1.0, seed=5)
    b = engine.sample(ids, n=2, max_new_tokens=12, temperature=1.0, seed=5)
    c = engine.sample(ids, n=2, max_new_tokens=12, temperature=1.0, seed=6)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b] != [r.completion_ids for r in c]


def test_top_p_keeps_only_the_nucleus(tok):
    model = helpers.tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    engine = TorchEngine(model, tok, max_batch=8)
    ids = prompts(tok, n=8, seed=4)
    greedy = engine.sample(ids, max_new_tokens=1, temperature=0.0)
    tiny_p = engine.sample(ids, max_new_tokens=1, temperature=1.0, top_p=1e-6, seed=9)
    assert [r.completion_ids for r in tiny_p] == [r.completion_ids for r in greedy]  # only the top token is left
    assert all(abs(r.logprobs[0]) < 1e-5 for r in tiny_p)  # ...with all the mass


def test_fp8_rollouts_are_close_but_not_equal(model, tok):
    ids = prompts(tok, n=4, seed=5)
    exact = TorchEngine(model, tok, max_batch=4).sample(ids, max_new_tokens=10, temperature=1.0, seed=1)
    fp8 = TorchEngine(model, tok, max_batch=4, fp8=True)
    again = fp8.sample(ids, max_new_tokens=10, temperature=1.0, seed=1)
    gaps = []
    for r in again:  # the FP8 policy's log-probs against the exact policy's on the FP8 samples
        full = torch.tensor([r.prompt_ids + r.completion_ids])
        exact_lp = token_logprobs(model, full, torch.ones_like(full), len(r.completion_ids))[0]
        gaps.append((torch.tensor(r.logprobs) - exact_lp).abs().max().item())
    assert 0 < max(gaps) < 0.5, gaps
    assert len(exact) == len(again)


def test_fp8_qdq_rounds_to_e4m3():
    x = torch.linspace(-3, 3, 101)
    y = fp8_qdq(x)
    assert y.abs().max() == 3.0 and not torch.equal(x, y)
    assert len(torch.unique(y)) < len(torch.unique(x))  # a coarser grid
    assert torch.equal(fp8_qdq(y), y)  # already on the grid
    rows = fp8_qdq(torch.tensor([[1e-3, 2e-3], [100.0, 50.0]]), -1)
    assert rows[0, 0] > 0  # each token keeps its own scale: small rows do not vanish


def test_bad_input_is_refused(model, tok):
    engine = TorchEngine(model, tok)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.sample([[1, 2], []])
    with pytest.raises(ValueError, match="n=0"):
        engine.sample([[1, 2]], n=0)
    with pytest.raises(ValueError, match="max_batch"):
        TorchEngine(model, tok, max_batch=0)
    assert engine.sample([]) == []
