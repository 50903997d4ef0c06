"""Batched KV-cache generation agrees with transformers' own; the harness scores what it should."""

from __future__ import annotations

from lnkit.data.chat import render_prompt
from lnkit.eval import compliant, evaluate, leaks, save_results, summarize
from lnkit.generate import generate


def test_greedy_batched_generation_matches_hf_generate(tok, tiny_llama):
    prompts = [render_prompt(p, "off") for p in ["What is 2 + 2?", "Where do daxes live?", "Hi", "A zog is a?"]]
    ours = generate(tiny_llama, tok, prompts, max_new_tokens=12, batch_size=3)
    for p, o in zip(prompts, ours):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert o["text"] == tok.decode(ref, skip_special_tokens=False)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tok, tiny_llama):
    prompts = [render_prompt("What is 3 + 4?", "on")] * 4
    a = generate(tiny_llama, tok, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    b = generate(tiny_llama, tok, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    assert a == b
    assert len({o["text"] for o in a}) > 1  # a random tiny model samples different continuations
    greedy = generate(tiny_llama, tok, prompts[:1], max_new_tokens=8)
    nucleus = generate(tiny_llama, tok, prompts[:1], max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3)
    assert greedy == nucleus


def test_compliance_and_leakage_rules():
    assert compliant("<think>\nA zog is a pim.\n</think>\nThe answer is B.", "on")
    assert not compliant("<think>\nunfinished", "on")
    assert not compliant("The answer is B.", "on")
    assert compliant("The answer is B.", "off") and not compliant("<think>x</think> B", "off")
    assert leaks("5 + 3 = 8. The answer is 8.") and not leaks("<think>5 + 3 = 8.</think>The answer is 8.")


def test_harness_scores_reference_answers(tok, small_splits, monkeypatch):
    items = [it for it in small_splits["test"] if it.domain in ("math", "science", "chat")][:12]
    answers = {render_prompt(it.prompt, "off"): it.direct for it in items}
    answers |= {render_prompt(it.prompt, "on"): f"<think>\n{it.reasoning}\n</think>\nThe answer is 0."
                for it in items}

    def fake_generate(model, tok, prompts, **kw):
        return [{"text": answers[p], "tokens": len(answers[p].split()), "finished": True} for p in prompts]

    monkeypatch.setattr("lnkit.eval.generate", fake_generate)
    rows = evaluate(None, tok, items, modes=("off", "on"), k=2, progress=False)
    assert len(rows) == len(items) * 3
    summ = summarize(rows)
    off = next(s for s in summ if s["mode"] == "off" and s["domain"] == "all")
    on = next(s for s in summ if s["mode"] == "on" and s["domain"] == "all")
    assert off["accuracy"] == 1.0 and off["compliance"] == 1.0 and off["leakage"] == 0.0
    assert on["compliance"] == 1.0 and on["samples"] == 2 * on["n"]
    assert on["accuracy"] < 1.0  # 'The answer is 0.' is right for no science or chat item


def test_results_are_saved_as_tidy_tables(tmp_path, tok, tiny_llama, small_splits):
    items = small_splits["test"][:6]
    rows = evaluate(tiny_llama, tok, items, modes=("off",), max_new_tokens=6, progress=False)
    summ = save_results(rows, tmp_path)
    assert (tmp_path / "eval_summary.csv").read_text().splitlines()[0].startswith("mode,domain,difficulty,n")
    assert len((tmp_path / "eval_rows.jsonl").read_text().splitlines()) == 6
    assert summ[0]["n"] >= 1
