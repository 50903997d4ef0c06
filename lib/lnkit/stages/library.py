"""Stage 01: build Puzzle's block library for the stage-00 parent (``notebooks/01_block_library.ipynb``).

The components are :mod:`lnkit.puzzle.space` (the variants), :mod:`lnkit.puzzle.library` (initialisation,
blockwise local distillation, storage) and :mod:`lnkit.puzzle.calibration` (the parent's activations).

Reads ``<run_dir>/00_parent/`` (model, tokenizer, training items), writes ``<run_dir>/01_block_library/``:
``library/`` (one checksummed folder per candidate, see :mod:`lnkit.puzzle.library`), ``losses.csv`` (loss
of every candidate before and after blockwise local distillation) and the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from lnkit import stage
from lnkit.checkpoints import load_model, require, stage_dir
from lnkit.data.splits import load_split
from lnkit.gpuhours import Work
from lnkit.params import ParamError, RunParams, param
from lnkit.puzzle.calibration import token_batches
from lnkit.puzzle.library import build_library, save_library, write_rows_csv
from lnkit.puzzle.space import SearchSpace

NAME = "01_block_library"


@dataclass
class Params(RunParams):
    """Stage 01 parameters (fields match ``notebooks/01_block_library.ipynb``'s parameters cell)."""

    STAGE = NAME
    threads: int = param(1, "torch CPU threads; sub-blocks of tiny models are small matrices, 1 is fastest", lo=0, hi=256)
    # --- search space
    kv_factors: list[int] = param([], "KV-head reduction factors to try (n_heads_in_group x factor); [] = every power of two that divides the heads", lo=2)
    attention_linear: bool = param(True, "include a linear replacement of attention")
    attention_no_op: bool = param(True, "include removing attention")
    ffn_fractions: list[float] = param([1.0, 0.75, 0.5, 0.25, 0.1], "FFN widths to try, as fractions of the parent's", lo=0.0, hi=1.0)
    ffn_linear: bool = param(True, "include a linear replacement of the FFN")
    ffn_no_op: bool = param(True, "include removing the FFN")
    # --- blockwise local distillation
    bld: str = param("decoupled", "decoupled: attention and FFN trained separately (the paper's default); coupled: every (attention, FFN) pair trained as a whole layer", choices=["decoupled", "coupled"])
    layers: list[int] = param([], "layers to build ([] = all): lets a cluster split the library across jobs", lo=0)
    calib_rows: int = param(64, "calibration rows of training text", lo=1)
    calib_len: int = param(128, "tokens per calibration row", lo=8)
    calib_batch: int = param(8, "rows per BLD step", lo=1)
    bld_steps: int = param(150, "Adam steps per candidate", lo=0)
    bld_lr: float = param(2e-3, "BLD learning rate", lo=1e-6, hi=1.0)

    def check(self):
        if 0.0 in self.ffn_fractions:
            raise ParamError(f"stage {self.STAGE}: ffn_fractions contains 0.0; remove the FFN with ffn_no_op instead")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): the parent's forward over the calibration rows, and
    every trainable variant's BLD steps (one layer's block each: across the layers, the whole model's size)."""
    attn = len(p.kv_factors) + p.attention_linear
    ffn = sum(f < 1.0 for f in p.ffn_fractions) + p.ffn_linear
    return Work(forward=p.calib_rows * p.calib_len, train=(attn + ffn) * p.bld_steps * p.calib_batch * p.calib_len)


def needs(p: Params) -> list[str]:
    """The earlier stages this stage reads."""
    return ["00_parent"]


def run(p: Params) -> dict:
    """Build, distill and save the library. Returns ``{"metrics", "rows"}`` (one row per candidate)."""
    stage.check_inputs(p, needs(p))
    stage.start(p)
    _, rows = build(p)
    trained = [r for r in rows if 1e-6 < r["loss_init"] < 0.999]  # no-op and parent variants train nothing
    metrics = {
        "candidates": len(rows),
        "layers": sorted({int(r["layer"]) for r in rows}),
        "mean_loss_init": sum(r["loss_init"] for r in trained) / max(1, len(trained)),
        "mean_loss_bld": sum(r["loss_bld"] for r in trained) / max(1, len(trained)),
        "improved_by_bld": sum(r["loss_bld"] < r["loss_init"] - 1e-9 for r in trained),
        "trainable": len(trained),
    }
    return {"metrics": metrics, "rows": rows}


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"candidates": 84, "trainable": 60, "mean_loss_init": 0.4, "mean_loss_bld": 0.2})
    '84 candidates; BLD loss 0.400 -> 0.200 (mean of 60 trained)'
    """
    return (f"{metrics['candidates']} candidates; BLD loss {metrics['mean_loss_init']:.3f} -> "
            f"{metrics['mean_loss_bld']:.3f} (mean of {metrics['trainable']} trained)")


def search_space(p: Params) -> SearchSpace:
    return SearchSpace(kv_factors=tuple(p.kv_factors) or None, attention_linear=p.attention_linear,
                       attention_no_op=p.attention_no_op, ffn_fractions=tuple(p.ffn_fractions),
                       ffn_linear=p.ffn_linear, ffn_no_op=p.ffn_no_op)


def build(p: Params):
    """Load the parent, make calibration batches, build, distill and save the library; return (library, rows)."""
    parent_dir = require(p.run_dir, "00_parent")
    model, tok = load_model(parent_dir / "model", p.setup_torch())
    batches = token_batches(tok, load_split(p.run_dir, "train"), rows=p.calib_rows, row_len=p.calib_len,
                            batch_size=p.calib_batch, seed=p.seed)
    batches = [b.to(next(model.parameters()).device) for b in batches]
    library = build_library(model, batches, search_space(p), layers=p.layers or None, steps=p.bld_steps,
                            lr=p.bld_lr, seed=p.seed, coupled=p.bld == "coupled", progress=p.progress)
    out = stage_dir(p.run_dir, NAME)
    save_library(library, out / "library")
    write_rows_csv(library.rows, out / "losses.csv")
    return library, library.rows
