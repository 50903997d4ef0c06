"""Atomic artifacts, verified checkpoints, and exact resume of the training loop after a crash."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import helpers
from lnkit.io import CheckpointError, atomic_dir, atomic_write_json, clean_partial, verify_checkpoint
from lnkit.train.batches import Batcher, collate, encode_chat
from lnkit.train.loop import LoopConfig, train_loop

_one_thread = pytest.fixture(autouse=True)(helpers.one_thread)  # tiny matrices: one thread is fastest


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


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path, umask, file_mode, dir_mode):
    """A group sharing the run folder reads what lnkit writes: an artifact renamed into place has the mode
    a plain open()/mkdir() would give it, not mkstemp's 0600 or mkdtemp's 0700."""
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        for text in ("first", "replaced"):  # a new folder, then one swapped in for an existing one
            with atomic_dir(tmp_path / "ckpt") as tmp:
                (tmp / "w.bin").write_text(text)
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "plain.txt") == file_mode and mode(tmp_path / "plain") == dir_mode
    assert mode(tmp_path / "m.json") == file_mode
    assert mode(tmp_path / "ckpt") == dir_mode and (tmp_path / "ckpt" / "w.bin").read_text() == "replaced"
    assert mode(tmp_path / "ckpt" / "w.bin") == mode(tmp_path / "ckpt" / "manifest.json") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.json", "plain", "plain.txt"]


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


# ------------------------------------------------------------- accumulation, the spike guard, exact resume


def _linear_data(n_steps=40, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_steps, rows, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n_steps, rows, 1, generator=g)
    return x, y


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    x, y = _linear_data()

    def full(step):
        return {"x": x[step], "y": y[step], "n_tokens": 8}

    def half(i):  # micro-batch k of step s is batch s * 2 + k: the two halves of the full batch
        s, k = divmod(i, 2)
        return {"x": x[s, 4 * k : 4 * k + 4], "y": y[s, 4 * k : 4 * k + 4], "n_tokens": 4}

    a, b = _linear(), _linear()
    ra = train_loop(a, full, LoopConfig(steps=30, lr=0.2, warmup=3), tmp_path / "a", progress=False, loss_fn=_mse)
    rb = train_loop(b, half, LoopConfig(steps=30, lr=0.2, warmup=3, accum=2), tmp_path / "b", progress=False,
                    loss_fn=_mse)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-5)
    assert [r["tokens"] for r in rb] == [8] * 30
    assert all(abs(p["loss"] - q["loss"]) < 1e-4 for p, q in zip(ra, rb))
    assert ra[-1]["loss"] < 0.2 * ra[0]["loss"]


def _guarded(**kw):
    return LoopConfig(**{"steps": 20, "lr": 0.05, "warmup": 2, "ckpt_every": 5, "spike_factor": 10.0, **kw})


def _faulty(x, y, bad_step, times, fault):
    """Batches of the linear data, and a loss that ``fault``s the first ``times`` computations of ``bad_step``."""
    seen = []

    def loss_fn(model, batch):
        seen.append(batch["step"])
        loss = _mse(model, batch)
        return fault(loss) if batch["step"] == bad_step and seen.count(bad_step) <= times else loss

    return (lambda s: {"x": x[s], "y": y[s], "step": s, "n_tokens": 8}), loss_fn, seen


def test_nan_loss_rolls_back_to_the_last_checkpoint_with_a_lower_lr(tmp_path, capsys):
    from lnkit.train.loop import lr_at

    x, y = _linear_data()
    batches, loss_fn, seen = _faulty(x, y, bad_step=12, times=1, fault=lambda loss: loss * float("nan"))
    model, cfg = _linear(), _guarded()
    rows = train_loop(model, batches, cfg, tmp_path, progress=False, loss_fn=loss_fn)
    assert [r["step"] for r in rows] == list(range(20))
    assert seen[:14] == list(range(13)) + [10]  # step 12 failed; the run went back to the checkpoint at 10
    assert [r["rollbacks"] for r in rows] == [0] * 10 + [1] * 10
    assert all(r["lr"] == lr_at(r["step"], cfg) for r in rows[:10])
    assert all(r["lr"] == 0.5 * lr_at(r["step"], cfg) for r in rows[10:])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "rollback 1/3 at step 12: loss is nan; back to the checkpoint at step 10" in capsys.readouterr().out
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert "rollbacks" in log[0] and len(log) == 21


def test_gradient_spike_is_rolled_back_and_an_unguarded_run_applies_it(tmp_path):
    x, y = _linear_data()
    spike = lambda loss: loss * 1e4  # noqa: E731 - a gradient 10^4 times the usual
    batches, loss_fn, seen = _faulty(x, y, bad_step=15, times=1, fault=spike)
    guarded = train_loop(_linear(), batches, _guarded(), tmp_path / "guarded", progress=False, loss_fn=loss_fn)
    assert seen[15:17] == [15, 15] and guarded[-1]["rollbacks"] == 1  # rolled back to 15 itself
    assert max(r["grad_norm"] for r in guarded) < 100

    batches, loss_fn, _ = _faulty(x, y, bad_step=15, times=1, fault=spike)
    plain = train_loop(_linear(), batches, _guarded(spike_factor=0.0), tmp_path / "plain", progress=False,
                       loss_fn=loss_fn)
    assert plain[15]["grad_norm"] > 1000 and plain[-1]["rollbacks"] == 0


def test_too_many_rollbacks_raise_naming_the_step(tmp_path):
    from lnkit.train.loop import TrainingDiverged

    x, y = _linear_data()
    batches, loss_fn, seen = _faulty(x, y, bad_step=7, times=99, fault=lambda loss: loss * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"step 7 is bad \(loss is inf\) after 2 rollbacks"):
        train_loop(_linear(), batches, _guarded(max_rollbacks=2), tmp_path, progress=False, loss_fn=loss_fn)
    assert seen.count(7) == 3 and seen.count(5) == 3  # back to the checkpoint at 5 twice, then gave up


def test_killed_and_resumed_run_ends_exactly_like_an_unbroken_one(tmp_path):
    """Accumulation, the guard (with a rollback), a random loss term and extra logged columns: a run
    killed mid-step and resumed gives bit-identical weights and the same log as an unbroken run."""
    import csv

    x, y = _linear_data()
    cfg = _guarded(steps=24, accum=2, ckpt_every=4)

    def run(out, crash_at=None):
        seen = []

        def batches(i):
            if i == crash_at:
                raise KeyboardInterrupt("killed")
            s, k = divmod(i, 2)
            return {"x": x[s, 4 * k : 4 * k + 4], "y": y[s, 4 * k : 4 * k + 4], "step": s, "n_tokens": 4}

        def loss_fn(model, batch):
            seen.append(batch["step"])
            noise = 0.01 * torch.randn(())  # consumes torch's random stream: resume must restore it
            loss = _mse(model, batch) + noise
            if batch["step"] == 9 and seen.count(9) <= 2:  # the first attempt at step 9 blows up
                loss = loss * float("nan")
            return {"loss": loss, "noise": noise.item()}

        torch.manual_seed(123)
        model = _linear()
        return model, train_loop(model, batches, cfg, out, progress=False, loss_fn=loss_fn)

    ref_model, ref_rows = run(tmp_path / "unbroken")
    assert ref_rows[-1]["rollbacks"] == 1 and "noise" in ref_rows[0]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "broken", crash_at=2 * 14 + 1)  # killed in the middle of step 14
    model, rows = run(tmp_path / "broken")
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    def drop_time(rs):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]

    assert drop_time(rows) == drop_time(ref_rows)
    on_disk = [drop_time(csv.DictReader(open(tmp_path / d / "train_log.csv"))) for d in ("unbroken", "broken")]
    assert on_disk[0] == on_disk[1] and len(on_disk[0]) == 24


def test_checkpoint_of_another_model_with_the_same_parameters_is_refused(tmp_path):
    """Other parameters: start over (above). Same parameters but the checkpoint's tensors do not fit the
    model: an input changed under the run; refuse, naming the folder."""
    x, y = _linear_data()
    batches = lambda s: {"x": x[s], "y": y[s], "n_tokens": 8}  # noqa: E731
    cfg = LoopConfig(steps=4, lr=0.05, warmup=1, ckpt_every=2)
    train_loop(_linear(), batches, cfg, tmp_path, progress=False, fingerprint="a", loss_fn=_mse)

    class Wider(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(torch.zeros(2, 4)), torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return (x @ self.weight.T + self.bias)[:, :1]

    longer = LoopConfig(steps=6, lr=0.05, warmup=1, ckpt_every=2)
    with pytest.raises(CheckpointError, match=f"cannot resume from {tmp_path}/train_state: .*different model "
                       r"\(tensor bias is \[1\] in the checkpoint but \[2\] in the model\)"):
        train_loop(Wider(), batches, cfg, tmp_path, progress=False, fingerprint="a", loss_fn=_mse)
    rows = train_loop(Wider(), batches, longer, tmp_path, progress=False, fingerprint="b", loss_fn=_mse)
    assert [r["step"] for r in rows] == list(range(6))


def test_log_written_before_the_rollbacks_column_still_resumes(tmp_path):
    x, y = _linear_data()
    batches = lambda s: {"x": x[s], "y": y[s], "n_tokens": 8}  # noqa: E731
    cfg = LoopConfig(steps=6, lr=0.05, warmup=1, ckpt_every=3)
    train_loop(_linear(), batches, cfg, tmp_path, progress=False, loss_fn=_mse)
    log = tmp_path / "train_log.csv"
    old = [",".join(line.split(",")[:6]) for line in log.read_text().splitlines()]  # drop the new column
    log.write_text("\n".join(old[:4]) + "\n")
    state = torch.load(tmp_path / "train_state" / "state.pt", weights_only=True)
    assert state["step"] == 6
    import lnkit.train.loop as loop

    rows = loop._read_log(tmp_path, 6)
    assert [r["step"] for r in rows] == [0, 1, 2] and "rollbacks" not in rows[0]
