"""Stage 06: batches (assistant-only loss, packing, the staged schedule), a short SFT run that learns,
a NaN injected into a run that the guard survives, and the stage's errors."""

from __future__ import annotations

import math

import pytest
import torch

from lnkit.data.released import item_row, write_rows
from lnkit.stages.sft import PHASES, data_path, make_batches, train_sft
from lnkit.stages.sft import Params as SFTParams
from lnkit.train.batches import IGNORE


def _tiny_run(tmp_path, small_splits, tok, tiny_llama, n=40):
    """A run folder with a student (the tiny Llama as 00_parent/model) and a blend written as stage 05."""
    from lnkit.checkpoints import save_model
    from lnkit.data.splits import save_items

    run = tmp_path / "run"
    save_model(tiny_llama, tok, run / "00_parent" / "model")
    (run / "00_parent" / "_COMPLETE.json").write_text("{}")  # stage 00 done
    save_items(small_splits["test"], run / "00_parent" / "data" / "test.jsonl")
    items = [it for it in small_splits["train"] if it.domain == "math"][:n]
    items += [it for it in small_splits["train"] if it.domain in ("chat", "instruct")][:n // 4]
    rows = [item_row(it, "on") for it in items] + [item_row(it, "off") for it in items[::2]]
    write_rows(rows, run / "05_reasoning_data" / "sft.jsonl")
    return run, rows


def _params(run, **kw):
    base = dict(run_dir=str(run), figures_dir="", progress=False, init="00_parent", steps=30, rows=4, row_len=192,
                lr=3e-3, warmup=3, ckpt_every=5, eval_n=2, eval_max_new_tokens=8)
    return SFTParams(**{**base, **kw})


def _segments(batch, tok):
    """The packed examples of a batch, decoded: (prompt text, trained text) per example."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids, lab, pos = batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r]
        starts = [i for i in range(len(pos)) if pos[i] == 0 and ids[i] != tok.pad_token_id]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            seg = [(int(t), int(lb)) for t, lb in zip(ids[a:b], lab[a:b]) if t != tok.pad_token_id]
            out.append((tok.decode([t for t, lb in seg if lb == IGNORE]), tok.decode([t for t, lb in seg if lb != IGNORE])))
    return out


def test_loss_is_on_assistant_tokens_only_and_examples_do_not_see_each_other(tmp_path, small_splits, tok, tiny_llama):
    run, rows = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    from lnkit.data.released import load_rows

    P = _params(run)
    batches, plan = make_batches(load_rows(data_path(run, P.data))[0], tok, P)
    b = batches(0)
    outputs = {r["output"] + "<|eot_id|>" for r in rows}
    for prompt, trained in _segments(b, tok):
        assert trained in outputs  # exactly one assistant answer is trained, nothing of the prompt
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "detailed thinking" in prompt
    mask = b["attention_mask"][0, 0]
    pos = b["position_ids"][0]
    second = [i for i in range(1, len(pos)) if pos[i] == 0][0]
    assert not mask[second:, :second].any()  # the second example never attends to the first


def test_staged_schedule_draws_each_phase_from_its_own_examples(tmp_path, small_splits, tok, tiny_llama):
    from lnkit.data.released import load_rows

    run, _ = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    P = _params(run, schedule="staged", stage_fractions=[0.5, 0.3, 0.2], steps=10, accum=2)
    batches, plan = make_batches(load_rows(data_path(run, P.data))[0], tok, P)
    assert [(ph, start) for ph, start, _ in plan] == list(zip(PHASES, [0, 5, 8]))
    reasoning = _segments(batches(2 * 4 + 1), tok)  # step 4, second micro-batch: phase 1
    assert reasoning and all("detailed thinking on" in p and t.startswith("<think>") for p, t in reasoning)
    chat = _segments(batches(2 * 9), tok)  # step 9: phase 3
    assert chat and all("How many" not in p for p, _ in chat)  # no math prompt in the chat phase
    with pytest.raises(ValueError, match=r"phase\(s\) \['chat'\] have no examples"):
        make_batches([r for r in load_rows(data_path(run, P.data))[0] if r["category"] == "math"], tok, P)


def test_sft_run_learns_saves_and_evaluates(tmp_path, small_splits, tok, tiny_llama):
    from lnkit import stage
    from lnkit.eval import evaluate, summarize
    from lnkit.stages.sft import eval_items

    run, _ = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    P = _params(run)
    stage.start(P)
    model, tok2, log, info = train_sft(P)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first and info["rollbacks"] == 0 and not info["skipped"]
    assert (run / "06_reasoning_sft" / "model" / "model.safetensors").exists()
    rows = evaluate(model, tok2, eval_items(P), modes=("off", "on"), max_new_tokens=8, progress=False)
    assert len(eval_items(P)) == 10 and len(rows) == 20 and {s["mode"] for s in summarize(rows)} == {"off", "on"}


def test_a_nan_in_the_middle_of_sft_is_rolled_back_and_the_run_completes(tmp_path, small_splits, tok, tiny_llama):
    from lnkit import stage

    run, _ = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    P = _params(run, steps=20)
    assert P.spike_factor > 0  # the stage's default turns the guard on
    stage.start(P)
    calls = {"n": 0}

    def loss_fn(model, batch):  # a transient fault (an overflow, a bad node): one step's loss is NaN
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if calls["n"] == 13 else loss

    model, _, log, info = train_sft(P, loss_fn=loss_fn)
    assert info["rollbacks"] == 1 and [r["step"] for r in log] == list(range(20))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert calls["n"] == 20 + 1 + (12 - 10)  # the bad step, and steps 10-11 redone from the step-10 checkpoint


def test_missing_inputs_are_named(tmp_path, small_splits, tok, tiny_llama):
    from lnkit.params import ParamError

    run, _ = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    with pytest.raises(FileNotFoundError, match="04_distillation"):
        train_sft(_params(run, init="04_distillation"))
    (run / "03_half_done").mkdir()
    (run / "03_half_done" / "params.json").write_text("{}")  # started, never finished
    with pytest.raises(FileNotFoundError, match="stage 03_half_done has not completed"):
        train_sft(_params(run, init="03_half_done"))
    with pytest.raises(FileNotFoundError, match="run stage 05_reasoning_data first"):
        train_sft(_params(run, data="no_such_stage"))
    with pytest.raises(ParamError, match="schedule"):
        _params(run, schedule="three-stage")
    with pytest.raises(ParamError, match="stage_fractions"):
        _params(run, stage_fractions=[0.5, 0.5, 0.5])


def test_a_corrupt_input_is_named_before_training_and_nothing_is_written(tmp_path, small_splits, tok, tiny_llama):
    from lnkit.io import ArtifactError
    from lnkit.stages import sft

    run, _ = _tiny_run(tmp_path, small_splits, tok, tiny_llama)
    (run / "05_reasoning_data" / "_COMPLETE.json").write_text("{}")
    bad = run / "00_parent" / "eval_summary.json"
    bad.write_text('[{"mode": "off", "domain": ')  # cut short, as by a full disk
    with pytest.raises(ArtifactError, match=rf"{bad} is not valid JSON .*rerun the stage that wrote it"):
        sft.run(_params(run))
    assert not (run / "06_reasoning_sft").exists()
    bad.write_bytes(b"[\xff]")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        sft.run(_params(run))


def test_sft_across_two_processes_trains_like_one_and_saves_the_whole_model(tmp_path, small_splits, tok, tiny_llama):
    """``processes=2``: the training runs under torchrun (FSDP2, gloo on this CPU) and the notebook's process
    loads what it saved: the same losses as one process to 1e-5, the same weights, one whole model folder."""
    from lnkit.stages.sft import stage_dir

    one_run, _ = _tiny_run(tmp_path / "one", small_splits, tok, tiny_llama)
    two_run, _ = _tiny_run(tmp_path / "two", small_splits, tok, tiny_llama)
    m1, _, log1, info1 = train_sft(_params(one_run, steps=12, ckpt_every=6))
    m2, _, log2, info2 = train_sft(_params(two_run, steps=12, ckpt_every=6, processes=2))
    assert [r["step"] for r in log2] == list(range(12))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(log1, log2)) < 1.01e-5  # the log keeps 5 decimals
    w1, w2 = m1.state_dict(), m2.state_dict()
    assert w1.keys() == w2.keys() and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert info2["rows"] == info1["rows"] and info2["phases"] == [list(x) for x in info1["phases"]]
    out = stage_dir(two_run, "06_reasoning_sft")
    assert (out / "train_state" / "dcp" / ".metadata").is_file()  # checkpointed sharded, by 2 processes
