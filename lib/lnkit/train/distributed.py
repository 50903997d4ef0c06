"""The shared training loop across processes: PyTorch's FSDP2 (``fully_shard``) under ``torchrun``.

When :func:`lnkit.train.loop.train_loop` runs in a process group of more than one process (``torchrun
--nproc_per_node N``; gloo on CPU, NCCL on GPUs), each decoder layer and then the whole model are sharded
with ``fully_shard``; every process builds the same global batch and keeps its rows ``rank::world``; each
process's loss is weighted by its share of the batch's loss tokens (the positions its loss averages over:
:func:`loss_tokens`, or the loss function's own ``loss_tokens``), so the averaged gradient is the gradient
of the global batch's token mean, the same as one process computes.

Checkpoints. One process writes the full state in one file (``state.pt``), as it always has. More than
one process write a sharded ``torch.distributed.checkpoint`` (DCP) folder, each process its own shards,
no process ever holding the full state (at 70B it fits none), plus the loop's small state (step, random
state, guard) in ``state.pt`` by rank 0. The folder is built under a temporary name and swapped in by rank
0 once every process has written its part (:func:`shared_atomic_dir`), so a crash mid-save leaves the
previous checkpoint in place. Either format loads under any number of processes: DCP reshards on load
(and loads without a process group); a full state is read whole by every process and ``set_state_dict``
keeps each one's shard (it comes from a run that fitted one process). A run saved with N processes resumes
with M. Rank 0 alone checksums the folder (the manifest of :mod:`lnkit.io`) when it writes it and when
it is loaded; at 70B that is a pass over every shard on one process, the price of a verified checkpoint.

Distillation (:mod:`lnkit.train.distill`) replicates the frozen teacher: each process runs all of it on
its own rows.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from lnkit.io import atomic_dir

SHARDS = "dcp"  # the DCP subfolder of a sharded checkpoint


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

    on = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors
    t = torch.tensor([float(value)], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return float(t[0])


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def from_rank0(value):
    """Rank 0's ``value`` (any picklable object), in every process."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state(model, opt) -> tuple[dict, dict]:
    """The model's and the optimizer's full state (parameter names as keys), on the CPU, in every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state(model) -> dict:
    """The whole model's weights on the CPU in rank 0 (empty elsewhere): a collective, every process calls it.
    What a stage saves as its ``model/`` after training across processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, opt, model_state: dict, opt_state: dict) -> None:
    """Load a full state (from :func:`full_state`, saved by any number of processes) into a sharded or plain
    model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def shared_atomic_dir(path: Path):
    """:func:`lnkit.io.atomic_dir` for a folder every process writes into: rank 0 makes the temporary
    folder and tells the others its name; once all have written their part it writes the manifest and
    swaps the folder in; every process returns after the swap. A crash before the swap leaves ``path`` as
    it was (and the temporary folder, which :func:`lnkit.io.clean_partial` removes)."""
    if world()[0] != 0:
        yield Path(from_rank0(None))
        barrier()  # every process has written its part
        barrier()  # rank 0 has swapped the folder in
        return
    with atomic_dir(path) as tmp:
        from_rank0(str(tmp))
        yield tmp
        barrier()
    barrier()


def save_sharded(model, opt, folder: Path) -> None:
    """Every process writes its shards of the model's and the optimizer's state to ``folder`` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, opt_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=folder)


def load_sharded(model, opt, folder: Path) -> None:
    """Load a DCP checkpoint (:func:`save_sharded`, any number of processes) into a sharded or plain model
    and its optimizer; each process reads only what its shards need. Works without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, opt_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": opt_state}
    with warnings.catch_warnings():  # without a process group DCP loads in this process, and says so: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def sharded_shapes(folder: Path) -> dict[str, tuple]:
    """The model tensors' (global) shapes in a DCP checkpoint, read from its metadata alone."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): tuple(m.size) for k, m in meta.items() if k.startswith("model.")}
