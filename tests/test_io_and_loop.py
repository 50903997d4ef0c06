"""Atomic artifacts, verified checkpoints, and exact resume of the training loop after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lnkit.io import CheckpointError, atomic_dir, atomic_write_json, clean_partial, verify_checkpoint
from lnkit.train.batches import Batcher, collate, encode_chat
from lnkit.train.loop import LoopConfig, train_loop


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object.__new__(type("X", (), {"__str__": None}))})
    assert p.read_text().strip().startswith("{") and '"a": 1' in p.read_text()
    assert [q.name for q in tmp_path.iterdir()] == ["m.json"]


def test_checkpoint_manifest_names_truncated_missing_and_altered_files(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 100)
        (tmp / "b.json").write_text("{}")
    verify_checkpoint(d)
    (d / "a.bin").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match=r"a\.bin is truncated"):
        verify_checkpoint(d)
    (d / "a.bin").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match=r"a\.bin is corrupt"):
        verify_checkpoint(d)
    (d / "a.bin").unlink()
    with pytest.raises(CheckpointError, match=r"a\.bin is missing"):
        verify_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nope")


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "w").write_text("new, half")
        raise RuntimeError("crash while writing")
    assert (d / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_9_during_checkpoint_write_never_leaves_a_torn_checkpoint(tmp_path):
    """A real process killed at random points while rewriting a checkpoint: afterwards the folder is
    either absent or verifies, and clean_partial removes every leftover."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)) + '/lib')!r})
        from lnkit.io import atomic_dir
        i = 0
        while True:
            with atomic_dir({str(tmp_path / 'ckpt')!r}) as tmp:
                for j in range(20):
                    (tmp / f"part{{j}}.bin").write_bytes(os.urandom(200_000))
            i += 1
    """)
    for delay in (0.15, 0.4, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        clean_partial(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] in ([], ["ckpt"])
        if (tmp_path / "ckpt").exists():
            verify_checkpoint(tmp_path / "ckpt")


def _examples(tok):
    return [encode_chat(tok, f"What is {a} + {b}?", f"The answer is {a + b}.", "off") for a in range(9) for b in range(9)]


def test_loss_masks_prompt_and_padding(tok):
    ids, labels = encode_chat(tok, "What is 2 + 2?", "The answer is 4.", "off")
    n_resp = len(tok("The answer is 4.<|eot_id|>", add_special_tokens=False)["input_ids"])
    assert sum(x != -100 for x in labels) == n_resp and labels[-n_resp:] == ids[-n_resp:]
    b = collate([(ids, labels), (ids[:5], labels[:5])], pad_id=tok.pad_token_id)
    assert b["attention_mask"][1].sum() == 5 and (b["labels"][1, 5:] == -100).all()


def test_training_reduces_loss(tok, tiny_llama):
    batches = Batcher(_examples(tok), 16, tok.pad_token_id, seed=0)
    before = tiny_llama(**batches(999)).loss.item()
    rows = train_loop(tiny_llama, batches, LoopConfig(steps=60, lr=3e-3, warmup=5, ckpt_every=1000),
                      out_dir=__import__("tempfile").mkdtemp(), progress=False)
    after = tiny_llama(**batches(999)).loss.item()
    assert after < 0.6 * before, (before, after)
    assert len(rows) == 60 and rows[0]["lr"] < rows[5]["lr"]


def test_resume_after_crash_matches_an_unbroken_run(tmp_path, tok, tiny_llama):
    import copy

    batches = Batcher(_examples(tok), 8, tok.pad_token_id, seed=0)
    cfg = LoopConfig(steps=20, lr=1e-3, warmup=2, ckpt_every=5)
    init = copy.deepcopy(tiny_llama.state_dict())

    train_loop(tiny_llama, batches, cfg, tmp_path / "unbroken", progress=False)
    reference = {k: v.clone() for k, v in tiny_llama.state_dict().items()}

    tiny_llama.load_state_dict(init)

    def crashing(step):
        if step == 12:
            raise KeyboardInterrupt("killed")
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train_loop(tiny_llama, crashing, cfg, tmp_path / "broken", progress=False)
    (tmp_path / "broken" / "model.tmp-half").mkdir()  # a half-written artifact from the crash
    (tmp_path / "broken" / "model.tmp-half" / "w.safetensors").write_bytes(b"junk")
    clean_partial(tmp_path / "broken")
    assert not (tmp_path / "broken" / "model.tmp-half").exists()

    tiny_llama.load_state_dict(init)  # a fresh process would start from a fresh model
    rows = train_loop(tiny_llama, batches, cfg, tmp_path / "broken", progress=False)
    assert [r["step"] for r in rows] == list(range(20))
    for k, v in tiny_llama.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-6)


def test_corrupt_training_state_is_named_not_loaded(tmp_path, tok, tiny_llama):
    batches = Batcher(_examples(tok), 8, tok.pad_token_id, seed=0)
    cfg = LoopConfig(steps=5, lr=1e-3, warmup=1, ckpt_every=5)
    train_loop(tiny_llama, batches, cfg, tmp_path, progress=False)
    state = tmp_path / "train_state" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"state\.pt is truncated"):
        train_loop(tiny_llama, batches, LoopConfig(steps=10, lr=1e-3), tmp_path, progress=False)


def test_packed_rows_compute_what_separate_examples_compute(tok, tiny_llama):
    """Packing with a block-diagonal mask and restarted positions: the loss of a packed batch equals
    the token-weighted mean of the examples' own losses."""
    from lnkit.train.batches import PackedBatcher

    examples = _examples(tok)[:12]
    batch = PackedBatcher(examples, rows=2, row_len=96, pad_id=tok.pad_token_id, seed=0)(0)
    n_tokens = int(batch.pop("n_tokens"))
    packed_loss = tiny_llama(**batch).loss.item()
    total, count, seen = 0.0, 0, 0
    for r in range(2):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0 and batch["labels"][r, i] == -100 and
                  (i == 0 or batch["attention_mask"][r, 0, i, i - 1].item() is False)]
        used = [i for i in range(96) if batch["attention_mask"][r, 0, i].sum() > 1 or pos[i] == 0]
        for a, b in zip(starts, starts[1:] + [max(used) + 1]):
            ids, labels = batch["input_ids"][r, a:b], batch["labels"][r, a:b]
            if (labels[1:] != -100).sum() == 0:
                continue
            out = tiny_llama(input_ids=ids[None], labels=labels[None])
            k = int((labels[1:] != -100).sum())
            total, count, seen = total + out.loss.item() * k, count + k, seen + (b - a)
    assert abs(packed_loss - total / count) < 1e-4
    assert seen <= n_tokens


def test_checkpoint_of_other_parameters_is_not_resumed(tmp_path, tok, tiny_llama):
    batches = Batcher(_examples(tok), 8, tok.pad_token_id, seed=0)
    train_loop(tiny_llama, batches, LoopConfig(steps=5, lr=1e-3, warmup=1, ckpt_every=5), tmp_path,
               progress=False, fingerprint="run-a")
    rows = train_loop(tiny_llama, batches, LoopConfig(steps=8, lr=1e-3, warmup=1, ckpt_every=4), tmp_path,
                      progress=False, fingerprint="run-b")
    assert [r["step"] for r in rows] == list(range(8))  # started over, did not continue run-a
