"""The shared training loop across processes: PyTorch's FSDP2 (``fully_shard``) under ``torchrun``.

When :func:`lnkit.train.loop.train_loop` runs in a process group of more than one process (``torchrun
--nproc_per_node N``; gloo on CPU, NCCL on GPUs), each decoder layer and then the whole model are sharded
with ``fully_shard``; every process builds the same global batch and keeps its rows ``rank::world``; each
process's loss is weighted by its share of the batch's loss tokens, so the averaged gradient is the
gradient of the global batch's token mean, the same as one process computes. Checkpoints hold the full
(unsharded) state through ``torch.distributed.checkpoint.state_dict``, written by rank 0: a run saved with
N processes resumes with M.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(model) -> None:
    """``fully_shard`` each decoder layer (``model.model.layers``), then the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def local_rows(batch: dict, rank: int, size: int) -> dict:
    """This process's rows (``rank::size``) of every tensor with the batch's first dimension."""
    rows = batch["input_ids"].shape[0]
    if rows < size:
        raise ValueError(f"a batch of {rows} rows cannot be split over {size} processes")
    return {k: v[rank::size] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
            for k, v in batch.items()}


def loss_tokens(batch: dict) -> int:
    """The tokens a causal-LM loss averages over: shifted labels that are not -100 (else the mask's sum)."""
    if "labels" in batch:
        return int((batch["labels"][..., 1:] != -100).sum())
    return int(batch["attention_mask"].sum())


def all_sum(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def full_state(model, opt) -> tuple[dict, dict]:
    """The model's and the optimizer's full state (parameter names as keys), on the CPU, in every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, opt, model_state: dict, opt_state: dict) -> None:
    """Load a full state (from :func:`full_state`, saved by any number of processes) into a sharded or plain
    model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))
