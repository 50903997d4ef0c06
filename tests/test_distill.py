"""Stage 04's distillation: the losses, their positions, KD bringing a Puzzle-style child to its parent, and
the stage's parameters, student resolution and resume rules, on tiny models made on the spot."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import helpers
from lnkit.checkpoints import save_model
from lnkit.io import atomic_write_json
from lnkit.params import ParamError
from lnkit.stages.distill import Params as DistillParams
from lnkit.stages.distill import distill_student, resolve_student, student_name
from lnkit.train.batches import PackedBatcher, encode_chat, encode_doc
from lnkit.train.distill import check_pair, cosine_distance, forward_kl, make_loss_fn, position_mask

_one_thread = pytest.fixture(autouse=True)(helpers.one_thread)  # tiny matrices: one thread is fastest


def _examples(tok):
    chats = [encode_chat(tok, f"What is {a} + {b}?", f"The answer is {a + b}.", "off") for a in range(9) for b in range(9)]
    return chats + [encode_doc(tok, f"{a} plus {a} makes {2 * a}.") for a in range(20)]


def _child(teacher, layer: int, block: dict):
    """A nemotron-nas child of ``teacher`` with one block replaced (weights copied wherever they fit)."""
    from lnkit.model.config import NemotronNasConfig
    from lnkit.model.convert import from_llama
    from lnkit.model.modeling import NemotronNasForCausalLM

    nas = from_llama(teacher)
    d = nas.config.to_dict()
    d["block_configs"][layer] = {**d["block_configs"][layer], **block}
    child = NemotronNasForCausalLM(NemotronNasConfig.from_dict(d))
    own = child.state_dict()
    child.load_state_dict({k: v for k, v in nas.state_dict().items() if k in own and own[k].shape == v.shape},
                          strict=False)
    return child.eval()


NO_ATTENTION = {"attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}}
NARROW_FFN = {"ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": 16, "ffn_mult": None}}


def test_forward_kl_is_teacher_to_student_and_scales_with_temperature():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")  # KL(t || s)
    torch.testing.assert_close(forward_kl(s, t), ref)
    assert abs(forward_kl(s, t) - forward_kl(t, s)) > 1e-3  # the direction matters
    torch.testing.assert_close(forward_kl(2 * s, 2 * t, temperature=2.0), 4 * forward_kl(s, t))
    h = torch.randn(5, 8, generator=g)
    assert float(cosine_distance(3 * h, h)) < 1e-6 and abs(float(cosine_distance(-h, h)) - 2) < 1e-6


def test_positions_on_packed_rows_exclude_padding_and_prompts(tok):
    batch = PackedBatcher(_examples(tok), rows=3, row_len=80, pad_id=tok.pad_token_id, seed=1)(0)
    n_tokens = int(batch.pop("n_tokens"))
    every, labels = position_mask(batch, "all", tok.pad_token_id), position_mask(batch, "labels", tok.pad_token_id)
    assert int(every.sum()) == n_tokens < 3 * 80  # real tokens only; rows end in padding
    assert int(labels.sum()) == int((batch["labels"] != -100).sum())  # one prediction per label
    assert not (labels & ~every).any()
    prompt_pos = (batch["labels"][:, 1:] == -100) & (batch["input_ids"][:, 1:] != tok.pad_token_id)
    assert prompt_pos.any() and not labels[:, :-1][prompt_pos].any()


def test_a_copy_of_the_teacher_has_zero_loss_and_cpt_is_the_lm_loss(tok, tiny_llama):
    from lnkit.model.convert import from_llama

    batch = PackedBatcher(_examples(tok), rows=2, row_len=64, pad_id=tok.pad_token_id, seed=0)(0)
    batch.pop("n_tokens")
    kd = make_loss_fn(tiny_llama, pad_id=tok.pad_token_id)(from_llama(tiny_llama), batch)
    assert kd["kl"] < 1e-6 and kd["cosine"] < 1e-6 and kd["loss"].item() < 1e-5
    student = _child(tiny_llama, 1, NO_ATTENTION)
    cpt = make_loss_fn(None, mode="cpt")(student, batch)
    torch.testing.assert_close(cpt["loss"], student(**batch).loss)
    assert set(cpt) == {"loss", "lm"}
    with pytest.raises(ValueError, match="mode='kd' needs a teacher"):
        make_loss_fn(None, mode="kd")


def test_distillation_brings_a_child_to_its_parent(tok, tiny_llama, tmp_path):
    """A child with layer 1's attention removed: KD lowers its KL to the parent and its hidden-state
    distance, on held-out rows, far more than the LM loss alone does."""
    from lnkit.train.loop import LoopConfig, train_loop

    batches = PackedBatcher(_examples(tok), rows=2, row_len=96, pad_id=tok.pad_token_id, seed=0)
    # A teacher with some structure: a few steps of LM training first.
    train_loop(tiny_llama, batches, LoopConfig(steps=40, lr=3e-3, warmup=2, ckpt_every=10**6), tmp_path / "t",
               progress=False)
    for q in tiny_llama.parameters():
        q.requires_grad_(False)
    held_out = {k: v for k, v in batches(10**6).items() if k != "n_tokens"}
    measure = make_loss_fn(tiny_llama, pad_id=tok.pad_token_id)

    def distance(student):
        with torch.no_grad():
            m = measure(student, held_out)
        return m["kl"], m["cosine"]

    results = {}
    for mode in ("kd", "cpt"):
        student = _child(tiny_llama, 1, NO_ATTENTION)
        before = distance(student)
        loss_fn = make_loss_fn(tiny_llama if mode == "kd" else None, mode=mode, pad_id=tok.pad_token_id)
        rows = train_loop(student, batches, LoopConfig(steps=30, lr=3e-3, warmup=2, ckpt_every=10**6),
                          tmp_path / mode, progress=False, loss_fn=loss_fn)
        results[mode] = distance(student)
        assert ("kl" in rows[0]) == (mode == "kd") and "lm" in rows[0]
    assert results["kd"][0] < 0.5 * before[0] and results["kd"][1] < 0.5 * before[1], (before, results)
    assert results["kd"][0] < results["cpt"][0]


def test_student_of_another_vocabulary_is_refused_naming_both_sizes(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match=rf"student's vocabulary is 50, the teacher's {tiny_llama.config.vocab_size}"):
        check_pair(other, tiny_llama)


@pytest.mark.parametrize("values, field", [
    ({"students": []}, "students"),
    ({"students": ["02_architecture_search/children/budget_0.40", "other/budget_0.40"]}, "same name twice"),
    ({"kl_weight": 0.0, "cosine_weight": 0.0}, "nothing to train"),
    ({"spike_factor": 0.5}, "spike_factor=0.5"),
    ({"kd_positions": "prompt"}, "kd_positions='prompt'"),
    ({"mode": "sft"}, "mode='sft'"),
])
def test_parameters_are_checked_before_any_compute(values, field):
    with pytest.raises(ParamError, match=field):
        DistillParams.from_dict(values)


def test_token_budget_and_training_key():
    p = DistillParams(tokens=4096 * 10, rows=4, row_len=256, accum=2)
    assert p.total_steps() == 20
    assert p.train_key("a") == DistillParams(tokens=4096 * 10, rows=4, row_len=256, accum=2, eval_n=5).train_key("a")
    assert p.train_key("a") != p.train_key("b") != DistillParams(lr=1e-3).train_key("b")


def test_students_resolve_to_model_folders(tmp_path, tiny_llama, tok):
    run = tmp_path
    save_model(tiny_llama, tok, run / "02_architecture_search" / "children" / "budget_0.40")
    assert resolve_student(run, "02_architecture_search/children/budget_0.40").name == "budget_0.40"
    with pytest.raises(FileNotFoundError, match="run 03_ffn_fusion first"):
        resolve_student(run, "unfused")
    fused = run / "03_ffn_fusion"
    save_model(tiny_llama, tok, fused / "model")
    atomic_write_json(fused / "params.json", {})
    with pytest.raises(FileNotFoundError, match="stage 03_ffn_fusion has not completed"):
        resolve_student(run, "03_ffn_fusion")
    (fused / "_COMPLETE.json").write_text("{}")
    atomic_write_json(fused / "source.json", {"child": "budget 0.40", "child_dir": "02_architecture_search/children/budget_0.40"})
    assert resolve_student(run, "03_ffn_fusion") == fused / "model"
    assert resolve_student(run, "unfused") == run / "02_architecture_search" / "children" / "budget_0.40"
    with pytest.raises(FileNotFoundError, match=r"student 'nope/x' resolves to .*nope/x, which holds no model"):
        resolve_student(run, "nope/x")
    assert student_name("unfused") == "unfused"


def test_a_changed_student_is_distilled_from_the_start_and_the_same_one_resumes(tmp_path, tiny_llama, tok, capsys):
    """Same parameters and the same student: a rerun resumes (at the end, when training completed). The
    student folder now holds another model (an upstream stage rerun: other weights, or another
    architecture): its training starts over, saying so, never resuming the old model's state. Other
    parameters: a fresh start too (the loop's rule)."""
    run = tmp_path / "run"
    save_model(_child(tiny_llama, 1, NO_ATTENTION), tok, run / "kids" / "x")
    for q in tiny_llama.parameters():
        q.requires_grad_(False)
    batches = PackedBatcher(_examples(tok), rows=2, row_len=64, pad_id=tok.pad_token_id, seed=0)
    p = DistillParams(run_dir=str(run), students=["kids/x"], steps=4, warmup=1, progress=False)
    out = run / "04_distillation" / "students" / "x"
    _, rows = distill_student(p, "kids/x", tiny_llama, tok, batches, out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "kl" in rows[0] and "cosine" in rows[0]
    _, again = distill_student(p, "kids/x", tiny_llama, tok, batches, out)  # complete: resumes at the end
    assert again == rows and "changed since" not in capsys.readouterr().out

    other = _child(tiny_llama, 1, NO_ATTENTION)
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)
    save_model(other, tok, run / "kids" / "x")  # the input changed under the run: other weights
    student, fresh = distill_student(p, "kids/x", tiny_llama, tok, batches, out)
    assert [r["step"] for r in fresh] == [0, 1, 2, 3] and fresh != rows  # trained again, from the new student
    assert "student 'kids/x'" in capsys.readouterr().out
    save_model(_child(tiny_llama, 0, NARROW_FFN), tok, run / "kids" / "x")  # another architecture
    student, fresh = distill_student(p, "kids/x", tiny_llama, tok, batches, out)
    assert [r["step"] for r in fresh] == [0, 1, 2, 3] and student.config.block_configs[0].ffn.kind == "ffn"
    assert "distilling it from the start" in capsys.readouterr().out
    p2 = DistillParams(run_dir=str(run), students=["kids/x"], steps=5, warmup=1, progress=False)
    _, rows = distill_student(p2, "kids/x", tiny_llama, tok, batches, out)
    assert [r["step"] for r in rows] == list(range(5))
    assert json.loads(json.dumps(rows))[0]["rollbacks"] == 0


def test_kd_then_cpt_switches_to_the_lm_loss_for_the_last_share_of_steps(tmp_path, tiny_llama, tok):
    """LN-Ultra's recipe: the last cpt_fraction of the steps are continued pretraining (no teacher)."""
    run = tmp_path / "run"
    save_model(_child(tiny_llama, 1, NO_ATTENTION), tok, run / "kids" / "x")
    for q in tiny_llama.parameters():
        q.requires_grad_(False)
    batches = PackedBatcher(_examples(tok), rows=2, row_len=64, pad_id=tok.pad_token_id, seed=0)
    p = DistillParams(run_dir=str(run), students=["kids/x"], mode="kd_cpt", cpt_fraction=0.4, steps=5, accum=2,
                      warmup=1, progress=False)
    _, rows = distill_student(p, "kids/x", tiny_llama, tok, batches, tmp_path / "out")
    assert ["kl" in r for r in rows] == [True, True, True, False, False]
    assert all(r["loss"] == r["lm"] for r in rows[3:])
    batch = {k: v for k, v in batches(0).items() if k != "n_tokens"}
    lf = make_loss_fn(tiny_llama, mode="kd_cpt", pad_id=tok.pad_token_id)
    assert set(lf(tiny_llama, {**batch, "distill": torch.tensor(False)})) == {"loss", "lm"}
    assert {"kl", "cosine"} <= set(lf(tiny_llama, batch))
