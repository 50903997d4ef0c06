"""Run by tests/test_distributed.py under `torchrun`: 20 steps of the shared training loop on a tiny Llama
with causal-LM batches whose rows have different numbers of loss tokens (as packed SFT rows do)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402
from lnkit.train.loop import LoopConfig, train_loop  # noqa: E402


def main() -> None:
    out, crash_at = sys.argv[1], int(sys.argv[2])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = helpers.tiny_llama(seed=0)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(20):
        ids = torch.randint(3, 101, (4, 24), generator=g)
        labels = ids.clone()
        for r, cut in enumerate(torch.randint(2, 20, (4,), generator=g).tolist()):
            labels[r, :cut] = -100  # a prompt of its own length, no loss on it
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

    def next_batch(i):
        if i == crash_at:
            raise SystemExit(3)  # a crash after the checkpoint at step 10
        return batches[i]

    rows = train_loop(model, next_batch, LoopConfig(steps=20, lr=3e-3, warmup=2, ckpt_every=10), out, progress=False,
                      fingerprint="distributed-test")
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out, "losses.json").write_text(json.dumps([r["loss"] for r in rows]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pytest imports this file when it collects doctests: nothing runs then
    main()
