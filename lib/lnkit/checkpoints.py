"""Which folder a stage name means, and saving and loading the models in it.

The one place that maps names to folders: ``<run_dir>/<stage>/`` is a stage's folder, complete once its
``_COMPLETE.json`` marker exists; ``<run_dir>/<stage>/model/`` is the model a stage hands on. Model
checkpoints are Hugging Face folders (safetensors, config, tokenizer) written atomically with a manifest
of checksums (:mod:`lnkit.io`), and verified before they load.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lnkit.model  # noqa: F401  (registers nemotron-nas with the Auto classes: Puzzle children load)
from lnkit.io import CheckpointError, atomic_dir, verify_checkpoint

MARKER = "_COMPLETE.json"


class StageNotComplete(FileNotFoundError):
    """An earlier stage a stage reads from has not completed in this run folder."""


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The folder of ``stage`` in a run (complete or not).

    >>> stage_dir("runs/tiny", "00_parent").as_posix()
    'runs/tiny/00_parent'
    """
    return Path(run_dir) / stage


def is_done(run_dir: str | Path, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / MARKER).is_file()


def require(run_dir: str | Path, stage: str) -> Path:
    """The folder of an earlier stage, which must be complete."""
    d = stage_dir(run_dir, stage)
    if not is_done(run_dir, stage):
        raise StageNotComplete(f"stage {stage} has not completed in {run_dir}: run it first "
                               f"(python -m lnkit.runs <run file> --until {stage})")
    return d


def stage_named(spec: str) -> str | None:
    """The stage a model or data ``spec`` names, by the pipeline's folder names (``NN_name``): the spec
    itself or its first path part; None for anything else (a folder of the user's, ``"reference"``).

    >>> stage_named("04_distillation"), stage_named("02_architecture_search/children/budget_0.40"), stage_named("/m")
    ('04_distillation', '02_architecture_search', None)
    """
    first = Path(spec.strip()).parts[0] if spec.strip() else ""
    return first if re.fullmatch(r"\d\d_[A-Za-z0-9_]+", first) else None


def names_stage(run_dir: str | Path, spec: str) -> bool:
    """Whether ``spec`` names a stage folder of the run (rather than a model folder or file)."""
    d = stage_dir(run_dir, spec)
    return (d / "model").is_dir() or (d / "params.json").is_file() or (d / MARKER).is_file()


def model_dir(run_dir: str | Path, spec: str) -> Path:
    """The model folder ``spec`` names: ``<run_dir>/<spec>/model`` for a stage (which must have completed),
    else ``spec`` itself (absolute, or relative to ``run_dir``), a folder holding a ``config.json``."""
    if names_stage(run_dir, spec):
        return require(run_dir, spec) / "model"
    for cand in (stage_dir(run_dir, spec), Path(spec)):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(f"no model for {spec!r}: neither a completed stage {stage_dir(run_dir, spec)} nor a "
                            f"model folder {spec} (a Hugging Face folder with config.json); run that stage first")


def save_model(model, tok, path: str | Path) -> None:
    """Hugging Face checkpoint (safetensors + tokenizer), written atomically with a manifest; a ``nemotron-nas``
    model also gets its modeling code and an ``auto_map`` (:mod:`lnkit.model.standalone`)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if getattr(model.config, "model_type", "") == "nemotron-nas":  # loads without lnkit, trust_remote_code=True
            from lnkit.model.standalone import write_remote_code

            write_remote_code(tmp)


def load_model(path: str | Path, device: str = "cpu"):
    """Load a checkpoint written by :func:`save_model`, or any local Hugging Face folder, in fp32.

    lnkit checkpoints are verified against their manifest first: a truncated or altered file is a
    :class:`~lnkit.io.CheckpointError` naming it.
    """
    path = Path(path)
    if (path / "manifest.json").exists() or not (path / "config.json").exists():
        verify_checkpoint(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None
    model.eval()
    return model, tok
